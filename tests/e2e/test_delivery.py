"""Delivery end to end (issue 4): real DNS on loopback, Postfix's smtp-sink as MX.

Each test runs the daemon with delivery workers, a DNSServer answering MX/A
records on 127.0.0.1, and smtp-sink processes standing in for remote
servers (their options make them answer 4xx/5xx to chosen commands).
Local delivery goes to Maildirs under the test's mailbox_dir.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import time
from pathlib import Path

import pytest

from conftest import free_ports, make_message, wait_for
from support.fixtures import dns_server  # noqa: F401  (fixture)
from support.sink import Sink

pytestmark = pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="postfix's smtp-sink is not installed")


@pytest.fixture
def sinks():
    started: list[Sink] = []

    def make(port: int, *options: str) -> Sink:
        sink = Sink(port, *options)
        started.append(sink)
        return sink

    yield make
    for sink in started:
        sink.cleanup()


def maildir_messages(mta, address: str) -> list[bytes]:
    local, domain = address.split("@")
    new = Path(mta.config["mailbox_dir"]) / domain / local / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def zone(mx_records, a_records=None):
    records = {"remote.test.": {"MX": mx_records}}
    for name, ip in (a_records or {"mx1.remote.test.": "127.0.0.1"}).items():
        records.setdefault(name, {})["A"] = [ip]
    records["nullmx.test."] = {"MX": [(0, ".")]}
    return records


@pytest.fixture
def delivering(mta_factory, dns_server):
    """A daemon that delivers: MX lookups go to `dns_server`, SMTP to `smtp_port`."""

    def make(smtp_port: int, overrides: dict | None = None, **kw):
        config = {"delivery_workers": 2, "dns_nameservers": dns_server.address, "smtp_port": smtp_port,
                  "backoff_min": 1, "backoff_max": 2, "smtp_client_timeout": 10, "delay_warning_time": 0}
        config.update(overrides or {})
        return mta_factory(config, **kw)

    return make


def test_plain_delivery_by_mx_rfc5321_5_1(delivering, dns_server, sinks):
    """RFC 5321 5.1: MX lookup, connect, deliver; the queue empties; mta.log says status=sent."""
    port, = free_ports(1)
    sink = sinks(port)
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port)
    qid = mta.send("sender@example.org", ["bob@remote.test", "carol@remote.test"],
                   make_message("plain", "hello remote"))
    message = wait_for(sink.received(b"hello remote"), what="message at smtp-sink")
    assert qid.encode() in message, "our Received header travels with the message"
    wait_for(lambda: not mta.queue_list(), what="empty queue")
    log = mta.log_text()
    assert f"{qid}: to=<bob@remote.test>" in log and "status=sent" in log
    assert ("remote.test.", "MX") in dns_server.queries or ("remote.test", "MX") in dns_server.queries


def test_first_mx_down_next_mx_used_rfc5321_5_1(delivering, dns_server, sinks):
    """RFC 5321 5.1: when the preferred MX refuses connections the next one is tried."""
    port, = free_ports(1)
    sink = sinks(port)
    dns_server.set_zone(zone([(10, "mx1.remote.test."), (20, "mx2.remote.test.")],
                             {"mx1.remote.test.": "127.0.0.9", "mx2.remote.test.": "127.0.0.1"}))
    mta = delivering(port)
    mta.send("sender@example.org", ["bob@remote.test"], make_message("backup mx", "via mx2"))
    wait_for(sink.received(b"via mx2"), what="delivery through mx2")


def test_4xx_deferred_then_delivered_on_retry(delivering, dns_server, sinks):
    """RFC 5321 4.2.5 / 4.5.4.1: a 4xx defers with backoff; the retry delivers."""
    port, = free_ports(1)
    failing = sinks(port, "-r", "RCPT")
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port)
    qid = mta.send("sender@example.org", ["bob@remote.test"], make_message("retry", "second time lucky"))
    deferred = wait_for(lambda: [m for m in mta.queue_list() if m["status"] == "deferred"], what="deferral")
    rcpt = deferred[0]["recipients"][0]
    assert rcpt["status"] == "deferred" and rcpt["attempts"] >= 1 and "4" in (rcpt["last_error"] or "")
    assert deferred[0]["next_attempt"]
    failing.stop()
    sink = sinks(port)
    wait_for(sink.received(b"second time lucky"), what="delivery on retry")
    wait_for(lambda: not mta.queue_list(), what="empty queue")
    assert f"{qid}: to=<bob@remote.test>" in mta.log_text() and "status=deferred" in mta.log_text()


def test_5xx_bounces_to_local_sender_as_rfc3464_dsn(delivering, dns_server, sinks):
    """RFC 3464: a 5xx produces one DSN from <> that lands in the sender's Maildir."""
    port, = free_ports(1)
    sinks(port, "-f", "RCPT")
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port, users={"alice@example.com": "pw-alice-1"})
    qid = mta.send("alice@example.com", ["nobody@remote.test"], make_message("doomed", "will bounce"))
    dsn_raw = wait_for(lambda: maildir_messages(mta, "alice@example.com"), what="DSN in alice's Maildir")[0]
    dsn = email.message_from_bytes(dsn_raw, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert b"Return-Path: <>" in dsn_raw
    status = [part for part in dsn.walk() if part.get_content_type() == "message/delivery-status"]
    assert status, dsn_raw[:2000]
    text = dsn_raw.decode("utf-8", "replace")
    assert "Final-Recipient: rfc822; nobody@remote.test" in text
    assert "Action: failed" in text and "Status: 5." in text
    assert "Diagnostic-Code: smtp;" in text and "Remote-MTA: dns;" in text
    wait_for(lambda: not mta.queue_list(), what="empty queue")
    assert f"{qid}: to=<nobody@remote.test>" in mta.log_text() and "status=bounced" in mta.log_text()


def test_null_mx_fails_at_once_rfc7505(delivering, dns_server):
    """RFC 7505 3: a domain with a null MX bounces at once with 5.1.10, no retry."""
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(free_ports(1)[0], users={"alice@example.com": "pw-alice-1"})
    mta.send("alice@example.com", ["x@nullmx.test"], make_message("nullmx", "nowhere"))
    dsn_raw = wait_for(lambda: maildir_messages(mta, "alice@example.com"), what="null MX DSN")[0]
    assert b"Status: 5.1.10" in dsn_raw
    assert "dsn=5.1.10" in mta.log_text()


def test_queue_age_expiry_bounces_with_4_4_7(delivering, dns_server, sinks):
    """RFC 3464 / MTA_MAX_QUEUE_AGE: mail still deferred after the age limit is returned."""
    port, = free_ports(1)
    sinks(port, "-r", "RCPT")
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port, {"max_queue_age": 2}, users={"alice@example.com": "pw-alice-1"})
    mta.send("alice@example.com", ["late@remote.test"], make_message("expiry", "too slow"))
    dsn_raw = wait_for(lambda: maildir_messages(mta, "alice@example.com"), timeout=30, what="expiry DSN")[0]
    assert b"Action: failed" in dsn_raw and b"Status: 4.4.7" in dsn_raw
    assert "status=expired" in mta.log_text()


def test_no_dsn_for_null_sender_rfc3464(delivering, dns_server, sinks):
    """RFC 3464 / RFC 5321 4.5.5: a bounce of a bounce is never sent."""
    port, = free_ports(1)
    sinks(port, "-f", "RCPT")
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port)
    mta.send("", ["nobody@remote.test"], make_message("null", "from <>", sender="MAILER-DAEMON@example.org"))
    wait_for(lambda: "status=bounced" in mta.log_text(), what="bounce")
    time.sleep(1)
    assert not mta.queue_list(), "no DSN may be queued for the null sender"
    assert "notification" not in mta.log_text()


def test_alias_fan_out_local_and_remote(delivering, dns_server, sinks):
    """Aliases: one address expands to a local Maildir and a remote recipient."""
    port, = free_ports(1)
    sink = sinks(port)
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port, users={"alice@example.com": "pw-alice-1"},
                     aliases="team: alice@example.com, bob@remote.test\n")
    mta.send("sender@example.org", ["team@example.com"], make_message("fan-out", "to the team"))
    local = wait_for(lambda: maildir_messages(mta, "alice@example.com"), what="local copy")[0]
    assert b"to the team" in local and b"Delivered-To: alice@example.com" in local
    wait_for(sink.received(b"to the team"), what="remote copy")
    wait_for(lambda: not mta.queue_list(), what="empty queue")


def test_postmaster_delivered_to_mailbox_rfc5321_4_5_1(delivering):
    """RFC 5321 4.5.1: postmaster@ always exists; without an alias it is a mailbox."""
    mta = delivering(free_ports(1)[0])
    mta.send("sender@example.org", ["postmaster@example.com"], make_message("pm", "hello postmaster"))
    message = wait_for(lambda: maildir_messages(mta, "postmaster@example.com"), what="postmaster Maildir")[0]
    assert b"Return-Path: <sender@example.org>" in message


def test_deferred_mail_survives_restart_and_waits_its_time(delivering, dns_server, sinks):
    """Deferred mail is not retried before its next attempt, also across restarts."""
    port, = free_ports(1)
    failing = sinks(port, "-r", "RCPT")
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port, {"backoff_min": 6, "backoff_max": 6})
    mta.send("sender@example.org", ["bob@remote.test"], make_message("restart", "after restart"))
    wait_for(lambda: [m for m in mta.queue_list() if m["status"] == "deferred"], what="deferral")
    failing.stop()
    sink = sinks(port)
    mta.restart()
    time.sleep(2)
    assert not sink.messages(), "retried before its next_attempt"
    wait_for(sink.received(b"after restart"), timeout=20, what="delivery after backoff")


def test_queue_retry_makes_deferred_mail_due_now(delivering, dns_server, sinks):
    """`mta queue retry ID` (postqueue -i) delivers deferred mail at once."""
    port, = free_ports(1)
    failing = sinks(port, "-r", "RCPT")
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port, {"backoff_min": 3600, "backoff_max": 3600})
    qid = mta.send("sender@example.org", ["bob@remote.test"], make_message("flush", "flushed"))
    wait_for(lambda: [m for m in mta.queue_list() if m["status"] == "deferred"], what="deferral")
    failing.stop()
    sink = sinks(port)
    mta.cli("queue", "retry", qid)
    wait_for(sink.received(b"flushed"), timeout=10, what="delivery after retry")


def test_relayhost_in_brackets_skips_mx_lookup(delivering, dns_server, sinks):
    """MTA_RELAYHOST=[host]:port: everything goes to the smarthost, no MX lookup."""
    port, = free_ports(1)
    sink = sinks(port)
    mta = delivering(port, {"relayhost": f"[127.0.0.1]:{port}"})
    mta.send("sender@example.org", ["someone@elsewhere.test"], make_message("smarthost", "via relayhost"))
    wait_for(sink.received(b"via relayhost"), what="delivery to the relayhost")
    assert not [q for q in dns_server.queries if "elsewhere" in str(q[0])]


def test_mx_pointing_at_ourselves_bounces_5_4_6(delivering, dns_server):
    """RFC 5321 5.1: an MX list whose best host is ourselves is a mail loop."""
    dns_server.set_zone({"loop.test.": {"MX": [(10, "mx.test.example.")]},
                         "mx.test.example.": {"A": ["127.0.0.1"]}})
    mta = delivering(free_ports(1)[0], users={"alice@example.com": "pw-alice-1"})
    mta.send("alice@example.com", ["x@loop.test"], make_message("loop", "loops"))
    dsn_raw = wait_for(lambda: maildir_messages(mta, "alice@example.com"), what="loop DSN")[0]
    assert b"Status: 5.4.6" in dsn_raw


def test_delay_warning_dsn_rfc3464(delivering, dns_server, sinks):
    """RFC 3464 2.3.3 'delayed': after delay_warning_time the sender hears once."""
    port, = free_ports(1)
    sinks(port, "-r", "RCPT")
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port, {"delay_warning_time": 1}, users={"alice@example.com": "pw-alice-1"})
    mta.send("alice@example.com", ["slow@remote.test"], make_message("slow", "delayed"))
    dsn_raw = wait_for(lambda: maildir_messages(mta, "alice@example.com"), what="delay DSN")[0]
    assert b"Action: delayed" in dsn_raw and b"Will-Retry-Until:" in dsn_raw
    time.sleep(3)
    assert len(maildir_messages(mta, "alice@example.com")) == 1, "one delay warning only"
    assert [m for m in mta.queue_list() if m["sender"] == "alice@example.com"], "the message is still queued"


def test_sigterm_during_delivery_loses_nothing(delivering, dns_server, sinks):
    """SIGTERM while a remote server is slow: exit 0, and the message is still there or delivered."""
    port, = free_ports(1)
    sinks(port, "-w", "30")   # waits 30 s before answering DATA
    dns_server.set_zone(zone([(10, "mx1.remote.test.")]))
    mta = delivering(port)
    qid = mta.send("sender@example.org", ["bob@remote.test"], make_message("slow peer", "in flight"))
    wait_for(lambda: "queue active" in mta.log_text() and "from=<sender@example.org>, size=" in mta.log_text(),
             what="delivery attempt")
    time.sleep(0.5)
    assert mta.stop() == 0
    assert qid in [m["id"] for m in mta.queue_list()], "the in-flight message must stay queued"
