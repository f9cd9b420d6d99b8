"""Limits (RFC 5321 4.5.3), hostile input and known attacks against the SMTP
server: SMTP smuggling, relay tricks, over-long lines, NUL and bare CR/LF,
idle clients, connection floods, error floods, HTTP on the SMTP port and
clients vanishing mid-transaction. Issue 2, "Limits" and "End of data".
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from conftest import SMTPClosed, SMTPConn, assert_reply, body_lines


def start_data(c: SMTPConn, rcpt: str = "info@example.com",
               sender: str = "sender@example.org") -> None:
    assert_reply(c.cmd(f"MAIL FROM:<{sender}>"), 250, "2.1.0")
    assert_reply(c.cmd(f"RCPT TO:<{rcpt}>"), 250, "2.1.5")
    assert_reply(c.cmd("DATA"), 354)


def assert_still_usable(c: SMTPConn) -> None:
    """The session is in sync after an error: NOOP gets exactly its own reply."""
    assert_reply(c.cmd("NOOP"), 250, "2.0.0")


# --------------------------------------------------------------------------
# recipients and size

def test_max_recipients_452(mta_factory):
    """RFC 5321 4.5.3.1.8 / 4.5.3.1.10: more than max_recipients RCPTs get
    452 4.5.3; the ones accepted before still make a message."""
    server = mta_factory({"max_recipients": 3})
    with server.session() as c:
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250)
        for i in range(3):
            assert_reply(c.cmd(f"RCPT TO:<user{i}@example.org>"), 250, "2.1.5")
        assert_reply(c.cmd("RCPT TO:<user3@example.org>"), 452, "4.5.3")
        assert_reply(c.cmd("RCPT TO:<user4@example.org>"), 452, "4.5.3")
        assert_reply(c.cmd("DATA"), 354)
        c.send(b"Subject: three\r\n\r\nx\r\n.\r\n")
        r = c.reply()
        assert_reply(r, 250, "2.0.0")
    entry = server.queue_list()[0]
    assert sorted(x["address"] for x in entry["recipients"]) == [
        "user0@example.org", "user1@example.org", "user2@example.org"]


def test_declared_size_too_big_552(mta_factory):
    """RFC 1870 sec. 6.1: MAIL with SIZE above the maximum gets 552 5.3.4 at once."""
    server = mta_factory({"max_message_size": 10000})
    with server.session() as c:
        assert_reply(c.cmd("MAIL FROM:<s@example.org> SIZE=10001"), 552, "5.3.4")
        assert_reply(c.cmd("MAIL FROM:<s@example.org> SIZE=99999999999999999999"), 552, "5.3.4")
        assert_reply(c.cmd("MAIL FROM:<s@example.org> SIZE=9000"), 250, "2.1.0")


def test_actual_size_too_big_552_after_data(mta_factory):
    """RFC 1870 sec. 6.3 / RFC 5321 4.5.3.1.10: a message over the maximum (whatever
    SIZE said) gets 552 5.3.4 after the end of data, nothing is queued, and the
    session continues in sync; a message under the limit is fine."""
    server = mta_factory({"max_message_size": 10000})
    with server.session() as c:
        start_data(c)
        c.send(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 300 + b".\r\n")
        assert_reply(c.reply(), 552, "5.3.4")
        assert_still_usable(c)
        # BDAT too (RFC 3030): over the limit, refused at the LAST chunk at the latest
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250)
        assert_reply(c.cmd("RCPT TO:<info@example.com>"), 250)
        chunk = (b"z" * 70 + b"\r\n") * 200
        c.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
        assert_reply(c.reply(), 552, "5.3.4")
        assert_still_usable(c)
        start_data(c)
        c.send(b"Subject: small\r\n\r\n" + (b"y" * 70 + b"\r\n") * 100 + b".\r\n")
        assert_reply(c.reply(), 250, "2.0.0")
    queue = server.queue_list()
    assert len(queue) == 1, queue


# --------------------------------------------------------------------------
# line and address lengths

def test_command_line_too_long_500(shared_mta):
    """RFC 5321 4.5.3.1.4: a command line is at most 512 octets; longer ones get
    500 5.5.2 and the rest of the line is discarded (session stays in sync)."""
    with shared_mta.session() as c:
        assert_reply(c.cmd("NOOP " + "x" * 600), 500, "5.5.2")
        assert_still_usable(c)
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250)
        # MAIL/RCPT may be longer because of DSN parameters, but not unbounded
        assert_reply(c.cmd("RCPT TO:<info@example.com> ORCPT=rfc822;" + "a" * 2000),
                     500, "5.5.2")
        assert_still_usable(c)


def test_huge_line_without_newline_is_bounded(shared_mta):
    """RFC 5321 4.5.3.1.4 + resource exhaustion: 1 MB without a line end must not
    be buffered for ever: the server answers 500 5.5.2 (or 421 and closes), and
    stays alive for others."""
    with shared_mta.session() as c:
        try:
            c.send(b"A" * 1_000_000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = c.reply(timeout=15)
        assert r.code in (500, 421), str(r)
        assert r.enhanced and r.enhanced[0] == str(r.code)[0], str(r)
    shared_mta.send()  # the daemon still works


def test_dsn_sized_mail_line_allowed(shared_mta):
    """RFC 3461 sec. 5 / RFC 5321 4.5.3.1.4: MAIL and RCPT lines may exceed 512
    octets by the DSN parameters (ENVID up to 100, ORCPT up to 500 octets)."""
    envid = "E" * 100
    sender = "s" * 64 + "@" + ".".join(["d" * 60] * 3) + ".org"
    orcpt = "rfc822;" + "+2B" * 64 + "@" + ".".join(["d" * 62] * 4)
    with shared_mta.session() as c:
        assert_reply(c.cmd(f"MAIL FROM:<{sender}> RET=HDRS ENVID={envid} "
                           f"SIZE=1000 BODY=8BITMIME"), 250, "2.1.0")
        line = f"RCPT TO:<info@example.com> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}"
        assert len(line) > 512
        assert_reply(c.cmd(line), 250, "2.1.5")


@pytest.mark.parametrize("address", [
    "l" * 65 + "@example.org",                              # local part > 64
    "u@" + ".".join(["d" * 63] * 4) + ".org",               # domain > 255
    "l" * 64 + "@" + ".".join(["d" * 63] * 3) + ".org",     # path > 256
])
def test_address_limits(shared_mta, address):
    """RFC 5321 4.5.3.1.1-4.5.3.1.3: local part 64, domain 255, path 256 octets:
    longer addresses are refused with a 5xx 5.1.x."""
    with shared_mta.session() as c:
        r = c.cmd(f"MAIL FROM:<{address}>")
        assert r.code in (501, 553) and r.enhanced and r.enhanced.startswith("5.1."), str(r)
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250)
        r = c.cmd(f"RCPT TO:<{address}>")
        assert r.code in (501, 553) and r.enhanced and r.enhanced.startswith("5.1."), str(r)


def test_text_line_too_long_rejected(shared_mta, queue_unchanged):
    """RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with CRLF; a longer
    one makes the message fail with a 5xx after the end of data; nothing queued."""
    with queue_unchanged(shared_mta), shared_mta.session() as c:
        start_data(c)
        c.send(b"Subject: long line\r\n\r\n" + b"x" * 1200 + b"\r\nend\r\n.\r\n")
        r = c.reply()
        assert 500 <= r.code < 600 and r.enhanced and r.enhanced.startswith("5."), str(r)
        assert_still_usable(c)


# --------------------------------------------------------------------------
# content checks

@pytest.mark.parametrize("content", [
    b"line one\nline two\r\n",
    b"line one\rline two\r\n",
    b"trailing bare LF\n\r\n",
    b"trailing bare CR\r\r\n",
    b"\n\r\n",
], ids=["LF-inside", "CR-inside", "LF-before-CRLF", "CR-before-CRLF", "lone-LF-line"])
def test_bare_newlines_rejected(shared_mta, queue_unchanged, content):
    """SMTP smuggling defence (SEC Consult 2023, CVE-2023-51764), RFC 5321 2.3.8
    and 4.1.1.4: bare CR or LF in DATA is refused with 550 5.5.2 (like Postfix's
    smtpd_forbid_bare_newline); nothing is queued; the session stays usable."""
    with queue_unchanged(shared_mta), shared_mta.session() as c:
        start_data(c)
        c.send(b"Subject: bare\r\n\r\n" + content + b".\r\n")
        assert_reply(c.reply(), 550, "5.5.2")
        assert_still_usable(c)


def test_nul_rejected(shared_mta, queue_unchanged):
    """RFC 5321 4.1.1.4 / 2.4 (no NUL in text): 550 5.6.0, nothing queued."""
    with queue_unchanged(shared_mta), shared_mta.session() as c:
        start_data(c)
        c.send(b"Subject: nul\r\n\r\nbefore\x00after\r\n.\r\n")
        assert_reply(c.reply(), 550, "5.6.0")
        assert_still_usable(c)


def test_mail_loop_too_many_received_554(shared_mta):
    """RFC 5321 6.3: more than 100 Received: headers is a loop: 554 5.4.6 at the
    end of data, nothing queued; a few Received: headers are fine."""
    mta = shared_mta
    before = set(mta.queue_ids())
    loop = "".join(f"Received: from hop{i}.example.org by hop{i + 1}.example.org; "
                   f"Mon, 1 Jan 2024 00:00:00 +0000\r\n" for i in range(101))
    with mta.session() as c:
        start_data(c)
        c.send(loop.encode() + b"Subject: loop\r\n\r\nloop\r\n.\r\n")
        assert_reply(c.reply(), 554, "5.4.6")
        start_data(c)
        few = "".join(loop.splitlines(keepends=True)[:5])
        c.send(few.encode() + b"Subject: fine\r\n\r\nfine\r\n.\r\n")
        assert_reply(c.reply(), 250, "2.0.0")
    assert len(mta.queue_since(before)) == 1


def test_dot_unstuffing(shared_mta):
    """RFC 5321 4.5.2: a leading dot is removed from every line that starts with
    one; `..x` is stored as `.x`, `..` as `.`, `...` as `..`."""
    mta = shared_mta
    with mta.session() as c:
        start_data(c)
        c.send(b"Subject: dots\r\n\r\n..x\r\n..\r\n...\r\nmiddle . dot\r\n.y\r\nend\r\n.\r\n")
        r = c.reply()
        assert_reply(r, 250, "2.0.0")
    lines = body_lines(mta.queue_show(r.queue_id))
    body = lines[lines.index("Subject: dots") + 2:]
    assert body[:6] == [".x", ".", "..", "middle . dot", "y", "end"], body


# --------------------------------------------------------------------------
# SMTP smuggling

SMUGGLED = (b"MAIL FROM:<smuggled@example.org>\r\n"
            b"RCPT TO:<info@example.com>\r\n"
            b"DATA\r\n"
            b"From: <smuggled@example.org>\r\nSubject: SMUGGLED\r\n\r\nevil\r\n"
            b".\r\n")


@pytest.mark.parametrize("fake_end", [
    b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r", b"\r.\r", b"\r\n.\r",
    b"\r\n\x00.\r\n",
], ids=["LF.CRLF", "CR.CRLF", "LF.LF", "CRLF.LF", "LF.CR", "CR.CR", "CRLF.CR", "CRLF-NUL.CRLF"])
def test_smtp_smuggling(shared_mta, fake_end):
    """SMTP smuggling (SEC Consult, Dec 2023; CVE-2023-51764 for Postfix): only
    CRLF.CRLF ends DATA (RFC 5321 4.1.1.4). A fake end followed by MAIL/RCPT/DATA
    must not end the message: the smuggled commands get no replies of their own and
    no smuggled message is queued (here the whole message is refused, since it has
    bare CR/LF)."""
    mta = shared_mta
    before = set(mta.queue_ids())
    with mta.session() as c:
        start_data(c)
        c.send(b"From: <sender@example.org>\r\nSubject: carrier\r\n\r\nhello\r\n"
               + fake_end + SMUGGLED)
        first = c.reply(timeout=10)
        c.send(b"QUIT\r\n")
        replies = [first]
        try:
            while replies[-1].code != 221:
                replies.append(c.reply(timeout=5))
        except (SMTPClosed, socket.timeout):
            pass
        rest = c.read_until_closed(10)
    time.sleep(0.2)
    new = [m for m in mta.queue_list() if m["id"] not in before]
    smuggled = [m for m in new if m["sender"] == "smuggled@example.org"]
    codes = [r.code for r in replies]
    assert not smuggled, f"smuggled message queued: {smuggled}; replies {codes}"
    assert first.code >= 500, f"message with a fake end accepted: {first}"
    assert codes == [first.code, 221] and rest == b"", (
        f"smuggled commands got replies: {[str(r) for r in replies]} {rest!r}")
    assert new == [], new


def test_pipelined_commands_after_real_end_are_not_smuggling(shared_mta):
    """RFC 2920: commands after a real CRLF.CRLF in the same write are legitimate
    pipelining and each gets its reply; the messages are separate."""
    mta = shared_mta
    before = set(mta.queue_ids())
    with mta.session() as c:
        start_data(c)
        c.send(b"Subject: first\r\n\r\nfirst\r\n.\r\n" + SMUGGLED.replace(b"smuggled", b"second"))
        r1 = c.reply()
        assert_reply(r1, 250, "2.0.0")
        assert_reply(c.reply(), 250, "2.1.0")
        assert_reply(c.reply(), 250, "2.1.5")
        assert_reply(c.reply(), 354)
        r2 = c.reply()
        assert_reply(r2, 250, "2.0.0")
        assert r1.queue_id != r2.queue_id
    senders = sorted(m["sender"] for m in mta.queue_since(before))
    assert senders == ["second@example.org", "sender@example.org"]


# --------------------------------------------------------------------------
# relay tricks (outsider)

@pytest.mark.parametrize("address", [
    "bob@other.org",
    "user%other.org@example.com",
    '"user@other.org"@example.com',
    "@example.com:user@other.org",
    "@example.com,@example.net:user@other.org",
    "other.org!user@example.com",
    "user@other.org@example.com",
    "user@[192.0.2.1]",
    "user@mx.test.example",
    "user@example.com@other.org",
    "user%example.com@other.org",
])
def test_relay_tricks_refused_for_outsider(shared_outsider_mta, queue_unchanged, address):
    """Open-relay tricks (RFC 5321 3.6.1/3.6.2, RFC 2505 sec. 2.x, RFC 5321 C
    source routes, %-hack, bang paths, quoted @) are never accepted from a client
    outside mynetworks: any 5xx."""
    server = shared_outsider_mta
    with queue_unchanged(server), server.session() as c:
        assert_reply(c.cmd("MAIL FROM:<someone@example.org>"), 250)
        r = c.cmd(f"RCPT TO:<{address}>")
        assert 500 <= r.code < 600, f"RCPT TO:<{address}> got {r}"
        assert_reply(c.cmd("RCPT TO:<info@example.com>"), 250)


def test_source_route_stripped_relay_denied(shared_outsider_mta):
    """RFC 5321 4.1.1.3 / Appendix C: a source route is stripped, leaving the
    non-local user@other.org: 554 5.7.1 from an outsider."""
    with shared_outsider_mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<someone@example.org>"), 250)
        assert_reply(c.cmd("RCPT TO:<@example.com:user@other.org>"), 554, "5.7.1")


# --------------------------------------------------------------------------
# timeouts, caps, error budget

def test_idle_timeout_421(mta_factory):
    """RFC 5321 4.5.3.2 (timeouts) and 3.8: an idle client gets 421 4.4.2 and is
    disconnected, both at the command prompt and in the middle of DATA, where
    nothing is queued."""
    server = mta_factory({"smtp_timeout": 2})
    idle = server.connect(timeout=15)
    assert idle.banner().code == 220
    mid = server.session(timeout=15)
    start_data(mid)
    mid.send(b"Subject: half\r\n\r\nhalf a message\r\n")
    started = time.monotonic()
    for conn in (idle, mid):
        r = conn.reply(timeout=12)
        assert_reply(r, 421, "4.4.2")
        assert conn.is_closed(5)
    assert time.monotonic() - started < 12
    # a client that keeps talking is not cut
    with server.session(timeout=10) as c:
        for _ in range(3):
            time.sleep(1)
            assert_still_usable(c)
    assert server.queue_list() == []


def test_connection_cap_per_ip_421(mta_factory):
    """Connection caps (issue 2, RFC 5321 3.8/4.3.2 421 service not available):
    max_connections_per_ip=2: a third session from the same address gets 421 4.7.0
    and is closed; another address is still served; after one closes, a new one
    works. max_connections=3 caps the total."""
    server = mta_factory({"max_connections_per_ip": 2, "max_connections": 3})
    a = server.connect()
    b = server.connect()
    try:
        assert a.banner().code == 220 and b.banner().code == 220
        with server.connect() as third:
            r = third.reply()
            assert_reply(r, 421, "4.7.0")
            assert third.is_closed(5)
        other = server.connect(source="127.0.0.2")
        assert other.banner().code == 220
        with server.connect(source="127.0.0.3") as over_total:
            assert_reply(over_total.reply(), 421, "4.7.0")
            assert over_total.is_closed(5)
        other.cmd("QUIT")
        other.close()
        a.cmd("QUIT")
        a.close()
        deadline = time.monotonic() + 5
        while True:
            with server.connect() as again:
                r = again.reply()
                if r.code == 220 or time.monotonic() > deadline:
                    break
            time.sleep(0.1)
        assert r.code == 220, f"slot not freed after QUIT: {r}"
    finally:
        a.close()
        b.close()


def test_error_budget_421(shared_mta):
    """Error budget (RFC 5321 4.3.2 / chasquid): after about ten errors in one
    session the server answers 421 and closes; the first few are plain 500s."""
    with shared_mta.session() as c:
        codes = []
        for _ in range(40):
            try:
                r = c.cmd("XBOGUS")
            except SMTPClosed:
                break
            codes.append(r.code)
            if r.code == 421:
                assert r.enhanced and r.enhanced.startswith("4."), str(r)
                break
        assert codes[:3] == [500, 500, 500], codes
        assert codes[-1] == 421, f"no 421 after {len(codes)} errors: {codes}"
        assert 5 <= len(codes) <= 30, codes
        assert c.is_closed(5)


@pytest.mark.parametrize("request_line", [
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT smtp.example.org:25 HTTP/1.1\r\n\r\n",
])
def test_http_verbs_close_connection(shared_mta, request_line):
    """Cross-protocol attacks (HTTP to SMTP, e.g. via browsers/proxies, ALPACA-style):
    an HTTP request line on the SMTP port closes the connection, after at most
    one reply line."""
    with shared_mta.connect() as c:
        assert c.banner().code == 220
        c.send(request_line)
        rest = c.read_until_closed(10)
        assert rest.count(b"\n") <= 1, rest
    shared_mta.send()


# --------------------------------------------------------------------------
# clients that vanish

def test_disconnect_mid_data_leaves_nothing(shared_mta):
    """A client that disconnects mid-DATA (or mid-command, mid-BDAT, right after
    connecting) leaves nothing queued, costs at most a log line, never a
    traceback (checked at teardown), and the daemon keeps serving."""
    mta = shared_mta
    before = set(mta.queue_ids())
    log_before = mta.log_text("mta.log").splitlines()
    c = mta.session()
    start_data(c)
    c.send(b"Subject: cut\r\n\r\n" + b"partial line\r\n" * 100 + b"no end")
    time.sleep(0.2)
    c.close()
    time.sleep(0.5)
    assert mta.queue_since(before) == []
    new_lines = mta.log_text("mta.log").splitlines()[len(log_before):]
    # connect/disconnect bookkeeping is allowed; nothing about a message
    assert not [l for l in new_lines if "from=<" in l or "status=" in l], new_lines
    assert len(new_lines) <= 3, new_lines

    # other places to vanish
    c = mta.connect(); c.close()
    c = mta.connect(); c.banner(); c.send(b"EHLO half-a-comm"); c.close()
    c = mta.session(); c.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<info@example.com>\r\n"
                              b"BDAT 1000\r\nonly a bit"); time.sleep(0.2); c.close()
    c = mta.session(); start_data(c)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.send(b"Subject: rst\r\n\r\nabc\r\n"); c.close()  # RST instead of FIN
    time.sleep(0.5)
    assert mta.queue_since(before) == []
    mta.send()
    assert len(mta.queue_since(before)) == 1


def test_many_parallel_sessions(shared_mta):
    """Threaded server: 20 concurrent sessions each deliver a message."""
    mta = shared_mta
    before = set(mta.queue_ids())
    ids: list[str] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            ids.append(mta.send(subject=f"parallel {i}"))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(ids) == sorted(m["id"] for m in mta.queue_since(before))
    assert len(set(ids)) == 20


def test_low_disk_space_452(mta_factory):
    """Issue 2 "Spool": when free space is low, 452 4.3.1 (RFC 3463 X.3.1 mail
    system full; RFC 5321 4.5.3.1.10 / 1870 6.2) and nothing accepted is harmed:
    mail queued before stays. The threshold `queue_min_free` is set above the free
    space of any disk."""
    server = mta_factory()
    kept = server.send(subject="before the disk filled")
    server.config_path.write_text(server.config_path.read_text().replace(
        "delivery_workers = 0", "delivery_workers = 0\nqueue_min_free = 1000000000000000000"))
    server.restart()
    with server.session() as c:
        replies = [c.cmd("MAIL FROM:<s@example.org>")]
        if replies[-1].code == 250:
            replies.append(c.cmd("RCPT TO:<info@example.com>"))
        if replies[-1].code == 250:
            replies.append(c.cmd("DATA"))
        if replies[-1].code == 354:
            c.send(b"Subject: full\r\n\r\nfull\r\n.\r\n")
            replies.append(c.reply())
        assert_reply(replies[-1], 452, "4.3.1")
        assert_still_usable(c)
    assert server.queue_ids() == [kept]
    assert "before the disk filled" in server.queue_show(kept)
