"""The ``type`` of an encoded event, read without decoding it, for
``tidings_events_delivered_total``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tidings.metrics import Metrics

__all__ = ["FrameCounter", "event_type", "frame_counter", "frame_event_type"]

#: ``(frames, connections)``: each event frame of ``frames`` was written to
#: ``connections`` connections (the hub's ``on_written``).
FrameCounter = Callable[[Sequence[bytes], int], None]


def event_type(payload: bytes, start: int = 0) -> str:
    """The ``type`` of the event JSON in ``payload`` from ``start`` on."""
    # Every event payload is encoded with "type" as its first key (protocol.wire).
    if not payload.startswith(b'{"type":"', start):
        return "unknown"
    end = payload.find(b'"', start + 9)
    return payload[start + 9 : end].decode() if end > 0 else "unknown"


def frame_event_type(frame: bytes) -> str:
    """The ``type`` of the event in a server text frame (``protocol.wire.text_frame``)."""
    # Unmasked server frame: a 7-bit length, or 126/127 then a 16/64-bit one (RFC 6455 5.2).
    length = frame[1] & 0x7F
    return event_type(frame, 2 if length < 126 else 4 if length == 126 else 10)


def frame_counter(metrics: Metrics) -> FrameCounter:
    """Counts written event frames into ``tidings_events_delivered_total``."""
    delivered = metrics.delivered

    def count(frames: Sequence[bytes], connections: int) -> None:
        for frame in frames:
            delivered(frame_event_type(frame), connections)

    return count
