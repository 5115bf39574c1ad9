"""What the client does after a connection ends: the close-code decision (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from tidings.protocol import CloseCode, ReconnectAdvice

__all__ = ["Action", "Decision", "decide"]


#: The client's possible actions are exactly the protocol's reconnect advice.
Action = ReconnectAdvice


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: Set for STOP: why the client gives up.
    reason: str = ""
    #: STOP because authentication cannot be recovered (AuthenticationFailed).
    auth: bool = False


def decide(code: int | None, *, has_token_provider: bool) -> Decision:
    """The decision for a connection that ended with ``code`` (None: abnormal or refused).

    1001/1009/1011/1013/4408/unknown/abnormal: reconnect with backoff; 4429: reconnect
    slowly; 4401: new token then reconnect, or stop without a provider; 4403 and 1000: stop.
    """
    advice = CloseCode.advice_for(code)
    if advice is ReconnectAdvice.STOP:
        why = (
            "the server closed the connection normally (1000)"
            if code == CloseCode.NORMAL
            else "disconnected by the application (4403)"
        )
        return Decision(advice, why)
    if advice is ReconnectAdvice.NEW_TOKEN and not has_token_provider:
        return Decision(
            Action.STOP,
            "the server rejected the token (4401) and no token_provider was given",
            auth=True,
        )
    return Decision(advice)
