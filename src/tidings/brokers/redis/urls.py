"""Broker URLs: which Redis deployment to talk to, and how. Pure (no Redis import).

Three modes, one shape (``Target``):

* ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS; options
  ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``,
  ``ssl_check_hostname`` as query parameters, on every TLS scheme) and
  ``unix://[user:password@]/path/redis.sock[?db=N]``: one primary.
* ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` for
  TLS): Redis Cluster; the hosts are seeds, the topology is read from them.
* ``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/db]``
  (``rediss+sentinel://``: TLS to the data nodes): Sentinel; the hosts are sentinels and
  the primary of ``<service>`` is asked from them (again after every failover).

Credentials apply to the data nodes, and to the sentinels too. They never appear in
``Target.safe``, which is what log lines show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

# Re-exported: the one URL redactor lives with the log redaction.
from tidings.logs import redact_url

__all__ = ["Mode", "Target", "is_redis_url", "parse_url", "redact_url", "scheme_of"]

Mode = Literal["single", "cluster", "sentinel"]

_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"single": 6379, "cluster": 6379, "sentinel": 26379}
_MAX_HOSTS = 64
_TLS_OPTIONS = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the broker connects.

    ``hosts``: the primary (single), the seed nodes (cluster) or the sentinels; empty for
    a unix socket (``path``). ``service``: the Sentinel service name. ``db``: the
    database number (cluster: always 0).
    """

    mode: Mode
    hosts: tuple[tuple[str, int], ...] = ()
    path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    service: str | None = None
    safe: str = ""
    tls_options: tuple[tuple[str, str], ...] = ()


def scheme_of(url: str) -> str:
    """The scheme of ``url``, lower-cased ('' when there is none)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def is_redis_url(url: str) -> bool:
    """True when ``url`` names one of the Redis modes."""
    return scheme_of(url) in _SCHEMES


def parse_url(url: str) -> Target:
    """The ``Target`` of a broker URL; ``ValueError`` (with no secret in it) when malformed."""
    scheme = scheme_of(url)
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported scheme {scheme or '(none)'}://")
    mode, tls = _SCHEMES[scheme]
    rest = url.split("://", 1)[1]
    # Split off the userinfo first: a password may contain '/', '?', '#', ',' or ':'.
    authority_end = len(rest)
    for mark in "/?#":
        found = rest.find(mark, rest.rfind("@") + 1 if "@" in rest else 0)
        if found != -1:
            authority_end = min(authority_end, found)
    authority, tail = rest[:authority_end], rest[authority_end:]
    username = password = None
    if "@" in authority:
        userinfo, authority = authority.rsplit("@", 1)
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    safe = _safe(scheme, authority, tail, username, password)
    parts = urlsplit("x://h" + tail)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"db"} - _TLS_OPTIONS)
    if unknown:
        raise ValueError(f"unsupported URL option {unknown[0]!r}")
    tls_options = tuple(sorted((k, v) for k, v in query.items() if k in _TLS_OPTIONS))
    if tls_options and not tls:
        raise ValueError(f"{tls_options[0][0]} needs a TLS scheme (rediss)")
    for name, value in tls_options:
        if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
            raise ValueError("ssl_cert_reqs must be none, optional or required")
        if name == "ssl_check_hostname" and value not in ("true", "false"):
            raise ValueError("ssl_check_hostname must be true or false")
    if scheme == "unix":
        if authority:
            raise ValueError("a unix:// URL names a path, not a host")
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket path")
        return Target(
            "single",
            (),
            unquote(parts.path),
            False,
            username,
            password,
            _db(query.get("db", "0")),
            None,
            safe,
        )
    hosts = _hosts(authority, _DEFAULT_PORT[mode])
    segments = [unquote(s) for s in parts.path.split("/")[1:] if s != ""]
    if "db" in query and segments:
        raise ValueError("the database is given twice (path and ?db=)")
    service = None
    if mode == "sentinel":
        if not segments:
            raise ValueError("a redis+sentinel:// URL needs /<service name>")
        service, segments = segments[0], segments[1:]
    if mode == "single" and len(hosts) > 1:
        raise ValueError("a redis:// URL names one host; use redis+cluster:// for seeds")
    if len(segments) > 1:
        raise ValueError("unexpected path after the database number")
    db = _db(segments[0] if segments else query.get("db", "0"))
    if mode == "cluster" and db != 0:
        raise ValueError("Redis Cluster has only database 0")
    return Target(mode, hosts, None, tls, username, password, db, service, safe, tls_options)


def _safe(
    scheme: str, authority: str, tail: str, username: str | None, password: str | None
) -> str:
    user = username or ""
    userinfo = f"{user}:***@" if password is not None else (f"{user}@" if user else "")
    return f"{scheme}://{userinfo}{authority}{tail}"


def _hosts(authority: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not authority:
        raise ValueError("no host given")
    items = authority.split(",")
    if len(items) > _MAX_HOSTS:
        raise ValueError(f"more than {_MAX_HOSTS} hosts")
    hosts = []
    for item in items:
        host, port = _host(item.strip(), default_port)
        hosts.append((host, port))
    return tuple(dict.fromkeys(hosts))


def _host(item: str, default_port: int) -> tuple[str, int]:
    if not item:
        raise ValueError("an empty host in the host list")
    if item.startswith("["):  # [IPv6]:port
        end = item.find("]")
        if end == -1:
            raise ValueError("an unclosed [ in an IPv6 address")
        host, rest = item[1:end], item[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after the address in {item!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError(f"no host in {item!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1-65535 in {item!r}")
    return host, int(port_text)


def _db(text: str) -> int:
    if not text.isdigit() or len(text) > 6:
        raise ValueError("the database must be a small non-negative number")
    return int(text)
