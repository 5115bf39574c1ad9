"""The ``tidings`` command: argument parsing, logging setup and running the server.

Exit status: 0 on success, 2 for bad usage or configuration (naming the key), 1 otherwise.

Start-up cost: each command imports what it needs when it runs, so that ``tidings
--version``, ``tidings publish`` and ``tidings token`` import neither the server nor
aiohttp, pydantic or PyJWT (a shell loop of publishes must not spend most of a second
per call on imports). Settings are loaded only where a configuration source exists.

Development mode: ``tidings serve`` writes a state file (``tidings.devstate``) that
``token``, ``publish`` and ``listen`` read when no secret or API key is configured, so
that they work against the development server with nothing exported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tidings import __version__

if TYPE_CHECKING:
    from tidings.config import Settings
    from tidings.server import DevCredentials, RunningServer

__all__ = ["main"]

DEV_USER = "dev-user"
DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds ``tidings publish`` waits on the server (connect, then each read): an operator at
#: a terminal sees a dead or unreachable URL as an error instead of a hang.
PUBLISH_TIMEOUT = 10.0

#: Help lines of the sub-commands whose parsers live in their own modules; those modules
#: are imported only to run (or explain) their command, so the lines are repeated here.
_LISTEN_HELP = "print events as JSON lines; reconnects and recovers on its own"
_BENCH_HELP = "run the benchmark suite"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"tidings: error: {message}\n")


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``listen`` and ``bench`` get their full arguments only when
    ``command`` names them (their modules are costly to import)."""
    parser = _Parser(prog="tidings", description="Tidings real-time event gateway")
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument(
        "--host",
        help="address to listen on (server.host; default 127.0.0.1, 0.0.0.0 for every interface)",
    )
    serve.add_argument(
        "--port", type=int, help="port to listen on (server.port; default 8000, 0 picks a free one)"
    )
    serve.add_argument("--broker", help="broker URL: memory:// or redis://host:6379/0")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (workers; default 1, more need the Redis broker)",
    )

    token = commands.add_parser(
        "token",
        help="mint a token with the configured secret",
        description="Print a token signed with auth.secret; without one configured, with "
        "the secret of the running development server.",
    )
    token.add_argument("--sub", required=True, help="the user id (sub claim)")
    token.add_argument(
        "--channel",
        action="append",
        default=[],
        help="channel or prefix pattern for the channels claim (repeatable)",
    )
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 90s, 15m, 1h, 2d")
    token.add_argument("--config", help="TOML configuration file")

    publish = commands.add_parser(
        "publish",
        help="publish an event through the server API",
        description="Publish one event with the first of api.keys; without a key "
        "configured, with the key and URL of the running development server.",
    )
    publish.add_argument("channel")
    publish.add_argument("type")
    publish.add_argument("data", help="the event's data as a JSON object")
    publish.add_argument(
        "--url",
        help=f"server base URL (default: the running development server's, else {DEFAULT_URL})",
    )
    publish.add_argument("--api-key", help="server API key (default: first of api.keys)")
    publish.add_argument("--idempotency-key")
    publish.add_argument("--config", help="TOML configuration file")

    if command == "listen":
        from tidings.client.listen import add_listen_parser

        add_listen_parser(commands)
    else:
        commands.add_parser("listen", help=_LISTEN_HELP)
    if command == "bench":
        from tidings.bench import add_bench_parser

        add_bench_parser(commands)
    else:
        commands.add_parser("bench", help=_BENCH_HELP)
    return parser


def _fail(code: int, message: str) -> NoReturn:
    print(f"tidings: {message}", file=sys.stderr)
    raise SystemExit(code)


def _configured(config: str | None) -> bool:
    """Whether any configuration source exists: a file, or a ``TIDINGS_*`` variable.

    Without one the settings are the defaults (no secret, no API key), so commands that
    only read a secret or a key skip loading them: pydantic's import alone is most of a
    call's start-up. Only names are looked at; ``tidings.config`` reads the values.
    """
    return bool(config) or any(name.upper().startswith("TIDINGS_") for name in os.environ)


def _settings(
    config: str | None, overrides: dict[str, Any] | None = None, *, require_auth: bool = True
) -> Settings:
    from tidings.config import load_settings
    from tidings.errors import ConfigError

    try:
        return load_settings(config, overrides, require_auth=require_auth)
    except ConfigError as exc:
        _fail(2, f"configuration error: {exc.key}: {exc.reason}")


def _command_name() -> str:
    """How to run this installation's ``tidings`` from a shell here: ``tidings`` when
    PATH finds it, else its path (``.venv/bin/tidings`` after ``make run``)."""
    import shlex
    import shutil

    script = Path(sys.executable).parent / "tidings"
    found = shutil.which("tidings")
    if not script.is_file() or (found is not None and Path(found).resolve() == script.resolve()):
        return "tidings"
    relative = os.path.relpath(script)
    return shlex.quote(relative if not relative.startswith("..") else str(script))


def _banner(server: RunningServer, dev: DevCredentials, state: Path | None) -> str:
    import shlex

    from tidings.minting import mint_token

    token = mint_token(dev.secret, DEV_USER, channels=["demo:*"], ttl=24 * 3600)
    channel = f"user:{DEV_USER}"
    body = json.dumps(
        {
            "channel": channel,
            "type": "notification",
            "data": {"message": "Hello from Tidings", "level": "info"},
        }
    )
    curl = (
        f"curl -s -X POST {server.api_url}/api/publish "
        f"-H 'Authorization: Bearer {dev.api_key}' -H 'Content-Type: application/json' "
        f"-d {shlex.quote(body)}"
    )
    tidings = _command_name()
    note = json.dumps({"message": "Hello", "level": "info"})
    if state is not None:
        commands = [
            "  Or use the command line from another terminal: it finds this server through",
            f"  {state} (removed when the server stops).",
            f"  {tidings} token --sub alice --channel 'news:*'",
            f"  {tidings} listen --sub alice news:a",
            f"  {tidings} publish news:a notification {shlex.quote(note)}",
        ]
    else:
        commands = [
            "  The command line cannot find this server (no state file); export",
            "  TIDINGS_AUTH__SECRET and TIDINGS_API__KEYS with the values above for it.",
        ]
    return "\n".join(
        [
            "",
            f"  Tidings {__version__} is running in DEVELOPMENT MODE.",
            "  The secret and API key below were generated for this run only.",
            "  Never use development mode in production: configure auth.secret and api.keys.",
            "",
            f"  JWT secret   {dev.secret}",
            f"  API key      {dev.api_key}",
            f"  Token        {token}",
            f"               (user '{DEV_USER}', valid 24 h, may read demo:*; its personal",
            f"               channel {channel} is subscribed automatically)",
            f"  WebSocket    {server.ws_url}?token={token}",
            *(
                [f"  Console      {server.api_url}/console#token={token}"]
                if server.settings.console_enabled
                else []
            ),
            f"  Health       {server.api_url}/healthz",
            "",
            *commands,
            "",
            "  Publish an event to that user:",
            f"  {curl}",
            "",
        ]
    )


def _write_dev_state(settings: Settings, dev: DevCredentials, url: str, ws_url: str) -> Path | None:
    """Write the development state file; None (and a line on stderr) when it cannot be."""
    from tidings.devstate import DevState, state_dir, write_state

    algorithm = next((a for a in settings.auth.algorithms if a.startswith("HS")), "HS256")
    try:
        return write_state(DevState(os.getpid(), url, ws_url, dev.secret, dev.api_key, algorithm))
    except OSError as exc:
        print(
            f"tidings: cannot write the development state file in {state_dir()}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
            flush=True,
        )
        return None


def _quiet_upgrade_lines() -> None:
    """Development mode logs a line per WebSocket connect and disconnect: drop the access
    line aiohttp writes when an upgraded request ends, which would repeat the latter."""
    import logging

    logging.getLogger("aiohttp.access").addFilter(
        lambda record: getattr(record, "response_status", None) != 101
    )


def _serve(args: argparse.Namespace) -> None:
    import asyncio
    import signal

    from tidings.devstate import remove_state
    from tidings.errors import ConfigError
    from tidings.logs import configure_logging
    from tidings.server import ListenError, prepare_dev, running, tune_gc

    overrides: dict[str, Any] = {}
    server_flags = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if server_flags:
        overrides["server"] = server_flags
    if args.broker is not None:
        overrides["broker"] = {"url": args.broker}
    if args.workers is not None:
        overrides["workers"] = args.workers
    settings, dev = prepare_dev(_settings(args.config, overrides))
    if dev is not None:
        if settings.logging.format == "auto":
            # Development mode is read by a person, also through a pipe (make run | tee).
            # Set in the settings, so that --workers processes log the same way.
            settings = settings.model_copy(
                update={"logging": settings.logging.model_copy(update={"format": "text"})}
            )
        _quiet_upgrade_lines()
    configure_logging(settings.logging.level, settings.logging.format, settings.secrets)
    if settings.workers > 1:
        from tidings.workers import run_workers

        state = None
        if dev is not None:
            print(
                f"tidings: development mode: JWT secret {dev.secret}  API key {dev.api_key}",
                flush=True,
            )
            server = settings.server
            # Only where the URLs are known before the workers start: not on port 0.
            if server.port and server.internal_port != 0:
                scheme = "https" if server.tls_cert else "http"
                api_port = server.internal_port or server.port
                api_host = server.internal_host if server.internal_port else server.host
                state = _write_dev_state(
                    settings,
                    dev,
                    f"{scheme}://{api_host}:{api_port}",
                    f"{'wss' if server.tls_cert else 'ws'}://{server.host}:{server.port}"
                    f"{server.path}",
                )
        try:
            code = run_workers(settings)
        finally:
            if state is not None:
                remove_state(state, os.getpid())
        raise SystemExit(code)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with running(settings) as server:
                tune_gc()
                state = None
                if dev is not None:
                    state = _write_dev_state(settings, dev, server.api_url, server.ws_url)
                    print(_banner(server, dev, state), flush=True)
                else:
                    print(f"tidings: listening on {server.http_url}", flush=True)
                try:
                    await stop.wait()
                finally:
                    # First: the CLI must not pick a server that is shutting down.
                    if state is not None:
                        remove_state(state, os.getpid())
        except ConfigError as exc:
            _fail(2, f"configuration error: {exc.key}: {exc.reason}")
        except ListenError as exc:
            _fail(1, str(exc))
        except OSError as exc:
            _fail(
                1, f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror}"
            )

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _token(args: argparse.Namespace) -> None:
    from tidings.devstate import read_state
    from tidings.minting import mint_token, parse_duration

    secret, algorithm = "", None
    if _configured(args.config):
        # Only the secret is read: a configuration for a production server that verifies
        # with a public key, or has no secret at all, is not an error here.
        settings = _settings(args.config, require_auth=False)
        secret = settings.auth.secret
        algorithm = next((a for a in settings.auth.algorithms if a.startswith("HS")), None)
        from tidings.config import MIN_HMAC_SECRET_BYTES

        if secret and not settings.dev_mode and len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
            # The server refuses to start with it; a token signed with it is no use.
            _fail(
                2,
                f"configuration error: auth.secret: must be at least "
                f"{MIN_HMAC_SECRET_BYTES} bytes outside development mode",
            )
    if not secret:
        state = read_state()
        if state is None:
            _fail(
                2,
                "configuration error: auth.secret: not set; tokens are signed with it "
                "(set TIDINGS_AUTH__SECRET, or start `tidings serve` in development "
                "mode and its secret is used)",
            )
        secret, algorithm = state.secret, state.algorithm
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        _fail(2, f"--ttl: {exc}")
    if ttl <= 0:
        _fail(2, "--ttl: must be positive")
    if algorithm is None:
        _fail(2, "configuration error: auth.algorithms: no HS* algorithm to sign with")
    print(mint_token(secret, args.sub, channels=args.channel, ttl=ttl, algorithm=algorithm))


def _same_server(first: str, second: str) -> bool:
    return first.rstrip("/") == second.rstrip("/")


def _publish(args: argparse.Namespace) -> None:
    from tidings.devstate import read_state

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        _fail(2, f"DATA_JSON is not valid JSON: {exc.msg}")
    if not isinstance(data, dict):
        _fail(2, "DATA_JSON must be a JSON object")
    key, url = args.api_key, args.url
    if key is None and _configured(args.config):
        # Only the API key is read: a client needs no signing key of its own.
        settings = _settings(args.config, require_auth=False)
        key = settings.api.keys[0] if settings.api.keys else None
    if key is None:
        state = read_state()
        # The development server's key goes to that server only, never to another --url.
        if state is not None and (url is None or _same_server(url, state.url)):
            key, url = state.api_key, state.url
    if not key:
        _fail(
            2,
            "--api-key: required (or set api.keys / TIDINGS_API__KEYS, or start "
            "`tidings serve` in development mode and its key is used)",
        )
    body: dict[str, Any] = {"channel": args.channel, "type": args.type, "data": data}
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    status, text = _post(url or DEFAULT_URL, "/api/publish", key, body)
    if status >= 400:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            text = json.loads(text)["error"]["message"]
        _fail(1, f"publish failed ({status}): {text}")
    print(text)


def _post(base: str, path: str, key: str, body: Any) -> tuple[int, str]:
    """POST ``body`` as JSON to ``base`` + ``path``: the status and the answer's text.

    The standard library's blocking client: one request needs no event loop, and
    aiohttp's import alone would cost a third of a second.
    """
    from http.client import HTTPConnection, HTTPException, HTTPSConnection, InvalidURL
    from urllib.parse import urlsplit

    if not (key.isascii() and key.isprintable()):
        _fail(2, "--api-key: must be printable ASCII (API keys go in an HTTP header)")
    parts = urlsplit(base)
    try:
        port = parts.port
    except ValueError:
        _fail(2, f"--url: invalid port in {base}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(2, f"--url: must be an http:// or https:// URL, not {base}")
    connection = (HTTPSConnection if parts.scheme == "https" else HTTPConnection)(
        parts.hostname, port, timeout=PUBLISH_TIMEOUT
    )
    try:
        connection.request(
            "POST",
            parts.path.rstrip("/") + path,
            body=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    except InvalidURL:
        _fail(2, f"--url: not a valid URL: {base!r}")
    except (OSError, HTTPException) as exc:
        _fail(1, f"cannot reach {base}: {type(exc).__name__}")
    finally:
        connection.close()


def _listen(args: argparse.Namespace) -> None:
    from tidings.client.listen import run_listen

    run_listen(args)


def _bench(args: argparse.Namespace) -> None:
    from tidings.bench import run_bench

    run_bench(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "serve": _serve,
    "token": _token,
    "publish": _publish,
    "listen": _listen,
    "bench": _bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tidings`` console script."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    # The top-level parser has no option that takes a value: the first word that is not
    # an option is the command.
    command = next((word for word in arguments if not word.startswith("-")), None)
    args = _build_parser(command).parse_args(arguments)
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
