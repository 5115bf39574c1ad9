"""The Tidings Python client: connects, reconnects with backoff, resubscribes, recovers.

    async with tidings.client.connect(url, token_provider=get_token) as client:
        sub = await client.subscribe("conversation:conv-123")
        async for item in sub:
            if isinstance(item, tidings.client.Gap):
                ...  # events were missed: reload state from the application
            else:
                print(item.type, item.offset, item.data)

It speaks the wire contract of ``tidings.protocol`` and imports no server module.
See docs/client-python.md.
"""

from __future__ import annotations

from tidings.client.backoff import Backoff
from tidings.client.connecting import Connecting, connect
from tidings.client.connection import Client, ClientOptions, StateListener, TokenProvider
from tidings.client.errors import (
    AuthenticationFailed,
    ClientError,
    CommandError,
    ConnectionClosed,
    NotConnected,
    SubscriptionError,
)
from tidings.client.models import (
    Event,
    Gap,
    GapReason,
    Item,
    Presence,
    Recovery,
    State,
    StateChange,
)
from tidings.client.policy import Action, Decision, decide
from tidings.client.subscription import Subscription
from tidings.client.tracker import ChannelTracker, ProtocolViolation

__all__ = [
    "Action",
    "AuthenticationFailed",
    "Backoff",
    "ChannelTracker",
    "Client",
    "ClientError",
    "ClientOptions",
    "CommandError",
    "Connecting",
    "ConnectionClosed",
    "Decision",
    "Event",
    "Gap",
    "GapReason",
    "Item",
    "NotConnected",
    "Presence",
    "ProtocolViolation",
    "Recovery",
    "State",
    "StateChange",
    "StateListener",
    "Subscription",
    "SubscriptionError",
    "TokenProvider",
    "connect",
    "decide",
]
