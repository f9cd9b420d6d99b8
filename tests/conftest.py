"""Shared fixtures for the black-box tests of mta.

Everything here treats mta as a black box: the daemon is started as a real
subprocess (`python -m mta serve`) on loopback ports picked at random, the
CLI is run as a subprocess, and clients talk to it over real sockets. Nothing
imports the `mta` package.

- `mta_factory(overrides=None, ...)` writes `mta.toml` in a fresh temporary
  directory, starts the daemon, waits for its 220 banner and returns an
  `MTAServer`. At teardown every daemon still alive gets SIGTERM (then SIGKILL
  after 10 s), and the daemon's stderr, `mta.log`, `smtp.log` and the stderr
  of every CLI call are checked for "Traceback": a misbehaving client may cost
  a log line, never a traceback (issue 2).
- `mta`: a daemon with the default test configuration.
- `SMTPConn`: a tiny raw-socket SMTP client that reads whole (multi-line)
  replies, for malformed input, pipelining and BDAT.

The temporary directories come from pytest's `tmp_path`, which keeps them
after a run so a failure can be inspected.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HOSTNAME = "mx.test.example"
DEFAULT_ALIASES = (
    "abuse: postmaster@example.com\n"
    "info@example.com: alice@example.com, bob@example.org\n"
)
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 30.0
# A hung test must not hang the suite: without pytest-timeout, dump the stacks
# and exit after this many seconds (daemons die with us, see _die_with_parent).
WATCHDOG_SECONDS = 240

QUEUED_RE = re.compile(r"queued as (\S+)")


# --------------------------------------------------------------------------
# process helpers

try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before any fork
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: the daemon gets SIGKILL if pytest dies (prctl PDEATHSIG)."""
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for mta subprocesses: no MTA_* from the caller, repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTA_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONWARNINGS", None)
    if extra:
        env.update(extra)
    return env


def poll(predicate, timeout: float = 15.0, interval: float = 0.1):
    """The predicate's first truthy value, or its last (falsy) one when time
    is up: for `assert poll(...), <diagnostics>`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.1):
    """Like poll, but a timeout fails the test, naming `what` was awaited."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    return value


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, values: dict) -> None:
    lines = [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


def run_mta(args, *, env, cwd, input=None, timeout=CLI_TIMEOUT):
    """Run `python -m mta ARGS`; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", "mta", *args], env=env, cwd=str(cwd), input=input,
        capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------
# raw SMTP client

@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)  # text after "ddd-" / "ddd "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code of the final line, if any."""
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})(\s|$)", self.lines[-1] if self.lines else "")
        return m.group(1) if m else None

    @property
    def queue_id(self) -> str | None:
        m = QUEUED_RE.search(self.text)
        return m.group(1) if m else None

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {line}" for line in self.lines)


class SMTPClosed(Exception):
    """The server closed the connection."""


class SMTPConn:
    """A tiny SMTP client over a raw socket: send bytes, read whole replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                 source: str | None = None):
        self.timeout = timeout
        self.sock = socket.create_connection(
            (host, port), timeout=timeout,
            source_address=(source, 0) if source else None)
        self.buf = b""
        self.transcript: list[str] = []

    # -- low level
    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.transcript.append(f"C: {data[:200]!r}")
        self.sock.sendall(data)

    def _fill(self, timeout: float | None) -> None:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise SMTPClosed(f"connection closed; unparsed: {self.buf!r}")
        self.buf += chunk

    def readline(self, timeout: float | None = None) -> bytes:
        """One line without its CRLF; SMTPClosed at EOF."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no full line; have {self.buf!r}")
            self._fill(left)
        line, _, self.buf = self.buf.partition(b"\n")
        line = line.rstrip(b"\r")
        self.transcript.append(f"S: {line[:200]!r}")
        return line

    def reply(self, timeout: float | None = None) -> Reply:
        """One full reply, multi-line replies included."""
        lines: list[str] = []
        first = 0
        while True:
            raw = self.readline(timeout).decode("utf-8", "replace")
            m = re.match(r"(\d{3})([ -]?)(.*)$", raw)
            assert m, f"malformed reply line {raw!r}; transcript {self.transcript}"
            code, sep, text = int(m.group(1)), m.group(2), m.group(3)
            assert not lines or code == first, (
                f"multi-line reply changes code: {first} then {raw!r}")
            first = code
            lines.append(text)
            if sep != "-":
                return Reply(code, lines)

    def cmd(self, line: str | bytes, timeout: float | None = None) -> Reply:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply(timeout)

    def banner(self) -> Reply:
        return self.reply()

    def ehlo(self, name: str = "client.example.org") -> Reply:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, str(r)
        return r

    def start(self, name: str = "client.example.org") -> "SMTPConn":
        """Read the banner and send EHLO."""
        b = self.banner()
        assert b.code == 220, str(b)
        self.ehlo(name)
        return self

    def read_until_closed(self, timeout: float = 10.0) -> bytes:
        """Everything until EOF; raises socket.timeout if the server keeps it open."""
        deadline = time.monotonic() + timeout
        data, self.buf = self.buf, b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"server did not close; got {data!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def is_closed(self, timeout: float = 10.0) -> bool:
        try:
            self.read_until_closed(timeout)
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def assert_reply(reply: Reply, code: int, enhanced: str | None = None) -> None:
    """Code exactly; the enhanced code by prefix ("5.5" matches 5.5.1 and 5.5.2)."""
    assert reply.code == code, f"expected {code} {enhanced or ''}, got {reply}"
    if enhanced is not None:
        assert reply.enhanced is not None, f"no enhanced status code in {reply}"
        want = enhanced if enhanced.count(".") == 2 else enhanced + "."
        if enhanced.count(".") == 2:
            assert reply.enhanced == enhanced, f"expected {code} {enhanced}, got {reply}"
        else:
            assert reply.enhanced.startswith(want), f"expected {code} {enhanced}.x, got {reply}"


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2: double a leading dot on every line."""
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + l if l.startswith(b".") else l for l in lines)


def make_message(subject: str, body: str, sender: str = "sender@example.org",
                 to: str = "info@example.com", extra_headers: str = "") -> bytes:
    text = (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@client.example.org>\r\n"
            f"{extra_headers}\r\n{body}")
    if not text.endswith("\r\n"):
        text += "\r\n"
    return text.encode("utf-8")


def send_mail(conn: SMTPConn, sender: str, recipients: list[str], message: bytes,
              mail_params: str = "") -> Reply:
    """MAIL/RCPT/DATA on an open session; returns the end-of-data reply."""
    assert_reply(conn.cmd(f"MAIL FROM:<{sender}>{(' ' + mail_params) if mail_params else ''}"), 250)
    for rcpt in recipients:
        assert_reply(conn.cmd(f"RCPT TO:<{rcpt}>"), 250)
    assert_reply(conn.cmd("DATA"), 354)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    conn.send(dot_stuff(message) + b".\r\n")
    return conn.reply(timeout=60)


def body_lines(text: str) -> list[str]:
    """Lines of `mta queue show` output, line ends normalised."""
    return text.replace("\r\n", "\n").split("\n")


# --------------------------------------------------------------------------
# the server under test

TEST_TLS_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / f"mta-test-tls-{os.getpid()}"
TEST_CERT, TEST_KEY = TEST_TLS_DIR / "cert.pem", TEST_TLS_DIR / "key.pem"


def _ensure_test_certificate() -> None:
    if not TEST_CERT.exists():
        sys.path.insert(0, str(REPO_ROOT))
        from mta.smtp.tls import generate_self_signed
        generate_self_signed(str(TEST_CERT), str(TEST_KEY), HOSTNAME)


class MTAServer:
    """One mta daemon in its own directory; start/stop/kill/restart it, run its CLI."""

    def __init__(self, root: Path, overrides: dict | None, aliases: str | None,
                 env: dict | None, users: dict | None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        _ensure_test_certificate()
        relay, submission, submissions, admin = free_ports(4)
        self.config = {
            "hostname": HOSTNAME,
            "domain": "example.com",
            "local_domains": "example.net",
            "listen_address": "127.0.0.1",
            "port_relay": relay,
            "port_submission": submission,
            "port_submissions": submissions,
            "port_admin": admin,
            "admin_token": "test-admin-token",
            # one certificate for every test daemon: generating RSA keys at each
            # start would cost ~0.4 s per daemon (the generation itself is
            # covered by tests that unset these keys)
            "tls_cert": str(TEST_CERT),
            "tls_key": str(TEST_KEY),
            "spool_dir": str(root / "spool"),
            "data_dir": str(root / "data"),
            "log_dir": str(root / "log"),
            "mailbox_dir": str(root / "mail"),
            "aliases": str(root / "aliases"),
            "delivery_workers": 0,
            "mynetworks": "127.0.0.0/8",
            # keep later anti-abuse features from touching DNS or throttling the tests
            "spf_enabled": False,
            "dkim_enabled": False,
            "dmarc_enabled": False,
            "rbl_enabled": False,
            "greylist_enabled": False,
            "rate_limit_ip": 1000000,
            "rate_limit_user": 1000000,
            "rate_limit_domain": 1000000,
        }
        for key, value in (overrides or {}).items():
            if value is None:
                self.config.pop(key, None)
            else:
                self.config[key] = value
        self.config_path = root / "mta.toml"
        write_toml(self.config_path, self.config)
        (root / "aliases").write_text(DEFAULT_ALIASES if aliases is None else aliases)
        self.env = base_env({"MTA_CONFIG": str(self.config_path), **(env or {})})
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.stderr_files: list[Path] = []
        self.cli_stderr: list[str] = []
        for name, password in (users or {}).items():
            self.add_user(name, password)

    # -- paths and ports
    @property
    def port(self) -> int:
        return self.config["port_relay"]

    @property
    def submission_port(self) -> int:
        return self.config["port_submission"]

    @property
    def log_dir(self) -> Path:
        return Path(self.config["log_dir"])

    @property
    def spool_dir(self) -> Path:
        return Path(self.config["spool_dir"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self, name: str = "mta.log") -> str:
        path = self.log_dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stderr_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.stderr_files if p.exists())

    def diagnostics(self) -> str:
        return (f"--- daemon stderr ---\n{self.stderr_text()[-4000:]}\n"
                f"--- mta.log ---\n{self.log_text('mta.log')[-4000:]}\n"
                f"--- smtp.log ---\n{self.log_text('smtp.log')[-4000:]}")

    # -- lifecycle
    def start(self, args: tuple[str, ...] = (), wait: bool = True) -> "MTAServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.generation += 1
        err = self.root / f"daemon-stderr-{self.generation}.txt"
        out = self.root / f"daemon-stdout-{self.generation}.txt"
        self.stderr_files.append(err)
        with open(err, "wb") as e, open(out, "wb") as o:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mta", "serve", *args], env=self.env,
                cwd=str(self.root), stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                preexec_fn=_die_with_parent)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT, port: int | None = None) -> None:
        """Poll-connect until the 220 banner arrives, then QUIT politely."""
        port = port or self.port
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"mta serve exited with {self.proc.returncode} during start-up\n"
                            + self.diagnostics())
            try:
                with SMTPConn(port, timeout=2) as c:
                    r = c.reply(timeout=2)
                    if r.code == 220:
                        try:
                            c.send(b"QUIT\r\n")
                            c.read_until_closed(3)
                        except (OSError, SMTPClosed):
                            pass
                        return
                    last = str(r)
            except (OSError, SMTPClosed, AssertionError) as error:
                last = repr(error)
            time.sleep(0.05)
        pytest.fail(f"mta serve not ready on port {port} after {timeout}s ({last})\n"
                    + self.diagnostics())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code of SIGTERM
        (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> "MTAServer":
        rc = self.stop()
        assert rc == 0, f"SIGTERM exit code {rc}\n" + self.diagnostics()
        return self.start()

    # -- CLI
    def cli(self, *args: str, input: str | None = None, env: dict | None = None,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        run_env = dict(self.env)
        if env:
            run_env.update(env)
        proc = run_mta(args, env=run_env, cwd=self.root, input=input, timeout=timeout)
        self.cli_stderr.append(proc.stderr)
        return proc

    def add_user(self, name: str, password: str = "s3cret-Passw0rd") -> None:
        p = self.cli("user", "add", name, input=password + "\n")
        assert p.returncode == 0, f"user add {name}: rc={p.returncode} {p.stderr}"

    def queue_list(self, *extra: str) -> list[dict]:
        p = self.cli("queue", "list", "--json", *extra)
        assert p.returncode == 0, f"queue list: rc={p.returncode} stderr={p.stderr}"
        data = json.loads(p.stdout)
        assert isinstance(data, list), p.stdout
        return data

    def queue_ids(self) -> list[str]:
        return [m["id"] for m in self.queue_list()]

    def queue_since(self, before) -> list[dict]:
        """Queue entries whose id is not in `before` (a set of ids taken earlier)."""
        return [m for m in self.queue_list() if m["id"] not in before]

    def queue_show(self, qid: str, *extra: str) -> str:
        p = self.cli("queue", "show", qid, *extra)
        assert p.returncode == 0, f"queue show {qid}: rc={p.returncode} stderr={p.stderr}"
        return p.stdout

    # -- SMTP
    def connect(self, port: int | None = None, **kw) -> SMTPConn:
        return SMTPConn(port or self.port, **kw)

    def session(self, port: int | None = None, **kw) -> SMTPConn:
        """A connection that has read the banner and sent EHLO."""
        return self.connect(port, **kw).start()

    def send(self, sender: str = "sender@example.org", recipients=("info@example.com",),
             message: bytes | None = None, subject: str = "test") -> str:
        """Send one message in its own session; returns its queue id."""
        if message is None:
            message = make_message(subject, "Hello.\r\n", sender=sender)
        with self.session() as c:
            r = send_mail(c, sender, list(recipients), message)
            assert_reply(r, 250, "2.0.0")
            assert r.queue_id, str(r)
            c.cmd("QUIT")
            return r.queue_id

    # -- checks
    def assert_no_traceback(self) -> None:
        for label, text in (("daemon stderr", self.stderr_text()),
                            ("mta.log", self.log_text("mta.log")),
                            ("smtp.log", self.log_text("smtp.log")),
                            ("CLI stderr", "\n".join(self.cli_stderr))):
            assert "Traceback" not in text, f"Traceback in {label}:\n{text[-6000:]}"


def _factory(base: Path):
    """A factory of servers under `base`, and its teardown."""
    servers: list[MTAServer] = []

    def make(overrides: dict | None = None, *, aliases: str | None = None,
             env: dict | None = None, users: dict | None = None, start: bool = True,
             name: str | None = None) -> MTAServer:
        root = base / (name or f"mta{len(servers)}")
        server = MTAServer(root, overrides, aliases, env, users)
        servers.append(server)
        if start:
            server.start()
        return server

    def teardown() -> None:
        problems = []
        for server in servers:
            server.stop()
            try:
                server.assert_no_traceback()
            except AssertionError as error:
                problems.append(str(error))
        if problems:
            pytest.fail("\n\n".join(problems))

    return make, teardown


@pytest.fixture
def mta_factory(tmp_path):
    """Factory: mta_factory(overrides={key: value}, aliases=..., env=..., users=...,
    start=True, name=...) -> MTAServer (started unless start=False)."""
    make, teardown = _factory(tmp_path)
    yield make
    teardown()


@pytest.fixture
def mta(mta_factory) -> MTAServer:
    """A running daemon with the default test configuration (relay allowed from 127/8)."""
    return mta_factory()


@pytest.fixture
def outsider_mta(mta_factory) -> MTAServer:
    """A running daemon for which 127.0.0.1 is outside mynetworks."""
    return mta_factory({"mynetworks": "192.0.2.0/24"})


@pytest.fixture(scope="module")
def module_mta_factory(tmp_path_factory):
    """Like mta_factory, but the servers live for the whole module (for many small
    parametrized cases that only compare the queue before and after)."""
    make, teardown = _factory(tmp_path_factory.mktemp("shared"))
    yield make
    teardown()


@pytest.fixture(scope="module")
def shared_mta(module_mta_factory) -> MTAServer:
    """A default daemon shared by the tests of one module."""
    return module_mta_factory()


@pytest.fixture(scope="module")
def shared_outsider_mta(module_mta_factory) -> MTAServer:
    """A daemon shared by one module, for which 127.0.0.1 is outside mynetworks."""
    return module_mta_factory({"mynetworks": "192.0.2.0/24"})


@pytest.fixture
def queue_unchanged():
    """queue_unchanged(server) -> context manager asserting no new queue entries."""
    import contextlib

    @contextlib.contextmanager
    def check(server: MTAServer):
        before = set(server.queue_ids())
        yield
        new = [m for m in server.queue_list() if m["id"] not in before]
        assert new == [], f"unexpected messages queued: {new}"

    return check


@pytest.fixture(autouse=True)
def _watchdog(request):
    """Bound every test even without pytest-timeout."""
    try:
        import pytest_timeout  # noqa: F401
        yield
        return
    except ImportError:
        pass
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
