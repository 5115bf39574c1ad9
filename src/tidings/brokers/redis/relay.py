"""Node-to-node requests with answers, over the control pub/sub channel (``NodeRelay``).

A request is JSON ``{"relay": "request", "node": <from>, "to": <node>, "req": <id>,
"body": {...}}``; its answer ``{"relay": "answer", "node": ..., "to": <from>, "req": ...,
"body": {...}}``. Every node receives every control message and acts only on those
addressed to it; the ``"relay"`` key comes first, so that ``is_relay`` is a prefix test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from tidings.errors import BrokerUnavailable

__all__ = ["MAX_IN_FLIGHT", "Relay", "is_relay"]

logger = logging.getLogger(__name__)

#: Requests a node may have waiting for answers, and requests it may be answering; past
#: either, ``request`` raises and an incoming request is answered 503 at once.
MAX_IN_FLIGHT = 256

_PREFIX = b'{"relay":'

Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


def is_relay(data: bytes) -> bool:
    """Whether a control message is a relay message (not a ``disconnect_user``)."""
    return data.startswith(_PREFIX)


class Relay:
    """This node's side of the relay; see the module docstring and ``NodeRelay``.

    ``publish`` sends one control message (raises ``BrokerUnavailable``); ``spawn`` runs
    an answer in a task the broker tracks and cancels on close.
    """

    def __init__(
        self,
        node_id: str,
        publish: Callable[[str], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None], str], object],
        timeout: float,
    ) -> None:
        self._node_id = node_id
        self._publish = publish
        self._spawn = spawn
        self._timeout = timeout
        self._handler: Handler | None = None
        self._waiting: dict[str, asyncio.Future[Mapping[str, Any]]] = {}
        self._answering = 0

    @property
    def node_id(self) -> str:
        return self._node_id

    def serve(self, handler: Handler) -> None:
        self._handler = handler

    async def request(self, node: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        if len(self._waiting) >= MAX_IN_FLIGHT:
            raise BrokerUnavailable("too many relayed requests in flight")
        req = secrets.token_hex(8)
        future: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[req] = future
        try:
            await self._publish(self._encode("request", node, req, body))
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            raise BrokerUnavailable(f"node {node} did not answer in time") from None
        finally:
            self._waiting.pop(req, None)

    def on_message(self, data: bytes) -> None:
        """A relay message from the control channel."""
        try:
            message = json.loads(data)
            kind, origin, to, req = (
                message["relay"],
                message["node"],
                message["to"],
                message["req"],
            )
            body = message["body"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed relay message")
            return
        if to != self._node_id or not isinstance(body, dict):
            return
        if kind == "answer":
            future = self._waiting.get(str(req))
            if future is not None and not future.done():
                future.set_result(body)
        elif kind == "request":
            if self._handler is None or self._answering >= MAX_IN_FLIGHT:
                busy = {
                    "status": 503,
                    "body": {"error": {"code": "unavailable", "message": "node busy; try again"}},
                }
                self._spawn(self._send_answer(str(origin), str(req), busy), "relay-busy")
                return
            self._answering += 1
            self._spawn(self._answer(self._handler, str(origin), str(req), body), "relay-answer")

    async def _answer(
        self, handler: Handler, origin: str, req: str, body: Mapping[str, Any]
    ) -> None:
        try:
            answer = await handler(body)
        except Exception:
            logger.exception("answering a relayed request failed")
            answer = {
                "status": 500,
                "body": {"error": {"code": "internal_error", "message": "internal server error"}},
            }
        finally:
            self._answering -= 1
        await self._send_answer(origin, req, answer)

    async def _send_answer(self, origin: str, req: str, answer: Mapping[str, Any]) -> None:
        try:
            await self._publish(self._encode("answer", origin, req, answer))
        except BrokerUnavailable as exc:
            # The requester times out and answers 503 itself.
            logger.warning("could not send a relay answer: %s", exc.message)

    def _encode(self, kind: str, to: str, req: str, body: Mapping[str, Any]) -> str:
        return json.dumps(
            {"relay": kind, "node": self._node_id, "to": to, "req": req, "body": body},
            separators=(",", ":"),
        )
