"""The development server's state file: how the CLI finds a running development server.

A server in development mode generates its JWT secret and API key at start-up. So that
``tidings token``, ``tidings publish`` and ``tidings listen`` work against it without
anything exported, ``tidings serve`` writes them, with its URLs and process id, to
``dev-server.json`` in a per-user directory (``$XDG_RUNTIME_DIR/tidings``, else
``$XDG_STATE_HOME/tidings``, else ``~/.local/state/tidings``), and removes the file when
it stops. Only development mode writes it; the commands read it only when no secret or
API key is configured.

The file is created with mode 0600 in a directory created with mode 0700, and replaced
atomically. It is trusted only when it is a regular file owned by the current user that
nobody else can read or write, and only while the process that wrote it is alive: a
server killed without its clean-up leaves a file that is ignored. With several
development servers, the most recently started one wins.

Standard library only: every CLI call reads this.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["FILE_NAME", "DevState", "read_state", "remove_state", "state_dir", "write_state"]

FILE_NAME = "dev-server.json"


@dataclass(frozen=True, slots=True)
class DevState:
    """What a running development server tells the CLI about itself."""

    pid: int
    #: Base URL of the HTTP endpoints (``http://127.0.0.1:8000``).
    url: str
    #: The WebSocket URL, path included, without a token.
    ws_url: str
    secret: str
    api_key: str
    #: The HS* algorithm tokens for this server are signed with.
    algorithm: str = "HS256"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The per-user directory of the state file (see the module docstring)."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return Path(runtime) / "tidings"
    state = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):
        return Path(state) / "tidings"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "tidings"


def _private_dir(directory: Path) -> None:
    """Make sure ``directory`` is ours and closed to everybody else (tightening its mode
    if it is ours); raise ``OSError`` when it is not ours."""
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{directory} is not a directory of this user")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(directory, 0o700)


def write_state(state: DevState, directory: Path | None = None) -> Path:
    """Write ``state`` (mode 0600, atomically); return the file's path.

    Raises ``OSError`` when the directory cannot be created or is not private to this
    user (then nothing is written).
    """
    folder = state_dir() if directory is None else directory
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private_dir(folder)
    path = folder / FILE_NAME
    temporary = folder / f".{FILE_NAME}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(state), handle)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return path


def remove_state(path: Path, pid: int) -> None:
    """Remove the state file at ``path`` if it is still the one process ``pid`` wrote (a
    development server started later may have replaced it)."""
    state = _load(path)
    if state is not None and state.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process now has that id: not our server
    return True


def _load(path: Path) -> DevState | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        info = os.fstat(handle.fileno())
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        ):
            return None  # not written by write_state: never trust its secret
        try:
            data = json.loads(handle.read(65536))
            state = DevState(**data)
        except (ValueError, TypeError):
            return None
    fields = (state.url, state.ws_url, state.secret, state.api_key, state.algorithm)
    if type(state.pid) is not int or not all(isinstance(f, str) and f for f in fields):
        return None
    return state


def read_state(directory: Path | None = None) -> DevState | None:
    """The running development server's state, or None when there is none: no file, a
    file this module would not have written, or a server that is gone."""
    state = _load((state_dir() if directory is None else directory) / FILE_NAME)
    if state is None or not _alive(state.pid):
        return None
    return state
