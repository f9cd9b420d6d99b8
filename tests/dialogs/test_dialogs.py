"""Scripted SMTP dialogs against a live daemon, in the spirit of chasquid's
chamuyero (test/util/chamuyero).

Every `*.txt` file next to this one is a script, run against a fresh daemon.
Format, one directive per line (blank lines and lines starting with `#` are
ignored):

    config KEY = TOML-VALUE   daemon configuration override (before any `c`)
    c -> TEXT                 send TEXT + CRLF
    c => TEXT                 send TEXT with \\r \\n \\t \\xNN escapes decoded,
                              nothing appended, in ONE write (pipelining)
    c <- TEXT                 read one line; it must equal TEXT exactly
    c <~ REGEX                read one line; it must match REGEX (re.match)
    c <= REGEX                read one whole reply (multi-line allowed); its
                              final line must match REGEX and every line must
                              carry the same code
    c <.                      the server closes the connection
    c connect                 open a new connection (the first is implicit)

Each script's comment header names the RFC section it checks.
"""

from __future__ import annotations

import codecs
import re
import socket
import tomllib
from pathlib import Path

import pytest

from conftest import SMTPClosed, SMTPConn

HERE = Path(__file__).resolve().parent
SCRIPTS = sorted(HERE.glob("*.txt"))


def parse_script(path: Path):
    config: dict = {}
    steps: list[tuple[int, str, str]] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("config "):
            assert not steps, f"{path.name}:{lineno}: config after dialog steps"
            key, _, value = line[len("config "):].partition("=")
            config[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
            continue
        m = re.match(r"c (->|=>|<-|<~|<=|<\.|connect)(?: (.*))?$", line)
        assert m, f"{path.name}:{lineno}: cannot parse {line!r}"
        steps.append((lineno, m.group(1), m.group(2) or ""))
    return config, steps


def decode_escapes(text: str) -> bytes:
    return codecs.escape_decode(text.encode("utf-8"))[0]


def run_script(path: Path, server) -> None:
    _, steps = parse_script(path)
    conn = SMTPConn(server.port, timeout=10)
    try:
        for lineno, op, arg in steps:
            where = f"{path.name}:{lineno}"
            try:
                if op == "connect":
                    conn.close()
                    conn = SMTPConn(server.port, timeout=10)
                elif op == "->":
                    conn.send(arg.encode("utf-8") + b"\r\n")
                elif op == "=>":
                    conn.send(decode_escapes(arg))
                elif op == "<-":
                    got = conn.readline().decode("utf-8", "replace")
                    assert got == arg, f"{where}: expected {arg!r}, got {got!r}"
                elif op == "<~":
                    got = conn.readline().decode("utf-8", "replace")
                    assert re.match(arg, got), f"{where}: expected /{arg}/, got {got!r}"
                elif op == "<=":
                    reply = conn.reply()
                    final = f"{reply.code} {reply.lines[-1]}"
                    assert re.match(arg, final), (
                        f"{where}: expected reply /{arg}/, got {str(reply)!r}")
                elif op == "<.":
                    assert conn.is_closed(timeout=10), f"{where}: connection still open"
            except (SMTPClosed, socket.timeout, ConnectionError) as error:
                pytest.fail(f"{where}: {op} {arg!r}: {error!r}\n"
                            f"transcript: {conn.transcript[-20:]}\n" + server.diagnostics())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server_for(module_mta_factory):
    """One daemon per distinct `config` block, shared by the scripts (each script
    runs on its own connections, so they do not see each other)."""
    servers: dict[str, object] = {}

    def get(config: dict):
        key = repr(sorted(config.items()))
        if key not in servers or not servers[key].alive():
            servers[key] = module_mta_factory(config or None)
        return servers[key]

    return get


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_dialog(script, server_for):
    config, _ = parse_script(script)
    run_script(script, server_for(config))
