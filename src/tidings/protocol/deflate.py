"""permessage-deflate (RFC 7692) for server frames: negotiation and the frame codec.

Pure and synchronous. The server always negotiates ``server_no_context_takeover`` and
``client_no_context_takeover``: every message is compressed on its own, so one
compressed frame can be written to every connection that negotiated the extension, and
no connection keeps a compressor between messages.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["MIN_DEFLATE_BYTES", "deflate_frame", "deflate_frames", "negotiate"]

#: Payloads shorter than this go out uncompressed (RSV1 clear, which RFC 7692 section
#: 6 allows): compressing them saves a few bytes at best and costs a compressor.
MIN_DEFLATE_BYTES = 64

_EXTENSION = "permessage-deflate"
_ACCEPT = f"{_EXTENSION}; server_no_context_takeover; client_no_context_takeover"
_TAIL = b"\x00\x00\xff\xff"
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
_RSV1 = 0x40
_DATA_OPCODES = frozenset({0x1, 0x2})


def _window_bits(value: str | None) -> int | None:
    """An RFC 7692 window-bits value (8 to 15, no leading zero), or None if invalid."""
    if value is None:
        return None
    value = value.strip('"')
    if not value.isdigit() or value.startswith("0") or not 8 <= int(value) <= 15:
        return None
    return int(value)


def _offer_response(params: list[str]) -> str | None:
    """The response accepting one permessage-deflate offer, or None to decline it."""
    seen: set[str] = set()
    response = _ACCEPT
    for param in params:
        name, sep, raw = param.partition("=")
        name, value = name.strip().lower(), raw.strip() if sep else None
        if not name:
            continue
        if name in seen:  # RFC 7692 section 7: a duplicated parameter declines the offer
            return None
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name == "server_max_window_bits":
            # One compressed frame is shared by every connection, so the server cannot
            # use a smaller window for one client; it declines the offer instead.
            if _window_bits(value) != 15:
                return None
            response += "; server_max_window_bits=15"
        elif name == "client_max_window_bits":
            # The server inflates with a 32 KB window, enough for any window the client
            # uses; leaving the parameter out of the response is allowed (section 7.1.2.2).
            if value is not None and _window_bits(value) is None:
                return None
        else:
            return None
    return response


def negotiate(header: str | None) -> str | None:
    """The ``Sec-WebSocket-Extensions`` response value for the client's offers, or None
    when no permessage-deflate offer can be accepted (the extension is not used and the
    handshake still succeeds).

    The first acceptable offer wins (RFC 7692 section 5); offers of other extensions
    and offers with parameters the server cannot honour are skipped.
    """
    if not header:
        return None
    for offer in header.split(","):
        name, *params = offer.split(";")
        if name.strip().lower() != _EXTENSION:
            continue
        response = _offer_response(params)
        if response is not None:
            return response
    return None


def _compress(payload: bytes) -> bytes:
    """``payload`` as one self-contained DEFLATE stream without the sync-flush tail
    (RFC 7692 section 7.2.1)."""
    # The window need not be larger than the message; a smaller one is cheaper to set
    # up and any receiver's window (up to 15 bits) can decode it.
    bits = min(15, max(9, len(payload).bit_length()))
    compressor = zlib.compressobj(
        zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits, min(8, max(1, bits - 7))
    )
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(_TAIL) else data


def deflate_frame(frame: bytes) -> bytes:
    """One complete unmasked server frame, compressed (RSV1 set) when that pays.

    Control frames, frames that already have RSV1 or are fragments, payloads under
    ``MIN_DEFLATE_BYTES`` and payloads that would not shrink are returned unchanged.
    """
    first, second = frame[0], frame[1]
    if first & 0x70 or not first & 0x80 or first & 0x0F not in _DATA_OPCODES:
        return frame
    length = second & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    payload = frame[start:]
    if len(payload) < MIN_DEFLATE_BYTES:
        return frame
    packed = _compress(payload)
    if len(packed) >= len(payload):
        return frame
    head = first | _RSV1
    size = len(packed)
    if size < 126:
        return bytes((head, size)) + packed
    if size < 65536:
        return _LEN2(head, 126, size) + packed
    return _LEN3(head, 127, size) + packed


def deflate_frames(data: bytes) -> bytes:
    """Consecutive complete unmasked server frames (one write), each ``deflate_frame``-d."""
    out: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        length = data[pos + 1] & 0x7F
        if length < 126:
            start = pos + 2
        elif length == 126:
            length, start = int.from_bytes(data[pos + 2 : pos + 4], "big"), pos + 4
        else:
            length, start = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
        stop = start + length
        out.append(deflate_frame(data[pos:stop]))
        pos = stop
    return out[0] if len(out) == 1 else b"".join(out)
