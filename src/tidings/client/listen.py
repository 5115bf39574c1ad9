"""``tidings listen``: print events as JSON lines, reconnecting and recovering on its own.

Each event is one JSON line on stdout (its wire form). State changes, recoveries,
missed-event gaps and errors go to stderr, one line each, prefixed ``tidings:``. Exit
status: 0 after SIGINT or SIGTERM, 1 when the client stops for good (4403, 1000, a rejected
token, a refused channel), 2 for bad usage.

Without ``--token``, a token for ``--sub`` that may read the given channels is minted with
the secret of the running development server (``tidings.devstate``), whose URL is then
the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from tidings.client.backoff import Backoff
from tidings.client.connection import Client
from tidings.client.errors import ClientError
from tidings.client.models import Event, Gap, Recovery, State, StateChange
from tidings.protocol import dumps, is_valid_channel

__all__ = ["DEFAULT_URL", "add_listen_parser", "listen", "main", "run_listen"]

DEFAULT_URL = "ws://127.0.0.1:8000/ws"


def add_listen_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``listen`` sub-command to the ``tidings`` parser."""
    parser = commands.add_parser(
        "listen",
        help="print events as JSON lines; reconnects and recovers on its own",
        description="Connect, subscribe to CHANNELs (the personal channel is automatic), "
        "print each event as one JSON line on stdout and state changes on "
        "stderr; reconnect and recover on its own.",
    )
    parser.add_argument(
        "--token",
        help="the JWT to connect with (default: one minted for "
        "--sub with the running development server's secret)",
    )
    parser.add_argument(
        "--sub",
        default="dev-user",
        help="without --token: the user to mint the token for (default "
        "dev-user); it may read the CHANNELs given",
    )
    parser.add_argument(
        "--url",
        help=f"the server's WebSocket URL (default: the running "
        f"development server's, else {DEFAULT_URL})",
    )
    parser.add_argument("channels", nargs="*", metavar="CHANNEL", help="a channel to subscribe")


def run_listen(args: argparse.Namespace) -> None:
    """Run ``tidings listen`` until interrupted; raises ``SystemExit`` with the status."""
    bad = [c for c in args.channels if not is_valid_channel(c)]
    if bad:
        print(f"tidings: error: invalid channel name {bad[0]!r} (namespace:name)", file=sys.stderr)
        raise SystemExit(2)
    token, url = args.token, args.url
    if token is None:
        token, url = _development_token(args.sub, args.channels, url)
    status = asyncio.run(listen(url or DEFAULT_URL, token, args.channels))
    if status:
        raise SystemExit(status)


def _development_token(sub: str, channels: Sequence[str], url: str | None) -> tuple[str, str]:
    """A token for ``sub`` that may read ``channels``, signed with the running
    development server's secret, and that server's URL; exits 2 when there is none (or
    ``url`` names another server: its token is for that server only)."""
    from tidings.devstate import read_state
    from tidings.minting import mint_token

    state = read_state()
    if state is None or (url is not None and url.rstrip("/") != state.ws_url.rstrip("/")):
        print(
            "tidings: error: --token: required (no development server to mint one "
            "with; see `tidings token`)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    # As long as the banner's token: a listener left running overnight keeps working.
    token = mint_token(
        state.secret, sub, channels=channels, ttl=24 * 3600, algorithm=state.algorithm
    )
    return token, state.ws_url


class _Printer:
    def __init__(self, out: TextIO, err: TextIO, url: str) -> None:
        self.out = out
        self.err = err
        self.url = url

    def event(self, event: Event) -> None:
        self.out.write(dumps(event.to_dict()).decode() + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(f"tidings: {text}\n")
        self.err.flush()

    def recovered(self, recovery: Recovery) -> None:
        count, channel = recovery.count, recovery.channel
        if count:
            events = "event" if count == 1 else "events"
            self.note(
                f"{channel}: recovered {count} missed {events} (offsets "
                f"{recovery.last_offset + 1} to {recovery.offset}, epoch {recovery.epoch})"
            )
        else:
            self.note(
                f"{channel}: recovered, no events missed (offset {recovery.offset}, "
                f"epoch {recovery.epoch})"
            )

    def gap(self, gap: Gap) -> None:
        self.note(
            f"{gap.channel}: events missed ({gap.reason}) after offset "
            f"{gap.last_offset} (epoch {gap.last_epoch}) up to offset {gap.offset} "
            f"(epoch {gap.epoch}); reload state from the application"
        )

    def state(self, change: StateChange, client: Client) -> None:
        code = f"code {change.code}" if change.code is not None else "no close code"
        ended = f"{code}: {change.reason}" if change.reason else code
        if change.state is State.CONNECTING:
            self.note(f"connecting to {self.url}")
        elif change.state is State.CONNECTED:
            self.note(f"connected (connection {client.connection_id}, user {client.user_id})")
        elif change.state is State.DISCONNECTED:
            self.note(f"disconnected ({ended}); reconnecting in {change.retry_in or 0:.2f} s")
        else:
            self.note(f"closed ({ended})")


async def listen(
    url: str,
    token: str,
    channels: Sequence[str],
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stop: asyncio.Event | None = None,
    backoff: Backoff | None = None,
) -> int:
    """Print events of ``channels`` (and the automatic personal channel) until ``stop`` is
    set, SIGINT/SIGTERM arrives, or the client stops for good; return the exit status."""
    printer = _Printer(out or sys.stdout, err or sys.stderr, url)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    failed = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    wired: set[str] = set()

    async def follow(channel: str) -> None:
        try:
            await client.subscribe(
                channel,
                on_event=printer.event,
                on_gap=printer.gap,
                on_error=lambda exc: printer.note(f"{channel}: {exc}"),
                on_recovered=printer.recovered,
            )
            printer.note(f"subscribed to {channel}")
        except ClientError as exc:
            printer.note(f"cannot subscribe to {channel}: {exc}")
            failed.set()

    def start(channel: str) -> None:
        if channel not in wired:
            wired.add(channel)
            task = asyncio.create_task(follow(channel))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def on_state(change: StateChange) -> None:
        printer.state(change, client)
        if change.state is State.CONNECTED:
            for channel in sorted(client.automatic_channels):
                start(channel)

    client = Client(url, token=token, on_state=on_state, backoff=backoff)
    status = 0
    try:
        await client.start(wait=False)
        for channel in channels:
            start(channel)
        waits: list[asyncio.Task[Any]] = [
            asyncio.create_task(stop.wait()),
            asyncio.create_task(failed.wait()),
            asyncio.create_task(client.wait_closed()),
        ]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        if failed.is_set() or client.error is not None:
            status = 1
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        for signum in handled:
            loop.remove_signal_handler(signum)
    return status


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tidings.client.listen --token T [--url URL] CHANNEL ...``."""
    parser = argparse.ArgumentParser(prog="tidings")
    add_listen_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["listen", *(sys.argv[1:] if argv is None else argv)])
    run_listen(args)


if __name__ == "__main__":
    main()
