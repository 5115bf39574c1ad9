"""What a newcomer meets before reading any code (issue 15 point 9): ``make run`` installs
only what the server needs, the licence is an SPDX expression pip reads without
deprecation warnings, and the commands the README and the docs show exist and are
written the way their tools parse them."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

from packaging.licenses import canonicalize_license_expression
from packaging.requirements import Requirement

from paths import REPO

PYPROJECT = REPO / "pyproject.toml"
#: The newcomer's pages: the README and the users' docs.
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _make_commands(target: str, venv: Path) -> list[str]:
    """The commands ``make TARGET`` would run for a fresh virtualenv at ``venv``."""
    make = shutil.which("make")
    assert make is not None, "the README's quick start needs make"
    # Under `make test` the parent make's variables would make this one a sub-make, which
    # prints "Entering/Leaving directory" lines among the commands.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    result = subprocess.run(
        [make, "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_make_run_installs_the_server_without_the_test_tools(tmp_path: Path) -> None:
    """On a fresh clone ``make run`` installs Tidings alone (no ``[test]`` extra: mypy,
    Playwright, ...) and starts ``tidings serve``; ``make test`` adds the extra."""
    venv = tmp_path / "venv"
    run = _make_commands("run", venv)
    installs = [line for line in run if " install " in line]
    assert any(line.endswith("pip install --quiet -e .") for line in installs), run
    assert not any("[" in line for line in installs), run
    assert run[-1] == f"{venv}/bin/tidings serve"
    test = _make_commands("test", venv)
    assert any(line.endswith("pip install --quiet -e '.[test]'") for line in test), test


def test_licence_is_an_spdx_expression() -> None:
    """``project.license`` is a plain SPDX expression (PEP 639), not the ``{text = ...}``
    table setuptools warns about on every install, and the build needs a setuptools
    that reads it (77 or later); no licence classifier contradicts it."""
    config = tomllib.loads(PYPROJECT.read_text())
    project = config["project"]
    licence = project["license"]
    assert isinstance(licence, str), licence
    assert canonicalize_license_expression(licence) == licence
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))
    [setuptools] = [
        Requirement(r)
        for r in config["build-system"]["requires"]
        if Requirement(r).name == "setuptools"
    ]
    assert not setuptools.specifier.contains("76.1") and setuptools.specifier.contains("77.0")


def _shell_snippets(text: str) -> list[str]:
    """Command lines of a page: lines of its code blocks and its inline code spans."""
    snippets: list[str] = []
    in_block = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif in_block or line.startswith("    "):
            snippets.append(line.strip().removeprefix("$ "))
    snippets.extend(re.findall(r"`([^`\n]+)`", text))
    return snippets


def test_websocat_examples_put_the_url_first() -> None:
    """Every websocat command in the README and the docs has its URL before any ``-H``:
    websocat's ``-H`` takes every word after it as a header, so a URL after it is lost
    ("No URL specified")."""
    commands = [
        snippet
        for page in PAGES
        for snippet in _shell_snippets(page.read_text())
        if snippet.startswith("websocat ")
    ]
    assert len(commands) >= 2, "the README and docs/protocol.md show websocat"
    for command in commands:
        words = shlex.split(command)
        urls = [i for i, word in enumerate(words) if re.match(r"wss?://", word)]
        headers = [i for i, word in enumerate(words) if word in ("-H", "--header")]
        assert len(urls) == 1, command
        assert not headers or urls[0] < headers[0], command


def test_python_dash_m_commands_name_runnable_modules() -> None:
    """Every ``python -m MODULE`` the README and the docs mention runs: the module exists
    and, for a package, has a ``__main__`` (there is no ``python -m aiohttp`` client)."""
    mentioned = {
        match
        for page in PAGES
        for match in re.findall(r"python3? -m ([A-Za-z_][\w.]*)", page.read_text())
    }
    assert "tidings.cli" in mentioned
    for module in sorted(mentioned):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"python -m {module}: no such module"
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(module + ".__main__") is not None, (
                f"python -m {module}: a package without __main__"
            )
