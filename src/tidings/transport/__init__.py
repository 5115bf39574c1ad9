"""WebSocket transport on aiohttp."""

from __future__ import annotations

from tidings.transport.websocket import WsConnection, websocket_handler

__all__ = ["WsConnection", "websocket_handler"]
