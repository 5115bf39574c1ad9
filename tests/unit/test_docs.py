"""The users' docs against the server they describe: the command-line table, the
development banner's sample, the client script's availability and the metrics table."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from paths import REPO
from tidings.cli import _banner, _build_parser
from tidings.metrics import Metrics
from tidings.server import DevCredentials

ROOT = REPO
DOCS = ROOT / "docs"


def _doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_command_line_table_lists_every_command() -> None:
    """docs/configuration.md's command-line table has a row for every ``tidings``
    sub-command the parser knows, listen and bench included."""
    parser = _build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    assert commands.choices is not None
    table = _section(_doc("configuration.md"), "## Command line")
    rows = re.findall(r"^\| `tidings (\w+)", table, re.MULTILINE)
    assert set(commands.choices) <= set(rows), (sorted(commands.choices), rows)


def test_banner_sample_shows_every_line_the_banner_prints() -> None:
    """Every labelled line of the development banner (Console included, as the console
    is on in development mode) is in docs/configuration.md's sample, in that order."""
    settings = SimpleNamespace(console_enabled=True)
    server: Any = SimpleNamespace(
        api_url="http://127.0.0.1:8000", ws_url="ws://127.0.0.1:8000/ws", settings=settings
    )
    banner = _banner(server, DevCredentials("s" * 43, "dev_key"), None)
    labels = [
        match.group(1)
        for match in re.finditer(r"^  ([A-Z][A-Za-z ]*?) {2,}\S", banner, re.MULTILINE)
    ]
    assert "Console" in labels and "Health" in labels, banner
    sample = _section(_doc("configuration.md"), "## Development and production mode")
    shown = [
        match.group(1)
        for match in re.finditer(r"^  ([A-Z][A-Za-z ]*?) {2,}\S", sample, re.MULTILINE)
    ]
    assert shown == labels, (shown, labels)


def test_client_js_docs_say_the_script_is_always_served() -> None:
    """docs/client-js.md does not tie /client/tidings.js to the console (the server serves
    it whatever console.enabled says; tests/test_console.py checks that)."""
    text = _doc("client-js.md")
    assert "`GET /client/tidings.js`, always served" in text
    assert not re.search(r"tidings\.js[^\n]*only (with|when) the console", text)


def test_metrics_table_lists_every_series_the_server_exposes() -> None:
    """Every metric family a server renders, and every per-worker family of --workers,
    is named in docs/server-api.md; it and docs/scaling.md say what /metrics covers
    with workers."""
    api = _doc("server-api.md")
    metrics = Metrics()
    metrics.broker_up.set(1)
    # _created series are the client library's, documented once for all counters.
    names = {
        family.name
        for family in text_string_to_metric_families(metrics.render().decode())
        if not family.name.endswith("_created")
    }
    source = (ROOT / "src" / "tidings" / "metrics.py").read_text(encoding="utf-8")
    names |= set(re.findall(r'"(tidings_worker_[a-z_]+)"', source))
    missing = []
    for name in sorted(names):
        documented = name in api or (
            name.startswith(("process_", "python_"))
            and ("`process_*`" in api and "`python_gc_*`" in api)
        )
        if not documented:
            missing.append(name)
    assert missing == []
    assert "### With `--workers`" in api
    assert "`/metrics` describes the whole server however many workers" in _section(
        _doc("scaling.md"), "## Workers on one machine"
    )
