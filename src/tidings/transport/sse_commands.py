"""``POST <sse_path>/commands``: the commands of an SSE session, on whichever node.

Body ``{"session": <connection_id>, "command": {...}}``, the command exactly as it would
be sent over the WebSocket; the credential is a valid token of the session's user
(``Authorization: Bearer``, or ``?token=``). The command's replies come on the session's
stream, as over the WebSocket; the POST answers ``202 {"status": "accepted"}`` once the
command has been handled (its replies are written by then).

Session ids of a node whose broker can relay (``NodeRelay``) end in ``.<node id>``: a
POST that lands on another node is verified there and relayed to the session's node,
whose answer it returns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from tidings.brokers.base import NodeRelay
from tidings.codes import ErrorCode
from tidings.errors import BrokerUnavailable, InvalidRequest, Unauthorized
from tidings.ports import ConnectionHost
from tidings.protocol import dumps, loads
from tidings.session import StartSubscribe
from tidings.transport.sse import MAX_QUEUED_COMMANDS, SsePeer, cors_headers, json_error
from tidings.transport.websocket import origin_allowed, token_from_request

__all__ = ["SseCommands"]

logger = logging.getLogger(__name__)

#: A session id as ``sse.sse_handler`` makes them: a connection id, then the node's.
_SESSION_ID = re.compile(r"c_[0-9a-f]{24}(?:\.([0-9A-Za-z_-]{1,64}))?")

#: Bytes a body may have beyond the command itself (the session id and the JSON around).
_BODY_OVERHEAD = 1024

Reply = tuple[int, dict[str, Any]]


def _error(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class SseCommands:
    """The POST handler, the CORS preflight, and the answer to relayed commands."""

    def __init__(self, gateway: ConnectionHost, relay: NodeRelay | None) -> None:
        self._gateway = gateway
        self._relay = relay
        self._node = relay.node_id if relay is not None else None
        self._max_body = gateway.settings.limits.max_message_bytes + _BODY_OVERHEAD

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        allowed = self._gateway.settings.server.allowed_origins
        if allowed and not origin_allowed(request.headers.get("Origin"), allowed):
            return json_error(403, ErrorCode.FORBIDDEN, "origin not allowed")
        headers = {
            **cors_headers(request, allowed),
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        }
        return web.Response(status=204, headers=headers)

    async def post(self, request: web.Request) -> web.StreamResponse:
        allowed = self._gateway.settings.server.allowed_origins
        if allowed and not origin_allowed(request.headers.get("Origin"), allowed):
            return json_error(403, ErrorCode.FORBIDDEN, "origin not allowed")
        cors = cors_headers(request, allowed)
        status, body = await self._post(request)
        response = web.Response(body=dumps(body), status=status, content_type="application/json")
        response.headers.update(cors)
        return response

    async def _post(self, request: web.Request) -> Reply:
        length = request.content_length
        if length is not None and length > self._max_body:
            return 413, _error(ErrorCode.PAYLOAD_TOO_LARGE, f"body over {self._max_body} bytes")
        raw = await request.content.read(self._max_body + 1)
        if len(raw) > self._max_body:
            return 413, _error(ErrorCode.PAYLOAD_TOO_LARGE, f"body over {self._max_body} bytes")
        try:
            message = loads(raw)
        except InvalidRequest as exc:
            return 400, _error(ErrorCode.INVALID_REQUEST, exc.message)
        session_id = message.get("session") if isinstance(message, dict) else None
        command = message.get("command") if isinstance(message, dict) else None
        if not isinstance(session_id, str) or not isinstance(command, dict):
            return 400, _error(
                ErrorCode.INVALID_REQUEST, 'body must be {"session": id, "command": {...}}'
            )
        located = _SESSION_ID.fullmatch(session_id)
        if located is None:
            return 400, _error(ErrorCode.INVALID_REQUEST, "not a session id")
        try:
            identity = await self._gateway.authenticate(token_from_request(request))
        except Unauthorized as exc:
            logger.info("SSE command rejected: %s", exc.message)
            return 401, _error(ErrorCode.UNAUTHORIZED, exc.message)
        user_id = identity.user_id
        command_raw = dumps(command)
        node = located.group(1)
        peer = self._gateway.peer(session_id)
        if isinstance(peer, SsePeer) or node is None or node == self._node:
            return await self._run(peer, user_id, command_raw)
        if self._relay is None:
            return 404, _error(ErrorCode.NOT_FOUND, "no such session")
        try:
            reply = await self._relay.request(
                node, {"session": session_id, "user": user_id, "command": command}
            )
        except BrokerUnavailable as exc:
            logger.warning("relaying an SSE command failed: %s", exc.message)
            return 503, _error(ErrorCode.UNAVAILABLE, "the session's node cannot be reached")
        return _checked_reply(reply)

    async def answer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Handle a command another node relayed: ``{"status", "body"}``."""
        session_id, user_id, command = body.get("session"), body.get("user"), body.get("command")
        if not (
            isinstance(session_id, str) and isinstance(user_id, str) and isinstance(command, dict)
        ):
            return {"status": 400, "body": _error(ErrorCode.INVALID_REQUEST, "malformed relay")}
        status, reply = await self._run(self._gateway.peer(session_id), user_id, dumps(command))
        return {"status": status, "body": reply}

    async def _run(self, peer: object, user_id: str, command: bytes) -> Reply:
        """Handle ``command`` on the local session ``peer`` (None or another kind of
        connection: no such session) for ``user_id``."""
        if not isinstance(peer, SsePeer) or peer.done.is_set():
            return 404, _error(ErrorCode.NOT_FOUND, "no such session")
        if peer.user_id != user_id:
            return 403, _error(ErrorCode.FORBIDDEN, "the credential is for another user")
        if peer.queued >= MAX_QUEUED_COMMANDS:
            return 429, _error(ErrorCode.RATE_LIMITED, "too many commands waiting for this session")
        peer.queued += 1
        try:
            async with peer.commands:
                if peer.done.is_set():
                    return 404, _error(ErrorCode.NOT_FOUND, "no such session")
                gateway = self._gateway
                effects = peer.session.receive_text(command, gateway.clock())
                for effect in effects:
                    if isinstance(effect, StartSubscribe) and effect.command.recover:
                        recover = effect.command.recover
                        peer.encoder.seed(effect.command.channel, recover.offset, recover.epoch)
                if effects:
                    await gateway.handle(peer, effects)
        finally:
            peer.queued -= 1
        return 202, {"status": "accepted"}


def _checked_reply(reply: Mapping[str, Any]) -> Reply:
    """A relayed answer, as the POST's answer (a malformed one is a 502)."""
    status, body = reply.get("status"), reply.get("body")
    if type(status) is not int or not 200 <= status < 600 or not isinstance(body, dict):
        return 502, _error(ErrorCode.INTERNAL_ERROR, "the session's node answered garbage")
    return status, body
