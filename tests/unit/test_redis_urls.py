"""Broker URLs (``brokers/redis/urls.py``): the three modes, their errors, redaction."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tidings.brokers.redis.urls import parse_url, redact_url
from timeouts import scaled


def test_single_primary_url() -> None:
    """redis:// names one host, its database and credentials."""
    target = parse_url("redis://user:s3cret@redis.internal:6380/2")
    assert (target.mode, target.hosts, target.db) == ("single", (("redis.internal", 6380),), 2)
    assert (target.username, target.password, target.tls) == ("user", "s3cret", False)
    assert "s3cret" not in target.safe and "s3cret" not in repr(target)


def test_unix_socket_url() -> None:
    """unix:// names a socket path and takes the database as a query option."""
    target = parse_url("unix:///run/redis.sock?db=3")
    assert (target.mode, target.path, target.db, target.hosts) == (
        "single",
        "/run/redis.sock",
        3,
        (),
    )


def test_cluster_url_lists_seeds() -> None:
    """redis+cluster:// takes several seeds, default port 6379, and TLS as rediss+cluster."""
    target = parse_url("rediss+cluster://:pw@a:7000,b,[::1]:7002?ssl_cert_reqs=none")
    assert target.mode == "cluster" and target.tls
    assert target.hosts == (("a", 7000), ("b", 6379), ("::1", 7002))
    assert target.tls_options == (("ssl_cert_reqs", "none"),)


def test_sentinel_url_names_the_service() -> None:
    """redis+sentinel:// lists sentinels (default port 26379), the service and a database."""
    target = parse_url("redis+sentinel://:p%40ss@s1:26380,s2/mymaster/4")
    assert target.mode == "sentinel"
    assert target.hosts == (("s1", 26380), ("s2", 26379))
    assert (target.service, target.db, target.password) == ("mymaster", 4, "p@ss")


def test_password_with_separators_is_parsed_and_redacted() -> None:
    """A password holding '/', ',' or ':' is not mistaken for hosts or a path."""
    url = "redis+cluster://u:a/b,c:d@h1:1,h2:2"
    target = parse_url(url)
    assert target.hosts == (("h1", 1), ("h2", 2)) and target.password == "a/b,c:d"
    assert redact_url(url) == "redis+cluster://u:***@h1:1,h2:2"
    assert target.safe == "redis+cluster://u:***@h1:1,h2:2"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://a:1/1", "only database 0"),
        ("redis://a,b", "use redis+cluster://"),
        ("redis+sentinel://s1", "needs /<service name>"),
        ("redis://h:99999", "port must be 1-65535"),
        ("redis://h:0", "port must be 1-65535"),
        ("redis://h?timeout=1", "unsupported URL option"),
        ("redis://h?ssl_cert_reqs=none", "needs a TLS scheme"),
        ("rediss://h?ssl_cert_reqs=maybe", "none, optional or required"),
        ("redis://", "no host"),
        ("redis://h/abc", "small non-negative number"),
        ("redis://h/1?db=2", "given twice"),
        ("redis+cluster://a,,b", "empty host"),
        ("redis+cluster://[::1", "unclosed"),
        ("unix://host/path", "names a path"),
        ("nats://h", "unsupported scheme"),
    ],
)
def test_malformed_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    """Each malformed URL gets a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("?", r"\?")):
        parse_url(f"{url}")


def test_many_hosts_are_refused() -> None:
    """A host list is bounded."""
    with pytest.raises(ValueError, match="more than 64"):
        parse_url("redis+cluster://" + ",".join(f"h{i}:1" for i in range(65)))


def test_errors_never_carry_the_password() -> None:
    """The message of a refused URL holds no part of its password."""
    with pytest.raises(ValueError) as info:
        parse_url("redis://user:topsecret@h:notaport/0")
    assert "topsecret" not in str(info.value)


def test_configuration_checks_urls_without_importing_redis() -> None:
    """Reading the configuration validates broker URLs and never imports redis-py."""
    code = (
        "import sys; import tidings.config as c, tidings.brokers.redis.urls; "
        "print('redis' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=scaled(30)
    )
    assert out.stdout.strip() == "False"
