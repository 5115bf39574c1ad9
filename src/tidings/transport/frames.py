"""Client frames must be masked (RFC 6455 section 5.1): the one rule of that section that
aiohttp's frame reader leaves out, added by reading frame headers from the byte stream
before aiohttp parses it.

This extends private parts of aiohttp (its compiled reader, ``_post_start``), which is
why pyproject.toml takes aiohttp minor versions only once the tests pass on them.
"""

from __future__ import annotations

from aiohttp import WebSocketError, WSCloseCode, hdrs, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.http_websocket import WebSocketWriter
from multidict import CIMultiDict

from tidings.protocol.deflate import negotiate

__all__ = ["MaskCheckingReader", "MaskCheckingResponse"]


#: aiohttp's own parse, called without ``super()`` on the per-read path.
_feed = WebSocketReader.feed_data


class MaskCheckingReader(WebSocketReader):
    """aiohttp's frame reader plus the rule it leaves out: a server must fail the
    connection with 1002 on a client frame that is not masked (RFC 6455 section 5.1).

    Frame headers are read from the raw byte stream before aiohttp parses it: the first
    two to ten bytes of each frame, the mask key and payload skipped by count, and at
    most 9 bytes of a header split across reads kept. The frames before an unmasked one
    are still delivered.
    """

    __slots__ = ("_failed", "_head", "_messages", "_skip")

    def __init__(
        self, queue: WebSocketDataQueue, max_msg_size: int, compress: bool, decode_text: bool
    ) -> None:
        super().__init__(queue, max_msg_size, compress, decode_text)
        # aiohttp's compiled reader does not expose its queue to subclasses.
        self._messages = queue
        self._head = b""
        self._skip = 0
        self._failed = False

    def feed_data(self, data: bytes | bytearray | memoryview) -> tuple[bool, bytes]:
        if self._failed:
            return True, b""
        if type(data) is not bytes:
            data = bytes(data)
        # Most reads are one whole masked frame with a payload under 126 bytes and
        # nothing carried over: its second byte is the mask bit and the payload length.
        size = len(data)
        if 6 <= size <= 131 and data[1] == 0x80 | (size - 6) and not self._skip and not self._head:
            return _feed(self, data)
        unmasked = self._find_unmasked(data)
        if unmasked < 0:
            return _feed(self, data)
        self._failed = True
        if unmasked:
            eof, tail = _feed(self, data[:unmasked])
            if eof:  # aiohttp failed the connection on an earlier frame: its code stands
                return eof, tail
        self._messages.set_exception(
            WebSocketError(WSCloseCode.PROTOCOL_ERROR, "client frame not masked")
        )
        return True, b""

    def _find_unmasked(self, data: bytes) -> int:
        """Offset in ``data`` of the header of the first frame without a mask, or -1
        (0 when that header began in an earlier read)."""
        size = len(data)
        if self._skip >= size:
            self._skip -= size
            return -1
        carried = len(self._head)
        # While a header is incomplete there is nothing to skip.
        buf, pos = (self._head + data, 0) if carried else (data, self._skip)
        end = len(buf)
        while end - pos >= 2:
            second = buf[pos + 1]
            if not second & 0x80:
                return max(pos - carried, 0)
            length = second & 0x7F
            if length < 126:
                start = pos + 6
            elif length == 126:
                if end - pos < 4:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 8
            else:
                if end - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 14
            pos = start + length  # the mask key is skipped with the payload
            if pos >= end:
                self._head, self._skip = b"", pos - end
                return -1
        self._head, self._skip = buf[pos:], 0
        return -1


class MaskCheckingResponse(web.WebSocketResponse):
    """aiohttp's server WebSocket with ``MaskCheckingReader`` as its frame reader.

    With ``compress=True`` permessage-deflate is negotiated by ``negotiate`` (both
    directions without context takeover) instead of aiohttp, whose negotiation would
    let each client choose the server's window size, which rules out one compressed
    frame shared by all; ``compress`` is then true only for a connection that
    negotiated it. Inflating client messages is aiohttp's reader's,
    which inflates at most ``max_msg_size + 1`` bytes and fails with 1009 past
    ``max_msg_size`` (checked by tests/server/test_deflate.py on the pinned aiohttp).
    """

    def _handshake(
        self, request: web.BaseRequest
    ) -> tuple[CIMultiDict[str], str | None, int, bool]:
        enabled, self._compress = self._compress, False
        headers, protocol, _, _ = super()._handshake(request)
        self._compress = enabled
        accepted = (
            negotiate(request.headers.get(hdrs.SEC_WEBSOCKET_EXTENSIONS)) if enabled else None
        )
        if accepted is None:
            return headers, protocol, 0, False
        headers[hdrs.SEC_WEBSOCKET_EXTENSIONS] = accepted
        return headers, protocol, 15, True

    def _post_start(
        self, request: web.BaseRequest, protocol: str | None, writer: WebSocketWriter
    ) -> None:
        handler = request.protocol
        # Bytes that arrived with the request head would go to aiohttp's own reader
        # inside _post_start; hold them back for the checking one.
        tail, handler._message_tail = handler._message_tail, b""
        super()._post_start(request, protocol, writer)
        queue = self._reader
        if queue is None:  # pragma: no cover - aiohttp's _post_start always sets it
            raise RuntimeError("aiohttp WebSocket started without a message queue")
        reader = MaskCheckingReader(
            queue, self._max_msg_size, bool(self._compress), self._decode_text
        )
        self._parser = reader
        handler._payload_parser = reader
        if tail:
            handler.data_received(tail)
