"""Unit tests for mta.delivery.local: Maildir delivery, loop detection, LMTP edges.

The LMTP conversation itself is tested against a real Dovecot in
tests/e2e/test_lmtp_dovecot.py; here only what needs no LMTP server:
connection failures, timeouts, and the DATA encoding.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import stat
import threading

import pytest

from mta.delivery import local
from mta.delivery.local import LmtpCourier, MaildirCourier
from mta.spool.envelope import Envelope, Recipient

MESSAGE = (
    b"Received: from client.example ([192.0.2.9])\r\n"
    b"\tby mx.test.example with ESMTP id 0005F0A1B2C3D4E5F60718\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a dot line\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
    b"last line\r\n"
)


def envelope(sender="alice@example.com", recipients=("bob@example.com",), **fields) -> Envelope:
    return Envelope(id="0005F0A1B2C3D4E5F60718", sender=sender,
                    recipients=[Recipient(r) for r in recipients], **fields)


@pytest.fixture
def spool_message(tmp_path):
    def write(data: bytes = MESSAGE) -> str:
        path = tmp_path / "spool" / "message.eml"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return str(path)
    return write


@pytest.fixture
def mailbox_dir(tmp_path):
    return tmp_path / "mail"


def delivered_files(mailbox_dir, address):
    local_part, domain = address.split("@")
    new = mailbox_dir / domain / local_part / "new"
    return sorted(new.iterdir())


# --------------------------------------------------------------------------
# Maildir: what is stored

def test_maildir_delivery_content(mailbox_dir, spool_message):
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), spool_message(), ["bob@example.com"])
    result = results["bob@example.com"]
    assert result.kind == "delivered"
    assert result.dsn == "2.0.0"
    assert result.remote_mta == "maildir"

    (stored,) = delivered_files(mailbox_dir, "bob@example.com")
    data = stored.read_bytes()
    assert b"\r" not in data                      # Maildir convention: LF line ends
    expected = (b"Return-Path: <alice@example.com>\n"    # RFC 5321 4.4
                b"Delivered-To: bob@example.com\n" + MESSAGE.replace(b"\r\n", b"\n"))
    assert data == expected
    # nothing left in tmp/
    assert list((mailbox_dir / "example.com" / "bob" / "tmp").iterdir()) == []


def test_maildir_null_sender_return_path(mailbox_dir, spool_message):
    MaildirCourier(str(mailbox_dir)).deliver(envelope(sender=""), spool_message(), ["bob@example.com"])
    (stored,) = delivered_files(mailbox_dir, "bob@example.com")
    assert stored.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: bob@example.com\n")


def test_maildir_layout_and_modes(mailbox_dir, spool_message):
    MaildirCourier(str(mailbox_dir)).deliver(envelope(), spool_message(), ["bob@example.com"])
    maildir = mailbox_dir / "example.com" / "bob"
    for directory in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        assert directory.is_dir()
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0, directory   # 0o700 (or stricter umask)
    (stored,) = delivered_files(mailbox_dir, "bob@example.com")
    assert stat.S_IMODE(stored.stat().st_mode) & 0o177 == 0      # 0o600
    # maildir(5) unique name: time.M<usec>P<pid>R<random>.<host>, no ':' or '/'
    name = stored.name
    assert name.split(".")[0].isdigit()
    assert f"P{os.getpid()}R" in name
    assert "/" not in name and ":" not in name


def test_maildir_several_recipients_get_their_own_copy(mailbox_dir, spool_message):
    addresses = ["bob@example.com", "carol@example.com", "dave@example.net"]
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), spool_message(), addresses)
    assert {a: r.kind for a, r in results.items()} == {a: "delivered" for a in addresses}
    for address in addresses:
        (stored,) = delivered_files(mailbox_dir, address)
        assert f"Delivered-To: {address}\n".encode() in stored.read_bytes()


def test_maildir_existing_mailbox_is_reused(mailbox_dir, spool_message):
    courier = MaildirCourier(str(mailbox_dir))
    courier.deliver(envelope(), spool_message(), ["bob@example.com"])
    courier.deliver(envelope(), spool_message(), ["bob@example.com"])
    assert len(delivered_files(mailbox_dir, "bob@example.com")) == 2


def test_maildir_streams_big_messages_with_crlf_across_chunks(mailbox_dir, spool_message):
    # a CRLF straddling the copy's read-chunk boundary must still become LF
    head = b"Subject: big\r\n\r\n"
    filler = b"y" * (local.READ_CHUNK - len(head) - 1)
    body = head + filler + b"\r\n" + (b"z" * 997 + b"\r\n") * 3000
    MaildirCourier(str(mailbox_dir)).deliver(envelope(), spool_message(body), ["bob@example.com"])
    (stored,) = delivered_files(mailbox_dir, "bob@example.com")
    data = stored.read_bytes()
    assert b"\r" not in data
    assert data.endswith(body.replace(b"\r\n", b"\n"))


def test_copy_keeps_a_lone_cr():
    out = io.BytesIO()
    local._copy_crlf_to_lf(io.BytesIO(b"a\rb\r\nc\r"), out)
    assert out.getvalue() == b"a\rb\nc\r"


# --------------------------------------------------------------------------
# Maildir: path traversal never escapes MAILBOX_DIR

@pytest.mark.parametrize("address", [
    "../../etc@example.com",
    "..@example.com",
    ".@example.com",
    ".hidden@example.com",
    "a/b@example.com",
    "a/../../b@example.com",
    "a\\b@example.com",
    "bob@../../etc",
    "bob@..",
    "bob@example.com/../..",
    "bob@.example.com",
    "bob@",
    "@example.com",
    "no-at-sign",
    "new\nline@example.com",
    "nul\0@example.com",
])
def test_maildir_refuses_paths_that_are_not_mailboxes(tmp_path, mailbox_dir, spool_message, address):
    message = spool_message()
    before = sorted(p for p in tmp_path.rglob("*"))
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), message, [address])
    result = results[address]
    assert result.kind == "permanent"
    assert result.dsn == "5.1.3"
    # nothing was created anywhere: not outside, not even inside MAILBOX_DIR
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_maildir_refusal_does_not_stop_the_others(mailbox_dir, spool_message):
    results = MaildirCourier(str(mailbox_dir)).deliver(
        envelope(), spool_message(), ["../../etc@example.com", "bob@example.com"])
    assert results["../../etc@example.com"].kind == "permanent"
    assert results["bob@example.com"].kind == "delivered"


def test_maildir_path_helper():
    assert local.maildir_path("/var/mail/vhosts", "bob@example.com") == "/var/mail/vhosts/example.com/bob"
    assert local.maildir_path("/var/mail/vhosts/", "b.o.b@example.com") == "/var/mail/vhosts/example.com/b.o.b"
    with pytest.raises(local.MailboxNameError):
        local.maildir_path("/var/mail/vhosts", "../x@example.com")


# --------------------------------------------------------------------------
# loops (RFC 5321 6.3)

def test_loop_on_delivered_to_same_address(mailbox_dir, spool_message):
    message = spool_message(b"Delivered-To: Bob@Example.com\r\n" + MESSAGE)
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), message, ["bob@example.com", "carol@example.com"])
    assert results["bob@example.com"].kind == "permanent"
    assert results["bob@example.com"].dsn == "5.4.6"
    assert "mail forwarding loop for bob@example.com" in results["bob@example.com"].text
    assert results["carol@example.com"].kind == "delivered"     # another address is not a loop
    assert not (mailbox_dir / "example.com" / "bob").exists()


def test_loop_on_folded_delivered_to(mailbox_dir, spool_message):
    message = spool_message(b"Delivered-To:\r\n <bob@example.com>\r\n" + MESSAGE)
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), message, ["bob@example.com"])
    assert results["bob@example.com"].dsn == "5.4.6"


def test_delivered_to_in_the_body_is_not_a_loop(mailbox_dir, spool_message):
    message = spool_message(MESSAGE + b"Delivered-To: bob@example.com\r\n")
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), message, ["bob@example.com"])
    assert results["bob@example.com"].kind == "delivered"


@pytest.mark.parametrize("hops, kind", [(100, "delivered"), (101, "permanent")])
def test_loop_on_too_many_received_headers(mailbox_dir, spool_message, hops, kind):
    received = b"".join(b"Received: from hop%d.example by hop%d.example; Fri, 1 Mar 2024 12:00:00 +0000\r\n"
                        % (i, i + 1) for i in range(hops))
    message = spool_message(received + b"Subject: x\r\n\r\nbody\r\n")
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), message, ["bob@example.com", "carol@example.com"])
    assert {r.kind for r in results.values()} == {kind}
    if kind == "permanent":
        assert {r.dsn for r in results.values()} == {"5.4.6"}


def test_scan_headers(spool_message):
    facts = local.scan_headers(spool_message(
        b"Received: a\r\nDelivered-To: X@Y.example\r\nreceived: b\r\n c\r\nSubject: s\r\n\r\nReceived: body\r\n"))
    assert facts.received == 2
    assert facts.delivered_to == frozenset({"x@y.example"})


# --------------------------------------------------------------------------
# disk errors are temporary

@pytest.mark.parametrize("code, dsn", [(errno.ENOSPC, "4.3.1"), (errno.EDQUOT, "4.2.2"), (errno.EIO, "4.3.0")])
def test_disk_errors_are_temporary_and_leave_nothing_behind(mailbox_dir, spool_message, monkeypatch, code, dsn):
    message = spool_message()
    real_fsync = os.fsync

    def failing_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(local.os, "fsync", failing_fsync)
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), message, ["bob@example.com"])
    monkeypatch.undo()
    result = results["bob@example.com"]
    assert result.kind == "temporary"
    assert result.dsn == dsn
    maildir = mailbox_dir / "example.com" / "bob"
    assert list((maildir / "tmp").iterdir()) == []      # the partial copy is removed
    assert list((maildir / "new").iterdir()) == []


def test_real_enospc_from_dev_full(tmp_path, spool_message, monkeypatch):
    # /dev/full fails every write with ENOSPC: point the temp file there
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    message = spool_message(MESSAGE * 2000)
    courier = MaildirCourier(str(tmp_path / "mail"))
    real_open = open

    def open_dev_full(path, mode="r", *args, **kwargs):
        if "x" in mode and "/tmp/" in str(path):
            kwargs.pop("opener", None)
            return real_open("/dev/full", "wb", *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_dev_full)
    results = courier.deliver(envelope(), message, ["bob@example.com"])
    monkeypatch.undo()
    assert results["bob@example.com"].kind == "temporary"
    assert results["bob@example.com"].dsn == "4.3.1"


def test_broken_maildir_is_temporary(mailbox_dir, spool_message):
    maildir = mailbox_dir / "example.com" / "bob"
    maildir.mkdir(parents=True)
    (maildir / "tmp").write_text("not a directory")
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), spool_message(), ["bob@example.com"])
    assert results["bob@example.com"].kind == "temporary"
    assert results["bob@example.com"].dsn == "4.3.0"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_mailbox_dir_is_temporary(mailbox_dir, spool_message):
    mailbox_dir.mkdir()
    mailbox_dir.chmod(0o500)
    try:
        results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), spool_message(), ["bob@example.com"])
    finally:
        mailbox_dir.chmod(0o700)
    assert results["bob@example.com"].kind == "temporary"
    assert results["bob@example.com"].dsn == "4.3.0"


def test_missing_spool_file_is_temporary(mailbox_dir, tmp_path):
    results = MaildirCourier(str(mailbox_dir)).deliver(envelope(), str(tmp_path / "gone.eml"), ["bob@example.com"])
    assert results["bob@example.com"].kind == "temporary"


# --------------------------------------------------------------------------
# LMTP: failures that need no server, and the DATA encoding

def test_lmtp_connection_refused_is_temporary_4_4_1(spool_message):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]      # closed again before use: nothing listens
    courier = LmtpCourier(f"127.0.0.1:{port}", "mx.test.example", timeout=5)
    results = courier.deliver(envelope(), spool_message(), ["bob@example.com", "carol@example.com"])
    assert {r.kind for r in results.values()} == {"temporary"}
    assert {r.dsn for r in results.values()} == {"4.4.1"}


def test_lmtp_missing_unix_socket_is_temporary_4_4_1(tmp_path, spool_message):
    courier = LmtpCourier(str(tmp_path / "no-such-socket"), "mx.test.example", timeout=5)
    results = courier.deliver(envelope(), spool_message(), ["bob@example.com"])
    assert results["bob@example.com"].kind == "temporary"
    assert results["bob@example.com"].dsn == "4.4.1"


def test_lmtp_silent_server_times_out_4_4_2(spool_message):
    # a socket that accepts and never says a word: the greeting times out
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        courier = LmtpCourier(f"127.0.0.1:{listener.getsockname()[1]}", "mx.test.example", timeout=0.5)
        results = courier.deliver(envelope(), spool_message(), ["bob@example.com"])
    finally:
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    assert results["bob@example.com"].kind == "temporary"
    assert results["bob@example.com"].dsn == "4.4.2"
    assert "timed out" in results["bob@example.com"].text


def test_lmtp_loop_is_refused_before_connecting(spool_message):
    message = spool_message(b"Delivered-To: bob@example.com\r\n" + MESSAGE)
    courier = LmtpCourier("127.0.0.1:1", "mx.test.example", timeout=1)
    results = courier.deliver(envelope(), message, ["bob@example.com"])
    assert results["bob@example.com"].kind == "permanent"
    assert results["bob@example.com"].dsn == "5.4.6"


def test_lmtp_refuses_command_injection(spool_message):
    courier = LmtpCourier("127.0.0.1:1", "mx.test.example", timeout=1)
    results = courier.deliver(envelope(), spool_message(), ["bob@example.com>\r\nRSET"])
    assert results["bob@example.com>\r\nRSET"].kind == "permanent"


def test_lmtp_rejects_bad_target():
    with pytest.raises(ValueError):
        LmtpCourier("host:notaport", "mx.test.example")


class _Sink:
    def __init__(self):
        self.data = bytearray()

    def send(self, data: bytes) -> None:
        self.data += data


@pytest.mark.parametrize("message, wire", [
    # RFC 5321 4.5.2: a leading dot is doubled, the end is CRLF.CRLF
    (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    # a final line without CRLF is completed before the terminator
    (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
    (b"", b".\r\n"),
    # bare LF becomes CRLF, so "\n.\n" can never end the data early (SMTP smuggling)
    (b"a\n.\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    # a dot in the middle of a line is left alone
    (b"a.b\r\n", b"a.b\r\n.\r\n"),
])
def test_lmtp_data_encoding(message, wire):
    sink = _Sink()
    local._send_dot_stuffed(sink, io.BytesIO(message))
    assert bytes(sink.data) == wire


def test_lmtp_data_encoding_of_long_lines():
    # a line longer than the read size: the dot rule applies only at real line starts
    long_line = b"x" * (local.READ_CHUNK + 10) + b".\r\n.y\r\n"
    sink = _Sink()
    local._send_dot_stuffed(sink, io.BytesIO(long_line))
    assert bytes(sink.data) == b"x" * (local.READ_CHUNK + 10) + b".\r\n..y\r\n.\r\n"


def test_reply_enhanced_code():
    assert local.Reply(250, ("2.1.5 OK",)).enhanced == "2.1.5"
    assert local.Reply(550, ("5.1.1 <x> User doesn't exist",)).enhanced == "5.1.1"
    assert local.Reply(550, ("2.1.5 wrong class",)).enhanced is None
    assert local.Reply(451, ("try later",)).enhanced is None
    assert str(local.Reply(250, ("first", "second"))) == "250 first second"
