"""A session fuzzer against the live daemon (issue 9).

A few hundred SMTP sessions, a dozen at a time, on the relay, submission
and submissions ports, each a random sequence drawn from a grammar of valid
commands plus mutations:

- random bytes, truncated lines, huge lines (over the 512/1024/12288
  octet limits of RFC 5321 4.5.3.1.4 and the 64 KiB garbage budget), NULs,
  bare CR and bare LF (RFC 5321 2.3.8), Unicode digits where numbers go
  ("SIZE=²", "BDAT ²": str.isdigit() is not ASCII), case games;
- pipelined bursts of 50 commands in one write (RFC 2920);
- DATA with smuggling look-alikes (SEC Consult 2023, CVE-2023-51764),
  over-long lines, NULs, dots; BDAT with wrong sizes (RFC 3030 2);
- STARTTLS then AUTH garbage on the submission port (RFC 4954, RFC 4616),
  truncated TLS handshakes: the first bytes of a ClientHello, then close
  (RFC 8446 4.1.2), on STARTTLS and on the implicit-TLS port (RFC 8314).

Interleaved with the chaos run "canary" sessions: clean transactions with a
unique token whose stored message must be exactly what was sent.

Afterwards: the daemon still serves smtplib, every reply seen was well
formed (3 digits, and 4xx/5xx with an RFC 3463 enhanced code of the same
class), `mta queue list --json` parses and lists exactly the messages that
got a 250, every queued message has a readable envelope and a complete,
CRLF-clean message file (checked on disk for all, and with `mta queue
show ID [--json]` for a sample), and no "Traceback" is in mta.log,
smtp.log or stderr.

Reproduce one session with MTA_FUZZ_SEED=<seed printed on failure>.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import smtplib
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_support import client_hello, tls_client_context

SESSIONS = int(os.environ.get("MTA_FUZZ_SESSIONS", "360"))
CANARIES = 40
PARALLEL = 12
BASE_SEED = int(os.environ.get("MTA_FUZZ_SEED", "90210"))
USER, PASSWORD = "alice@example.com", "fuzz-Passw0rd"
QUEUED = re.compile(rb"queued as ([0-9A-F]{20})")
REPLY_LINE = re.compile(rb"^(\d{3})([ -]|$)(.*)$", re.S)
ENHANCED = re.compile(rb"^([245])\.\d{1,3}\.\d{1,3}(\s|$)")
HELLO = client_hello()
SPOOL_STATES = ("incoming", "deferred", "hold", "bounce")


# --------------------------------------------------------------------------
# one fuzzing connection

@dataclass
class Outcome:
    seed: int
    kind: str
    sent: list[str] = field(default_factory=list)
    streams: list[bytearray] = field(default_factory=lambda: [bytearray()])
    ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    clean_close: bool = True
    expected: dict[str, tuple[bytes, list[str]]] = field(default_factory=dict)  # canaries


class Closed(Exception):
    pass


class FuzzConn:
    def __init__(self, port: int, outcome: Outcome, source: str):
        self.outcome = outcome
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        self.closed = False

    @property
    def stream(self) -> bytearray:
        return self.outcome.streams[-1]

    def send(self, data: bytes, label: str | None = None) -> None:
        self.outcome.sent.append(label or repr(data[:120]) + (f"...({len(data)} octets)" if len(data) > 120 else ""))
        if self.closed:
            raise Closed()
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            self.closed = True
            raise Closed() from None

    def drain(self, wait: float = 0.03, until: bytes | None = None, limit: float = 3.0) -> None:
        """Read what the server says; with `until`, keep reading (up to `limit`) until it appears."""
        deadline = time.monotonic() + limit
        start = len(self.stream)
        while not self.closed:
            if until is not None and until in self.stream[start:] and self.stream.endswith(b"\n"):
                return
            timeout = wait if until is None else max(0.01, min(0.2, deadline - time.monotonic()))
            self.sock.settimeout(timeout)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                if until is None or time.monotonic() >= deadline:
                    return
                continue
            except (OSError, ssl.SSLError):
                self.closed = True
                return
            if not chunk:
                self.closed = True
                return
            self.stream.extend(chunk)
            if len(self.stream) > 4_000_000:
                self.outcome.problems.append("server sent more than 4 MB of replies")
                self.closed = True
                return

    def last_reply_code(self) -> int | None:
        lines = [l for l in bytes(self.stream).split(b"\r\n") if REPLY_LINE.match(l)]
        return int(lines[-1][:3]) if lines else None

    def starttls(self, hello_only: int | None = None) -> bool:
        """STARTTLS; with `hello_only`, send that many ClientHello bytes and close."""
        before = len(self.stream)
        self.send(b"STARTTLS\r\n")
        self.drain(until=b"\r\n", limit=1)
        answer = bytes(self.stream[before:])
        if not (answer.startswith(b"220 ") or b"\r\n220 " in answer):
            return False
        if hello_only is not None:
            self.send(HELLO[:hello_only], f"ClientHello[:{hello_only}] then close")
            self.closed = True
            return False
        return self.wrap()

    def wrap(self) -> bool:
        try:
            self.sock.settimeout(5)
            self.sock = tls_client_context().wrap_socket(self.sock, server_hostname="mx.test.example")
        except (OSError, ssl.SSLError) as error:
            self.outcome.problems.append(f"TLS handshake failed: {error!r}")
            self.closed = True
            return False
        self.outcome.streams.append(bytearray())
        return True

    def finish(self) -> None:
        """QUIT politely if we can, then read until the server closes."""
        if not self.closed:
            try:
                self.send(b"QUIT\r\n")
            except Closed:
                pass
        deadline = time.monotonic() + 3
        while not self.closed and time.monotonic() < deadline:
            self.drain(wait=0.2)
        if not self.closed:
            self.outcome.clean_close = False
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# the grammar

HOSTS = ["client.example.org", "[127.0.0.1]", "[IPv6:::1]", "x", "a" * 300, "ünïcode.example", "a\tb", "-"]
SENDERS = ["sender@example.org", "", "alice@example.com", '"quoted local"@example.org', "u@[127.0.0.1]",
           "a" * 70 + "@example.org", "ü@example.org", "@route.example:x@example.org", "<>", "x@" + "d" * 260,
           '"a"@[IPv6:::1%x y]', "postmaster"]
RCPTS = ["info@example.com", "postmaster@example.com", "Postmaster", "bob@remote.example", "alice@example.com",
         "nobody@example.com", "a%b@example.com", '"x@y"@example.com', "rcpt@[127.0.0.1]", "ü@remote.example",
         "x" * 65 + "@example.com", "abuse@example.net"]
MAIL_PARAMS = ["", "SIZE=100", "SIZE=99999999999", "BODY=8BITMIME", "BODY=BINARYMIME", "SMTPUTF8", "RET=HDRS",
               "ENVID=abc+2Bdef", "ENVID=+0D+0A", "AUTH=<>", "SIZE=\u00b2", "SIZE=\u0663", "SIZE=", "SIZE=-1",
               "FOO=bar", "SIZE=1 SIZE=2", "BODY=7BIT SMTPUTF8 RET=FULL ENVID=x"]
RCPT_PARAMS = ["", "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE,DELAY", "NOTIFY=BOGUS", "ORCPT=rfc822;a@b",
               "ORCPT=rfc822;a+0D+0Ab", "ORCPT=bad", "NOTIFY=", "X=1"]
VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY", "EXPN", "HELP", "QUIT",
         "STARTTLS", "AUTH", "GET", "ETRN", "TURN", "XCLIENT", "LHLO", ""]


def valid_command(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.15:
        return f"EHLO {rng.choice(HOSTS)}".encode()
    if choice < 0.2:
        return f"HELO {rng.choice(HOSTS)}".encode()
    if choice < 0.45:
        params = rng.choice(MAIL_PARAMS)
        return f"MAIL FROM:<{rng.choice(SENDERS)}>{' ' + params if params else ''}".encode()
    if choice < 0.7:
        params = rng.choice(RCPT_PARAMS)
        return f"RCPT TO:<{rng.choice(RCPTS)}>{' ' + params if params else ''}".encode()
    return rng.choice([b"RSET", b"NOOP", b"NOOP hi", b"VRFY postmaster", b"EXPN list", b"HELP", b"RSET x",
                       b"DATA x", b"VRFY", b"mail from:<a@b>", b"rcpt to:<info@example.com>", b"MAIL FROM: <a@b>",
                       b"MAIL FROM:a@b", b"RCPT TO:info@example.com", b"STARTTLS x"])


def mutate(rng: random.Random, line: bytes) -> bytes:
    """One mutation of a command line (without its CRLF)."""
    op = rng.randrange(13)
    pos = rng.randint(0, len(line))
    if op == 0:
        return line[:pos] + rng.randbytes(rng.randint(1, 20)) + line[pos:]
    if op == 1:
        return line[:pos]
    if op == 2:
        return line + b"A" * rng.choice([500, 1100, 13000, 70000])
    if op == 3:
        return line[:pos] + b"\0" + line[pos:]
    if op == 4:
        return line[:pos] + rng.choice([b"\n", b"\r", b"\r\r", b"\n\r"]) + line[pos:]
    if op == 5:
        return line.swapcase()
    if op == 6:
        return rng.randbytes(rng.randint(0, 60))
    if op == 7:
        return line.replace(b" ", rng.choice([b"  ", b"\t", b""]))
    if op == 8:
        return line + " SIZE=²".encode() if line.upper().startswith(b"MAIL") else line + b" " + line
    if op == 9:
        return rng.choice(VERBS).encode() + b" " + line
    if op == 10:
        return line.replace(b"<", b"").replace(b">", b"")
    if op == 11:
        return line + b" " + b" ".join(rng.choice([b"X=1", b"SIZE=1", b"BODY=7BIT", b"=", b"=="])
                                       for _ in range(rng.randint(1, 40)))
    return line.decode("utf-8", "replace").encode("utf-16")[:200]


def message_body(rng: random.Random, token: str, clean: bool) -> bytes:
    lines = [f"Subject: fuzz {token}".encode(), f"Message-ID: <{token}@fuzz.example>".encode(), b""]
    for _ in range(rng.randint(0, 12)):
        lines.append(rng.choice([b"plain text line", b".", b"..", b".leading dot", b"", b"Received: fake",
                                 "8bit: ünïcödé".encode(), b"x" * rng.randint(0, 998), b"\t tab", b"end."]))
    lines.append(f"token {token} end".encode())
    body = b"\r\n".join(lines) + b"\r\n"
    if clean:
        return body
    bad = rng.choice([b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\0", b"bare\nlf", b"bare\rcr",
                      b"y" * 1500 + b"\r\n", b"z" * 1000 + b"\r\n", b"\r\n.\r\nRSET\r\n", b"\r\n.\r\n"])
    pos = rng.randint(0, len(body))
    return body[:pos] + bad + body[pos:]


def stuff(body: bytes) -> bytes:
    return b"".join(b"." + l if l.startswith(b".") else l for l in body.splitlines(keepends=True))


def act(rng: random.Random, conn: FuzzConn, outcome: Outcome, port_kind: str) -> None:
    if port_kind in ("submission", "submissions") and len(outcome.streams) > 1 and rng.random() < 0.4:
        auth_garbage(rng, conn)                          # RFC 4954 / RFC 4616 under TLS
        return
    r = rng.random()
    if r < 0.35:                                         # one command, maybe mutated
        line = valid_command(rng)
        if rng.random() < 0.5:
            line = mutate(rng, line)
        end = b"\r\n" if rng.random() < 0.95 else rng.choice([b"", b"\n", b"\r"])
        conn.send(line + end)
        conn.drain()
    elif r < 0.45:                                       # a pipelined burst of 50 (RFC 2920)
        lines = []
        for _ in range(50):
            line = valid_command(rng)
            if rng.random() < 0.2:
                line = mutate(rng, line)
            lines.append(line + b"\r\n")
        conn.send(b"".join(lines), "burst of 50 commands")
        conn.drain(wait=0.1)
    elif r < 0.62:                                       # a DATA transaction, clean or not
        token = f"fz{outcome.seed}x{rng.randrange(10 ** 9)}"
        clean = rng.random() < 0.6
        body = message_body(rng, token, clean)
        head = (f"MAIL FROM:<sender@example.org>\r\nRCPT TO:<{rng.choice(RCPTS[:5])}>\r\nDATA\r\n"
                if rng.random() < 0.8 else "DATA\r\n").encode()
        payload = head + stuff(body) + rng.choice([b".\r\n", b".\r\n", b".\n", b"\n.\r\n", b""])
        if rng.random() < 0.3:                           # dribble it in pieces
            cuts = sorted(rng.randint(0, len(payload)) for _ in range(rng.randint(1, 5)))
            previous = 0
            for cut in [*cuts, len(payload)]:
                conn.send(payload[previous:cut])
                previous = cut
        else:
            conn.send(payload, f"DATA transaction ({len(payload)} octets, clean={clean})")
        conn.drain(wait=0.1)
    elif r < 0.72:                                       # BDAT, right or wrong sizes (RFC 3030)
        body = message_body(rng, f"bd{outcome.seed}x{rng.randrange(10 ** 9)}", rng.random() < 0.6)
        conn.send(f"MAIL FROM:<sender@example.org>\r\nRCPT TO:<{rng.choice(RCPTS[:5])}>\r\n".encode())
        size = len(body)
        announced = rng.choice([size, size, size - 1, size + 5, 0, 10 ** 14, -1])
        last = rng.choice([" LAST", " LAST", "", " last", " LAST x"])
        size_text = rng.choice([str(announced), str(announced), "\u00b2", "0x10", "", "1 2"])
        conn.send(f"BDAT {size_text}{last}\r\n".encode() + body, f"BDAT {size_text}{last} + {size} octets")
        conn.drain(wait=0.1)
    elif r < 0.86:
        if len(outcome.streams) == 1 and port_kind != "submissions":
            if rng.random() < 0.3:
                conn.starttls(hello_only=rng.randint(0, len(HELLO) - 1))
            else:
                conn.send(b"EHLO fuzz.example\r\n")
                conn.drain(until=b"250 ", limit=1)
                if conn.starttls() and rng.random() < 0.2:
                    conn.send(b"\x16\x03\x01garbage-in-tls\r\n")
        else:
            conn.send(b"STARTTLS\r\n")
            conn.drain()
    else:
        conn.send(rng.randbytes(rng.randint(1, 300)), "random bytes")
        conn.drain()


def auth_garbage(rng: random.Random, conn: FuzzConn) -> None:
    conn.send(b"EHLO fuzz.example\r\n")
    conn.drain(until=b"250 ", limit=1)
    b64 = lambda data: base64.b64encode(data).decode()
    choice = rng.randrange(12)
    if choice == 0:
        conn.send(f"AUTH PLAIN {b64(rng.randbytes(rng.randint(0, 80)))}\r\n".encode())
    elif choice == 1:
        conn.send(b"AUTH PLAIN " + rng.randbytes(rng.randint(1, 40)).replace(b"\n", b"") + b"\r\n")
    elif choice == 2:
        conn.send(b"AUTH LOGIN\r\n" + rng.choice([b"*", b"=", b"!!!", b"\xff\xfe"]) + b"\r\n")
    elif choice == 3:
        conn.send(b"AUTH PLAIN\r\n" + base64.b64encode(b"\0\0\0") + b"\r\n")
    elif choice == 4:
        conn.send(b"AUTH PLAIN " + b"QUFB" * 3500 + b"\r\n")            # over 12288 (RFC 4954 4)
    elif choice == 5:
        conn.send(f"AUTH PLAIN {b64(b'x' + bytes([0]) + b'')}\r\n".encode())
    elif choice == 6:
        conn.send(rng.choice([b"AUTH\r\n", b"AUTH CRAM-MD5\r\n", b"AUTH PLAIN =\r\n", b"AUTH plain  \r\n",
                              b"AUTH LOGIN " + b"=" * 5 + b"\r\n", b"AUTH PLAIN AAAA AAAA\r\n"]))
    elif choice == 7:
        conn.send(b"AUTH LOGIN\r\n" + base64.b64encode("ünï\0".encode()) + b"\r\n" + b"*\r\n")
    elif choice == 8 and rng.random() < 0.3:                            # well formed, wrong password (bcrypt)
        conn.send(f"AUTH PLAIN {b64(b'' + bytes([0]) + USER.encode() + bytes([0]) + b'wrong')}\r\n".encode())
    elif choice == 9 and rng.random() < 0.3:                            # the real thing, then mail
        conn.send(f"AUTH PLAIN {b64(bytes([0]) + USER.encode() + bytes([0]) + PASSWORD.encode())}\r\n".encode())
        conn.drain(until=b"\r\n")
        conn.send(b"MAIL FROM:<alice@example.com>\r\nMAIL FROM:<other@example.org>\r\n")
    elif choice == 10:
        conn.send(b"AUTH LOGIN " + base64.b64encode(b"a" * 50) + b"\r\n" + b"\xc3\x28" * 10 + b"\r\n")
    else:
        conn.send(b"AUTH PLAIN\r\n" + b"\r\n")
    conn.drain(wait=0.1)


def chaos_session(port_by_kind: dict[str, int], seed: int) -> Outcome:
    rng = random.Random(seed)
    kind = rng.choices(["relay", "submission", "submissions"], weights=[6, 3, 1])[0]
    outcome = Outcome(seed, kind)
    source = f"127.{rng.randint(1, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 250)}"
    conn = FuzzConn(port_by_kind[kind], outcome, source)
    try:
        if kind == "submissions":
            if rng.random() < 0.4:
                cut = rng.randint(0, len(HELLO) - 1)
                conn.send(HELLO[:cut], f"ClientHello[:{cut}] then close")
                conn.closed = True
                return outcome
            if not conn.wrap():
                return outcome
        conn.drain(until=b"\r\n")
        for _ in range(rng.randint(1, 25)):
            if conn.closed:
                break
            act(rng, conn, outcome, kind)
    except Closed:
        pass
    finally:
        conn.finish()
    return outcome


def canary_session(port: int, seed: int) -> Outcome:
    """A clean transaction during the chaos: its message must be stored exactly."""
    rng = random.Random(seed)
    outcome = Outcome(seed, "canary")
    conn = FuzzConn(port, outcome, f"127.0.{rng.randint(1, 250)}.{rng.randint(1, 250)}")
    token = f"canary{seed}"
    body = message_body(rng, token, True)
    rcpts = rng.sample(["info@example.com", "postmaster@example.com", "bob@remote.example"], rng.randint(1, 3))
    try:
        conn.drain(until=b"\r\n")
        conn.send(b"EHLO canary.example\r\n")
        conn.drain(until=b"250 ")
        head = "MAIL FROM:<canary@example.org> BODY=8BITMIME\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts)
        if rng.random() < 0.5:
            conn.send((head + "DATA\r\n").encode() + stuff(body) + b".\r\n")
        else:
            cut = rng.randint(0, len(body))
            conn.send(head.encode() + f"BDAT {cut}\r\n".encode() + body[:cut]
                      + f"BDAT {len(body) - cut} LAST\r\n".encode() + body[cut:])
        conn.drain(until=b"queued as", limit=20)
        ids = QUEUED.findall(bytes(conn.stream))
        if len(ids) != 1:
            outcome.problems.append(f"canary not queued: {bytes(conn.stream)[-500:]!r}")
        else:
            outcome.expected[ids[0].decode()] = (body, rcpts)
    except Closed:
        outcome.problems.append(f"canary connection closed: {bytes(conn.stream)[-500:]!r}")
    finally:
        conn.finish()
    return outcome


# --------------------------------------------------------------------------
# checks

def check_replies(outcome: Outcome) -> None:
    """RFC 5321 4.2: every line is a reply line; INTERFACE.md: 4xx/5xx carry
    an RFC 3463 enhanced code of the same class."""
    for stream in outcome.streams:
        data = bytes(stream)
        lines = data.split(b"\r\n")
        for line in lines[:-1]:
            match = REPLY_LINE.match(line)
            if not match or b"\n" in line or b"\r" in line:
                outcome.problems.append(f"malformed reply line {line[:200]!r}")
                continue
            code, sep, text = match.groups()
            if code[:1] in b"45" and sep != b"-":
                enhanced = ENHANCED.match(text.lstrip())
                if not enhanced or enhanced.group(1) != code[:1]:
                    outcome.problems.append(f"no matching enhanced status code in {line[:200]!r}")
        if lines[-1] and outcome.clean_close:
            outcome.problems.append(f"reply without CRLF at close: {lines[-1][:200]!r}")
        outcome.ids.extend(m.decode() for m in QUEUED.findall(data))


def received_header_length(message: bytes, size: int, qid: str) -> int | None:
    """Our Received: block (3-4 lines) is what the stored file has beyond the client's octets."""
    for extra in (0, 2):   # BDAT LAST without a final CRLF gets one added (RFC 5322 2.1)
        cut = len(message) - size - extra
        head = message[:max(cut, 0)]
        if 40 <= cut <= 1200 and head.startswith(b"Received: ") and head.endswith(b"\r\n") \
                and f" id {qid}".encode() in head and all(l.startswith(b"\t") for l in head.split(b"\r\n")[1:-1]):
            return cut
    return None


def check_spool_entry(spool: Path, qid: str) -> tuple[dict, bytes]:
    for state in SPOOL_STATES:
        directory = spool / state / qid
        if directory.is_dir():
            envelope = json.loads((directory / "envelope.json").read_text(encoding="utf-8"))
            message = (directory / "message.eml").read_bytes()
            return envelope, message
    raise AssertionError(f"{qid}: listed but not in the spool")


def test_session_fuzzer_live_daemon(mta_factory):
    """Hundreds of random and mutated sessions: afterwards the daemon serves
    smtplib, the queue is consistent, stored messages are whole, no traceback."""
    mta = mta_factory({"max_connections_per_ip": 0, "smtp_timeout": 5, "max_message_size": 300000,
                       "max_recipients": 5, "auth_lockout_failures": 3, "auth_lockout_window": 60,
                       "auth_lockout_duration": 30},
                      users={USER: PASSWORD})
    ports = {"relay": mta.port, "submission": mta.submission_port,
             "submissions": mta.config["port_submissions"]}
    started = time.monotonic()
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def run(job):
        kind, seed = job
        result = canary_session(mta.port, seed) if kind == "canary" else chaos_session(ports, seed)
        with lock:
            outcomes.append(result)

    jobs = [("chaos", BASE_SEED + n) for n in range(SESSIONS)]
    for n in range(CANARIES):
        jobs.insert((n * len(jobs)) // CANARIES, ("canary", BASE_SEED + 100000 + n))
    with ThreadPoolExecutor(PARALLEL) as pool:
        for future in [pool.submit(run, job) for job in jobs]:
            future.result()
    elapsed = time.monotonic() - started

    # -- the daemon is alive and serves a normal client
    assert mta.alive(), "daemon died during the fuzzing\n" + mta.diagnostics()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=15) as client:
        client.ehlo("after-fuzz.example")
        refused = client.sendmail("after@example.org", ["info@example.com"],
                                  b"Subject: after the fuzzing\r\n\r\nstill here\r\n")
        assert refused == {}

    # -- every reply was well formed
    problems = []
    for outcome in outcomes:
        check_replies(outcome)
        if outcome.problems:
            problems.append(f"seed {outcome.seed} ({outcome.kind}): {outcome.problems[:3]}; "
                            f"sent {outcome.sent[-6:]}")
    assert not problems, f"{len(problems)} sessions with problems:\n" + "\n".join(problems[:15])

    # -- the queue is consistent with what the clients were told
    listed = mta.queue_list()
    listed_ids = {m["id"] for m in listed}
    on_disk = {p.name for state in SPOOL_STATES for p in (mta.spool_dir / state).iterdir()}
    assert listed_ids == on_disk, (listed_ids ^ on_disk)
    told = {qid for outcome in outcomes for qid in outcome.ids}
    assert told <= listed_ids, f"250 given but not queued: {sorted(told - listed_ids)[:10]}"
    unfinished = sum(1 for o in outcomes if not o.clean_close)
    extra = listed_ids - told
    assert len(extra) <= 1 + unfinished, f"queued without a 250 seen: {sorted(extra)[:10]}"

    for qid in sorted(listed_ids):
        envelope, message = check_spool_entry(mta.spool_dir, qid)
        assert envelope["id"] == qid and envelope["version"] == 1 and envelope["recipients"], envelope
        header = received_header_length(message, envelope["size"], qid)
        assert header is not None, f"{qid}: stored {len(message)} octets, envelope size {envelope['size']}: " \
                                   f"{message[:300]!r}"
        assert message.endswith(b"\r\n") and b"\0" not in message, f"{qid}: {message[-200:]!r}"
        for line in message.split(b"\r\n")[:-1]:
            assert b"\r" not in line and b"\n" not in line, f"{qid}: bare CR/LF stored: {line[:100]!r}"
            assert len(line) <= 998, f"{qid}: line of {len(line)} octets stored"

    # -- the canaries are stored exactly as sent, with their recipients
    canaries = {qid: exp for outcome in outcomes for qid, exp in outcome.expected.items()}
    assert len(canaries) == CANARIES
    for qid, (body, rcpts) in canaries.items():
        envelope, message = check_spool_entry(mta.spool_dir, qid)
        header = received_header_length(message, envelope["size"], qid)
        assert message[header:] == body, f"canary {qid} stored differently: {message[-300:]!r}"
        assert sorted(r["address"].lower() for r in envelope["recipients"]) == sorted(rcpts)

    # -- the CLI reads a sample of them (every CLI call is a process; the rest was checked on disk)
    for qid in sorted(listed_ids)[:: max(1, len(listed_ids) // 6)][:6]:
        shown = json.loads(mta.queue_show(qid, "--json"))
        assert shown["id"] == qid
        text = mta.queue_show(qid)
        assert "Received: " in text
    # -- AUTH secrets never reach the transcript (INTERFACE.md "Files on disk")
    transcript = mta.log_text("smtp.log")
    secret = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()).decode()
    assert PASSWORD not in transcript and secret not in transcript, "AUTH secret in smtp.log"

    # -- no session thread died (the fixture checks this too; here with a summary)
    log = mta.log_text("mta.log")
    crashes = [line for line in log.splitlines() if "internal error in session" in line]
    assert "Traceback" not in log, (f"{len(crashes)} session crashes, e.g. {crashes[:3]}\n"
                                    + _traceback_summary(log))
    sent = [item for outcome in outcomes for item in outcome.sent]
    print(f"\n{len(jobs)} sessions in {elapsed:.1f}s ({sum(len(o.streams) > 1 for o in outcomes)} in TLS, "
          f"{sum('ClientHello' in s for s in sent)} truncated handshakes, "
          f"{sum(s.startswith(repr(b'AUTH')[:-1]) for s in sent)} AUTH lines, "
          f"{sum(s.startswith('burst') for s in sent)} bursts, {sum(s.startswith('BDAT') for s in sent)} BDATs), "
          f"{len(listed_ids)} messages queued, {unfinished} sessions left open by the server at the end")


def _traceback_summary(log: str) -> str:
    """The last line of each distinct traceback (the exception), with a count."""
    found: dict[str, int] = {}
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = index + 1
            while end < len(lines) and (lines[end].startswith(" ") or lines[end].startswith("Traceback")):
                end += 1
            if end < len(lines):
                frames = [l.strip() for l in lines[index:end] if l.strip().startswith("File ")]
                key = f"{lines[end]}  at {frames[-1] if frames else '?'}"
                found[key] = found.get(key, 0) + 1
    return "\n".join(f"{count} x {key}" for key, count in found.items())
