"""The development server's state file (``tidings.devstate``): where it lives, how it is
written, and when the CLI refuses to trust it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidings.devstate import (
    FILE_NAME,
    DevState,
    read_state,
    remove_state,
    state_dir,
    write_state,
)


def state(pid: int | None = None) -> DevState:
    return DevState(
        os.getpid() if pid is None else pid,
        "http://127.0.0.1:8000",
        "ws://127.0.0.1:8000/ws",
        "dev-secret",
        "dev_key",
        "HS256",
    )


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_state_dir_prefers_the_runtime_dir_then_state_home_then_home() -> None:
    """$XDG_RUNTIME_DIR, else $XDG_STATE_HOME, else ~/.local/state; relative ones are
    ignored, as the XDG specification asks."""
    assert state_dir(
        {"XDG_RUNTIME_DIR": "/run/user/7", "XDG_STATE_HOME": "/s", "HOME": "/h"}
    ) == Path("/run/user/7/tidings")
    assert state_dir({"XDG_RUNTIME_DIR": "relative", "XDG_STATE_HOME": "/s", "HOME": "/h"}) == Path(
        "/s/tidings"
    )
    assert state_dir({"XDG_RUNTIME_DIR": "", "XDG_STATE_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.local/state/tidings"
    )


def test_written_state_is_private_and_reads_back(tmp_path: Path) -> None:
    """The file is 0600 in a 0700 directory and reads back while its process lives."""
    folder = tmp_path / "tidings"
    path = write_state(state(), folder)
    assert path == folder / FILE_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    assert read_state(folder) == state()
    assert [p.name for p in folder.iterdir()] == [FILE_NAME]  # no temporary file left


def test_an_open_directory_of_ours_is_closed_first(tmp_path: Path) -> None:
    """A directory the user made with a looser mode is tightened to 0700 before writing."""
    folder = tmp_path / "tidings"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    write_state(state(), folder)
    assert folder.stat().st_mode & 0o777 == 0o700


def test_state_of_a_dead_server_is_ignored(tmp_path: Path) -> None:
    """A server killed before its clean-up leaves a file the CLI does not use."""
    write_state(state(dead_pid()), tmp_path)
    assert read_state(tmp_path) is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_state_others_could_read_or_write_is_ignored(tmp_path: Path, mode: int) -> None:
    """A file with group or other permission bits was not written by a server: ignored."""
    path = write_state(state(), tmp_path)
    path.chmod(mode)
    assert read_state(tmp_path) is None


def test_a_symlinked_state_file_is_ignored(tmp_path: Path) -> None:
    """The state file is never followed through a symbolic link."""
    real = write_state(state(), tmp_path / "elsewhere")
    (tmp_path / FILE_NAME).symlink_to(real)
    assert read_state(tmp_path) is None


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        "{}",
        json.dumps({"pid": "1", "url": "u", "ws_url": "w", "secret": "s", "api_key": "k"}),
        json.dumps({"pid": os.getpid(), "url": "u", "ws_url": "w", "secret": "", "api_key": "k"}),
        json.dumps(
            {
                "pid": os.getpid(),
                "url": "u",
                "ws_url": "w",
                "secret": "s",
                "api_key": "k",
                "extra": 1,
            }
        ),
    ],
)
def test_malformed_state_is_ignored(tmp_path: Path, content: str) -> None:
    """Anything but the exact fields with non-empty values reads as no server."""
    path = tmp_path / FILE_NAME
    path.write_text(content)
    path.chmod(0o600)
    assert read_state(tmp_path) is None


def test_remove_only_removes_the_file_its_server_wrote(tmp_path: Path) -> None:
    """A server stopping does not remove the file a later server has written since."""
    path = write_state(state(), tmp_path)
    remove_state(path, os.getpid() + 1)
    assert path.exists()
    remove_state(path, os.getpid())
    assert not path.exists()
    remove_state(path, os.getpid())  # already gone: nothing to do
