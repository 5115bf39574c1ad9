"""Token verification: a JWT becomes an ``Identity`` or an ``Unauthorized`` error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Identity"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user_id: str
    expires_at: float
    #: Channel names and prefix patterns (ending in ``*``) from the channels claim.
    channels: tuple[str, ...] = ()
    #: The verified claims, as decoded.
    claims: Mapping[str, Any] = field(default_factory=dict)
