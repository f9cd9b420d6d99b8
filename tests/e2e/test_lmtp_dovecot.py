"""LmtpCourier against a real Dovecot LMTP server (RFC 2033).

A throwaway Dovecot (Debian's dovecot-lmtpd) runs in the foreground
(`dovecot -F`) with a minimal configuration in a temporary directory:
LMTP on a random loopback port and on a unix socket, `ssl = no`, users
from a passwd-file holding only alice and bob (so any other recipient is
refused at RCPT time, 550 5.1.1), Maildirs under the temporary directory.

Dovecot runs unprivileged. When the tests run as root it is started as
`nobody` through setpriv(1) and its directory lives outside pytest's
tmp_path (which is 0700 root); that directory is removed when the tests
pass and kept when one fails. Otherwise it runs as the current user inside
tmp_path.

Skipped, saying why, when /usr/sbin/dovecot is missing
(`apt-get install dovecot-lmtpd`).
"""

from __future__ import annotations

import ctypes
import email
import email.policy
import os
import pwd
import grp
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.delivery.local import LmtpCourier
from mta.spool.envelope import Envelope, Recipient

DOVECOT = "/usr/sbin/dovecot"
SETPRIV = "/usr/bin/setpriv"
READY_TIMEOUT = 20.0
HOSTNAME = "mx.test.example"

MESSAGE = (
    b"Received: from client.example ([192.0.2.9])\r\n"
    b"\tby mx.test.example with ESMTP id 0005F0A1B2C3D4E5F60718\r\n"
    b"From: Sender <sender@example.org>\r\n"
    b"To: alice@example.com, bob@example.com\r\n"
    b"Subject: lmtp test\r\n"
    b"Message-ID: <lmtp-test-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".\r\n"                       # a lone dot: must arrive as a lone dot, not end the data
    b"..two dots\r\n"
    b"caf\xc3\xa9 8-bit text\r\n"
    + b"".join(b"line %05d of the body\r\n" % i for i in range(20000))
    + b"the end\r\n"
)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: Dovecot's master gets SIGKILL if pytest dies (prctl PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except Exception:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Dovecot:
    root: Path
    port: int
    mail: Path
    log: Path
    lmtp_socket: Path
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def maildir_files(self, address: str) -> list[Path]:
        user, domain = address.split("@")
        new = self.mail / domain / user / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


CONFIG = """\
# minimal throwaway Dovecot for mta's LMTP tests
base_dir = {root}/run
state_dir = {root}/state
instance_name = mta-test-{port}
protocols = lmtp
listen = 127.0.0.1
ssl = no
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
mail_location = maildir:{root}/mail/%d/%n
first_valid_uid = 1
first_valid_gid = 1
# unprivileged: every service runs as the user that started Dovecot
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
service anvil {{
  chroot =
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


@pytest.fixture
def dovecot(tmp_path, request):
    if not os.path.exists(DOVECOT):
        pytest.skip(f"{DOVECOT} is missing: install Debian's dovecot-lmtpd (apt-get install dovecot-lmtpd)")
    as_root = os.geteuid() == 0
    if as_root:
        if not os.path.exists(SETPRIV):
            pytest.skip(f"running as root and {SETPRIV} (util-linux) is missing to start Dovecot unprivileged")
        account = pwd.getpwnam("nobody")
        uid, gid = account.pw_uid, account.pw_gid
        root = Path(tempfile.mkdtemp(prefix="mta-dovecot-", dir="/tmp"))
        root.chmod(0o755)
        prefix = [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    else:
        uid, gid = os.getuid(), os.getgid()
        root = tmp_path / "dovecot"
        root.mkdir()
        prefix = []
    user = pwd.getpwuid(uid).pw_name
    group = grp.getgrgid(gid).gr_name
    port = _free_port()
    for name in ("run", "state", "mail"):
        (root / name).mkdir()
    (root / "dovecot.conf").write_text(CONFIG.format(root=root, port=port, user=user, group=group))
    # only alice and bob exist: Dovecot refuses anyone else at RCPT (550 5.1.1)
    (root / "users").write_text(
        f"alice@example.com::{uid}:{gid}::{root}/home/alice::\n"
        f"bob@example.com::{uid}:{gid}::{root}/home/bob::\n")
    if as_root:
        for path in [root, *root.rglob("*")]:
            os.chown(path, uid, gid)

    output = open(root / "dovecot.out", "wb")
    process = subprocess.Popen([*prefix, DOVECOT, "-F", "-c", str(root / "dovecot.conf")],
                               stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                               preexec_fn=_die_with_parent)
    instance = Dovecot(root=root, port=port, mail=root / "mail", log=root / "dovecot.log",
                       lmtp_socket=root / "run" / "lmtp", process=process)
    failures_before = request.session.testsfailed
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"dovecot exited with {process.returncode}:\n"
                            f"{(root / 'dovecot.out').read_text(errors='replace')}\n{instance.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    if probe.makefile("rb").readline().startswith(b"220") and instance.lmtp_socket.exists():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dovecot did not answer on 127.0.0.1:{port} within {READY_TIMEOUT} s:\n"
                            f"{instance.log_text()}")
            time.sleep(0.1)
        yield instance
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        output.close()
        if as_root and request.session.testsfailed == failures_before:
            shutil.rmtree(root, ignore_errors=True)


def make_envelope(recipients, **fields) -> Envelope:
    fields.setdefault("sender", "sender@example.org")
    fields.setdefault("body", "8BITMIME")
    return Envelope(id="0005F0A1B2C3D4E5F60718", recipients=[Recipient(r) for r in recipients], **fields)


@pytest.fixture
def message_path(tmp_path):
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE)
    return str(path)


def read_delivered(dovecot: Dovecot, address: str) -> bytes:
    files = dovecot.maildir_files(address)
    assert len(files) == 1, f"{address}: expected one message, found {files}\n{dovecot.log_text()}"
    return files[0].read_bytes()


def test_delivers_to_two_users_and_refuses_an_unknown_one(dovecot, message_path):
    courier = LmtpCourier(f"127.0.0.1:{dovecot.port}", HOSTNAME, timeout=30)
    addresses = ["alice@example.com", "nobody-here@example.com", "bob@example.com"]
    results = courier.deliver(make_envelope(addresses), message_path, addresses)
    log = dovecot.log_text()

    for address in ("alice@example.com", "bob@example.com"):
        result = results[address]
        assert result.kind == "delivered", (result, log)
        assert result.dsn == "2.0.0"
        assert result.remote_mta == f"127.0.0.1[127.0.0.1]:{dovecot.port}"
        assert "Saved" in result.text                    # Dovecot's "250 2.0.0 <user> id Saved"

    # RFC 2033 4.1: refused at RCPT, with Dovecot's enhanced status code
    unknown = results["nobody-here@example.com"]
    assert unknown.kind == "permanent", (unknown, log)
    assert unknown.dsn == "5.1.1"
    assert unknown.diagnostic.startswith("smtp; 550 5.1.1")
    assert "in reply to RCPT TO command" in unknown.text
    assert not (dovecot.mail / "example.com" / "nobody-here").exists()

    # what Dovecot wrote: LF line ends, its own Return-Path from MAIL FROM, the message intact
    expected_body = MESSAGE.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    for address in ("alice@example.com", "bob@example.com"):
        stored = read_delivered(dovecot, address)
        head, _, body = stored.partition(b"\n\n")
        assert body == expected_body                      # dots unstuffed, 8-bit intact, nothing lost
        parsed = email.message_from_bytes(stored, policy=email.policy.default)
        assert parsed["Return-Path"] == "<sender@example.org>"
        assert parsed["Subject"] == "lmtp test"
        assert parsed["Message-ID"] == "<lmtp-test-1@example.org>"
        assert b"by mx.test.example with ESMTP" in head   # our Received: kept
        # LmtpCourier adds no Delivered-To of its own (Dovecot may add one)
        assert head.count(b"Delivered-To:") <= 1


def test_unix_socket_and_null_sender(dovecot, message_path):
    courier = LmtpCourier(str(dovecot.lmtp_socket), HOSTNAME, timeout=30)
    results = courier.deliver(make_envelope(["alice@example.com"], sender=""), message_path, ["alice@example.com"])
    assert results["alice@example.com"].kind == "delivered", (results, dovecot.log_text())
    assert results["alice@example.com"].remote_mta == str(dovecot.lmtp_socket)
    stored = read_delivered(dovecot, "alice@example.com")
    assert stored.startswith(b"Return-Path: <>\n")


def test_only_unknown_recipients_sends_no_data(dovecot, message_path):
    courier = LmtpCourier(f"127.0.0.1:{dovecot.port}", HOSTNAME, timeout=30)
    addresses = ["x@example.com", "y@example.net"]
    results = courier.deliver(make_envelope(addresses), message_path, addresses)
    assert {r.kind for r in results.values()} == {"permanent"}, (results, dovecot.log_text())
    assert list(dovecot.mail.iterdir()) == []


def test_smtputf8_mail(dovecot, tmp_path):
    # Dovecot 2.3 does not advertise SMTPUTF8 (RFC 6531): ASCII addresses still
    # go through; a non-ASCII address cannot be expressed and bounces with 5.6.7
    path = tmp_path / "utf8.eml"
    path.write_bytes("From: Jörg <jörg@bücher.example>\r\nSubject: grüße\r\n\r\nHallo\r\n".encode())
    courier = LmtpCourier(f"127.0.0.1:{dovecot.port}", HOSTNAME, timeout=30)
    ascii_envelope = make_envelope(["bob@example.com"], sender="sender@example.org", smtputf8=True)
    results = courier.deliver(ascii_envelope, str(path), ["bob@example.com"])
    assert results["bob@example.com"].kind == "delivered", (results, dovecot.log_text())
    assert "grüße".encode() in read_delivered(dovecot, "bob@example.com")

    utf8_envelope = make_envelope(["bob@example.com"], sender="jörg@bücher.example", smtputf8=True)
    results = courier.deliver(utf8_envelope, str(path), ["bob@example.com"])
    assert results["bob@example.com"].kind == "permanent"
    assert results["bob@example.com"].dsn == "5.6.7"


def test_dovecot_going_away_is_temporary(dovecot, message_path):
    # stop the server: the next delivery is deferred (4.4.1), not bounced
    courier = LmtpCourier(f"127.0.0.1:{dovecot.port}", HOSTNAME, timeout=10)
    dovecot.stop()
    results = courier.deliver(make_envelope(["alice@example.com"]), message_path, ["alice@example.com"])
    assert results["alice@example.com"].kind == "temporary"
    assert results["alice@example.com"].dsn == "4.4.1"


def test_daemon_delivers_local_mail_over_lmtp(dovecot, mta_factory):
    """MTA_LMTP (RFC 2033): the running daemon hands local mail to Dovecot over
    LMTP instead of writing Maildirs itself; per-recipient replies are used."""
    mta = mta_factory({"delivery_workers": 1, "lmtp": f"127.0.0.1:{dovecot.port}", "delay_warning_time": 0},
                      users={"alice@example.com": "pw-alice-1", "carol@example.com": "pw-carol-1"})
    qid = mta.send("sender@example.org", ["alice@example.com", "carol@example.com"],
                   b"Subject: over lmtp\r\n\r\nhanded to dovecot\r\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not dovecot.maildir_files("alice@example.com"):
        time.sleep(0.1)
    files = dovecot.maildir_files("alice@example.com")
    assert files and b"handed to dovecot" in files[0].read_bytes()
    assert not (Path(mta.config["mailbox_dir"]) / "example.com").exists(), "no Maildir written by mta itself"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "status=bounced" not in mta.log_text():
        time.sleep(0.1)
    log = mta.log_text()
    assert f"{qid}: to=<alice@example.com>" in log and "status=sent" in log
    # carol is an mta user but unknown to Dovecot: its 5xx at RCPT bounces her copy only
    assert f"{qid}: to=<carol@example.com>" in log and "status=bounced" in log
