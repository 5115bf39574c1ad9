"""The ``tidings`` command: argument parsing, logging setup and running the server.

Exit status: 0 on success, 2 for bad usage or configuration (naming the key), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from tidings import __version__
from tidings.auth import mint_token, parse_duration
from tidings.bench import add_bench_parser, run_bench
from tidings.client.listen import add_listen_parser, run_listen
from tidings.config import Settings, load_settings
from tidings.errors import ConfigError
from tidings.logs import configure_logging
from tidings.server import DevCredentials, RunningServer, prepare_dev, running, tune_gc

__all__ = ["main"]

DEV_USER = "dev-user"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"tidings: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tidings", description="Tidings real-time event gateway")
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--broker", help="broker URL: memory:// or redis://host:6379/0")
    serve.add_argument("--workers", type=int)

    token = commands.add_parser("token", help="mint a token with the configured secret")
    token.add_argument("--sub", required=True, help="the user id (sub claim)")
    token.add_argument("--channel", action="append", default=[],
                       help="channel or prefix pattern for the channels claim (repeatable)")
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 90s, 15m, 1h, 2d")
    token.add_argument("--config", help="TOML configuration file")

    publish = commands.add_parser("publish", help="publish an event through the server API")
    publish.add_argument("channel")
    publish.add_argument("type")
    publish.add_argument("data", help="the event's data as a JSON object")
    publish.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    publish.add_argument("--api-key", help="server API key (default: first of api.keys)")
    publish.add_argument("--idempotency-key")
    publish.add_argument("--config", help="TOML configuration file")

    add_listen_parser(commands)
    add_bench_parser(commands)
    return parser


def _fail(code: int, message: str) -> NoReturn:
    print(f"tidings: {message}", file=sys.stderr)
    raise SystemExit(code)


def _settings(config: str | None, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        _fail(2, f"configuration error: {exc.key}: {exc.reason}")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _banner(server: RunningServer, dev: DevCredentials) -> str:
    token = mint_token(dev.secret, DEV_USER, channels=["demo:*"], ttl=24 * 3600)
    channel = f"user:{DEV_USER}"
    body = json.dumps({"channel": channel, "type": "notification",
                       "data": {"message": "Hello from Tidings", "level": "info"}})
    curl = (f"curl -s -X POST {server.http_url}/api/publish "
            f"-H 'Authorization: Bearer {dev.api_key}' -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")
    return "\n".join([
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
        *([f"  Console      {server.http_url}/console#token={token}"]
          if server.settings.console_enabled else []),
        f"  Health       {server.http_url}/healthz",
        "",
        "  Publish an event to that user:",
        f"  {curl}",
        "",
    ])


def _serve(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {}
    server_flags = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if server_flags:
        overrides["server"] = server_flags
    if args.broker is not None:
        overrides["broker"] = {"url": args.broker}
    if args.workers is not None:
        overrides["workers"] = args.workers
    settings, dev = prepare_dev(_settings(args.config, overrides))
    secrets = [settings.auth.secret, *settings.api.keys]
    configure_logging(settings.logging.level, settings.logging.format, secrets)
    if settings.workers > 1:
        from tidings.workers import run_workers

        if dev is not None:
            print(f"tidings: development mode: JWT secret {dev.secret}  API key {dev.api_key}",
                  flush=True)
        raise SystemExit(run_workers(settings))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with running(settings) as server:
                tune_gc()
                if dev is not None:
                    print(_banner(server, dev), flush=True)
                else:
                    print(f"tidings: listening on {server.http_url}", flush=True)
                await stop.wait()
        except ConfigError as exc:
            _fail(2, f"configuration error: {exc.key}: {exc.reason}")
        except OSError as exc:
            _fail(1, f"cannot listen on {settings.server.host}:{settings.server.port}: "
                     f"{exc.strerror}")

    _run(main())


def _token(args: argparse.Namespace) -> None:
    settings = _settings(args.config)
    if not settings.auth.secret:
        _fail(2, "configuration error: auth.secret: not set; tokens are signed with it")
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        _fail(2, f"--ttl: {exc}")
    if ttl <= 0:
        _fail(2, "--ttl: must be positive")
    algorithm = next((a for a in settings.auth.algorithms if a.startswith("HS")), None)
    if algorithm is None:
        _fail(2, "configuration error: auth.algorithms: no HS* algorithm to sign with")
    print(mint_token(settings.auth.secret, args.sub, channels=args.channel, ttl=ttl,
                     algorithm=algorithm))


def _publish(args: argparse.Namespace) -> None:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        _fail(2, f"DATA_JSON is not valid JSON: {exc.msg}")
    if not isinstance(data, dict):
        _fail(2, "DATA_JSON must be a JSON object")
    key = args.api_key
    if key is None:
        settings = _settings(args.config)
        key = settings.api.keys[0] if settings.api.keys else None
    if not key:
        _fail(2, "--api-key: required (or set api.keys / TIDINGS_API__KEYS)")
    body: dict[str, Any] = {"channel": args.channel, "type": args.type, "data": data}
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key

    async def post() -> None:
        import aiohttp

        url = args.url.rstrip("/") + "/api/publish"
        headers = {"Authorization": f"Bearer {key}"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                    http.post(url, json=body, headers=headers) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            _fail(1, f"cannot reach {args.url}: {type(exc).__name__}")
        if response.status >= 400:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                text = json.loads(text)["error"]["message"]
            _fail(1, f"publish failed ({response.status}): {text}")
        print(text)

    _run(post())


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "serve": _serve,
    "token": _token,
    "publish": _publish,
    "listen": run_listen,
    "bench": run_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tidings`` console script."""
    args = _build_parser().parse_args(argv)
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
