"""Configuration (INTERFACE "Configuration"): defaults < TOML file < MTA_* env,
`--config` over MTA_CONFIG, booleans, secrets masked, exit 2 with one line
naming the bad key and never a traceback; SIGHUP reloads aliases and users.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from conftest import assert_reply, base_env, run_mta, write_toml


def check_one_line_error(proc, key: str) -> None:
    assert proc.returncode == 2, f"rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr!r}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {proc.stderr!r}"
    assert key.lower() in lines[0].lower(), f"{key} not named in {lines[0]!r}"
    assert "Traceback" not in proc.stderr + proc.stdout


def cli(tmp_path, *args, config: dict | None = None, env: dict | None = None,
        config_text: str | None = None):
    path = tmp_path / "mta.toml"
    if config_text is not None:
        path.write_text(config_text)
    elif config is not None:
        write_toml(path, config)
    else:
        path.write_text("")
    run_env = base_env({"MTA_CONFIG": str(path), **(env or {})})
    return run_mta(args, env=run_env, cwd=tmp_path)


def shown_value(output: str, key: str) -> str:
    """The line of `mta config show` that mentions KEY (format not fixed)."""
    lines = [l for l in output.splitlines() if re.search(rf"(?<![a-z_]){key}(?![a-z_])", l)]
    assert lines, f"{key} not in config show output:\n{output}"
    return lines[0]


# --------------------------------------------------------------------------
# mta config check

@pytest.mark.parametrize("config_text,key", [
    ('port_relay = "abc"\n', "port_relay"),
    ("port_relay = 70000\n", "port_relay"),
    ("no_such_key = 1\n", "no_such_key"),
    ('max_message_size = "lots"\n', "max_message_size"),
    ('mynetworks = "not-a-network"\n', "mynetworks"),
    ('spf_enabled = "maybe"\n', "spf_enabled"),
], ids=["port-abc", "port-range", "unknown-key", "size", "mynetworks", "bool"])
def test_config_check_bad_value(tmp_path, config_text, key):
    """A malformed value exits 2 with one line naming the key (INTERFACE)."""
    check_one_line_error(cli(tmp_path, "config", "check", config_text=config_text), key)


def test_config_check_missing_cert_file(tmp_path):
    """tls_cert pointing to a missing file exits 2 naming tls_cert."""
    key = tmp_path / "key.pem"
    key.write_text("not really a key\n")
    proc = cli(tmp_path, "config", "check", config={
        "tls_cert": str(tmp_path / "missing-cert.pem"), "tls_key": str(key)})
    check_one_line_error(proc, "tls_cert")


def test_config_check_bad_env(tmp_path):
    """MTA_* environment values are validated like file values."""
    proc = cli(tmp_path, "config", "check", config={"port_relay": 2600},
               env={"MTA_PORT_RELAY": "abc"})
    check_one_line_error(proc, "port_relay")


def test_config_check_bad_toml_syntax(tmp_path):
    """A config file that is not TOML is a configuration error too: exit 2, one line."""
    proc = cli(tmp_path, "config", "check", config_text="port_relay = = 25\n[[[\n")
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_missing_file(tmp_path):
    """`--config` naming a file that does not exist: exit 2, one line, no traceback."""
    proc = run_mta(["config", "check", "--config", str(tmp_path / "nope.toml")],
                   env=base_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_config_file_is_valid(tmp_path):
    """INTERFACE: an empty config file is valid."""
    proc = cli(tmp_path, "config", "check", config_text="")
    assert proc.returncode == 0, proc.stderr


def test_sections_allowed(tmp_path):
    """INTERFACE: sections are allowed but not required."""
    proc = cli(tmp_path, "config", "show",
               config_text='[smtp]\nhostname = "sectioned.example"\n')
    assert proc.returncode == 0, proc.stderr
    assert "sectioned.example" in proc.stdout


@pytest.mark.parametrize("value,expected", [
    ("yes", True), ("No", False), ("1", True), ("0", False), ("True", True),
    ("FALSE", False), ("YES", True), ("nO", False),
])
def test_booleans_any_case(tmp_path, value, expected):
    """INTERFACE: booleans accept true/false, yes/no, 1/0 in any case, from the env."""
    proc = cli(tmp_path, "config", "show", env={"MTA_GREYLIST_ENABLED": value})
    assert proc.returncode == 0, proc.stderr
    line = shown_value(proc.stdout, "greylist_enabled").lower()
    assert str(expected).lower() in line and str(not expected).lower() not in line, line


@pytest.mark.parametrize("literal,expected", [
    ('"yes"', True), ('"No"', False), ("true", True), ("false", False), ('"1"', True),
    ("0", False),
])
def test_booleans_in_file(tmp_path, literal, expected):
    """Booleans in the TOML file: native or as the same strings."""
    proc = cli(tmp_path, "config", "show", config_text=f"greylist_enabled = {literal}\n")
    assert proc.returncode == 0, proc.stderr
    line = shown_value(proc.stdout, "greylist_enabled").lower()
    assert str(expected).lower() in line and str(not expected).lower() not in line, line


def test_layers_and_masking(tmp_path):
    """Defaults < file < MTA_* env; `--config` wins over MTA_CONFIG; secrets
    (admin_token) are masked by `config show`."""
    file_a = tmp_path / "a.toml"
    file_b = tmp_path / "b.toml"
    write_toml(file_a, {"hostname": "file-a.example", "max_recipients": 11,
                        "admin_token": "very-secret-token-aaa"})
    write_toml(file_b, {"hostname": "file-b.example", "max_recipients": 22,
                        "admin_token": "very-secret-token-bbb"})

    env = base_env({"MTA_CONFIG": str(file_a)})
    p = run_mta(["config", "show"], env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "file-a.example" in p.stdout
    assert "11" in shown_value(p.stdout, "max_recipients")
    assert "very-secret-token" not in p.stdout, "admin_token not masked"
    assert "admin_token" in p.stdout

    p = run_mta(["config", "show", "--config", str(file_b)], env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "file-b.example" in p.stdout and "file-a.example" not in p.stdout
    assert "very-secret-token" not in p.stdout

    env_over = base_env({"MTA_CONFIG": str(file_a), "MTA_HOSTNAME": "from-env.example",
                         "MTA_MAX_RECIPIENTS": "33"})
    p = run_mta(["config", "show"], env=env_over, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "from-env.example" in p.stdout and "file-a.example" not in p.stdout
    assert "33" in shown_value(p.stdout, "max_recipients")

    # built-in defaults (INTERFACE: ports 2525 / 5870 / 4650 / 8080)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    p = run_mta(["config", "show"], env=base_env({"MTA_CONFIG": str(empty)}), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "2525" in shown_value(p.stdout, "port_relay")
    assert "5870" in shown_value(p.stdout, "port_submission")


# --------------------------------------------------------------------------
# mta serve

@pytest.mark.parametrize("override,key", [
    ({"port_relay": "abc"}, "port_relay"),
    ({"no_such_key": 1}, "no_such_key"),
], ids=["port-abc", "unknown-key"])
def test_serve_bad_config_exits_2(mta_factory, override, key):
    """`mta serve` with a malformed value stops start-up: exit 2, one line naming
    the key, no traceback (INTERFACE "Configuration")."""
    server = mta_factory(override, start=False)
    server.start(wait=False)
    try:
        rc = server.proc.wait(15)
    except Exception:
        server.kill()
        raise
    err = server.stderr_text()
    assert rc == 2, f"rc={rc} stderr={err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], err
    assert "Traceback" not in err


def test_serve_config_flag_wins(mta_factory, tmp_path):
    """`mta serve --config FILE` wins over MTA_CONFIG: the banner shows FILE's hostname."""
    server = mta_factory(start=False)
    other = dict(server.config, hostname="flag.test.example")
    flag_file = server.root / "flag.toml"
    write_toml(flag_file, other)
    server.start(args=("--config", str(flag_file)))
    with server.connect() as c:
        banner = c.banner()
        assert banner.lines[0].startswith("flag.test.example"), str(banner)


def test_sighup_reloads_aliases_and_users(mta_factory):
    """INTERFACE `mta serve`: SIGHUP reloads config, users and policy without
    dropping connections; a new alias (and a new user) is accepted afterwards."""
    server = mta_factory({"mynetworks": "192.0.2.0/24"})
    with server.session() as c:
        assert_reply(c.cmd("MAIL FROM:<x@example.org>"), 250)
        assert_reply(c.cmd("RCPT TO:<newalias@example.com>"), 550, "5.1.1")
        assert_reply(c.cmd("RCPT TO:<carol@example.com>"), 550, "5.1.1")

    held = server.session()  # must survive the reload
    aliases = server.root / "aliases"
    aliases.write_text(aliases.read_text() + "newalias: postmaster@example.com\n")
    server.add_user("carol@example.com")
    server.signal(signal.SIGHUP)

    deadline = time.monotonic() + 5
    while True:
        with server.session() as c:
            assert_reply(c.cmd("MAIL FROM:<x@example.org>"), 250)
            r = c.cmd("RCPT TO:<newalias@example.com>")
            r2 = c.cmd("RCPT TO:<carol@example.com>")
        if (r.code, r2.code) == (250, 250) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert_reply(r, 250, "2.1.5")
    assert_reply(r2, 250, "2.1.5")
    assert server.alive()
    assert_reply(held.cmd("NOOP"), 250, "2.0.0")
    assert_reply(held.cmd("MAIL FROM:<x@example.org>"), 250)
    assert_reply(held.cmd("RCPT TO:<newalias@example.net>"), 250, "2.1.5")
    held.close()


def test_sighup_changes_idle_timeout_of_new_sessions(mta_factory):
    """RFC 5321 4.5.3.2 timeouts, as configured now: listeners hand the idle
    timeout to accepted sockets (SO_RCVTIMEO), so a reload that shortens
    smtp_timeout must still reach the next session, which is cut with
    421 4.4.2 once idle that long."""
    server = mta_factory({"smtp_timeout": 300})
    write_toml(server.config_path, dict(server.config, smtp_timeout=2))
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        with server.connect() as c:
            assert_reply(c.banner(), 220)
            started = time.monotonic()
            try:
                reply = c.reply(timeout=4)
            except TimeoutError:
                reply = None
        if reply is not None or time.monotonic() > deadline:
            break
    assert reply is not None, "an idle session outlived the reloaded smtp_timeout"
    assert_reply(reply, 421, "4.4.2")
    assert 1.5 < time.monotonic() - started < 4


def test_sighup_with_broken_config_keeps_running(mta_factory):
    """A reload with a bad config file must not kill a running daemon (Postfix
    `reload` semantics): it keeps the old config and keeps serving."""
    server = mta_factory()
    good = server.config_path.read_text()
    server.config_path.write_text(good + 'port_relay = "abc"\n')
    server.signal(signal.SIGHUP)
    time.sleep(1)
    assert server.alive(), server.diagnostics()
    server.send()
    server.config_path.write_text(good)
