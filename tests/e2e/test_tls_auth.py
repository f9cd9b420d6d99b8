"""TLS and authentication with real clients against the real daemon (issue 3).

STARTTLS (RFC 3207) on the relay and submission ports, implicit TLS on the
submissions port (RFC 8314), TLS 1.2 minimum, the STARTTLS injection defence
(CVE-2011-0411), AUTH PLAIN/LOGIN (RFC 4954, RFC 4616), bcrypt users managed
with `mta user`, lockout, the submission policy (RFC 6409), the Received:
"with" keywords (RFC 3848) and the certificate reload on SIGHUP.

Clients: `openssl s_client`, `swaks`, `curl`, `smtplib` and the raw-socket
`SMTPConn` from conftest.py (wrapped in TLS by `starttls()` below). Every
test names the RFC section or the attack it checks. The daemon is a black
box: it is started as a subprocess by conftest's factories, the queue is read
with `mta queue list/show`, the logs from the log directory.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import poll as wait_for
from conftest import (DEFAULT_ALIASES, HOSTNAME, SMTPConn, assert_reply,
                      make_message, send_mail)

ALICE = "alice@example.com"
ALICE_PW = "Alice-s3cret-pw!"
ALIASES = DEFAULT_ALIASES + "sales@example.com: alice@example.com\n"
REMOTE_RCPT = "bob@remote.example"
TOOL_TIMEOUT = 30
# the shared server must not lock 127.0.0.1 out while other tests fail AUTH on purpose
SHARED_OVERRIDES = {"auth_lockout_failures": 1000}


# --------------------------------------------------------------------------
# helpers

def b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def plain_blob(user: str, password: str, authzid: str = "") -> str:
    """RFC 4616 2: [authzid] NUL authcid NUL passwd, base64."""
    return b64(f"{authzid}\0{user}\0{password}")


def client_context() -> ssl.SSLContext:
    """A client that accepts the test's self-signed certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_wrap(conn: SMTPConn) -> ssl.SSLSocket:
    """Handshake on the connection's socket; `conn` then talks TLS."""
    assert conn.buf == b"", f"bytes before the handshake: {conn.buf!r}"
    conn.sock = client_context().wrap_socket(conn.sock, server_hostname=HOSTNAME)
    conn.transcript.append(f"-- TLS {conn.sock.version()} {conn.sock.cipher()[0]}")
    return conn.sock


def starttls(conn: SMTPConn) -> ssl.SSLSocket:
    """RFC 3207 4: STARTTLS, 220, then the handshake."""
    assert_reply(conn.cmd("STARTTLS"), 220, "2.0.0")
    return tls_wrap(conn)


def ehlo_keywords(reply) -> dict[str, str]:
    assert reply.code == 250, str(reply)
    words = {}
    for line in reply.lines[1:]:
        word, _, rest = line.partition(" ")
        words[word.upper()] = rest
    return words


def submission(server, *, tls: bool = True, user: str | None = None,
               password: str | None = None, source: str | None = None) -> SMTPConn:
    """Port 587: banner, EHLO, STARTTLS, EHLO and (optionally) AUTH PLAIN."""
    conn = SMTPConn(server.submission_port, source=source)
    conn.start()
    if tls:
        starttls(conn)
        conn.ehlo()
    if user is not None:
        assert_reply(conn.cmd(f"AUTH PLAIN {plain_blob(user, password)}"), 235, "2.7.0")
    return conn


def implicit_tls(server, source: str | None = None) -> SMTPConn:
    """Port 465 (RFC 8314 3.3): TLS from the first byte, then the banner."""
    conn = SMTPConn(server.config["port_submissions"], source=source)
    tls_wrap(conn)
    return conn


def run_tool(args: list[str], input: str | bytes | None = None,
             timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    text = not isinstance(input, bytes)
    return subprocess.run(args, input=input, capture_output=True, text=text,
                          timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)


def s_client(port: int, *extra: str, starttls_smtp: bool = True,
             input: str = "QUIT\n") -> subprocess.CompletedProcess:
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-crlf",
            "-ign_eof", "-servername", HOSTNAME]
    if starttls_smtp:
        args[2:2] = ["-starttls", "smtp"]
    return run_tool(args + list(extra), input=input)


def s_client_protocol(proc: subprocess.CompletedProcess) -> str | None:
    m = re.search(r"^Protocol version: (\S+)", proc.stdout + proc.stderr, re.M)
    return m.group(1) if m else None


def find_queued(server, qid: str) -> dict:
    items = [m for m in server.queue_list() if m["id"] == qid]
    assert len(items) == 1, f"{qid} not in the queue exactly once: {server.queue_list()}"
    return items[0]


def queued_id(text: str) -> str:
    m = re.search(r"queued as (\S+)", text)
    assert m, f"no 'queued as' in:\n{text}"
    return m.group(1)


def make_cert(directory: Path, cn: str) -> tuple[Path, Path]:
    """A self-signed certificate for `cn` made by `openssl req -x509`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{cn}.crt", directory / f"{cn}.key"
    p = run_tool(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                  "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn}",
                  "-keyout", str(key), "-out", str(cert)])
    assert p.returncode == 0, p.stderr
    return cert, key


def der(cert_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text())


def peer_der_starttls(port: int) -> bytes:
    with SMTPConn(port) as c:
        c.start()
        sock = starttls(c)
        cert = sock.getpeercert(binary_form=True)
        c.cmd("QUIT")
        return cert


def peer_der_implicit(port: int) -> bytes:
    with SMTPConn(port) as c:
        sock = tls_wrap(c)
        assert_reply(c.banner(), 220)
        cert = sock.getpeercert(binary_form=True)
        c.cmd("QUIT")
        return cert


# --------------------------------------------------------------------------
# servers

@pytest.fixture(scope="module")
def srv(module_mta_factory):
    """One daemon for the read-mostly tests: alice exists, sales@ is her alias,
    lockout effectively off (the lockout tests have their own daemon)."""
    return module_mta_factory(SHARED_OVERRIDES, aliases=ALIASES, users={ALICE: ALICE_PW},
                              name="tls-shared")


@pytest.fixture(scope="module")
def notls_srv(module_mta_factory):
    """MTA_TLS_REQUIRED_SUBMISSION=false: AUTH allowed before TLS on 587."""
    return module_mta_factory({"tls_required_submission": False, **SHARED_OVERRIDES},
                              users={ALICE: ALICE_PW}, name="tls-not-required")


LOCKOUT = {"auth_lockout_failures": 3, "auth_lockout_window": 60, "auth_lockout_duration": 60}
FRANK, FRANK_PW = "frank@example.com", "Frank-pw-456"


@pytest.fixture(scope="module")
def lock_srv(module_mta_factory):
    """auth_lockout_failures=3 within 60 s locks for 60 s. The IP test uses 127.0.0.2/.3 and
    alice, the per-user test 127.0.0.4-.7 and frank, so they do not interfere."""
    return module_mta_factory(LOCKOUT, users={ALICE: ALICE_PW, FRANK: FRANK_PW},
                              name="tls-lockout")


# --------------------------------------------------------------------------
# openssl s_client: STARTTLS, protocol versions, implicit TLS

@pytest.mark.parametrize("port_key", ["port_relay", "port_submission"])
def test_openssl_starttls_handshake(srv, port_key):
    """RFC 3207 on the relay and submission ports with `openssl s_client -starttls smtp`:
    the handshake succeeds with TLS 1.2 or 1.3 (issue 3: TLS 1.2 and newer only)."""
    p = s_client(srv.config[port_key])
    out = p.stdout + p.stderr
    assert "CONNECTION ESTABLISHED" in out, out
    assert s_client_protocol(p) in ("TLSv1.2", "TLSv1.3"), out
    # the QUIT we typed went over TLS and was answered
    assert "221 2.0.0" in p.stdout, out


@pytest.mark.parametrize("port_key", ["port_relay", "port_submission"])
def test_openssl_tls12_uses_intermediate_cipher(srv, port_key):
    """TLS 1.2 still works (RFC 8996 floor) and negotiates a Mozilla "intermediate"
    cipher: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (forward secrecy, AEAD)."""
    p = s_client(srv.config[port_key], "-tls1_2")
    out = p.stdout + p.stderr
    assert s_client_protocol(p) == "TLSv1.2", out
    m = re.search(r"^Ciphersuite: (\S+)", out, re.M)
    assert m and re.match(r"ECDHE-(RSA|ECDSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$",
                          m.group(1)), out


@pytest.mark.parametrize("port_key", ["port_relay", "port_submission"])
@pytest.mark.parametrize("cipher", ["AES128-SHA", "ECDHE-RSA-AES128-SHA", "AES256-GCM-SHA384"])
def test_openssl_weak_tls12_cipher_refused(srv, port_key, cipher):
    """Mozilla intermediate: no static-RSA key exchange, no CBC-SHA1, no 3DES (SWEET32)."""
    p = s_client(srv.config[port_key], "-tls1_2", "-cipher", f"{cipher}@SECLEVEL=0")
    out = p.stdout + p.stderr
    assert "CONNECTION ESTABLISHED" not in out, out
    assert p.returncode != 0, out
    assert "alert handshake failure" in out, f"expected the server's handshake_failure alert:\n{out}"


@pytest.mark.parametrize("port_key", ["port_relay", "port_submission", "port_submissions"])
@pytest.mark.parametrize("version", ["-tls1_1", "-tls1"])
def test_openssl_tls11_and_older_refused(srv, port_key, version):
    """TLS 1.2 minimum (issue 3; RFC 8996 deprecates TLS 1.0/1.1): a client limited to
    TLS 1.1 (or 1.0) is refused by the *server* with a protocol_version alert. The client is
    allowed to offer it (SECLEVEL=0), so the failure is not the local OpenSSL's policy."""
    p = s_client(srv.config[port_key], version, "-cipher", "DEFAULT@SECLEVEL=0",
                 starttls_smtp=port_key != "port_submissions")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "CONNECTION ESTABLISHED" not in out, out
    assert "alert protocol version" in out, f"expected the server's protocol_version alert:\n{out}"


def test_openssl_implicit_tls_on_submissions(srv):
    """RFC 8314 3.3: on port_submissions TLS starts at connect, before the greeting; plain
    `openssl s_client -connect` (no -starttls) gets the 220 banner inside TLS, EHLO there
    offers AUTH and no STARTTLS (TLS is already on)."""
    p = s_client(srv.config["port_submissions"], starttls_smtp=False, input="EHLO client.example.org\nQUIT\n")
    out = p.stdout + p.stderr
    assert s_client_protocol(p) in ("TLSv1.2", "TLSv1.3"), out
    assert re.search(r"^220 mx\.test\.example", p.stdout, re.M), out
    assert re.search(r"^250[ -]AUTH PLAIN LOGIN", p.stdout, re.M), out
    assert not re.search(r"^250[ -]STARTTLS", p.stdout, re.M), out
    assert "221 2.0.0" in p.stdout, out


def test_submissions_port_rejects_plaintext(srv):
    """RFC 8314 3.3: port_submissions speaks TLS only; a plaintext client sees no
    cleartext greeting and nothing it sends is executed."""
    with SMTPConn(srv.config["port_submissions"], timeout=3) as c:
        c.send(b"EHLO client.example.org\r\n")
        try:
            data = c.read_until_closed(5)
        except OSError:
            data = c.buf
        assert b"220" not in data and b"250" not in data, data


def test_tls_close_notify_on_quit(srv):
    """RFC 8446 6.1: each party MUST send close_notify before closing its write side.
    After QUIT over TLS the server ends the TLS session cleanly (openssl s_client reports
    no "unexpected eof")."""
    p = s_client(srv.submission_port)
    out = p.stdout + p.stderr
    assert "221 2.0.0" in p.stdout, out
    assert "unexpected eof" not in out, out


# --------------------------------------------------------------------------
# STARTTLS command rules and the injection defence

@pytest.mark.parametrize("port_key", ["port_relay", "port_submission"])
def test_starttls_injection_discarded(srv, port_key):
    """CVE-2011-0411 (and the 2021 "NO STARTTLS" command-injection findings): the client
    writes `STARTTLS\\r\\nRSET\\r\\n` in ONE write. The RSET was sent before TLS and must be
    discarded: no reply to it ever arrives, neither in plaintext nor inside TLS."""
    with SMTPConn(srv.config[port_key]) as c:
        c.start()
        c.send(b"STARTTLS\r\nRSET\r\n")
        r = c.reply()
        assert_reply(r, 220, "2.0.0")
        assert c.buf == b"", f"plaintext reply to the injected RSET: {c.buf!r}"
        tls_wrap(c)
        with pytest.raises(socket.timeout):
            line = c.readline(timeout=0.7)
            pytest.fail(f"reply to the injected RSET arrived after TLS: {line!r}")
        # RFC 3207 4.2: the session forgot EHLO -- MAIL first is out of sequence
        assert_reply(c.cmd("MAIL FROM:<sender@example.org>"), 503, "5.5.1")
        c.ehlo()
        assert_reply(c.cmd("NOOP"), 250)


def test_starttls_injected_ehlo_and_auth_not_executed(srv):
    """CVE-2011-0411 with a payload: `STARTTLS\\r\\nEHLO evil\\r\\nAUTH PLAIN <valid>\\r\\n`
    in one write on the submission port. Neither pipelined command may take effect inside
    TLS: no replies arrive, MAIL needs EHLO (503 5.5.1), and after EHLO MAIL still needs
    AUTH (530 5.7.0)."""
    with SMTPConn(srv.submission_port) as c:
        c.start()
        c.send(f"STARTTLS\r\nEHLO evil.example\r\nAUTH PLAIN {plain_blob(ALICE, ALICE_PW)}\r\n")
        assert_reply(c.reply(), 220, "2.0.0")
        tls_wrap(c)
        with pytest.raises(socket.timeout):
            line = c.readline(timeout=0.7)
            pytest.fail(f"reply to an injected command after TLS: {line!r}")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 503, "5.5.1")
        c.ehlo()
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


def test_starttls_forgets_auth(notls_srv):
    """RFC 3207 4.2 / RFC 4954 4: with tls_required_submission=false a client may AUTH in
    plaintext, but STARTTLS discards that state: after TLS EHLO offers AUTH again and MAIL
    needs AUTH (530 5.7.0)."""
    with SMTPConn(notls_srv.submission_port) as c:
        c.start()
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235, "2.7.0")
        starttls(c)
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 503, "5.5.1")
        words = ehlo_keywords(c.cmd("EHLO client.example.org"))
        assert words.get("AUTH", "").split() == ["PLAIN", "LOGIN"], words
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


def test_auth_offered_without_tls_when_not_required(notls_srv):
    """MTA_TLS_REQUIRED_SUBMISSION=false: AUTH is offered (and works) before TLS on 587."""
    with SMTPConn(notls_srv.submission_port) as c:
        c.banner()
        words = ehlo_keywords(c.cmd("EHLO client.example.org"))
        assert words.get("AUTH", "").split() == ["PLAIN", "LOGIN"], words
        assert "STARTTLS" in words, words
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235, "2.7.0")


@pytest.mark.parametrize("port_key", ["port_relay", "port_submission"])
def test_starttls_twice(srv, port_key):
    """RFC 3207 4: STARTTLS inside TLS is out of sequence (503 5.5.1), and EHLO after TLS
    no longer offers STARTTLS (RFC 3207 4.2)."""
    with SMTPConn(srv.config[port_key]) as c:
        c.start()
        starttls(c)
        words = ehlo_keywords(c.cmd("EHLO client.example.org"))
        assert "STARTTLS" not in words, words
        assert_reply(c.cmd("STARTTLS"), 503, "5.5.1")
        assert_reply(c.cmd("NOOP"), 250)


def test_starttls_on_implicit_tls_port(srv):
    """RFC 8314 3.3 + RFC 3207 4: on the implicit-TLS port STARTTLS is not offered and is
    refused as out of sequence."""
    with implicit_tls(srv) as c:
        c.start()
        assert_reply(c.cmd("STARTTLS"), 503, "5.5.1")


@pytest.mark.parametrize("port_key", ["port_relay", "port_submission"])
def test_starttls_with_argument(srv, port_key):
    """RFC 3207 4: "STARTTLS" takes no parameters -> 501 5.5.4, and the session stays plain."""
    with SMTPConn(srv.config[port_key]) as c:
        c.start()
        assert_reply(c.cmd("STARTTLS now"), 501, "5.5.4")
        assert_reply(c.cmd("NOOP"), 250)
        starttls(c)  # still possible


def test_starttls_inside_transaction(srv):
    """RFC 3207 4 / RFC 5321 4.1.4: STARTTLS inside a mail transaction -> 503 5.5.1
    (relay port: the only port where a transaction can start before TLS)."""
    with SMTPConn(srv.port) as c:
        c.start()
        assert_reply(c.cmd("MAIL FROM:<sender@example.org>"), 250)
        assert_reply(c.cmd("STARTTLS"), 503, "5.5.1")
        assert_reply(c.cmd("RSET"), 250)
        starttls(c)


# --------------------------------------------------------------------------
# where AUTH is offered

def test_submission_offers_auth_only_after_tls(srv):
    """RFC 4954 4 + MTA_TLS_REQUIRED_SUBMISSION: on 587, EHLO before TLS offers STARTTLS
    and no AUTH; after STARTTLS it offers `AUTH PLAIN LOGIN`."""
    with SMTPConn(srv.submission_port) as c:
        c.banner()
        words = ehlo_keywords(c.cmd("EHLO client.example.org"))
        assert "AUTH" not in words, words
        assert "STARTTLS" in words, words
        starttls(c)
        words = ehlo_keywords(c.cmd("EHLO client.example.org"))
        assert words.get("AUTH", "").split() == ["PLAIN", "LOGIN"], words


def test_auth_before_tls_on_submission(srv):
    """RFC 4954 6: AUTH where TLS is required first -> 538 5.7.11; nothing is decoded and
    MAIL still needs TLS+AUTH (530 5.7.0)."""
    with SMTPConn(srv.submission_port) as c:
        c.start()
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 538, "5.7.11")
        assert_reply(c.cmd("AUTH LOGIN"), 538, "5.7.11")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


def test_relay_port_never_offers_auth(srv):
    """INTERFACE "SMTP": the relay port never offers AUTH, before or after TLS, and
    refuses the command (503 5.5.1)."""
    with SMTPConn(srv.port) as c:
        c.banner()
        assert "AUTH" not in ehlo_keywords(c.cmd("EHLO client.example.org"))
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 503, "5.5.1")
        starttls(c)
        assert "AUTH" not in ehlo_keywords(c.cmd("EHLO client.example.org"))
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 503, "5.5.1")
        assert_reply(c.cmd("AUTH LOGIN"), 503, "5.5.1")


# --------------------------------------------------------------------------
# AUTH PLAIN / LOGIN exchanges (RFC 4954 4, RFC 4616)

def test_auth_plain_initial_response(srv):
    """RFC 4954 4 / RFC 4616: AUTH PLAIN with an initial response -> 235 2.7.0."""
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235, "2.7.0")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 250)


def test_auth_plain_without_initial_response(srv):
    """RFC 4954 4: AUTH PLAIN alone -> 334 with an empty challenge, the response on the
    next line -> 235 2.7.0."""
    with submission(srv) as c:
        r = c.cmd("AUTH PLAIN")
        assert r.code == 334 and r.lines[-1].strip() == "", str(r)
        assert_reply(c.cmd(plain_blob(ALICE, ALICE_PW)), 235, "2.7.0")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 250)


def test_auth_login_without_initial_response(srv):
    """AUTH LOGIN (draft-murchison-sasl-login): 334 "Username:", 334 "Password:", 235."""
    with submission(srv) as c:
        r = c.cmd("AUTH LOGIN")
        assert r.code == 334 and base64.b64decode(r.lines[-1]) == b"Username:", str(r)
        r = c.cmd(b64(ALICE))
        assert r.code == 334 and base64.b64decode(r.lines[-1]) == b"Password:", str(r)
        assert_reply(c.cmd(b64(ALICE_PW)), 235, "2.7.0")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 250)


def test_auth_login_initial_response(srv):
    """AUTH LOGIN with the username as initial response (RFC 4954 4): 334 "Password:", 235."""
    with submission(srv) as c:
        r = c.cmd(f"AUTH LOGIN {b64(ALICE)}")
        assert r.code == 334 and base64.b64decode(r.lines[-1]) == b"Password:", str(r)
        assert_reply(c.cmd(b64(ALICE_PW)), 235, "2.7.0")


def test_auth_case_insensitive_mechanism_and_username(srv):
    """RFC 4954 4: mechanism names are case-insensitive; usernames are addresses compared
    case-insensitively (users.py)."""
    with submission(srv) as c:
        assert_reply(c.cmd(f"auth plain {plain_blob('Alice@Example.COM', ALICE_PW)}"), 235, "2.7.0")


@pytest.mark.parametrize("mechanism,prompts", [("PLAIN", 0), ("LOGIN", 0), ("LOGIN", 1)])
def test_auth_cancel(srv, mechanism, prompts):
    """RFC 4954 4: a client response of "*" cancels the exchange -> 501 5.0.0; the
    session stays unauthenticated and may try again."""
    with submission(srv) as c:
        r = c.cmd(f"AUTH {mechanism}")
        assert r.code == 334, str(r)
        if prompts:
            assert c.cmd(b64(ALICE)).code == 334
        assert_reply(c.cmd("*"), 501, "5.0.0")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235, "2.7.0")


@pytest.mark.parametrize("how", ["initial", "continuation", "login-password"])
def test_auth_bad_base64(srv, how):
    """RFC 4954 4: a response that cannot be base64-decoded -> 501 5.5.2."""
    with submission(srv) as c:
        if how == "initial":
            r = c.cmd("AUTH PLAIN !!not*base64!!")
        elif how == "continuation":
            assert c.cmd("AUTH PLAIN").code == 334
            r = c.cmd("%%%===")
        else:
            assert c.cmd(f"AUTH LOGIN {b64(ALICE)}").code == 334
            r = c.cmd("@@@@")
        assert_reply(r, 501, "5.5.2")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_wrong_password(srv, mechanism):
    """RFC 4954 6: invalid credentials -> 535 5.7.8, session stays unauthenticated."""
    with submission(srv) as c:
        if mechanism == "PLAIN":
            r = c.cmd(f"AUTH PLAIN {plain_blob(ALICE, 'wrong-password')}")
        else:
            assert c.cmd(f"AUTH LOGIN {b64(ALICE)}").code == 334
            r = c.cmd(b64("wrong-password"))
        assert_reply(r, 535, "5.7.8")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


def test_auth_unknown_user(srv):
    """RFC 4954 6: an unknown user gets the same 535 5.7.8 as a wrong password (no user
    enumeration)."""
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob('nobody@example.com', ALICE_PW)}"), 535, "5.7.8")


def test_auth_authzid_other_user_refused(srv):
    """RFC 4616 2 / RFC 4954 4: an authorization identity other than the authenticated user
    (acting as someone else) is refused with 535 even with the right password; the same
    identity as the user is accepted."""
    with submission(srv) as c:
        r = c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW, authzid='postmaster@example.com')}")
        assert r.code == 535, str(r)
        assert_reply(c.cmd("MAIL FROM:<postmaster@example.com>"), 530, "5.7.0")
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW, authzid=ALICE)}"), 235, "2.7.0")


def test_auth_unknown_mechanism(srv):
    """RFC 4954 4: an unsupported mechanism -> 504 5.5.4."""
    with submission(srv) as c:
        assert_reply(c.cmd("AUTH CRAM-MD5"), 504, "5.5.4")
        assert_reply(c.cmd("AUTH XOAUTH2 dG9rZW4="), 504, "5.5.4")


def test_auth_twice_refused(srv):
    """RFC 4954 4: after a successful AUTH, another AUTH is refused with 503 5.5.1 and EHLO
    the session keeps its identity."""
    with submission(srv, user=ALICE, password=ALICE_PW) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 503, "5.5.1")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 250)


def test_auth_needs_ehlo(srv):
    """RFC 4954 3: AUTH is an ESMTP extension; after STARTTLS (state reset) and before EHLO
    it is out of sequence (503 5.5.1)."""
    with SMTPConn(srv.submission_port) as c:
        c.start()
        starttls(c)
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 503, "5.5.1")


# --------------------------------------------------------------------------
# users: `mta user add|del|passwd|list`, bcrypt in users.json

def test_user_add_del_passwd_while_running(srv):
    """Issue 3: users managed with `mta user` take effect without a restart: add -> can log
    in; passwd -> only the new password works; del -> cannot log in any more."""
    user, pw1, pw2 = "dave@example.com", "Dave-first-pw-1", "Dave-second-pw-2"
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, pw1)}"), 535, "5.7.8")
    p = srv.cli("user", "add", user, input=pw1 + "\n")
    assert p.returncode == 0, p.stderr
    listing = srv.cli("user", "list")
    assert listing.returncode == 0 and user in listing.stdout.split(), listing
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, pw1)}"), 235, "2.7.0")
    p = srv.cli("user", "passwd", user, input=pw2 + "\n")
    assert p.returncode == 0, p.stderr
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, pw1)}"), 535, "5.7.8")
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, pw2)}"), 235, "2.7.0")
    p = srv.cli("user", "del", user)
    assert p.returncode == 0, p.stderr
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, pw2)}"), 535, "5.7.8")
    listing = srv.cli("user", "list")
    assert user not in listing.stdout.split(), listing


def test_user_cli_errors(srv):
    """INTERFACE "Commands": bad input to `mta user` is a one-line error with a non-zero
    exit code, never a traceback: a duplicate add, del/passwd of an unknown user, a name
    that is not a full address, an empty password. users.json is left as it was."""
    path = Path(srv.config["data_dir"]) / "users.json"
    before = path.read_bytes()
    cases = [
        (("user", "add", ALICE), "another-password\n"),
        (("user", "del", "nobody@example.com"), None),
        (("user", "passwd", "nobody@example.com"), "x-password\n"),
        (("user", "add", "not-an-address"), "x-password\n"),
        (("user", "add", "empty@example.com"), "\n"),
    ]
    for args, stdin in cases:
        p = srv.cli(*args, input=stdin)
        assert p.returncode != 0, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) >= 1, (args, p.stderr)
    assert path.read_bytes() == before
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235, "2.7.0")


def test_users_json_holds_bcrypt_only(srv):
    """INTERFACE "Files on disk": users.json in data_dir holds bcrypt hashes ($2...) and
    never the plaintext password (nor its base64)."""
    path = Path(srv.config["data_dir"]) / "users.json"
    text = path.read_text()
    assert ALICE_PW not in text and b64(ALICE_PW) not in text
    hashes = re.findall(r'"(\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53})"', text)
    assert hashes, text
    data = json.loads(text)
    found = []

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node.startswith("$2"):
            found.append(node)
    walk(data)
    assert found, data
    assert not os.stat(path).st_mode & 0o004, "users.json is world-readable"


# --------------------------------------------------------------------------
# secrets stay out of the logs

def test_auth_secrets_not_logged(srv):
    """Issue 3 / INTERFACE "Files on disk": AUTH secrets are masked in smtp.log (and never
    in mta.log): after PLAIN and LOGIN exchanges, with and without initial response, good and
    bad, neither the base64 blobs nor the passwords appear in either log."""
    user, pw = "carol@example.com", "Carol-Unique-Secret-9f3b"
    bad = "Carol-Wrong-Secret-77ac"
    srv.add_user(user, pw)
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, pw)}"), 235)
    with submission(srv) as c:
        assert c.cmd("AUTH PLAIN").code == 334
        assert_reply(c.cmd(plain_blob(user, pw, authzid=user)), 235)
    with submission(srv) as c:
        assert c.cmd(f"AUTH LOGIN {b64(user)}").code == 334
        assert_reply(c.cmd(b64(pw)), 235)
    with submission(srv) as c:
        assert c.cmd("AUTH LOGIN").code == 334
        assert c.cmd(b64(user)).code == 334
        assert_reply(c.cmd(b64(pw)), 235)
    with submission(srv) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, bad)}"), 535)
        assert c.cmd(f"AUTH LOGIN {b64(user)}").code == 334
        assert_reply(c.cmd(b64(bad)), 535)
    with implicit_tls(srv) as c:
        c.start()
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(user, pw)}"), 235)
    secrets = {pw, bad, b64(pw), b64(bad), plain_blob(user, pw), plain_blob(user, pw, authzid=user),
               plain_blob(user, bad)}
    time.sleep(0.2)
    for name in ("smtp.log", "mta.log"):
        text = srv.log_text(name)
        assert text, f"{name} is empty"
        leaked = [(s, line) for s in secrets for line in text.splitlines() if s in line]
        assert not leaked, f"secrets in {name}: {leaked}"
    # the exchange itself is still visible in the transcript, masked
    assert re.search(r"AUTH", srv.log_text("smtp.log")), "no AUTH in smtp.log at all"


# --------------------------------------------------------------------------
# lockout

def test_lockout_after_failures_from_one_ip(lock_srv):
    """Issue 3 lockout (brute-force defence): with 3 failures in 60 s from one IP, the 4th
    AUTH from that IP -- even with the right password -- gets 454 4.7.0; mta.log records
    the lockout. The right password from another IP still works (an IP lockout, and the
    failures were spread over different usernames so no user is locked)."""
    server = lock_srv
    attacker = "127.0.0.2"
    for n in range(3):
        with submission(server, source=attacker) as c:
            assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(f'guess{n}@example.com', 'bad')}"), 535, "5.7.8")
    with submission(server, source=attacker) as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 454, "4.7.0")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")
    # also on the implicit-TLS port, and with LOGIN
    with implicit_tls(server, source=attacker) as c:
        c.start()
        r = c.cmd(f"AUTH LOGIN {b64(ALICE)}")
        if r.code == 334:
            r = c.cmd(b64(ALICE_PW))
        assert_reply(r, 454, "4.7.0")
    with submission(server, source="127.0.0.3") as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235, "2.7.0")
    log = server.log_text()
    assert re.search(r"lock", log, re.I) and "127.0.0.2" in log, log[-3000:]
    assert re.search(r"lock\w*.*127\.0\.0\.2|127\.0\.0\.2.*lock", log, re.I), log[-3000:]


def test_lockout_per_user(lock_srv):
    """Issue 3 lockout, per user (distributed guessing): 3 failures for frank from three
    different IPs lock frank; the right password from a fourth IP gets 454 4.7.0, while
    another user from that IP is unaffected."""
    server = lock_srv
    for n, ip in enumerate(("127.0.0.4", "127.0.0.5", "127.0.0.6")):
        with submission(server, source=ip) as c:
            assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(FRANK, f'wrong{n}')}"), 535, "5.7.8")
    with submission(server, source="127.0.0.7") as c:
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(FRANK, FRANK_PW)}"), 454, "4.7.0")
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235, "2.7.0")
    assert re.search(r"lock\w*.*frank@example\.com", server.log_text(), re.I), server.log_text()[-3000:]


def test_bcrypt_does_not_block_other_sessions(srv):
    """Issue 3: "Bcrypt work runs without blocking other sessions": while several AUTH
    checks are in flight, another session's NOOP is answered at once."""
    conns = [submission(srv) for _ in range(4)]
    try:
        other = SMTPConn(srv.port)
        other.start()
        for c in conns:
            c.send(f"AUTH PLAIN {plain_blob(ALICE, 'wrong-' + str(id(c)))}\r\n")
        time.sleep(0.02)
        t0 = time.monotonic()
        assert_reply(other.cmd("NOOP"), 250)
        elapsed = time.monotonic() - t0
        for c in conns:
            assert_reply(c.reply(timeout=30), 535)
        other.close()
        assert elapsed < 0.5, f"NOOP took {elapsed:.2f}s while bcrypt ran"
    finally:
        for c in conns:
            c.close()


# --------------------------------------------------------------------------
# submission policy (RFC 6409) and trace headers (RFC 3848)

def test_mail_before_auth_on_submission(srv):
    """RFC 6409 4.3 / RFC 4954 6: on 587 over TLS, MAIL before AUTH -> 530 5.7.0."""
    with submission(srv) as c:
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


def test_mail_before_auth_on_submissions(srv):
    """RFC 8314 + RFC 6409 4.3: on 465, MAIL before AUTH -> 530 5.7.0."""
    with implicit_tls(srv) as c:
        c.start()
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


def test_mail_before_tls_on_submission(srv):
    """RFC 3207 4 / INTERFACE: on 587 without TLS, MAIL -> 530 5.7.0 (STARTTLS first)."""
    with SMTPConn(srv.submission_port) as c:
        c.start()
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0")


def test_authenticated_user_relays_anywhere(srv):
    """RFC 6409 / RFC 4954: an authenticated client may relay to any domain; the message
    is queued with `with ESMTPSA` (RFC 3848) and the TLS version and cipher in Received:,
    sasl_username in mta.log and auth_user on the envelope."""
    with submission(srv) as c:
        sock = c.sock
        assert_reply(c.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235)
        r = send_mail(c, ALICE, [REMOTE_RCPT, "carol@far.example.net"],
                      make_message("relay via submission", "Hi.\r\n", sender=ALICE, to=REMOTE_RCPT))
        assert_reply(r, 250, "2.0.0")
        qid = r.queue_id
        version, cipher = sock.version(), sock.cipher()[0]
        c.cmd("QUIT")
    entry = find_queued(srv, qid)
    assert entry["sender"] == ALICE, entry
    assert sorted(x["address"] for x in entry["recipients"]) == sorted([REMOTE_RCPT, "carol@far.example.net"])
    shown = srv.queue_show(qid)
    received = re.search(r"^Received:.*?(?=^\S)", shown.replace("\r\n", "\n"), re.M | re.S)
    assert received, shown[:2000]
    header = received.group(0)
    assert "with ESMTPSA" in header, header
    assert version in header and cipher in header, (version, cipher, header)
    envelope = json.loads(srv.queue_show(qid, "--json"))
    assert envelope.get("auth_user") == ALICE, envelope
    line = [l for l in srv.log_text().splitlines() if qid in l and "sasl_username=" in l]
    assert line and f"sasl_username={ALICE}" in line[0], srv.log_text()[-3000:]


def test_sender_not_owned_refused(srv):
    """RFC 6409 6.1 / issue 3: an authenticated user may only use their own addresses:
    MAIL FROM someone else's address -> 553 5.7.1; the session can go on."""
    with submission(srv, user=ALICE, password=ALICE_PW) as c:
        assert_reply(c.cmd("MAIL FROM:<ceo@example.com>"), 553, "5.7.1")
        assert_reply(c.cmd("MAIL FROM:<alice@other.example>"), 553, "5.7.1")
        assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 250)


@pytest.mark.parametrize("sender", [ALICE, "Alice@Example.com", "sales@example.com"])
def test_sender_owned_accepted(srv, sender):
    """Issue 3: MAIL FROM the login address (any case) or an alias mapped to the user
    (`sales@example.com: alice@example.com`) is accepted and queued."""
    with submission(srv, user=ALICE, password=ALICE_PW) as c:
        r = send_mail(c, sender, [REMOTE_RCPT], make_message("owned sender", "Hi.\r\n", sender=sender))
        assert_reply(r, 250, "2.0.0")
    entry = find_queued(srv, r.queue_id)
    assert entry["sender"].lower() == sender.lower(), entry


def test_relay_port_starttls_received_esmtps(srv):
    """RFC 3848: a message received on the relay port over STARTTLS without AUTH is
    `with ESMTPS` and names the TLS version and cipher; no auth_user on the envelope."""
    with SMTPConn(srv.port) as c:
        c.start()
        sock = starttls(c)
        c.ehlo()
        r = send_mail(c, "sender@example.org", ["info@example.com"],
                      make_message("relay tls", "Hi.\r\n"))
        assert_reply(r, 250, "2.0.0")
        version, cipher = sock.version(), sock.cipher()[0]
    shown = srv.queue_show(r.queue_id)
    assert re.search(r"with ESMTPS\b", shown), shown[:1500]
    assert version in shown and cipher in shown, shown[:1500]
    envelope = json.loads(srv.queue_show(r.queue_id, "--json"))
    assert not envelope.get("auth_user"), envelope


# --------------------------------------------------------------------------
# real clients: swaks, smtplib, curl

def swaks(server, port: int, *extra: str, subject: str) -> subprocess.CompletedProcess:
    return run_tool(["swaks", "--server", f"127.0.0.1:{port}", "--timeout", "20",
                     "--from", ALICE, "--to", REMOTE_RCPT, "--helo", "client.example.org",
                     "--header", f"Subject: {subject}", *extra])


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_starttls_auth(srv, mechanism):
    """swaks --tls --auth PLAIN|LOGIN on 587 (RFC 3207 + RFC 4954): queued, ESMTPSA."""
    p = swaks(srv, srv.submission_port, "--tls", "--auth", mechanism, "--auth-user", ALICE,
              "--auth-password", ALICE_PW, subject=f"swaks {mechanism}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "235 2.7.0" in p.stdout, p.stdout
    assert_queued_esmtpsa(srv, queued_id(p.stdout))


def test_swaks_implicit_tls(srv):
    """swaks --tlsc (TLS on connect) on port_submissions (RFC 8314 3.3) with AUTH LOGIN."""
    p = swaks(srv, srv.config["port_submissions"], "--tlsc", "--auth", "LOGIN", "--auth-user", ALICE,
              "--auth-password", ALICE_PW, subject="swaks tlsc")
    assert p.returncode == 0, p.stdout + p.stderr
    assert_queued_esmtpsa(srv, queued_id(p.stdout))


def test_swaks_wrong_password(srv):
    """swaks with a wrong password: 535 5.7.8, swaks gives up before MAIL, nothing queued."""
    p = swaks(srv, srv.submission_port, "--tls", "--auth", "PLAIN", "--auth-user", ALICE,
              "--auth-password", "nope-nope", subject="swaks bad")
    assert p.returncode != 0
    assert "535 5.7.8" in p.stdout, p.stdout
    assert "MAIL FROM" not in p.stdout and "queued as" not in p.stdout, p.stdout


def smtplib_send(client: smtplib.SMTP, subject: str) -> str:
    """MAIL/RCPT/DATA through smtplib; returns the queue id from the end-of-data reply."""
    code, text = client.mail(ALICE)
    assert code == 250, text
    code, text = client.rcpt(REMOTE_RCPT)
    assert code == 250, text
    code, text = client.data(make_message(subject, "Hi.\r\n", sender=ALICE, to=REMOTE_RCPT))
    assert code == 250, text
    return queued_id(text.decode())


def assert_queued_esmtpsa(server, qid: str, body: str | None = None) -> None:
    """The message is in `mta queue list --json` (alice -> bob@remote) and its Received:
    says ESMTPSA (RFC 3848: ESMTP + TLS + AUTH)."""
    entry = find_queued(server, qid)
    assert entry["sender"] == ALICE and [r["address"] for r in entry["recipients"]] == [REMOTE_RCPT], entry
    shown = server.queue_show(qid)
    assert "with ESMTPSA" in shown, shown[:1500]
    if body is not None:
        assert body in shown, shown[:1500]


def test_smtplib_starttls_login(srv):
    """smtplib: starttls() + login() (RFC 3207, RFC 4954) on 587; no AUTH before TLS."""
    with smtplib.SMTP("127.0.0.1", srv.submission_port, local_hostname="client.example.org",
                      timeout=20) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        client.starttls(context=client_context())
        client.ehlo()
        assert client.has_extn("auth")
        client.login(ALICE, ALICE_PW)
        qid = smtplib_send(client, "smtplib starttls")
    assert_queued_esmtpsa(srv, qid)


def test_smtplib_login_mechanism(srv):
    """smtplib with AUTH LOGIN and no initial response (RFC 4954 4, 334 challenges)."""
    with smtplib.SMTP("127.0.0.1", srv.submission_port, local_hostname="client.example.org",
                      timeout=20) as client:
        client.starttls(context=client_context())
        client.ehlo()
        client.user, client.password = ALICE, ALICE_PW
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235


def test_smtplib_ssl_submissions(srv):
    """smtplib.SMTP_SSL on port_submissions (RFC 8314 3.3) + login + a message."""
    with smtplib.SMTP_SSL("127.0.0.1", srv.config["port_submissions"], local_hostname="client.example.org",
                          timeout=20, context=client_context()) as client:
        client.login(ALICE, ALICE_PW)
        qid = smtplib_send(client, "smtplib ssl")
    assert_queued_esmtpsa(srv, qid)


def test_smtplib_wrong_password(srv):
    """smtplib login with a wrong password raises SMTPAuthenticationError (535)."""
    with smtplib.SMTP("127.0.0.1", srv.submission_port, local_hostname="client.example.org",
                      timeout=20) as client:
        client.starttls(context=client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(ALICE, "definitely-wrong")
        assert info.value.smtp_code == 535


def curl(url: str, msg: Path, *extra: str) -> str:
    """curl upload; returns the queue id from the verbose transcript (stderr)."""
    p = run_tool(["curl", "-v", "-sS", "--max-time", "20", "--insecure", url,
                  "--mail-from", ALICE, "--mail-rcpt", REMOTE_RCPT,
                  "--user", f"{ALICE}:{ALICE_PW}", "--upload-file", str(msg), *extra])
    assert p.returncode == 0, p.stderr
    return queued_id(p.stderr)


@pytest.mark.parametrize("login_options", [None, "AUTH=LOGIN"])
def test_curl_ssl_reqd(srv, tmp_path, login_options):
    """curl --ssl-reqd smtp:// (STARTTLS required by the client) with --user on 587;
    curl picks PLAIN by default, LOGIN with --login-options."""
    msg = tmp_path / "msg.txt"
    msg.write_bytes(make_message(f"curl {login_options}", "Sent by curl.\r\n", sender=ALICE, to=REMOTE_RCPT))
    extra = ["--login-options", login_options] if login_options else []
    qid = curl(f"smtp://127.0.0.1:{srv.submission_port}/client.example.org", msg, "--ssl-reqd", *extra)
    assert_queued_esmtpsa(srv, qid, "Sent by curl.")


def test_curl_implicit_tls(srv, tmp_path):
    """curl smtps:// on port_submissions (RFC 8314 3.3)."""
    msg = tmp_path / "msg.txt"
    msg.write_bytes(make_message("curl smtps", "Sent by curl over smtps.\r\n", sender=ALICE, to=REMOTE_RCPT))
    qid = curl(f"smtps://127.0.0.1:{srv.config['port_submissions']}/client.example.org", msg)
    assert_queued_esmtpsa(srv, qid, "Sent by curl over smtps.")


# --------------------------------------------------------------------------
# certificate reload on SIGHUP

def test_sighup_reloads_certificate(mta_factory, tmp_path):
    """Issue 3 / INTERFACE `mta serve`: SIGHUP reloads MTA_TLS_CERT/MTA_TLS_KEY without
    dropping connections. New connections on every TLS port see the new certificate; a
    connection opened (and TLS-established) before the reload keeps working and can still
    authenticate and submit a message. A later SIGHUP with a garbage certificate keeps the
    current one."""
    old_cert, old_key = make_cert(tmp_path / "old", "old.example")
    new_cert, new_key = make_cert(tmp_path / "new", "new.example")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(old_cert, live_cert)
    shutil.copy(old_key, live_key)
    server = mta_factory({"tls_cert": str(live_cert), "tls_key": str(live_key)},
                         users={ALICE: ALICE_PW})
    sub, subs = server.submission_port, server.config["port_submissions"]
    assert peer_der_starttls(sub) == der(old_cert)
    assert peer_der_implicit(subs) == der(old_cert)

    existing = SMTPConn(sub)
    existing.start()
    sock = starttls(existing)
    assert sock.getpeercert(binary_form=True) == der(old_cert)
    existing.ehlo()
    existing_plain = SMTPConn(server.port)
    existing_plain.start()
    try:
        # replace the files atomically (as certbot's deploy hooks would), then SIGHUP
        shutil.copy(new_key, tmp_path / "live.key.tmp")
        shutil.copy(new_cert, tmp_path / "live.crt.tmp")
        os.replace(tmp_path / "live.key.tmp", live_key)
        os.replace(tmp_path / "live.crt.tmp", live_cert)
        server.signal(signal.SIGHUP)
        assert wait_for(lambda: peer_der_starttls(sub) == der(new_cert), timeout=10), \
            "new connections still see the old certificate\n" + server.diagnostics()
        assert peer_der_starttls(server.port) == der(new_cert)
        assert peer_der_implicit(subs) == der(new_cert)
        p = s_client(sub, "-showcerts")
        assert "new.example" in p.stdout + p.stderr, p.stdout + p.stderr
        assert server.alive()

        # the connection opened before the reload is still usable
        assert_reply(existing.cmd("NOOP"), 250)
        assert_reply(existing.cmd(f"AUTH PLAIN {plain_blob(ALICE, ALICE_PW)}"), 235)
        r = send_mail(existing, ALICE, [REMOTE_RCPT],
                      make_message("across reload", "Hi.\r\n", sender=ALICE, to=REMOTE_RCPT))
        assert_reply(r, 250, "2.0.0")
        assert_reply(existing.cmd("QUIT"), 221)
        # a plaintext session opened before the reload can still upgrade, to the new cert
        assert_reply(existing_plain.cmd("NOOP"), 250)
        assert starttls(existing_plain).getpeercert(binary_form=True) == der(new_cert)
    finally:
        existing.close()
        existing_plain.close()
    find_queued(server, r.queue_id)

    # A broken certificate on the next SIGHUP must not take TLS down: the daemon logs the
    # error and keeps serving the certificate it has.
    failures = server.log_text().count("reload failed")
    live_cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: server.log_text().count("reload failed") > failures, timeout=10), \
        "no 'reload failed' in mta.log after SIGHUP with a garbage certificate\n" + server.diagnostics()
    assert server.alive()
    assert peer_der_starttls(sub) == der(new_cert)
    assert peer_der_implicit(subs) == der(new_cert)


def test_development_default_generates_a_self_signed_certificate(mta_factory):
    """INTERFACE.md: with no MTA_TLS_CERT a self-signed certificate is generated
    under the data directory on first start, and STARTTLS works with it (RFC 3207)."""
    import smtplib
    import ssl as ssl_module
    srv = mta_factory({"tls_cert": None, "tls_key": None})
    cert = Path(srv.config["data_dir"]) / "tls" / "cert.pem"
    key = Path(srv.config["data_dir"]) / "tls" / "key.pem"
    assert cert.exists() and key.exists()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as client:
        context = ssl_module.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
        client.starttls(context=context)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
