"""Unit tests for tidings.logs: redaction of tokens and secrets, and the log line formats."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tidings.logs import Redactor, configure_logging

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLTEiLCJleHAiOjE4MDAwMDAwMDB9"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)
TRUNCATED_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIi"
TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger (and the library logger used here) back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    library = logging.getLogger("aiohttp.server")
    saved = (library.level, library.propagate, library.disabled)
    library.setLevel(logging.NOTSET)
    library.propagate = True
    library.disabled = False
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        library.level, library.propagate, library.disabled = saved


class TtyStream(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written to ``stream``, each parsed as one JSON object."""
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all(isinstance(entry, dict) for entry in parsed)
    return parsed


# -- Redactor -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("GET /ws?token=SECRETVALUE&client=web HTTP/1.1", ["GET /ws?", "&client=web HTTP/1.1"]),
        ("GET /ws?client=web&token=SECRETVALUE HTTP/1.1", ["GET /ws?client=web&", " HTTP/1.1"]),
        ("GET /ws?client=web&token=SECRETVALUE", ["GET /ws?client=web&"]),
        ("wss://h/ws?TOKEN=SECRETVALUE#frag", ["wss://h/ws?", "#frag"]),
        ("'/ws?token=SECRETVALUE'", ["'/ws?", "'"]),
        ('"/ws?token=SECRETVALUE"', ['"/ws?', '"']),
        ("refresh_token=SECRETVALUE&x=1", ["&x=1"]),
    ],
)
def test_redacts_token_query_parameter(text: str, kept: list[str]) -> None:
    """token=... is removed from URLs, in the middle or at the end, keeping the rest."""
    out = Redactor()(text)
    assert "SECRETVALUE" not in out
    assert "[redacted]" in out
    for part in kept:
        assert part in out


def test_redacts_jwt_in_query() -> None:
    """A real JWT in a query string leaves no part of itself behind."""
    out = Redactor()(f"GET /ws?token={JWT}&v=1 HTTP/1.1")
    for part in JWT.split("."):
        assert part not in out
    assert out.endswith("&v=1 HTTP/1.1")


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer xyz-123.abc",
        "authorization: bearer xyz-123.abc",
        "headers={'Authorization': 'Bearer xyz-123.abc'}",
        "BEARER   xyz-123.abc, next",
    ],
)
def test_redacts_bearer_values(text: str) -> None:
    """Bearer credentials are removed whatever their case or surroundings."""
    out = Redactor()(text)
    assert "xyz-123" not in out
    assert "abc" not in out.replace("[redacted]", "")


@pytest.mark.parametrize(
    "jwt",
    [JWT, TRUNCATED_JWT, "eyJhbGciOiJIUz", JWT + "==", JWT.rsplit(".", 1)[0] + "."],
)
def test_redacts_jwt_looking_strings(jwt: str) -> None:
    """Full and truncated JWTs anywhere in a line are removed, down to their first segment."""
    out = Redactor()(f"could not verify {jwt} for user")
    assert "eyJ" not in out
    for part in jwt.split("."):
        if len(part) >= 6:
            assert part not in out
    assert out.startswith("could not verify ")
    assert out.endswith(" for user")


def test_redacts_explicit_secrets() -> None:
    """Secrets given to the Redactor are removed wherever they appear."""
    redact = Redactor(["my-api-key-0123", "hmac-secret-xyz"])
    out = redact("key=my-api-key-0123 secret hmac-secret-xyz and again my-api-key-0123")
    assert "my-api-key-0123" not in out
    assert "hmac-secret-xyz" not in out
    assert out.count("[redacted]") == 3


def test_longer_secret_redacted_whole() -> None:
    """When one secret contains another, the longer one is removed whole first."""
    out = Redactor(["abcd", "abcdefgh"])("x abcdefgh y")
    assert out == "x [redacted] y"


def test_tiny_secrets_are_ignored() -> None:
    """Secrets shorter than 4 characters are not used (they would redact everything)."""
    assert Redactor(["", "a", "ab", "abc"])("a cab abc") == "a cab abc"


def test_plain_text_untouched() -> None:
    """Text without tokens or secrets comes out unchanged."""
    text = "subscribed user-1 to news:daily (eyJ is a prefix, tokens=3)"
    assert Redactor(["zzzz-secret"])(text) == text


# -- configure_logging --------------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
def test_json_lines() -> None:
    """In json mode each record is one JSON object per line with ts, level, logger and msg."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("tidings.test").info("first %s", "line")
    logging.getLogger("tidings.test").warning("second\nline")
    entries = lines(stream)
    assert len(entries) == 2
    first, second = entries
    assert TS.fullmatch(first["ts"])
    assert first["level"] == "info"
    assert first["logger"] == "tidings.test"
    assert first["msg"] == "first line"
    assert second["level"] == "warning"
    assert second["msg"] == "second\nline"


@pytest.mark.usefixtures("restore_logging")
def test_level_filters() -> None:
    """Records below the configured level are not written."""
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    logging.getLogger("tidings.test").info("hidden")
    logging.getLogger("tidings.test").error("shown")
    assert [entry["msg"] for entry in lines(stream)] == ["shown"]
    assert logging.getLogger().level == logging.WARNING


@pytest.mark.usefixtures("restore_logging")
def test_library_logger_is_redacted() -> None:
    """A library logger's message is redacted too (aiohttp logs rejected request lines)."""
    stream = io.StringIO()
    configure_logging("debug", "json", secrets=["api-key-0123456789"], stream=stream)
    logging.getLogger("aiohttp.server").error(
        "Error handling request GET /ws?token=%s&x=1 key=%s auth=Bearer %s",
        JWT,
        "api-key-0123456789",
        "opaque-bearer-value",
    )
    (entry,) = lines(stream)
    assert entry["logger"] == "aiohttp.server"
    assert entry["level"] == "error"
    raw = stream.getvalue()
    for part in (*JWT.split("."), "api-key-0123456789", "opaque-bearer-value"):
        assert part not in raw
    assert "&x=1" in entry["msg"]


@pytest.mark.usefixtures("restore_logging")
def test_exception_is_redacted() -> None:
    """Exception tracebacks are included and redacted."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        raise ValueError(f"bad token {TRUNCATED_JWT}")
    except ValueError:
        logging.getLogger("tidings.test").exception("failed")
    (entry,) = lines(stream)
    assert entry["msg"] == "failed"
    assert "ValueError" in entry["exc"]
    assert TRUNCATED_JWT not in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_json_stays_valid_around_redaction() -> None:
    """Redaction never breaks a JSON line, even next to quotes and backslashes."""
    stream = io.StringIO()
    configure_logging("info", "json", secrets=['k"ey\\with-quote'], stream=stream)
    log = logging.getLogger("tidings.test")
    log.info('url="/ws?token=abc" done')
    log.info('header "Authorization: Bearer zzz-value" done')
    log.info('secret k"ey\\with-quote done')
    log.info("path C:\\dir\\token=abc\\x")
    entries = lines(stream)  # every line parses
    assert len(entries) == 4
    assert "abc" not in entries[0]["msg"]
    assert entries[0]["msg"].endswith('" done')
    assert "zzz-value" not in entries[1]["msg"]
    assert 'k"ey' not in entries[2]["msg"]
    assert entries[2]["msg"] == "secret [redacted] done"
    assert "abc" not in entries[3]["msg"]


@pytest.mark.usefixtures("restore_logging")
def test_text_format_is_redacted() -> None:
    """Text mode writes one readable line per record, redacted."""
    stream = io.StringIO()
    configure_logging("info", "text", secrets=["text-secret-value"], stream=stream)
    logging.getLogger("aiohttp.access").info("GET /ws?token=abcdef HTTP/1.1 text-secret-value")
    out = stream.getvalue()
    assert out.count("\n") == 1
    assert "aiohttp.access" in out
    assert "INFO" in out
    assert "abcdef" not in out
    assert "text-secret-value" not in out
    with pytest.raises(ValueError):
        json.loads(out)


@pytest.mark.usefixtures("restore_logging")
def test_auto_format_follows_terminal() -> None:
    """auto picks text on a terminal and JSON lines otherwise."""
    piped = io.StringIO()
    configure_logging("info", "auto", stream=piped)
    logging.getLogger("tidings.test").info("piped")
    assert lines(piped)[0]["msg"] == "piped"

    tty = TtyStream()
    configure_logging("info", "auto", stream=tty)
    logging.getLogger("tidings.test").info("terminal")
    assert tty.getvalue().rstrip().endswith("tidings.test: terminal")
    assert "piped" not in tty.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_configure_replaces_handlers() -> None:
    """configure_logging leaves exactly one root handler, the one it returns."""
    first = io.StringIO()
    configure_logging("info", "json", stream=first)
    second = io.StringIO()
    handler = configure_logging("info", "json", stream=second)
    assert logging.getLogger().handlers == [handler]
    logging.getLogger("tidings.test").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_redactor_catches_percent_encoded_tokens() -> None:
    """A token whose parameter name and dots are percent-encoded is still redacted."""
    line = "GET /ws?%74oken=eyJhbGciOiJIUzI1NiJ9%2EeyJzdWIiOiJhIn0%2Esig-part HTTP/1.1"
    cleaned = Redactor()(line)
    assert "eyJ" not in cleaned and "sig-part" not in cleaned
