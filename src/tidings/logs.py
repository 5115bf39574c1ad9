"""Logging setup: JSON lines or text, with every token, key and secret redacted.

Redaction happens in the handler's formatter, so it covers library log lines too
(aiohttp logs request lines, ``token=`` and all, when it rejects them).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from urllib.parse import unquote_plus

__all__ = ["Redactor", "configure_logging", "redact_url"]

#: A ``name=value`` pair as in a query string. The value ends where the server's own
#: query parsing (``transport.websocket.token_from_request``) ends it: at ``&`` or ``#``,
#: and at what ends a URL inside a log line (whitespace, a quote). A name starts only
#: after a separator, so that the search stays linear on a long run without ``=``.
_PARAMETER = re.compile(r"(?:^|(?<=[\s&?#\"';,]))([^\s&?=#\"';,]+)=([^&\s\"'#]*)")

#: Rounds of percent-decoding applied to a parameter name; more than any client or proxy
#: layer would add, few enough to bound the work on a hostile name.
_NAME_DECODINGS = 3


def _is_token_name(name: str) -> bool:
    """Whether a parameter name, decoded like the server decodes it, names a token.

    The server percent-decodes names (``unquote_plus``), so ``tok%65n`` and ``%74oken``
    authenticate like ``token``; any case and any prefix (``refresh_token``) counts too,
    which redacts a little more than the server reads, never less.
    """
    for _ in range(_NAME_DECODINGS):
        if "%" not in name and "+" not in name:
            break
        name = unquote_plus(name)
    return name.lower().endswith("token")


def _redact_parameter(match: re.Match[str]) -> str:
    name = match.group(1)
    # Cheap test first: almost every access line has parameters, few have tokens.
    if ("oken" in name.lower() or "%" in name) and _is_token_name(name):
        return f"{name}=[redacted]"
    return match.group(0)


_PATTERNS = (
    # Authorization headers
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1[redacted]"),
    # Anything that looks like a JWT or the start of one (base64url of '{"'), also when
    # percent-encoded (``%2E`` for the dots, as a client may send ``%74oken=...``).
    (re.compile(r"eyJ[A-Za-z0-9_%-]{6,}(?:(?:\.|%2[Ee])[A-Za-z0-9_%-]*){0,2}"), "[redacted-jwt]"),
)


def redact_url(url: str) -> str:
    """``url`` for a log line: the password masked (``user:***@``), the query string and
    fragment dropped (they may carry keys); works on any string, parsable or not.

    The one URL redactor of the project (JWKS URLs, broker URLs): the userinfo ends at the
    last ``@``, because a password may hold ``/``, ``?``, ``#``, ``,`` or ``:``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, address = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:***@" if colon else f"{user}@"
    address = re.split(r"[?#]", address, maxsplit=1)[0]
    return f"{scheme}{sep}{userinfo}{address}"


class Redactor:
    """Removes tokens, bearer values and the given secrets from text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if "=" in text:
            text = _PARAMETER.sub(_redact_parameter, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


class _JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self._redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = self._redact(self.formatException(record.exc_info))
        # Redact the values, not the encoded line: a pattern applied after JSON escaping
        # could swallow an escape's backslash (breaking the line) or miss a secret whose
        # characters JSON escapes.
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def configure_logging(
    level: str = "info", fmt: str = "auto", secrets: Iterable[str] = (), stream: object = None
) -> logging.Handler:
    """Route every log line (the libraries' included) through one redacting handler."""
    out = stream if stream is not None else sys.stderr
    redact = Redactor(secrets)
    use_json = fmt == "json" or (fmt == "auto" and not getattr(out, "isatty", lambda: False)())
    handler = logging.StreamHandler(out)  # type: ignore[arg-type]
    handler.setFormatter(_JsonFormatter(redact) if use_json else _TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
