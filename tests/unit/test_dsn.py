"""Unit tests for mta.delivery.dsn: RFC 3464 reports and RFC 3461 NOTIFY rules.

Every report built here is parsed back with Python's email package, and the
delivery-status fields are read from the parsed structure, the way a mail
client or a bounce processor would.
"""

from __future__ import annotations

import datetime
import email
import email.parser
import email.policy
import email.utils
import re

import pytest

from mta.delivery import dsn
from mta.delivery.result import Result
from mta.spool.envelope import Envelope, Recipient

NOW = datetime.datetime(2024, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
ARRIVAL = "2024-03-01T08:00:00+00:00"
QUEUE_ID = "0005F0A1B2C3D4E5F60718"
ORIGINAL = (
    b"Received: from client.example (client.example [192.0.2.9])\r\n"
    b"\tby mx.test.example with ESMTP id 0005F0A1B2C3D4E5F60718\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"\r\n"
    b"The body line that only FULL returns.\r\n"
    b".a line with a leading dot\r\n"
)


@pytest.fixture
def message_path(tmp_path):
    path = tmp_path / "message.eml"
    path.write_bytes(ORIGINAL)
    return str(path)


def make_envelope(recipients, **fields) -> Envelope:
    fields.setdefault("sender", "alice@example.com")
    fields.setdefault("arrival", ARRIVAL)
    return Envelope(id=QUEUE_ID, recipients=recipients, **fields)


def build(envelope, results, action, message_path, **kwargs) -> bytes:
    return dsn.build_dsn(envelope, results, action, reporting_mta="mx.test.example",
                         message_path=message_path, now=NOW, **kwargs)


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def raw_parts(data: bytes) -> list[bytes]:
    """The body parts of the multipart/report as raw bytes (headers + body)."""
    boundary = parse(data).get_boundary().encode()
    pieces = data.split(b"\r\n--" + boundary)
    assert pieces[-1] == b"--\r\n", "closing delimiter missing"
    return [piece[2:] for piece in pieces[1:-1]]   # drop the CRLF after each delimiter


def status_blocks(part: bytes) -> list[dict[str, str]]:
    """RFC 3464 2.1: the delivery-status body is blank-line separated field blocks."""
    _, _, body = part.partition(b"\r\n\r\n")
    parser = email.parser.HeaderParser(policy=email.policy.default)
    blocks = []
    for chunk in body.strip(b"\r\n").split(b"\r\n\r\n"):
        fields = parser.parsestr(chunk.decode("utf-8") + "\r\n\r\n")
        blocks.append({name: " ".join(str(value).split()) for name, value in fields.items()})
    return blocks


def assert_crlf_only(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF in the report"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR in the report"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998   # RFC 5322 2.1.1


def smtp_failure(address="bob@example.org"):
    return Result.permanent(
        "5.1.1", f"550 5.1.1 <{address}>: Recipient address rejected: User unknown (in reply to RCPT TO command)",
        remote_mta="mx.example.org[192.0.2.1]:25")


# --------------------------------------------------------------------------
# failed

def test_failed_report_is_a_parseable_rfc3464_message(message_path):
    bob = Recipient("bob@example.org")
    envelope = make_envelope([bob])
    data = build(envelope, [(bob, smtp_failure())], "failed", message_path)
    assert_crlf_only(data)

    message = parse(data)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test.example>"
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"            # RFC 3834 5
    assert message["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(message["Date"]) == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.test\.example>", message["Message-ID"])
    # RFC 6522 3: multipart/report naming the report type
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"

    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]   # RET absent: full, like Postfix

    text = parts[0].get_content()
    assert "mx.test.example" in text
    assert "could not be delivered" in text
    assert "<bob@example.org>: host mx.example.org[192.0.2.1]:25 said: 550 5.1.1" in " ".join(text.split())

    # RFC 3464 2.2 and 2.3, read through the email package's own parser
    per_message, per_recipient = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test.example"
    assert per_message["X-Queue-ID"] == QUEUE_ID
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == datetime.datetime(
        2024, 3, 1, 8, 0, tzinfo=datetime.timezone.utc)
    assert "Original-Envelope-Id" not in per_message
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.org"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.org"
    assert " ".join(per_recipient["Diagnostic-Code"].split()) == (
        "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown "
        "(in reply to RCPT TO command)")
    assert email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"]) == NOW
    assert "Original-Recipient" not in per_recipient
    assert "Will-Retry-Until" not in per_recipient


def test_delivery_status_fields_follow_the_rfc3464_grammar_order(message_path):
    bob = Recipient("bob@example.org", orcpt="rfc822;info@example.com")
    envelope = make_envelope([bob], envid="QQ314159")
    data = build(envelope, [(bob, smtp_failure())], "failed", message_path)
    per_message, per_recipient = status_blocks(raw_parts(data)[1])
    assert list(per_message) == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date", "X-Queue-ID"]
    assert list(per_recipient) == ["Original-Recipient", "Final-Recipient", "Action", "Status",
                                   "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"]


def test_failed_with_several_recipients_has_one_block_each(message_path):
    bob, carol = Recipient("bob@example.org"), Recipient("carol@example.net")
    envelope = make_envelope([bob, carol])
    results = [(bob, smtp_failure()),
               (carol, Result.permanent("5.4.6", "mail forwarding loop for carol@example.net", remote_mta="maildir"))]
    data = build(envelope, results, "failed", message_path)
    blocks = status_blocks(raw_parts(data)[1])
    assert [b.get("Final-Recipient") for b in blocks[1:]] == ["rfc822; bob@example.org", "rfc822; carol@example.net"]
    carol_block = blocks[2]
    assert carol_block["Status"] == "5.4.6"
    # not an SMTP reply: x-mta diagnostic type (RFC 3464 2.3.6), no Remote-MTA for a local mailbox
    assert carol_block["Diagnostic-Code"] == "x-mta; mail forwarding loop for carol@example.net"
    assert "Remote-MTA" not in carol_block
    text = parse(data).get_payload()[0].get_content()
    assert "<carol@example.net>: mail forwarding loop for carol@example.net" in text


def test_explicit_diagnostic_wins(message_path):
    bob = Recipient("bob@example.org")
    result = Result.permanent("5.1.10", "null MX", diagnostic="x-mta; domain example.org has a null MX (RFC 7505)")
    data = build(make_envelope([bob]), [(bob, result)], "failed", message_path)
    block = status_blocks(raw_parts(data)[1])[1]
    assert block["Diagnostic-Code"] == "x-mta; domain example.org has a null MX (RFC 7505)"
    assert block["Status"] == "5.1.10"


def test_malformed_status_falls_back_to_the_action_class(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob]), [(bob, Result.permanent("bogus", "no"))], "failed", message_path)
    assert status_blocks(raw_parts(data)[1])[1]["Status"] == "5.0.0"


def test_multiline_reply_text_stays_one_field(message_path):
    bob = Recipient("bob@example.org")
    result = Result.permanent("5.7.1", "550-5.7.1 first line\r\n550 5.7.1 second line " + "word " * 60)
    data = build(make_envelope([bob]), [(bob, result)], "failed", message_path)
    assert_crlf_only(data)
    block = status_blocks(raw_parts(data)[1])[1]
    assert block["Diagnostic-Code"].startswith("smtp; 550-5.7.1 first line 550 5.7.1 second line word")


# --------------------------------------------------------------------------
# RET (RFC 3461 4.3) and the returned original

def test_ret_full_returns_the_whole_message(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], ret="FULL"), [(bob, smtp_failure())], "failed", message_path)
    original = parse(data).get_payload()[2]
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Description"] == "Undelivered Message"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "quarterly numbers"
    assert inner["Message-ID"] == "<orig-1@example.com>"
    assert b"The body line that only FULL returns." in data
    # the original is attached byte for byte
    assert raw_parts(data)[2].split(b"\r\n\r\n", 1)[1] == ORIGINAL


def test_ret_hdrs_returns_headers_only(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], ret="HDRS"), [(bob, smtp_failure())], "failed", message_path)
    original = parse(data).get_payload()[2]
    assert original.get_content_type() == "text/rfc822-headers"   # RFC 6522 / RFC 3462
    assert original["Content-Description"] == "Undelivered Message Headers"
    assert "Subject: quarterly numbers" in original.get_content()
    assert b"The body line that only FULL returns." not in data


def test_absent_ret_returns_full_message_like_postfix(message_path):
    """RFC 3461 4.3 leaves the default to the MTA; Postfix returns the full
    original (up to bounce_size_limit, 50 kB), and so do we."""
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob]), [(bob, smtp_failure())], "failed", message_path)
    assert parse(data).get_payload()[2].get_content_type() == "message/rfc822"
    assert b"The body line that only FULL returns." in data


@pytest.mark.parametrize("action", ["delayed", "delivered"])
def test_ret_full_only_applies_to_failures(message_path, action):
    # RFC 3461 4.3: RET is about "failed" DSNs; warnings and success reports carry headers
    bob = Recipient("bob@example.org")
    result = Result.temporary("4.4.1", "connect to mx.example.org: Connection refused") if action == "delayed" \
        else Result.delivered("250 2.0.0 Ok", remote_mta="mx.example.org[192.0.2.1]:25")
    data = build(make_envelope([bob], ret="FULL"), [(bob, result)], action, message_path)
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"The body line that only FULL returns." not in data


def test_big_original_falls_back_to_headers_and_says_so(tmp_path):
    # over the default 10 MB cap: only the header section is read and returned
    path = tmp_path / "big.eml"
    line = b"x" * 998 + b"\r\n"
    with open(path, "wb") as handle:
        handle.write(ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
        for _ in range(2 * dsn.FULL_LIMIT // len(line)):
            handle.write(line)
    assert path.stat().st_size > dsn.FULL_LIMIT
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], ret="FULL"), [(bob, smtp_failure())], "failed", str(path))
    assert len(data) < 20_000
    message = parse(data)
    original = message.get_payload()[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: quarterly numbers" in original.get_content()
    text = " ".join(message.get_payload()[0].get_content().split())
    assert f"too large ({path.stat().st_size} bytes)" in text
    assert "only its headers are attached" in text


def test_full_limit_is_adjustable(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], ret="FULL"), [(bob, smtp_failure())], "failed", message_path,
                 full_limit=len(ORIGINAL))
    assert parse(data).get_payload()[2].get_content_type() == "message/rfc822"
    data = build(make_envelope([bob], ret="FULL"), [(bob, smtp_failure())], "failed", message_path,
                 full_limit=len(ORIGINAL) - 1)
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_unreadable_original_still_gives_a_report(tmp_path):
    # RFC 6522 3: the returned content is optional; the notification is not
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], ret="FULL"), [(bob, smtp_failure())], "failed", str(tmp_path / "gone.eml"))
    message = parse(data)
    assert [p.get_content_type() for p in message.get_payload()] == ["text/plain", "message/delivery-status"]
    assert "could not be read" in message.get_payload()[0].get_content()


def test_eight_bit_original_is_declared(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve body\r\n")
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], ret="FULL", body="8BITMIME"), [(bob, smtp_failure())], "failed", str(path))
    assert dsn.body_type(data) == "8BITMIME"
    part = raw_parts(data)[2]
    assert b"Content-Transfer-Encoding: 8bit" in part.split(b"\r\n\r\n")[0]
    assert b"Content-Transfer-Encoding: 8bit" in data.split(b"\r\n\r\n")[0]


def test_seven_bit_report_needs_no_8bitmime(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], ret="FULL"), [(bob, smtp_failure())], "failed", message_path)
    assert dsn.body_type(data) is None
    assert b"Content-Transfer-Encoding: 7bit" in data.split(b"\r\n\r\n")[0]


# --------------------------------------------------------------------------
# delayed and delivered

def test_delayed_warning(message_path):
    bob = Recipient("bob@example.org")
    until = datetime.datetime(2024, 3, 8, 8, 0, tzinfo=datetime.timezone.utc)
    result = Result.temporary("4.4.1", "connect to mx.example.org[192.0.2.1]:25: Connection refused",
                              remote_mta="mx.example.org[192.0.2.1]:25")
    data = build(make_envelope([bob]), [(bob, result)], "delayed", message_path, retry_until=until)
    assert_crlf_only(data)
    message = parse(data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    text = message.get_payload()[0].get_content()
    assert "THIS IS A WARNING ONLY" in text
    assert "for more than 4 hour(s)" in text          # 08:00 -> 12:00
    assert "until it is 7 day(s) old" in text
    per_recipient = message.get_payload()[1].get_payload()[1]
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.4.1"
    assert email.utils.parsedate_to_datetime(per_recipient["Will-Retry-Until"]) == until   # RFC 3464 2.3.9
    assert per_recipient["Diagnostic-Code"].startswith("x-mta; connect to mx.example.org")
    assert message.get_payload()[2]["Content-Description"] == "Delayed Message Headers"


def test_delayed_without_deadline_has_no_will_retry_until(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob]), [(bob, Result.temporary("4.4.2", "timed out"))], "delayed", message_path)
    assert "Will-Retry-Until" not in status_blocks(raw_parts(data)[1])[1]


def test_delivered_report(message_path):
    bob = Recipient("bob@example.org", notify=["SUCCESS"])
    result = Result.delivered("250 2.0.0 Ok: queued as 4F2", remote_mta="mx.example.org[192.0.2.1]:25")
    data = build(make_envelope([bob]), [(bob, result)], "delivered", message_path)
    message = parse(data)
    assert message["Subject"] == "Successful Mail Delivery Report"
    assert "successfully delivered" in message.get_payload()[0].get_content()
    per_recipient = message.get_payload()[1].get_payload()[1]
    assert per_recipient["Action"] == "delivered"
    assert per_recipient["Status"] == "2.0.0"
    assert per_recipient["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4F2"
    assert message.get_payload()[2]["Content-Description"] == "Delivered Message Headers"


def test_delivered_to_local_mailbox(message_path):
    bob = Recipient("bob@example.com", notify=["SUCCESS", "FAILURE"])
    data = build(make_envelope([bob]), [(bob, Result.delivered("delivered to maildir", remote_mta="maildir"))],
                 "delivered", message_path)
    block = status_blocks(raw_parts(data)[1])[1]
    assert "Remote-MTA" not in block
    assert block["Diagnostic-Code"] == "x-mta; delivered to maildir"


# --------------------------------------------------------------------------
# ENVID (RFC 3461 4.4) and ORCPT (RFC 3461 4.2)

def test_envid_is_returned(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], envid="QQ314159-abc"), [(bob, smtp_failure())], "failed", message_path)
    per_message = parse(data).get_payload()[1].get_payload()[0]
    assert per_message["Original-Envelope-Id"] == "QQ314159-abc"


def test_unsafe_envid_is_xtext_encoded(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob], envid="a b+c"), [(bob, smtp_failure())], "failed", message_path)
    assert status_blocks(raw_parts(data)[1])[0]["Original-Envelope-Id"] == "a+20b+2Bc"


def test_orcpt_becomes_original_recipient(message_path):
    bob = Recipient("bob@example.org", orcpt="rfc822;info@example.com")
    data = build(make_envelope([bob]), [(bob, smtp_failure())], "failed", message_path)
    message = parse(data)
    per_recipient = message.get_payload()[1].get_payload()[1]
    assert per_recipient["Original-Recipient"] == "rfc822; info@example.com"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.org"
    assert "(expanded from <info@example.com>)" in message.get_payload()[0].get_content()


def test_no_original_recipient_without_orcpt(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob]), [(bob, smtp_failure())], "failed", message_path)
    assert "Original-Recipient" not in status_blocks(raw_parts(data)[1])[1]


# --------------------------------------------------------------------------
# NOTIFY (RFC 3461 4.1) and the null sender

@pytest.mark.parametrize("notify, failed, delayed, delivered", [
    (None, True, True, False),                            # absent: failures and (like Postfix) delays
    (["NEVER"], False, False, False),
    (["FAILURE"], True, False, False),
    (["DELAY"], False, True, False),
    (["SUCCESS"], False, False, True),
    (["SUCCESS", "FAILURE"], True, False, True),
    (["FAILURE", "DELAY"], True, True, False),
    (["SUCCESS", "FAILURE", "DELAY"], True, True, True),
    (["success", "failure"], True, False, True),          # case-insensitive
])
def test_should_notify(notify, failed, delayed, delivered):
    recipient = Recipient("bob@example.org", notify=notify)
    assert dsn.should_notify(recipient, "failed") is failed
    assert dsn.should_notify(recipient, "delayed") is delayed
    assert dsn.should_notify(recipient, "delivered") is delivered


def test_should_notify_rejects_unknown_action():
    with pytest.raises(ValueError):
        dsn.should_notify(Recipient("bob@example.org"), "bounced")


def test_no_dsn_to_the_null_sender(message_path):
    # RFC 5321 4.5.5 / RFC 3461 6.2: never notify <>, or bounces loop
    bob = Recipient("bob@example.org")
    envelope = make_envelope([bob], sender="")
    assert dsn.dsn_recipient(envelope) is None
    with pytest.raises(ValueError):
        build(envelope, [(bob, smtp_failure())], "failed", message_path)


def test_dsn_recipient_is_the_sender():
    assert dsn.dsn_recipient(make_envelope([Recipient("b@example.org")])) == "alice@example.com"


def test_build_refuses_nonsense(message_path):
    bob = Recipient("bob@example.org")
    with pytest.raises(ValueError):
        build(make_envelope([bob]), [], "failed", message_path)
    with pytest.raises(ValueError):
        build(make_envelope([bob]), [(bob, smtp_failure())], "exploded", message_path)


# --------------------------------------------------------------------------
# SMTPUTF8 (RFC 6533)

def test_smtputf8_uses_global_types(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes("From: Jörg <jörg@bücher.example>\r\nSubject: grüße\r\n\r\nHallo\r\n".encode())
    rcpt = Recipient("usér@example.org", orcpt="utf-8;usér@example.org")
    envelope = make_envelope([rcpt], sender="jörg@bücher.example", smtputf8=True, body="8BITMIME", ret="FULL")
    result = Result.permanent("5.1.1", "550 5.1.1 no such user", remote_mta="mx.example.org[192.0.2.1]:25")
    data = build(envelope, [(rcpt, result)], "failed", str(path))
    assert_crlf_only(data)
    message = parse(data)
    assert message.get_param("report-type") == "global-delivery-status"
    assert message["To"] == "jörg@bücher.example"                      # RFC 6532 3.2
    parts = raw_parts(data)
    assert b"Content-Type: message/global-delivery-status" in parts[1]
    assert b"Content-Type: message/global\r\n" in parts[2]
    blocks = status_blocks(parts[1])
    assert blocks[1]["Final-Recipient"] == "utf-8; usér@example.org"   # RFC 6533 3
    assert blocks[1]["Original-Recipient"] == "utf-8; usér@example.org"
    assert dsn.body_type(data) == "8BITMIME"

    # headers only: message/global-headers (RFC 6533 3.5)
    envelope.ret = "HDRS"
    data = build(envelope, [(rcpt, result)], "failed", str(path))
    assert b"Content-Type: message/global-headers" in raw_parts(data)[2]


def test_ascii_report_stays_ascii_for_plain_mail(message_path):
    bob = Recipient("bob@example.org")
    data = build(make_envelope([bob]), [(bob, smtp_failure())], "failed", message_path)
    assert data.isascii()
    assert b"message/global" not in data
