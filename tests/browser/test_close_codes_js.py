"""The browser client knows every close code the server defines, with the server's
reconnect advice: ``CLOSE_CODES`` and ``closeAction`` of clients/js/tidings.js (imported by
Node, so that the table is read as the browser reads it) against
``tidings.protocol.codes.CloseCode``, and the JS client's reconnection table in
docs/client-js.md."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from paths import REPO
from tidings.protocol.codes import CloseCode, ReconnectAdvice
from timeouts import scaled

ROOT = REPO
CLIENT = ROOT / "clients" / "js" / "tidings.js"
DOCS = ROOT / "docs" / "client-js.md"
#: Codes a browser reports itself (never sent by the server) and codes nobody defines.
EXTRA_CODES = (1005, 1006, 3000, 4000, 4999)

_SCRIPT = """
const m = await import(process.argv[1]);
const codes = process.argv.slice(2).map(Number);
console.log(JSON.stringify({
  described: Object.keys(m.CLOSE_CODES).map(Number),
  actions: Object.fromEntries(codes.map((code) => [code, m.closeAction(code)])),
}));
"""


def _js_view() -> dict[str, dict[str, str] | list[int]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to read clients/js/tidings.js")
    codes = [str(int(code)) for code in CloseCode] + [str(code) for code in EXTRA_CODES]
    done = subprocess.run(
        [node, "--input-type=module", "-e", _SCRIPT, "--", CLIENT.as_uri(), *codes],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    )
    view: dict[str, dict[str, str] | list[int]] = json.loads(done.stdout)
    return view


def test_js_client_describes_every_server_close_code() -> None:
    """Every ``CloseCode`` has an entry in the JS ``CLOSE_CODES`` table."""
    described = _js_view()["described"]
    assert isinstance(described, list)
    assert sorted({int(code) for code in CloseCode} - set(described)) == []


def test_js_client_follows_the_server_reconnect_advice() -> None:
    """``closeAction`` gives each server close code, and any unknown code, the advice of
    ``CloseCode.advice_for``."""
    actions = _js_view()["actions"]
    assert isinstance(actions, dict)
    expected = {str(int(code)): code.advice.value for code in CloseCode}
    expected.update({str(code): CloseCode.advice_for(code).value for code in EXTRA_CODES})
    assert actions == expected
    assert {CloseCode.advice_for(code) for code in EXTRA_CODES} == {ReconnectAdvice.RECONNECT}


def test_js_docs_reconnection_table_lists_every_server_close_code() -> None:
    """The JS client's reconnection table in docs/client-js.md names every server close
    code, each in exactly one row."""
    text = DOCS.read_text()
    table = text.split("## Reconnection", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| ")]
    listed = [int(code) for row in rows for code in re.findall(r"\b[14]\d{3}\b", row)]
    assert sorted(set(listed)) == sorted(set(listed) | {int(code) for code in CloseCode})
    assert len(listed) == len(set(listed))
