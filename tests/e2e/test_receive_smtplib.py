"""Receiving mail with real clients (smtplib, swaks, raw sockets) and checking
what lands in the queue through the CLI (`mta queue list --json`,
`mta queue show`) and the logs. Issue 2, "Receive mail".
"""

from __future__ import annotations

import datetime
import json
import re
import smtplib
import subprocess

import pytest

from conftest import (HOSTNAME, SMTPClosed, assert_reply, body_lines, make_message,
                      send_mail)


def smtp_client(server) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.org",
                          timeout=10)
    return client


def find(queue: list[dict], qid: str) -> dict:
    matches = [m for m in queue if m["id"] == qid]
    assert len(matches) == 1, f"{qid} appears {len(matches)} times in {queue}"
    return matches[0]


def parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------
# greeting and EHLO

def test_greeting_and_ehlo_keywords(shared_mta):
    """RFC 5321 4.1.1.1/4.3.1 greeting and EHLO; the extensions issue 2 asks for:
    SIZE n (RFC 1870) = max_message_size, 8BITMIME (RFC 6152), PIPELINING (RFC 2920),
    ENHANCEDSTATUSCODES (RFC 2034), SMTPUTF8 (RFC 6531), DSN (RFC 3461),
    CHUNKING (RFC 3030). EHLO lines carry no enhanced codes (RFC 2034 sec. 3)."""
    with shared_mta.connect() as c:
        banner = c.banner()
        assert banner.code == 220
        assert re.match(r"mx\.test\.example ESMTP", banner.lines[0]), str(banner)
        r = c.cmd("EHLO client.example.org")
        assert r.code == 250 and len(r.lines) >= 2, str(r)
        assert r.lines[0].split()[0] == HOSTNAME, str(r)
        keywords = {}
        for line in r.lines[1:]:
            assert not re.match(r"\d\.\d+\.\d+", line), f"enhanced code on EHLO line {line!r}"
            word, _, rest = line.partition(" ")
            keywords[word.upper()] = rest
        for kw in ("SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8",
                   "DSN", "CHUNKING"):
            assert kw in keywords, f"{kw} not advertised: {r}"
        assert keywords["SIZE"].strip() == str(35000000), str(r)
        # no AUTH on the relay port (INTERFACE "SMTP")
        assert "AUTH" not in keywords, str(r)
        helo = c.cmd("HELO client.example.org")
        assert helo.code == 250 and helo.lines[0].split()[0] == HOSTNAME, str(helo)


def test_size_keyword_follows_config(mta_factory):
    """RFC 1870 sec. 4: SIZE advertises the fixed maximum message size."""
    server = mta_factory({"max_message_size": 123456})
    with smtp_client(server) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "123456"


# --------------------------------------------------------------------------
# smtplib

def test_smtplib_message_is_queued(shared_mta):
    """RFC 5321 3.3 + 4.4: a transaction with smtplib; the message is on the queue
    with the right envelope, our Received: header names the queue id, and mta.log
    has the Postfix-like line (INTERFACE "Files on disk")."""
    mta = shared_mta
    msg = make_message("smtplib one", "Line one.\r\nLine two.\r\n")
    with smtp_client(mta) as client:
        client.ehlo()
        code, _ = client.mail("sender@example.org")
        assert code == 250
        assert client.rcpt("info@example.com")[0] == 250
        assert client.rcpt("bob@example.org")[0] == 250  # relay from mynetworks
        code, text = client.data(msg)
        assert code == 250, text
        m = re.match(rb"2\.0\.0 Ok: queued as (\S+)", text)
        assert m, text
        qid = m.group(1).decode()

    entry = find(mta.queue_list(), qid)
    assert entry["status"] == "active"
    assert entry["sender"] == "sender@example.org"
    assert sorted(r["address"] for r in entry["recipients"]) == [
        "bob@example.org", "info@example.com"]
    for rcpt in entry["recipients"]:
        assert set(rcpt) >= {"address", "status", "attempts", "last_error"}, rcpt
        assert rcpt["attempts"] == 0, rcpt
    assert len(msg) <= entry["size"] <= len(msg) + 4096, (entry["size"], len(msg))
    arrival = parse_iso(entry["arrival"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - arrival.astimezone(
        datetime.timezone.utc)).total_seconds()) < 120
    assert "next_attempt" in entry

    shown = mta.queue_show(qid)
    lines = body_lines(shown)
    assert "Subject: smtplib one" in lines
    assert "Line one." in lines and "Line two." in lines
    received = [l for l in lines if l.lower().startswith("received:")]
    assert received, shown
    header_block = shown.replace("\r\n", "\n").split("\n\n")[0]
    assert qid in header_block, f"queue id not in the Received header:\n{header_block}"
    assert HOSTNAME in header_block
    # our Received is the first header (RFC 5321 4.4: prepended)
    first = [l for l in lines if l.strip()][0]
    assert first.lower().startswith("received:"), shown[:300]

    log = mta.log_text("mta.log").splitlines()
    ours = [l for l in log if l.startswith(qid)]
    assert any("from=<sender@example.org>" in l and "size=" in l and "nrcpt=2" in l
               for l in ours), "\n".join(log)
    smtp_log = mta.log_text("smtp.log")
    assert "MAIL FROM:<sender@example.org>" in smtp_log or "sender@example.org" in smtp_log
    # the transcript records what the client sent (smtplib says "ehlo")
    assert "ehlo client.example.org" in smtp_log.lower()


def test_smtplib_sendmail_many_recipients_and_8bit(shared_mta):
    """RFC 6152 8BITMIME: an 8-bit body with BODY=8BITMIME is stored byte for byte."""
    mta = shared_mta
    before = set(mta.queue_ids())
    body = "Grüße aus Köln — ünïcödé\r\n"
    msg = make_message("eight bit", body, extra_headers=(
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"))
    with smtp_client(mta) as client:
        refused = client.sendmail("sender@example.org",
                                  ["info@example.com", "abuse@example.com",
                                   "postmaster@example.net"],
                                  msg, mail_options=["BODY=8BITMIME"])
        assert refused == {}
    queue = mta.queue_since(before)
    assert len(queue) == 1
    entry = queue[0]
    assert len(entry["recipients"]) == 3
    shown = mta.queue_show(entry["id"])
    assert "Grüße aus Köln — ünïcödé" in shown


def test_local_user_added_by_cli(mta_factory, tmp_path):
    """Local users = auth users plus aliases (issue 2): `mta user add` with the
    password on stdin creates one; RCPT to it is accepted, the password is not
    stored in clear (INTERFACE: users.json holds bcrypt hashes only)."""
    server = mta_factory({"mynetworks": "192.0.2.0/24"}, start=False)
    server.add_user("alice@example.com", "Tr0ub4dor&3-plain")
    server.start()
    with server.session() as c:
        assert_reply(c.cmd("MAIL FROM:<x@example.org>"), 250, "2.1.0")
        assert_reply(c.cmd("RCPT TO:<alice@example.com>"), 250, "2.1.5")
        # users receive only at their own domain (INTERFACE "Delivery")
        assert_reply(c.cmd("RCPT TO:<alice@example.net>"), 550, "5.1.1")
    data_dir = server.root / "data"
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert b"Tr0ub4dor&3-plain" not in path.read_bytes(), path


# --------------------------------------------------------------------------
# swaks

def run_swaks(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "swaks.example.org",
         "--timeout", "10", *args],
        capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipeline"])
def test_swaks_message_is_queued(shared_mta, pipeline):
    """A real third-party client (swaks), plain and with RFC 2920 pipelining."""
    mta = shared_mta
    token = f"swaks-token-{'p' if pipeline else 'n'}"
    args = ["--to", "info@example.com", "--from", "swaks@example.org",
            "--header", f"Subject: {token}", "--body", f"swaks body {token}"]
    if pipeline:
        args.append("--pipeline")
    p = run_swaks(mta, *args)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"<-\s+250 2\.0\.0 Ok: queued as (\S+)", p.stdout)
    assert m, p.stdout
    qid = m.group(1)
    entry = find(mta.queue_list(), qid)
    assert entry["sender"] == "swaks@example.org"
    assert [r["address"] for r in entry["recipients"]] == ["info@example.com"]
    shown = mta.queue_show(qid)
    assert f"swaks body {token}" in shown
    assert f"Subject: {token}" in shown


def test_swaks_relay_denied_for_outsider(shared_outsider_mta, queue_unchanged):
    """554 5.7.1 relay refusal as a real client sees it."""
    with queue_unchanged(shared_outsider_mta):
        p = run_swaks(shared_outsider_mta, "--to", "bob@example.org",
                      "--from", "swaks@example.org")
    assert p.returncode != 0
    assert re.search(r"<\*\*\s+554 5\.7\.1", p.stdout), p.stdout


# --------------------------------------------------------------------------
# DSN (RFC 3461), BODY, SIZE, SMTPUTF8 parameters stored on the envelope

def test_dsn_parameters_are_stored(shared_mta):
    """RFC 3461 sec. 4: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT, plus BODY
    (RFC 6152) and SIZE (RFC 1870), are accepted and kept on the envelope
    (`mta queue show --json`)."""
    mta = shared_mta
    msg = make_message("dsn params", "dsn\r\n")
    with smtp_client(mta) as client:
        client.ehlo()
        assert "dsn" in client.esmtp_features
        code, text = client.mail("sender@example.org",
                                 ["RET=HDRS", "ENVID=QQ314159", "BODY=8BITMIME",
                                  f"SIZE={len(msg)}"])
        assert code == 250, text
        code, text = client.rcpt("info@example.com",
                                 ["NOTIFY=SUCCESS,DELAY",
                                  "ORCPT=rfc822;orig-alias@example.org"])
        assert code == 250, text
        code, text = client.rcpt("bob@example.org", ["NOTIFY=NEVER"])
        assert code == 250, text
        code, text = client.data(msg)
        assert code == 250, text
        qid = re.search(rb"queued as (\S+)", text).group(1).decode()

    envelope_text = mta.queue_show(qid, "--json")
    envelope = json.loads(envelope_text)
    flat = json.dumps(envelope).lower()
    for value in ("hdrs", "qq314159", "success", "delay", "never", "8bitmime",
                  "orig-alias@example.org", str(len(msg))):
        assert value in flat, f"{value!r} not stored in the envelope: {envelope_text}"
    assert "QQ314159" in json.dumps(envelope), "ENVID must keep its case"


@pytest.mark.parametrize("command,enhanced", [
    ("MAIL FROM:<a@example.org> RET=SOMETIMES", "5.5"),
    ("MAIL FROM:<a@example.org> RET=FULL RET=HDRS", "5.5"),
    ("MAIL FROM:<a@example.org> BODY=7BITS", "5.5"),
    ("MAIL FROM:<a@example.org> SIZE=abc", "5.5"),
    ("MAIL FROM:<a@example.org> ENVID=bad+zzxtext", "5.5"),
])
def test_bad_mail_parameters_are_501(shared_mta, command, enhanced):
    """RFC 3461 sec. 4.3/4.4 and RFC 5321 4.1.1.11: a known parameter with a bad
    value (or repeated) is a syntax error, 501 5.5.4; the session goes on."""
    with shared_mta.session() as c:
        assert_reply(c.cmd(command), 501, enhanced)
        assert_reply(c.cmd("MAIL FROM:<a@example.org>"), 250, "2.1.0")


@pytest.mark.parametrize("params", [
    "NOTIFY=NEVER,SUCCESS",
    "NOTIFY=SOMETIMES",
    "ORCPT=rfc822",
    "ORCPT=rfc822;bad+zzaddress",
])
def test_bad_rcpt_parameters_are_501(shared_mta, params):
    """RFC 3461 sec. 4.1 (NOTIFY=NEVER excludes the others) and 4.2 (ORCPT is
    addr-type;xtext): bad values are 501 5.5.4; a good RCPT still works after."""
    with shared_mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<a@example.org>"), 250, "2.1.0")
        assert_reply(c.cmd(f"RCPT TO:<info@example.com> {params}"), 501, "5.5")
        assert_reply(c.cmd("RCPT TO:<info@example.com>"), 250, "2.1.5")


def test_smtputf8_addresses_accepted_with_parameter(shared_mta):
    """RFC 6531 sec. 3.4: with the SMTPUTF8 MAIL parameter, UTF-8 local parts and
    domains in MAIL and RCPT are accepted and stored as sent."""
    mta = shared_mta
    before = set(mta.queue_ids())
    sender = "jösé@example.org"
    rcpt = "bjørn@exämple.org"
    rcpt_a_label = "bjørn@xn--exmple-cua.org"
    msg = ("From: <jösé@example.org>\r\nTo: <bjørn@exämple.org>\r\n"
           "Subject: ütf8\r\n\r\nHej då\r\n").encode("utf-8")
    with smtp_client(mta) as client:
        client.ehlo()
        assert "smtputf8" in client.esmtp_features
        refused = client.sendmail(sender, [rcpt], msg,
                                  mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    queue = mta.queue_since(before)
    assert len(queue) == 1, queue
    entry = queue[0]
    assert entry["sender"] == sender
    assert [r["address"] for r in entry["recipients"]] in ([rcpt], [rcpt_a_label])
    envelope = json.dumps(json.loads(mta.queue_show(entry["id"], "--json"))).lower()
    assert "smtputf8" in envelope, envelope
    assert "Hej då" in mta.queue_show(entry["id"])


def test_non_ascii_address_without_smtputf8_is_553(shared_mta):
    """RFC 6531 sec. 3.4 / RFC 6530: a non-ASCII address without the SMTPUTF8
    parameter is refused with 553 5.6.7."""
    with shared_mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<jösé@example.org>"), 553, "5.6.7")
        assert_reply(c.cmd("MAIL FROM:<jose@example.org>"), 250, "2.1.0")
        assert_reply(c.cmd("RCPT TO:<bjørn@example.org>"), 553, "5.6.7")
        assert_reply(c.cmd("RCPT TO:<bob@example.org>"), 250, "2.1.5")


# --------------------------------------------------------------------------
# BDAT / CHUNKING (RFC 3030)

def test_bdat_several_chunks_then_last_zero(shared_mta):
    """RFC 3030 sec. 2/4.2: chunks of exact byte counts, then `BDAT 0 LAST`; no dot
    processing inside chunks (a line `..x` stays `..x`); one 250 per chunk."""
    mta = shared_mta
    chunks = [b"From: <s@example.org>\r\nSubject: bdat chunks\r\n",
              b"\r\nfirst line\r\n..not unstuffed\r\n",
              b"second line\r\n" * 50,
              b"last line\r\n"]
    with mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250, "2.1.0")
        assert_reply(c.cmd("RCPT TO:<info@example.com>"), 250, "2.1.5")
        for chunk in chunks:
            c.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
            r = c.reply()
            assert_reply(r, 250, "2.0.0")
        r = c.cmd("BDAT 0 LAST")
        assert_reply(r, 250, "2.0.0")
        qid = r.queue_id
        assert qid, str(r)
        assert_reply(c.cmd("QUIT"), 221, "2.0.0")
    entry = find(mta.queue_list(), qid)
    total = sum(len(ch) for ch in chunks)
    assert total <= entry["size"] <= total + 4096
    lines = body_lines(mta.queue_show(qid))
    assert "..not unstuffed" in lines
    assert lines.count("second line") == 50
    assert "last line" in lines


def test_bdat_single_last_chunk_pipelined(shared_mta):
    """RFC 3030 sec. 4.2 + RFC 2920: MAIL, RCPT and `BDAT n LAST` with its data in
    one write."""
    mta = shared_mta
    chunk = b"Subject: one chunk\r\n\r\nonly chunk\r\n"
    with mta.session() as c:
        c.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<info@example.com>\r\n"
               + f"BDAT {len(chunk)} LAST\r\n".encode() + chunk + b"NOOP\r\n")
        assert_reply(c.reply(), 250, "2.1.0")
        assert_reply(c.reply(), 250, "2.1.5")
        r = c.reply()
        assert_reply(r, 250, "2.0.0")
        assert r.queue_id
        assert_reply(c.reply(), 250, "2.0.0")  # the NOOP after the chunk
    assert "only chunk" in body_lines(mta.queue_show(r.queue_id))


def test_bdat_bad_sequence_consumes_chunk(shared_mta, queue_unchanged):
    """RFC 3030 sec. 3 (and 4.2): a BDAT refused for bad sequence (503 5.5.1, no
    MAIL or no RCPT) still consumes its chunk bytes, so commands hidden in the
    chunk are never executed and the session stays in sync."""
    hidden = b"NOOP\r\nNOOP\r\n"
    with queue_unchanged(shared_mta), shared_mta.session() as c:
        c.send(f"BDAT {len(hidden)}\r\n".encode() + hidden)
        assert_reply(c.reply(), 503, "5.5.1")
        assert_reply(c.cmd("RSET"), 250, "2.0.0")  # not a reply to a hidden NOOP
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250, "2.1.0")
        c.send(f"BDAT {len(hidden)} LAST\r\n".encode() + hidden)
        assert_reply(c.reply(), 503, "5.5.1")  # no RCPT yet
        r = c.cmd("HELP")
        assert r.code == 214, f"session out of sync: {r}"
        assert_reply(c.cmd("QUIT"), 221, "2.0.0")


def test_bdat_then_data_is_refused(shared_mta):
    """RFC 3030 sec. 3: DATA after BDAT in the same transaction is 503 5.5.1;
    the transaction can still be finished with BDAT LAST."""
    mta = shared_mta
    with mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250)
        assert_reply(c.cmd("RCPT TO:<info@example.com>"), 250)
        part = b"Subject: mix\r\n\r\n"
        c.send(f"BDAT {len(part)}\r\n".encode() + part)
        assert_reply(c.reply(), 250)
        assert_reply(c.cmd("DATA"), 503, "5.5.1")
        tail = b"tail\r\n"
        c.send(f"BDAT {len(tail)} LAST\r\n".encode() + tail)
        r = c.reply()
        assert_reply(r, 250, "2.0.0")
    assert "tail" in body_lines(mta.queue_show(r.queue_id))


@pytest.mark.parametrize("command", ["BDAT abc", "BDAT", "BDAT 5 LASTX", "BDAT -1"])
def test_bdat_bad_argument_is_501(shared_mta, command):
    """RFC 3030 sec. 2: BDAT needs a decimal chunk size (and at most LAST): 501
    5.5.4 otherwise. Since the chunk length is then unknown, the server may hang
    up after the reply (the next command cannot be found); if it does not, the
    session must still be in sync."""
    with shared_mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<s@example.org>"), 250)
        assert_reply(c.cmd("RCPT TO:<info@example.com>"), 250)
        assert_reply(c.cmd(command), 501, "5.5.4")
        try:
            r = c.cmd("NOOP")
        except SMTPClosed:
            return
        assert_reply(r, 250, "2.0.0")


def test_bare_postmaster_goes_to_primary_domain(shared_outsider_mta):
    """RFC 5321 4.5.1 + INTERFACE "SMTP": RCPT TO:<Postmaster> (no domain, any case)
    is accepted from anyone and goes to postmaster@MTA_DOMAIN."""
    server = shared_outsider_mta
    with server.session() as c:
        r = send_mail(c, "someone@example.org", ["Postmaster"],
                      make_message("to bare postmaster", "hi\r\n"))
        assert_reply(r, 250, "2.0.0")
    entry = find(server.queue_list(), r.queue_id)
    assert [x["address"].lower() for x in entry["recipients"]] == ["postmaster@example.com"]
