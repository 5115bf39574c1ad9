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

__all__ = ["Redactor", "configure_logging"]

_PATTERNS = (
    # token=... in URLs and query strings, up to a separator
    (re.compile(r"(?i)(token=)[^&\s\"'#]*"), r"\1[redacted]"),
    # Authorization headers
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1[redacted]"),
    # Anything that looks like a JWT or the start of one (base64url of '{"'), also when
    # percent-encoded (``%2E`` for the dots, as a client may send ``%74oken=...``).
    (re.compile(r"eyJ[A-Za-z0-9_%-]{6,}(?:(?:\.|%2[Ee])[A-Za-z0-9_%-]*){0,2}"), "[redacted-jwt]"),
)


class Redactor:
    """Removes tokens, bearer values and the given secrets from text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
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


def configure_logging(level: str = "info", fmt: str = "auto",
                      secrets: Iterable[str] = (), stream: object = None) -> logging.Handler:
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
