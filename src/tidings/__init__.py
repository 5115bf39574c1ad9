"""Tidings: a real-time event gateway over WebSockets."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
