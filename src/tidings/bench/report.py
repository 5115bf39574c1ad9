"""``tidings bench``'s results: a figure's runs summarised, the targets checked, the JSON
report and the plain-text table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from tidings import __version__
from tidings.bench import publishing, scenarios
from tidings.bench.plan import Figure, Plan
from tidings.bench.system import Pinning, machine_info

__all__ = ["TARGETS", "build_report", "fmt", "render_table", "summarise"]

#: Targets of the issue, as ratios to the floor or absolute figures.
TARGETS = {
    "fanout_ratio": 0.80,
    "latency_p99_ms": 15.0,
    "latency_p99_ratio": 1.5,
    "memory_kb": 16.0,
    "handshake_ratio": 0.75,
}

#: Secondary figures summarised (median, min, max) next to a run's main value.
_EXTRA_KEYS = (
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "sampled_p50_ms",
    "sampled_p99_ms",
    "deliveries_per_s",
    "handshakes_per_s",
)
#: Rows shown for a latency figure: (key, label suffix).
_LATENCY_ROWS = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def summarise(runs: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    values = [run["value"] for run in runs if run.get("value") is not None]
    summary: dict[str, Any] = {"runs": runs, "errors": errors}
    if values:
        summary.update(median=statistics.median(values), min=min(values), max=max(values))
    else:
        summary.update(median=None, min=None, max=None)
    summary["lower_bound"] = any(run.get("lower_bound") for run in runs)
    summary["gen_cpu_max"] = max((run.get("gen_cpu", 0.0) for run in runs), default=None)
    cpus = [run["server_cpu"] for run in runs if run.get("server_cpu") is not None]
    summary["server_cpu_median"] = statistics.median(cpus) if cpus else None
    if any(run.get("saturated") for run in runs):
        summary["saturated"] = True
    if any(run.get("noisy") for run in runs):
        summary["noisy"] = True
    extra = {}
    for key in _EXTRA_KEYS:
        found = [run[key] for run in runs if run.get(key) is not None]
        if found:
            extra[key] = {"median": statistics.median(found), "min": min(found), "max": max(found)}
    if extra:
        summary["extra"] = extra
    return summary


def fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and unit in ("ms", "KB", "ratio", "µs/publish"):
        return f"{value:,.2f}" if value < 100 else f"{value:,.1f}"
    return f"{value:,.0f}"


def _ratio(figure: Figure, name: str) -> float | None:
    floor = figure.servers.get("floor", {}).get("median")
    mine = figure.servers.get(name, {}).get("median")
    if not floor or mine is None:
        return None
    return round(float(mine) / float(floor), 3)


def _targets(figures: Sequence[Figure]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for figure in figures:
        tidings = figure.servers.get("tidings", {})
        value = tidings.get("median")
        if value is None:
            continue
        ratio = _ratio(figure, "tidings")
        if figure.scenario == "fanout" and ratio is not None:
            checks.append(
                {
                    "figure": figure.label,
                    "target": ">= 80% of the floor",
                    "value": ratio,
                    "met": ratio >= TARGETS["fanout_ratio"],
                }
            )
        elif figure.scenario == "latency" and figure.params["rate"] == 100:
            checks.append(
                {
                    "figure": figure.label,
                    "target": "p99 <= 15 ms",
                    "value": value,
                    "met": value <= TARGETS["latency_p99_ms"],
                }
            )
            if ratio is not None:
                checks.append(
                    {
                        "figure": figure.label,
                        "target": "p99 <= 1.5x the floor",
                        "value": ratio,
                        "met": ratio <= TARGETS["latency_p99_ratio"],
                    }
                )
        elif figure.scenario == "memory":
            checks.append(
                {
                    "figure": figure.label,
                    "target": "<= 16 KB per connection",
                    "value": value,
                    "met": value <= TARGETS["memory_kb"],
                }
            )
        elif figure.scenario == "publish_ratio" and figure.params.get("target"):
            checks.append(
                {
                    "figure": figure.label,
                    "target": f">= {publishing.TARGET_RATIO} of the memory broker",
                    "value": value,
                    "met": value >= publishing.TARGET_RATIO,
                }
            )
        elif figure.scenario == "handshake" and ratio is not None:
            checks.append(
                {
                    "figure": figure.label,
                    "target": ">= 75% of the floor",
                    "value": ratio,
                    "met": ratio >= TARGETS["handshake_ratio"],
                }
            )
    return checks


def build_report(
    plan: Plan, pinning: Pinning, figures: Sequence[Figure], skipped: dict[str, str], started: float
) -> dict[str, Any]:
    return {
        "tidings_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_info(pinning),
        "config": {
            "runs": plan.runs,
            "servers": [kind.name for kind in plan.kinds],
            "scenarios": plan.scenarios,
            "fanout_subscribers": plan.subscribers,
            "fanout_seconds": plan.seconds,
            "fanout_events": plan.events,
            "latency_subscribers": plan.latency_subscribers,
            "latency_rates": plan.latency_rates,
            "latency_seconds": plan.latency_seconds,
            "memory_connections": plan.memory_connections,
            "handshakes": plan.handshakes,
            "handshake_concurrency": plan.handshake_concurrency,
            "quiet_wait": plan.quiet_wait,
            "max_foreign": plan.max_foreign,
            "generator_bottleneck_percent": scenarios.GEN_BOTTLENECK_PERCENT,
        },
        "results": [
            {
                "scenario": figure.scenario,
                "label": figure.label,
                "metric": figure.metric,
                "unit": figure.unit,
                "better": figure.better,
                "params": figure.params,
                "servers": figure.servers,
                "note": figure.note,
                "ratio_vs_floor": {
                    name: _ratio(figure, name)
                    for name in figure.servers
                    if name != "floor" and "floor" in figure.servers
                },
            }
            for figure in figures
        ],
        "targets": _targets(figures),
        "skipped": skipped,
    }


def _cell(summary: dict[str, Any], unit: str) -> str:
    median = summary.get("median")
    if median is None:
        return "failed" if summary.get("errors") else "-"
    text = f"{fmt(median, unit)} [{fmt(summary['min'], unit)}-{fmt(summary['max'], unit)}]"
    if summary.get("lower_bound"):
        text = ">=" + text
    if summary.get("saturated"):
        text += " SAT"
    if summary.get("noisy"):
        text += " *"
    return text


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.4f}"


def render_table(report: dict[str, Any]) -> str:
    """The results as a plain-text table: median [min-max] per server, ratios to the floor."""
    servers: list[str] = report["config"]["servers"]
    header = ["figure", "unit", *[f"{name} median [min-max]" for name in servers]]
    if "floor" in servers:
        header += [f"{name}/floor" for name in servers if name != "floor"]
    header += ["gen CPU max %", "server CPU %"]
    rows = [header]
    for result in report["results"]:
        unit = result["unit"]
        views: list[tuple[str, dict[str, dict[str, Any]]]]
        if result["scenario"] in ("latency", "redis_latency"):
            views = []
            for key, suffix in _LATENCY_ROWS:
                per_server = {}
                for name, summary in result["servers"].items():
                    view = dict(summary.get("extra", {}).get(key, {"median": None}))
                    view.update(
                        lower_bound=summary.get("lower_bound"),
                        noisy=summary.get("noisy"),
                        saturated=summary.get("saturated"),
                        errors=summary.get("errors"),
                    )
                    per_server[name] = view
                views.append((f"{result['label']} {suffix}", per_server))
        else:
            views = [(result["label"], result["servers"])]
        for label, per_server in views:
            row = [label, unit]
            row += [_cell(per_server.get(name, {}), unit) for name in servers]
            if "floor" in servers:
                floor = per_server.get("floor", {}).get("median")
                for name in servers:
                    if name == "floor":
                        continue
                    mine = per_server.get(name, {}).get("median")
                    row.append(_ratio_text(mine / floor) if floor and mine is not None else "-")
            gen = [
                result["servers"][n].get("gen_cpu_max")
                for n in servers
                if result["servers"].get(n, {}).get("gen_cpu_max") is not None
            ]
            cpu = [
                f"{result['servers'][n]['server_cpu_median']:.0f}"
                for n in servers
                if result["servers"].get(n, {}).get("server_cpu_median") is not None
            ]
            row.append(f"{max(gen):.0f}" if gen else "-")
            row.append("/".join(cpu) if cpu else "-")
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    if any(s.get("lower_bound") for r in report["results"] for s in r["servers"].values()):
        notes.append(">= : the load generator used > 90% of its core: a lower bound")
    if any(s.get("saturated") for r in report["results"] for s in r["servers"].values()):
        notes.append(
            "SAT: the server could not keep up with the offered rate (events lost, "
            "or p50 > 1 s, or the publisher fell behind)"
        )
    if any(s.get("noisy") for r in report["results"] for s in r["servers"].values()):
        notes.append(
            "*  : other processes of the machine used more than "
            f"{report['config']['max_foreign']:g}% of a core during a kept run"
        )
    notes.append("server CPU %: median per server, in the order of the columns")
    for note in dict.fromkeys(r["note"] for r in report["results"] if r.get("note")):
        notes.append(note)
    for check in report["targets"]:
        mark = "met" if check["met"] else "MISSED"
        notes.append(f"target {check['figure']}: {check['target']}: {check['value']} -> {mark}")
    for name, why in report["skipped"].items():
        notes.append(f"skipped {name}: {why}")
    machine = report["machine"]
    title = (
        f"tidings bench {report['tidings_version']}, {report['config']['runs']} run(s), "
        f"{machine['cpu_model']} x{machine['cpus']}, Python {machine['python']}, "
        f"pinning {machine['pinning']['method']}"
    )
    return "\n".join([title, "", *lines, "", *notes])
