"""The ``tidings`` command run as a real subprocess: serve, shutdown, token, publish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from helpers import API_KEY, SECRET, TIMEOUT, api, serve
from paths import REPO
from redis_support import REDIS_URL
from timeouts import scaled

CLI = [sys.executable, "-m", "tidings.cli"]
#: Seconds a subprocess may take to start, answer or stop.
PROCESS_TIMEOUT = scaled(8.0)


@pytest.fixture(autouse=True)
def _private_runtime_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test's CLI processes get a runtime directory of their own, so the development
    state files they write or read are never the user's nor another test's."""
    runtime = tmp_path_factory.mktemp("runtime")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without any TIDINGS_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TIDINGS_")}
    env.update(extra or {})
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one short CLI command to completion (killed by ``subprocess.run`` on timeout)."""
    return subprocess.run(
        [*CLI, *args],
        env=clean_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


async def run_cli_async(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """Run a CLI command without blocking the event loop (an in-process server needs it)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env=clean_env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_config_error(result: subprocess.CompletedProcess[str], key: str) -> None:
    """Exit status 2 with a one-line reason naming ``key``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# -- serve -------------------------------------------------------------------------------


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    stdout: list[str]
    stderr_path: Path

    def field(self, label: str) -> str:
        for line in self.stdout:
            text = line.strip()
            if text.startswith(label + " "):
                return text[len(label) :].strip()
        raise AssertionError(f"no {label!r} in the banner: {self.stdout}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


async def _read_until(proc: asyncio.subprocess.Process, done: Callable[[str], bool]) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(PROCESS_TIMEOUT):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(f"stdout ended before the expected line: {lines}")
            line = raw.decode().rstrip("\n")
            lines.append(line)
            if done(line):
                return lines


@contextlib.asynccontextmanager
async def serve_process(
    tmp_path: Path, *args: str, env: Mapping[str, str] | None = None, done: Callable[[str], bool]
) -> AsyncIterator[Served]:
    """``tidings serve --port 0 ...`` until its stdout shows ``done``; killed on exit."""
    stderr_path = tmp_path / "serve-stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "serve",
            "--port",
            "0",
            *args,
            env=clean_env(env),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        try:
            try:
                lines = await _read_until(proc, done)
            except (AssertionError, TimeoutError):
                raise AssertionError(
                    f"server did not start; stderr: {stderr_path.read_text()[-3000:]}"
                ) from None
            yield Served(proc, lines, stderr_path)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _is_curl(line: str) -> bool:
    return line.strip().startswith("curl ")


async def _run_curl(command: str) -> tuple[int, Any]:
    """Carry out the banner's curl command with aiohttp."""
    words = shlex.split(command)
    assert words[0] == "curl"
    method, url, headers, data = "GET", "", {}, None
    index = 1
    while index < len(words):
        word = words[index]
        if word == "-X":
            method, index = words[index + 1], index + 2
        elif word == "-H":
            name, _, value = words[index + 1].partition(":")
            headers[name.strip()] = value.strip()
            index += 2
        elif word == "-d":
            data, index = words[index + 1], index + 2
        elif word.startswith("-"):
            index += 1
        else:
            url, index = word, index + 1
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.request(method, url, data=data, headers=headers) as response,
    ):
        return response.status, json.loads(await response.text())


async def test_serve_dev_mode_banner_works_end_to_end(tmp_path: Path) -> None:
    """The dev banner's token, URL and curl command work: the event reaches the client."""
    async with serve_process(tmp_path, done=_is_curl) as served:
        text = "\n".join(served.stdout)
        assert "DEVELOPMENT MODE" in text
        api_key, secret, tok = (
            served.field("API key"),
            served.field("JWT secret"),
            served.field("Token"),
        )
        ws_url = served.field("WebSocket")
        assert ws_url.startswith("ws://127.0.0.1:")
        port = int(ws_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        assert port > 0
        assert ws_url.endswith(f"?token={tok}")
        claims = jwt.decode(tok, secret, algorithms=["HS256"])
        assert claims["sub"] == "dev-user"
        curl = next(line for line in served.stdout if _is_curl(line)).strip()
        assert api_key in curl and f"127.0.0.1:{port}/api/publish" in curl
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            hello = json.loads((await ws.receive(timeout=TIMEOUT)).data)
            assert hello["type"] == "connected"
            assert hello["data"]["user_id"] == "dev-user"
            assert hello["data"]["channels"] == ["user:dev-user"]
            status, answer = await _run_curl(curl)
            assert status == 200, answer
            event = json.loads((await ws.receive(timeout=TIMEOUT)).data)
            assert event["type"] == "notification"
            assert event["channel"] == "user:dev-user"
            assert event["id"] == answer["results"][0]["id"]
        health = served.field("Health")
        async with aiohttp.ClientSession() as session, session.get(health) as response:
            assert response.status == 200
        # The generated credentials never reach the log output.
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), PROCESS_TIMEOUT) == 0
        logs = served.stderr()
        assert secret not in logs and api_key not in logs and tok not in logs


async def test_sigterm_drains_clients_with_1001_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM closes connected clients with 1001 and the process exits with status 0."""
    async with serve_process(tmp_path, done=_is_curl) as served:
        ws_url = served.field("WebSocket")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(ws_url, autoclose=False) as ws,
        ):
            hello = json.loads((await ws.receive(timeout=TIMEOUT)).data)
            assert hello["type"] == "connected"
            served.proc.send_signal(signal.SIGTERM)
            frame = await ws.receive(timeout=TIMEOUT)
            assert frame.type is aiohttp.WSMsgType.CLOSE, frame
            assert frame.data == 1001
            await ws.close()
        code = await asyncio.wait_for(served.proc.wait(), PROCESS_TIMEOUT)
        assert code == 0, served.stderr()
        assert "Traceback" not in served.stderr()


async def test_serve_production_mode_and_sigint(tmp_path: Path) -> None:
    """With a secret configured the server starts in production mode; SIGINT exits 0."""
    env = {"TIDINGS_AUTH__SECRET": SECRET, "TIDINGS_API__KEYS": API_KEY}
    async with serve_process(tmp_path, env=env, done=lambda line: "listening on" in line) as served:
        line = served.stdout[-1]
        assert "DEVELOPMENT MODE" not in "\n".join(served.stdout)
        url = line.split("listening on", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as r:
            assert r.status == 200
        served.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(served.proc.wait(), PROCESS_TIMEOUT) == 0
        logs = served.stderr()
        assert SECRET not in logs and API_KEY not in logs


async def test_stray_environment_variables_do_not_stop_the_server(tmp_path: Path) -> None:
    """TIDINGS_KEY (as docs/server-api.md exports it) and a mistyped TIDINGS_BROKER_URL
    are not settings: the server starts, warns about the lookalike without its value,
    and exits 0."""
    env = {
        "TIDINGS_AUTH__SECRET": SECRET,
        "TIDINGS_API__KEYS": API_KEY,
        "TIDINGS_KEY": "STRAYKEYVALUE",
        "TIDINGS_BROKER_URL": "redis://STRAYURLVALUE:1/0",
    }
    async with serve_process(tmp_path, env=env, done=lambda line: "listening on" in line) as served:
        url = served.stdout[-1].split("listening on", 1)[1].strip()
        async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as r:
            assert r.status == 200
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), PROCESS_TIMEOUT) == 0
        logs = served.stderr()
    assert "TIDINGS_BROKER_URL" in logs and "TIDINGS_BROKER__URL" in logs
    assert "TIDINGS_KEY" not in logs
    assert "STRAY" not in logs and "Traceback" not in logs


# -- configuration errors ----------------------------------------------------------------


def test_misspelled_key_in_a_known_section() -> None:
    """TIDINGS_SERVER__PORTT names a key the server section does not have: exit 2."""
    result = run_cli(
        "serve", "--port", "0", env={"TIDINGS_SERVER__PORTT": "8001", "TIDINGS_KEY": "k"}
    )
    assert_config_error(result, "server.portt")


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    """An unknown key in the TOML file exits 2 naming it."""
    config = tmp_path / "tidings.toml"
    config.write_text("[server]\nbogus = 1\n")
    assert_config_error(run_cli("serve", "--port", "0", "--config", str(config)), "server.bogus")


def test_config_file_from_environment(tmp_path: Path) -> None:
    """TIDINGS_CONFIG names the file when --config is absent."""
    config = tmp_path / "tidings.toml"
    config.write_text("[limits]\nmax_subscriptions = -1\n")
    assert_config_error(
        run_cli("serve", "--port", "0", env={"TIDINGS_CONFIG": str(config)}),
        "limits.max_subscriptions",
    )


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("failing", ["port", "internal_port", "internal_host"])
def test_a_listener_that_cannot_open_is_named(tmp_path: Path, failing: str, workers: int) -> None:
    """A busy public or internal port, or an internal host that does not resolve, exits 1
    with one line naming that listener's address and settings, without a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        server = {"port": 0, "internal_port": 0, "internal_host": '"127.0.0.1"'}
        server[failing] = '"no-such-host.invalid"' if failing == "internal_host" else taken
        config = tmp_path / "tidings.toml"
        config.write_text(
            f'workers = {workers}\n[server]\nmode = "production"\nhost = "127.0.0.1"\n'
            + "".join(f"{key} = {value}\n" for key, value in server.items())
            + f'[auth]\nsecret = "{SECRET}"\n[broker]\nurl = "{REDIS_URL}"\n'
        )
        result = run_cli("serve", "--config", str(config))
    assert result.returncode == 1, result.stderr
    address = "no-such-host.invalid:0" if failing == "internal_host" else f"127.0.0.1:{taken}"
    keys = (
        "server.host, server.port"
        if failing == "port"
        else "server.internal_host, server.internal_port"
    )
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"tidings: cannot listen on {address} ({keys}): "), line
    assert "Traceback" not in result.stderr


def test_unreadable_config_file(tmp_path: Path) -> None:
    """A missing or invalid TOML file exits 2 naming --config."""
    assert_config_error(run_cli("serve", "--config", str(tmp_path / "missing.toml")), "--config")
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    assert_config_error(run_cli("serve", "--config", str(broken)), "--config")


def test_bad_environment_value() -> None:
    """A TIDINGS_* variable of the wrong type exits 2 naming the key."""
    result = run_cli("serve", "--port", "0", env={"TIDINGS_LIMITS__MAX_SUBSCRIPTIONS": "abc"})
    assert_config_error(result, "limits.max_subscriptions")


def test_short_secret_in_production() -> None:
    """A secret under 32 bytes outside development mode exits 2 naming auth.secret."""
    for env in (
        {"TIDINGS_AUTH__SECRET": "short"},
        {"TIDINGS_AUTH__SECRET": "short", "TIDINGS_SERVER__MODE": "production"},
    ):
        assert_config_error(run_cli("serve", "--port", "0", env=env), "auth.secret")


def test_production_without_secret() -> None:
    """Production mode without a secret exits 2 naming auth.secret."""
    result = run_cli("serve", "--port", "0", env={"TIDINGS_SERVER__MODE": "production"})
    assert_config_error(result, "auth.secret")


def test_workers_need_redis() -> None:
    """--workers 2 with the memory broker exits 2 naming workers."""
    assert_config_error(run_cli("serve", "--port", "0", "--workers", "2"), "workers")


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "abc"),
        ("serve", "--bogus"),
        ("nonsense",),
        (),
        ("token",),
        ("publish", "news:a"),
    ],
)
def test_bad_usage_exits_2(args: tuple[str, ...]) -> None:
    """Bad arguments exit 2 with a usage message."""
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "usage" in result.stderr.lower()


def test_version() -> None:
    """--version prints the version and exits 0."""
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("tidings ")


# -- token -------------------------------------------------------------------------------


def test_token_verifies_with_the_secret() -> None:
    """``tidings token`` prints a JWT signed with the configured secret and the claims."""
    before = time.time()
    result = run_cli(
        "token",
        "--sub",
        "alice",
        "--channel",
        "news:*",
        "--ttl",
        "10m",
        env={"TIDINGS_AUTH__SECRET": SECRET},
    )
    assert result.returncode == 0, result.stderr
    tok = result.stdout.strip()
    assert len(result.stdout.strip().splitlines()) == 1
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["channels"] == ["news:*"]
    assert before + 600 - 5 <= claims["exp"] <= time.time() + 600 + 5
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tok, SECRET + "x", algorithms=["HS256"])


def test_token_with_several_channels_and_config_file(tmp_path: Path) -> None:
    """--channel repeats; the secret may come from the TOML file."""
    config = tmp_path / "tidings.toml"
    config.write_text(f'[auth]\nsecret = "{SECRET}"\n')
    result = run_cli(
        "token",
        "--sub",
        "bob",
        "--channel",
        "news:a",
        "--channel",
        "chat:*",
        "--config",
        str(config),
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["channels"] == ["news:a", "chat:*"]
    assert 3600 - 5 <= claims["exp"] - time.time() <= 3600 + 5


def test_token_without_secret() -> None:
    """Without any secret ``tidings token`` exits 2 naming auth.secret."""
    assert_config_error(run_cli("token", "--sub", "alice"), "auth.secret")


def test_token_refuses_a_secret_the_server_would_refuse() -> None:
    """A production secret shorter than 32 bytes exits 2 naming auth.secret (the server
    would not start with it), without echoing the secret; in development mode it signs."""
    result = run_cli("token", "--sub", "alice", env={"TIDINGS_AUTH__SECRET": "short-secret"})
    assert_config_error(result, "auth.secret")
    assert "short-secret" not in result.stderr + result.stdout
    result = run_cli(
        "token",
        "--sub",
        "alice",
        env={"TIDINGS_AUTH__SECRET": "short-secret", "TIDINGS_SERVER__MODE": "development"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().count(".") == 2


@pytest.mark.parametrize("ttl", ["ten", "10x", "-5", "", "1e999", "nan"])
def test_token_bad_ttl(ttl: str) -> None:
    """An unparsable --ttl exits 2 naming --ttl."""
    result = run_cli(
        "token", "--sub", "alice", f"--ttl={ttl}", env={"TIDINGS_AUTH__SECRET": SECRET}
    )
    assert_config_error(result, "--ttl")
    assert result.stdout == ""


# -- publish -----------------------------------------------------------------------------


async def test_publish_prints_results() -> None:
    """``tidings publish`` against a running server prints the results JSON and exits 0."""
    async with serve() as server:
        code, out, err = await run_cli_async(
            "publish",
            "news:cli",
            "notification",
            '{"message": "from cli", "level": "info"}',
            "--url",
            server.http_url,
            "--api-key",
            API_KEY,
        )
        assert code == 0, err
        answer = json.loads(out)
        [result] = answer["results"]
        assert (result["channel"], result["offset"]) == ("news:cli", 1)
        status, page = await api(server, "GET", "/api/channels/news:cli/history")
        assert status == 200
        assert page["events"][0]["id"] == result["id"]
        assert page["events"][0]["data"] == {"message": "from cli", "level": "info"}


async def test_publish_with_idempotency_key_and_env_key() -> None:
    """The API key may come from TIDINGS_API__KEYS; a repeated idempotency key dedupes."""
    async with serve() as server:
        env = {"TIDINGS_API__KEYS": f"{API_KEY},other-key"}
        results = []
        for _ in range(2):
            code, out, err = await run_cli_async(
                "publish",
                "news:cli",
                "custom_event",
                '{"n": 1}',
                "--url",
                server.http_url,
                "--idempotency-key",
                "once",
                env=env,
            )
            assert code == 0, err
            results.append(json.loads(out)["results"][0])
        assert "duplicate" not in results[0]
        assert results[1] == {**results[0], "duplicate": True}
        status, page = await api(server, "GET", "/api/channels/news:cli/history")
        assert (status, page["offset"]) == (200, 1)


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"text"', ""])
async def test_publish_bad_data_json(data: str) -> None:
    """DATA_JSON that is not a JSON object exits 2 and publishes nothing."""
    async with serve() as server:
        code, out, err = await run_cli_async(
            "publish",
            "news:cli",
            "notification",
            data,
            "--url",
            server.http_url,
            "--api-key",
            API_KEY,
        )
        assert code == 2, (out, err)
        assert "DATA_JSON" in err
        status, page = await api(server, "GET", "/api/channels/news:cli/history")
        assert (status, page["offset"]) == (200, 0)


async def test_publish_wrong_key_exits_1() -> None:
    """A wrong API key exits 1 with the server's error message."""
    async with serve() as server:
        code, out, err = await run_cli_async(
            "publish",
            "news:cli",
            "notification",
            '{"message": "x", "level": "info"}',
            "--url",
            server.http_url,
            "--api-key",
            "wrong-key",
        )
        assert code == 1, (out, err)
        assert "401" in err and "invalid API key" in err
        assert out == ""


async def test_publish_invalid_event_exits_1() -> None:
    """An event the server rejects exits 1 with the server's reason."""
    async with serve() as server:
        code, out, err = await run_cli_async(
            "publish",
            "news:cli",
            "notification",
            '{"message": "x"}',
            "--url",
            server.http_url,
            "--api-key",
            API_KEY,
        )
        assert code == 1, (out, err)
        assert "400" in err and "level" in err


async def test_publish_unreachable_server_exits_1() -> None:
    """A server that does not answer exits 1 saying it cannot be reached."""
    async with serve() as server:
        url = server.http_url
    code, out, err = await run_cli_async(
        "publish",
        "news:cli",
        "notification",
        '{"message": "x", "level": "info"}',
        "--url",
        url,
        "--api-key",
        API_KEY,
    )
    assert code == 1, (out, err)
    assert "cannot reach" in err


def test_publish_without_any_key() -> None:
    """Without --api-key and without api.keys ``tidings publish`` exits 2."""
    result = run_cli(
        "publish",
        "news:cli",
        "notification",
        '{"message": "x", "level": "info"}',
        "--url",
        "http://127.0.0.1:9",
    )
    assert_config_error(result, "--api-key")


# -- serve --help --------------------------------------------------------------------------


def test_serve_help_explains_every_flag() -> None:
    """``tidings serve --help`` gives each of --host, --port and --workers a help text."""
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for flag, metavar, words in (
        ("--host", "HOST", "address"),
        ("--port", "PORT", "port"),
        ("--workers", "WORKERS", "worker processes"),
    ):
        [line] = [line for line in lines if line.strip().startswith(f"{flag} {metavar}")]
        assert words in line.split(metavar, 1)[1], result.stdout


# -- the development server's state file -------------------------------------------------


async def _read_stream_until(stream: asyncio.StreamReader, needle: str) -> list[str]:
    """Lines of ``stream`` up to and including the first that contains ``needle``."""
    lines: list[str] = []
    async with asyncio.timeout(PROCESS_TIMEOUT):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"stream ended before {needle!r}: {lines}")
            lines.append(raw.decode().rstrip("\n"))
            if needle in lines[-1]:
                return lines


def _readme_commands() -> list[str]:
    """The README's ``.venv/bin/tidings ...`` lines, without ``.venv/bin/tidings`` and the
    trailing comment."""
    readme = (REPO / "README.md").read_text()
    prefix = "    .venv/bin/tidings "
    return [
        line.removeprefix(prefix).split("  #", 1)[0].strip()
        for line in readme.splitlines()
        if line.startswith(prefix)
    ]


def _home_env(tmp_path: Path) -> dict[str, str]:
    """No runtime directory and no XDG state home: the state file goes under $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "XDG_RUNTIME_DIR": "", "XDG_STATE_HOME": ""}


async def test_cli_works_against_the_dev_server_with_nothing_exported(tmp_path: Path) -> None:
    """After ``tidings serve`` in development mode, ``token``, ``publish`` and ``listen``
    work with no secret, key or URL given (the server runs on a random port), through a
    0600 state file that is removed when the server stops; the banner shows them."""
    env = _home_env(tmp_path)
    state = Path(env["HOME"]) / ".local" / "state" / "tidings" / "dev-server.json"
    async with serve_process(tmp_path, env=env, done=_is_curl) as served:
        banner = "\n".join(served.stdout)
        secret, api_key = served.field("JWT secret"), served.field("API key")
        assert str(state) in banner
        assert "token --sub alice --channel 'news:*'" in banner
        assert "listen --sub alice news:a" in banner
        assert "publish news:a notification" in banner
        # The README's quick start shows the banner's command lines, word for word.
        shown = [
            line.strip().split("tidings ", 1)[1]
            for line in served.stdout
            if line.strip().split(" ", 1)[0].endswith("tidings")
        ]
        assert sorted(_readme_commands()) == sorted(shown), served.stdout
        assert state.stat().st_mode & 0o777 == 0o600
        assert state.parent.stat().st_mode & 0o777 == 0o700
        assert api_key in state.read_text()

        code, out, err = await run_cli_async(
            "token", "--sub", "alice", "--channel", "news:*", env=env
        )
        assert code == 0, err
        claims = jwt.decode(out.strip(), secret, algorithms=["HS256"])
        assert (claims["sub"], claims["channels"]) == ("alice", ["news:*"])

        listener = await asyncio.create_subprocess_exec(
            *CLI,
            "listen",
            "--sub",
            "alice",
            "news:a",
            env=clean_env(env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert listener.stdout is not None and listener.stderr is not None
        try:
            await _read_stream_until(listener.stderr, "subscribed to news:a")
            code, out, err = await run_cli_async(
                "publish",
                "news:a",
                "notification",
                '{"message": "first", "level": "info"}',
                env=env,
            )
            assert code == 0, err
            [result] = json.loads(out)["results"]
            async with asyncio.timeout(PROCESS_TIMEOUT):
                event = json.loads(await listener.stdout.readline())
            assert (event["channel"], event["id"]) == ("news:a", result["id"])
            listener.terminate()
            assert await asyncio.wait_for(listener.wait(), PROCESS_TIMEOUT) == 0
        finally:
            if listener.returncode is None:
                listener.kill()
                await listener.wait()

        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), PROCESS_TIMEOUT) == 0
    assert not state.exists()
    result = run_cli("token", "--sub", "alice", env=env)
    assert_config_error(result, "auth.secret")
    assert "tidings serve" in result.stderr

    # Development mode logs readable lines: where it listens, each WebSocket coming and
    # going with its id and user, and no access line, token or secret.
    logs = served.stderr()
    assert not any(line.startswith("{") for line in logs.splitlines()), logs
    assert "listening on http://127.0.0.1:" in logs
    connected = [
        line
        for line in logs.splitlines()
        if "connected: user alice" in line and "disconnected" not in line
    ]
    assert len(connected) == 1, logs
    conn_id = connected[0].split("websocket ", 1)[1].split()[0]
    assert conn_id.startswith("c_")
    assert f"websocket {conn_id} disconnected: user alice, close code 1000" in logs
    assert "GET /ws" not in logs
    assert secret not in logs and api_key not in logs and "eyJ" not in logs


async def test_dev_key_is_not_sent_to_another_server(tmp_path: Path) -> None:
    """With a development server's state file present, ``publish --url`` naming another
    server does not send it that server's key: without a key of its own it exits 2."""
    env = _home_env(tmp_path)
    async with serve_process(tmp_path, env=env, done=_is_curl), serve() as other:
        code, out, err = await run_cli_async(
            "publish",
            "news:a",
            "notification",
            '{"message": "x", "level": "info"}',
            "--url",
            other.http_url,
            env=env,
        )
        assert code == 2, (out, err)
        assert "--api-key" in err
        status, page = await api(other, "GET", "/api/channels/news:a/history")
        assert (status, page["offset"]) == (200, 0)
        code, out, err = await run_cli_async("listen", "--url", other.ws_url, "news:a", env=env)
        assert code == 2 and "--token" in err, (out, err)


async def test_production_server_writes_no_state_file(tmp_path: Path) -> None:
    """A production server leaves the CLI nothing to find: ``tidings token`` without a
    secret still exits 2."""
    plain = _home_env(tmp_path)
    env = {**plain, "TIDINGS_AUTH__SECRET": SECRET, "TIDINGS_API__KEYS": API_KEY}
    async with serve_process(tmp_path, env=env, done=lambda line: "listening on" in line):
        assert not (Path(env["HOME"]) / ".local" / "state" / "tidings").exists()
        assert_config_error(run_cli("token", "--sub", "alice", env=plain), "auth.secret")


# -- start-up cost -----------------------------------------------------------------------

#: Modules whose import is most of a slow start-up; the quick commands need none of them.
HEAVY = (
    "aiohttp",
    "pydantic",
    "pydantic_settings",
    "jwt",
    "cryptography",
    "tidings.server",
    "tidings.client",
    "tidings.bench.runner",
)

_REPORT_IMPORTS = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('IMPORTED', sorted(m for m in sys.modules if any(\n"
    f"    m == h or m.startswith(h + '.') for h in {HEAVY!r})), file=sys.stderr))\n"
    "from tidings.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


async def _heavy_imports(*args: str, env: Mapping[str, str] | None = None) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _REPORT_IMPORTS,
        *args,
        env=clean_env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
    assert proc.returncode == 0, (out, err)
    line = next(line for line in err.decode().splitlines() if line.startswith("IMPORTED "))
    return list(json.loads(line.removeprefix("IMPORTED ").replace("'", '"')))


async def test_quick_commands_import_no_heavy_module(tmp_path: Path) -> None:
    """``--version``, ``publish`` (with a key, or the dev server's) and ``token`` (with the
    dev server's secret) run without importing aiohttp, pydantic, PyJWT or the server:
    what made every call cost most of a second."""
    assert await _heavy_imports("--version") == []
    async with serve() as server:
        assert (
            await _heavy_imports(
                "publish",
                "news:a",
                "notification",
                '{"message": "x", "level": "info"}',
                "--url",
                server.http_url,
                "--api-key",
                API_KEY,
            )
            == []
        )
    env = _home_env(tmp_path)
    async with serve_process(tmp_path, env=env, done=_is_curl):
        assert await _heavy_imports("token", "--sub", "alice", env=env) == []
        assert (
            await _heavy_imports(
                "publish", "news:a", "notification", '{"message": "x", "level": "info"}', env=env
            )
            == []
        )


# -- development mode is asked for; the file is checked as a whole ---------------------------


def test_config_file_without_auth_refuses_to_start(tmp_path: Path) -> None:
    """A configuration file that lost its [auth] section exits 2 naming auth.secret
    instead of starting a development server."""
    config = tmp_path / "tidings.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\n')
    result = run_cli("serve", "--port", "0", "--config", str(config))
    assert_config_error(result, "auth.secret")
    assert "DEVELOPMENT" not in result.stdout


def test_environment_settings_without_a_secret_refuse_to_start() -> None:
    """TIDINGS_* settings in the environment make a production server: no secret, exit 2."""
    result = run_cli("serve", "--port", "0", env={"TIDINGS_LOGGING__LEVEL": "info"})
    assert_config_error(result, "auth.secret")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "eighty"\n', "server.port"),
        ('[server]\nport = "8106"\n', "server.port"),
        ('[auth]\npersonal_channel = "yes"\n', "auth.personal_channel"),
    ],
)
def test_bad_file_value_exits_2_even_when_a_flag_overrides_it(
    tmp_path: Path, text: str, key: str
) -> None:
    """A file value of the wrong type exits 2 naming the key, also under --port."""
    config = tmp_path / "tidings.toml"
    config.write_text(text + f'[api]\nkeys = ["{API_KEY}"]\n')
    result = run_cli(
        "serve", "--port", "8108", "--config", str(config), env={"TIDINGS_AUTH__SECRET": SECRET}
    )
    assert_config_error(result, key)
    assert "must be" in result.stderr and "Input should" not in result.stderr


async def test_explicit_development_mode_in_a_file(tmp_path: Path) -> None:
    """server.mode = "development" in a file asks for a development server: banner,
    generated credentials and the console."""
    config = tmp_path / "tidings.toml"
    config.write_text('[server]\nmode = "development"\n')
    async with serve_process(tmp_path, "--config", str(config), done=_is_curl) as served:
        assert "DEVELOPMENT MODE" in "\n".join(served.stdout)
        assert served.field("Console").startswith("http://127.0.0.1:")
