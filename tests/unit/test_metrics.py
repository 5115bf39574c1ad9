"""Unit tests for tidings.metrics: names, labels and separate registries per instance."""

from __future__ import annotations

import re
import sys

from prometheus_client.parser import text_string_to_metric_families

from tidings import __version__
from tidings.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered text, keyed by name and sorted labels."""
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_render_is_prometheus_text() -> None:
    """render() returns Prometheus text exposition with the matching content type."""
    metrics = Metrics()
    text = metrics.render().decode()
    assert metrics.content_type.startswith("text/plain")
    for name in (
        "tidings_connections",
        "tidings_subscriptions",
        "tidings_slow_consumer_closes_total",
    ):
        assert name in text
    assert "# TYPE tidings_connections gauge" in text
    assert re.search(r"^# TYPE tidings_events_published(_total)? counter$", text, re.M)
    assert "# TYPE tidings_command_seconds histogram" in text


def test_counters_with_labels() -> None:
    """Counter calls show up under their names with bounded labels."""
    metrics = Metrics()
    metrics.published("notification")
    metrics.published("notification", 2)
    metrics.published("chat_message")
    metrics.delivered("notification", 5)
    metrics.error("rate_limited")
    metrics.error("rate_limited")
    metrics.closed(4429)
    metrics.closed(1000)
    metrics.handshakes.labels("ok").inc()
    metrics.slow_consumer_closes.inc()
    metrics.request_head_timeouts.inc()
    values = samples(metrics)
    assert values[("tidings_events_published_total", (("type", "notification"),))] == 3
    assert values[("tidings_events_published_total", (("type", "chat_message"),))] == 1
    assert values[("tidings_events_delivered_total", (("type", "notification"),))] == 5
    assert values[("tidings_errors_total", (("code", "rate_limited"),))] == 2
    assert values[("tidings_closes_total", (("code", "4429"),))] == 1
    assert values[("tidings_closes_total", (("code", "1000"),))] == 1
    assert values[("tidings_handshakes_total", (("outcome", "ok"),))] == 1
    assert values[("tidings_slow_consumer_closes_total", ())] == 1
    assert values[("tidings_request_head_timeouts_total", ())] == 1
    text = metrics.render().decode()
    assert 'tidings_events_published_total{type="notification"} 3.0' in text
    assert 'tidings_closes_total{code="4429"} 1.0' in text


def test_gauges() -> None:
    """Connection and subscription gauges go up and down."""
    metrics = Metrics()
    metrics.connections.inc()
    metrics.connections.inc()
    metrics.connections.dec()
    metrics.subscriptions.set(7)
    values = samples(metrics)
    assert values[("tidings_connections", ())] == 1
    assert values[("tidings_subscriptions", ())] == 7


def test_command_latency_histogram() -> None:
    """Command timings land in the histogram buckets labelled by command name."""
    metrics = Metrics()
    metrics.command("subscribe", 0.003)
    metrics.command("subscribe", 0.2)
    metrics.command("ping", 0.0001)
    values = samples(metrics)
    assert values[("tidings_command_seconds_count", (("command", "subscribe"),))] == 2
    assert abs(values[("tidings_command_seconds_sum", (("command", "subscribe"),))] - 0.203) < 1e-9
    assert (
        values[("tidings_command_seconds_bucket", (("command", "subscribe"), ("le", "0.005")))] == 1
    )
    assert (
        values[("tidings_command_seconds_bucket", (("command", "subscribe"), ("le", "0.25")))] == 2
    )
    assert (
        values[("tidings_command_seconds_bucket", (("command", "subscribe"), ("le", "+Inf")))] == 2
    )
    assert values[("tidings_command_seconds_bucket", (("command", "ping"), ("le", "0.0005")))] == 1


def test_instances_have_separate_registries() -> None:
    """Two Metrics objects do not clash and do not share values."""
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    first.published("notification", 4)
    first.connections.inc()
    second.published("notification", 1)
    assert samples(first)[("tidings_events_published_total", (("type", "notification"),))] == 4
    assert samples(second)[("tidings_events_published_total", (("type", "notification"),))] == 1
    assert samples(second)[("tidings_connections", ())] == 0
    third = Metrics()
    assert ("tidings_events_published_total", (("type", "notification"),)) not in samples(third)


def test_no_default_registry_pollution() -> None:
    """Metrics are not registered in prometheus_client's global registry."""
    from prometheus_client import REGISTRY, generate_latest

    Metrics().published("notification")
    assert b"tidings_" not in generate_latest(REGISTRY)


def test_operator_series_in_one_process() -> None:
    """One process exposes process_* and python_* series, the build info and the
    broker-health gauge, and the publish and fan-out histograms."""
    metrics = Metrics()
    metrics.broker_up.set(1)
    values = samples(metrics)
    assert values[("tidings_build_info", (("version", __version__),))] == 1
    assert values[("tidings_broker_up", ())] == 1
    assert ("python_gc_collections_total", (("generation", "0"),)) in values
    assert any(name == "python_info" for name, _ in values)
    assert values[("tidings_publish_seconds_count", ())] == 0
    assert values[("tidings_fanout_seconds_count", ())] == 0
    if sys.platform.startswith("linux"):  # the client library reads /proc
        assert values[("process_resident_memory_bytes", ())] > 0
        assert values[("process_open_fds", ())] > 0
        assert ("process_cpu_seconds_total", ()) in values


def test_counts_are_read_at_scrape_time_in_one_process() -> None:
    """bind_counts reads the two gauges from the functions when scraped; the returned
    callable has nothing to do."""
    metrics = Metrics()
    counts = {"connections": 2, "subscriptions": 5}
    changed = metrics.bind_counts(lambda: counts["connections"], lambda: counts["subscriptions"])
    assert samples(metrics)[("tidings_connections", ())] == 2
    counts["connections"] = 3
    changed()
    values = samples(metrics)
    assert values[("tidings_connections", ())] == 3
    assert values[("tidings_subscriptions", ())] == 5
