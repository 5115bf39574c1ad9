"""The wire protocol's error and close codes (defined in ``tidings.codes``, which imports
nothing from tidings, so that ``tidings.errors`` can use them without an import circle)."""

from __future__ import annotations

from tidings.codes import CloseCode, ErrorCode, ReconnectAdvice

__all__ = ["CloseCode", "ErrorCode", "ReconnectAdvice"]
