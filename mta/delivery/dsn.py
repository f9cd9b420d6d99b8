"""Delivery status notifications: RFC 3464 reports, RFC 3461 rules.

Owns three questions and nothing else:

- whether a recipient's outcome deserves a notification at all
  (`should_notify`: RFC 3461 4.1 NOTIFY) and to whom it goes
  (`dsn_recipient`: never to the null reverse-path, RFC 5321 4.5.5 and
  6.1, RFC 3461 6.2);
- what the notification says (`build_dsn`): a complete RFC 5322 message,
  CRLF line ends, `multipart/report; report-type=delivery-status` (RFC
  6522) holding a human-readable text part, a `message/delivery-status`
  part (RFC 3464 2) and the original message or its headers (RFC 3461 4.3,
  RFC 6522 3); for SMTPUTF8 mail the RFC 6533 `message/global*` types;
- which ESMTP body type the result needs (`body_type`).

It does not queue the notification, decide when a message has expired or
remember that a delay warning was sent: that is the scheduler's job. The
caller filters recipients with `should_notify` and queues the bytes from
`<>` to `dsn_recipient(envelope)`.

The original message is read from the spool file (CRLF on disk). Only the
header section is read when only headers are returned, so a 35 MB message
costs one header block; a full copy is attached only up to `full_limit`
octets (10 MB by default), beyond which the headers alone are returned and
the text part says so.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import os
import re
import secrets
import textwrap
from typing import Iterable, Sequence

from mta.delivery.result import Result
from mta.spool.envelope import Envelope, Recipient, parse_iso

log = logging.getLogger("mta.delivery.dsn")

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"
ACTIONS = (FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED)   # RFC 3464 2.3.3

# RFC 3461 4.3 lets the MTA choose when the sender gave no RET. Headers only
# keeps bounces of large mail small; Postfix instead treats a missing RET as
# FULL up to bounce_size_limit (50 kB).
DEFAULT_RET = "FULL"              # Postfix: the whole original, up to bounce_size_limit
FULL_LIMIT = 50_000                # Postfix bounce_size_limit: larger originals return headers only
HEADER_LIMIT = 1024 * 1024         # largest header section returned
MAX_FIELD_TEXT = 900               # keeps every line under RFC 5322 2.1.1's 998

SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Mail Delivery Status Report",
    EXPANDED: "Mail Delivery Status Report",
}
ORIGINAL_DESCRIPTION = {
    FAILED: "Undelivered Message",
    DELAYED: "Delayed Message",
    DELIVERED: "Delivered Message",
    RELAYED: "Relayed Message",
    EXPANDED: "Expanded Message",
}
DEFAULT_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0", DELIVERED: "2.0.0", RELAYED: "2.0.0", EXPANDED: "2.0.0"}

_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")           # RFC 3463 2
_SMTP_REPLY_RE = re.compile(r"[2-5]\d\d(?:[ -]|\Z)")              # RFC 5321 4.2
_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")        # RFC 3464 2.1.2


# --------------------------------------------------------------------------
# who gets a notification

def dsn_recipient(envelope: Envelope) -> str | None:
    """Where a DSN about `envelope` goes, or None: never to the null sender.

    RFC 5321 4.5.5 and 6.1, RFC 3461 6.2: a message from `<>` (itself a
    notification) must not produce another one, or bounces would loop.
    """
    return envelope.sender or None


def should_notify(recipient: Recipient, action: str) -> bool:
    """RFC 3461 4.1: does the sender want a notification for `action`?

    - NOTIFY=NEVER: never.
    - failed: unless NOTIFY was given without FAILURE.
    - delayed: when NOTIFY lists DELAY, or when NOTIFY is absent (RFC 3461
      4.1 leaves absent = FAILURE or FAILURE,DELAY to the MTA; like
      Postfix we warn about delays).
    - delivered (and relayed/expanded, RFC 3461 6.2.2): only with SUCCESS.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    notify = {item.upper() for item in recipient.notify} if recipient.notify is not None else None
    if notify is not None and "NEVER" in notify:
        return False
    if action == FAILED:
        return notify is None or "FAILURE" in notify
    if action == DELAYED:
        return notify is None or "DELAY" in notify
    return notify is not None and "SUCCESS" in notify


def body_type(message: bytes) -> str | None:
    """The RFC 6152 BODY= a DSN needs when queued: "8BITMIME" or None."""
    return None if message.isascii() else "8BITMIME"


# --------------------------------------------------------------------------
# building the report

def build_dsn(envelope: Envelope, results: Sequence[tuple[Recipient, Result]], action: str, *,
              reporting_mta: str, message_path: str, now: datetime.datetime | float | None = None,
              retry_until: datetime.datetime | None = None, full_limit: int = FULL_LIMIT) -> bytes:
    """A complete RFC 3464 delivery status notification for `results`.

    `results` pairs each recipient to report with its latest `Result`; the
    caller has already filtered them with `should_notify`. `retry_until`
    (arrival + MTA_MAX_QUEUE_AGE) fills Will-Retry-Until in delay warnings
    (RFC 3464 2.3.9). Returns bytes with CRLF line ends, to be queued from
    `<>` to `dsn_recipient(envelope)`; when `envelope.smtputf8` the result
    needs SMTPUTF8, and `body_type()` says whether it needs 8BITMIME.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    recipient_address = dsn_recipient(envelope)
    if recipient_address is None:
        raise ValueError("no DSN for a message from the null sender (RFC 3461 6.2)")
    if not results:
        raise ValueError("a DSN needs at least one recipient")
    now_dt = _as_datetime(now)
    utf8 = bool(envelope.smtputf8)          # RFC 6533 (message/global*) and RFC 6532 headers
    boundary = f"{envelope.id}.{int(now_dt.timestamp())}.{secrets.token_hex(8)}/{reporting_mta}"

    try:
        original, original_type, full, too_big = _original_part(envelope, action, message_path, utf8, full_limit)
    except OSError as error:
        # The notification matters more than the attachment (RFC 6522 3: the
        # third part is optional): report without it.
        log.warning("%s: DSN without the original message: %s", envelope.id, error)
        original, original_type, full, too_big = None, "", False, None
    text = _human_text(envelope, results, action, reporting_mta=reporting_mta, now=now_dt,
                       retry_until=retry_until, full=full, too_big=too_big, missing=original is None)
    status = _delivery_status(envelope, results, action, reporting_mta=reporting_mta,
                              now=now_dt, retry_until=retry_until, utf8=utf8)

    text_bytes = text.encode("utf-8")
    status_bytes = status.encode("utf-8")
    parts = [
        _part([("Content-Description", "Notification"),
               ("Content-Type", "text/plain; charset=" + ("us-ascii" if text_bytes.isascii() else "utf-8")),
               ("Content-Transfer-Encoding", _cte(text_bytes))], text_bytes),
        # RFC 3464 2.1 / RFC 6533 3.3: the machine-readable report
        _part([("Content-Description", "Delivery report"),
               ("Content-Type", "message/global-delivery-status" if utf8 else "message/delivery-status"),
               ("Content-Transfer-Encoding", _cte(status_bytes))], status_bytes),
    ]
    if original is not None:
        parts.append(_part([("Content-Description", ORIGINAL_DESCRIPTION[action] + ("" if full else " Headers")),
                            ("Content-Type", original_type),
                            ("Content-Transfer-Encoding", _cte(original))], original))

    headers = [
        ("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
        ("To", _header_text(recipient_address, utf8)),
        ("Subject", SUBJECTS[action]),
        ("Date", email.utils.format_datetime(now_dt)),
        ("Message-ID", f"<{now_dt.strftime('%Y%m%d%H%M%S')}.{envelope.id}.{secrets.token_hex(4)}@{reporting_mta}>"),
        ("Auto-Submitted", "auto-replied"),                           # RFC 3834 5
        ("MIME-Version", "1.0"),
        # RFC 6522 3: the report type names the second part
        ("Content-Type", f'multipart/report; report-type={"global-delivery-status" if utf8 else "delivery-status"};'
                         f'\r\n\tboundary="{boundary}"'),
    ]
    body = b"".join(parts)
    headers.append(("Content-Transfer-Encoding", "7bit" if body.isascii() else "8bit"))

    out = bytearray()
    for name, value in headers:
        out += f"{name}: {value}\r\n".encode("utf-8")
    out += b"\r\nThis is a MIME-encapsulated message.\r\n"
    for part in parts:
        out += b"\r\n--" + boundary.encode("ascii") + b"\r\n" + part
    out += b"\r\n--" + boundary.encode("ascii") + b"--\r\n"
    return bytes(out)


def _part(headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("ascii")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + b"\r\n" + body


def _cte(data: bytes) -> str:
    # RFC 2046 5.2.1 / RFC 6533 3: message/* parts are only ever 7bit or 8bit
    return "7bit" if data.isascii() else "8bit"


def _as_datetime(value: datetime.datetime | float | None) -> datetime.datetime:
    if value is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value


def _iso_to_datetime(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return _as_datetime(parse_iso(text))
    except ValueError:
        return None


def _rfc5322_date(value: datetime.datetime) -> str:
    return email.utils.format_datetime(_as_datetime(value))


# --------------------------------------------------------------------------
# part 3: the original message (RFC 3461 4.3, RFC 3462, RFC 6533 3.4-3.5)

def _original_part(envelope: Envelope, action: str, message_path: str, utf8: bool,
                   full_limit: int) -> tuple[bytes, str, bool, int | None]:
    """(content, content type, full?, size when too big to return in full)."""
    ret = (envelope.ret or DEFAULT_RET).upper()
    # RFC 3461 4.3: RET governs "failed" DSNs; warnings and success reports
    # carry the headers only.
    want_full = action == FAILED and ret == "FULL"
    too_big = None
    if want_full:
        size = os.path.getsize(message_path)
        if size <= full_limit:
            with open(message_path, "rb") as handle:
                content = handle.read(full_limit + 1)
            if len(content) <= full_limit:
                return content, ("message/global" if utf8 else "message/rfc822"), True, None
            size = len(content)
        too_big = size
    headers = read_header_block(message_path)
    return headers, ("message/global-headers" if utf8 else "text/rfc822-headers"), False, too_big


def read_header_block(message_path: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of a spool message, up to (not including) the blank line.

    Reads only the header lines; stops after `limit` octets at a line
    boundary. Always ends with CRLF.
    """
    lines: list[bytes] = []
    total = 0
    with open(message_path, "rb") as handle:
        while True:
            line = handle.readline(8192)
            if not line or line in (b"\r\n", b"\n"):
                break
            if total + len(line) > limit:
                break
            lines.append(line)
            total += len(line)
    block = b"".join(lines)
    if block and not block.endswith(b"\n"):
        block += b"\r\n"
    return block


# --------------------------------------------------------------------------
# part 1: the human-readable explanation (RFC 6522 3, first part)

_INTROS = {
    FAILED: (
        "I'm sorry to have to tell you that your message could not be delivered "
        "to one or more recipients. {attached}\n\n"
        "For further assistance, please send mail to postmaster. If you do so, "
        "please include this problem report. You can delete your own text from "
        "the attached returned message."
    ),
    DELAYED: (
        "####################################################################\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
        "####################################################################\n\n"
        "Your message could not be delivered for more than {delay}. {until}\n\n"
        "For further assistance, please send mail to postmaster. If you do so, "
        "please include this problem report."
    ),
    DELIVERED: (
        "Your message was successfully delivered to the destination(s) listed "
        "below. If it was delivered to a mailbox you will receive no further "
        "notifications. Otherwise you may still receive notifications of "
        "delivery errors from other systems."
    ),
    RELAYED: (
        "Your message was relayed to the destination(s) listed below, which "
        "do not return delivery notifications. You may receive no further "
        "notifications about it."
    ),
    EXPANDED: (
        "Your message was delivered to the list(s) below and sent on to their "
        "members. You may still receive notifications from other systems."
    ),
}


def _human_text(envelope: Envelope, results: Iterable[tuple[Recipient, Result]], action: str, *,
                reporting_mta: str, now: datetime.datetime, retry_until: datetime.datetime | None,
                full: bool, too_big: int | None, missing: bool = False) -> str:
    arrival = _iso_to_datetime(envelope.arrival) or now
    fields = {
        "attached": ("" if missing else "It is attached below." if full else "Its headers are attached below."),
        "delay": _duration(now - arrival),
        "until": (f"It will be retried until it is {_duration(_as_datetime(retry_until) - arrival)} old."
                  if retry_until is not None else "It will be retried."),
    }
    paragraphs = [f"This is the mail system at host {reporting_mta}."]
    for paragraph in _INTROS[action].format(**fields).split("\n\n"):
        if paragraph.startswith("#"):
            paragraphs.append(paragraph)
        else:
            paragraphs.append(textwrap.fill(paragraph, 70))
    if too_big is not None:
        paragraphs.append(textwrap.fill(
            f"The original message was too large ({too_big} bytes) to be returned in full; "
            "only its headers are attached.", 70))
    if missing:
        paragraphs.append("The original message could not be read from the queue and is not attached.")
    paragraphs.append("                   The mail system")
    for recipient, result in results:
        paragraphs.append(_recipient_line(recipient, result))
    return "\n\n".join(paragraphs).replace("\n", "\r\n") + "\r\n"


def _recipient_line(recipient: Recipient, result: Result) -> str:
    """`<bob@example.org> (expanded from <info@example.com>): host ... said: 550 ...`"""
    who = f"<{recipient.address}>"
    original = _orcpt_address(recipient)
    if original and original.lower() != recipient.address.lower():
        who += f" (expanded from <{original}>)"
    text = " ".join((result.text or "").split())
    if result.remote_mta and _SMTP_REPLY_RE.match(text):
        text = f"host {result.remote_mta} said: {text}"
    return textwrap.fill(f"{who}: {text}", 72, subsequent_indent="    ",
                         break_long_words=False, break_on_hyphens=False)


def _orcpt_address(recipient: Recipient) -> str | None:
    if not recipient.orcpt:
        return None
    addr_type, _, address = recipient.orcpt.partition(";")
    if addr_type.strip().lower() in ("rfc822", "utf-8") and address.strip():
        return address.strip()
    return None


def _duration(delta: datetime.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} day(s)"
    if seconds >= 3600:
        return f"{seconds // 3600} hour(s)"
    return f"{max(1, seconds // 60)} minute(s)"


# --------------------------------------------------------------------------
# part 2: message/delivery-status (RFC 3464 2.1 - 2.4)

def _delivery_status(envelope: Envelope, results: Iterable[tuple[Recipient, Result]], action: str, *,
                     reporting_mta: str, now: datetime.datetime, retry_until: datetime.datetime | None,
                     utf8: bool) -> str:
    # RFC 3464 2.2: per-message fields, in the order of its grammar
    block = []
    if envelope.envid:
        block.append(_field("Original-Envelope-Id", _xtext_if_needed(envelope.envid, utf8)))   # 2.2.1
    block.append(_field("Reporting-MTA", f"dns; {reporting_mta}"))                               # 2.2.2
    arrival = _iso_to_datetime(envelope.arrival)
    if arrival is not None:
        block.append(_field("Arrival-Date", _rfc5322_date(arrival)))                             # 2.2.5
    block.append(_field("X-Queue-ID", envelope.id))                                              # 2.4 extension
    blocks = ["".join(block)]

    for recipient, result in results:
        # RFC 3464 2.3: per-recipient fields, in the order of its grammar
        block = []
        if recipient.orcpt:
            block.append(_field("Original-Recipient", _address_field(recipient.orcpt, utf8, orcpt=True)))  # 2.3.1
        block.append(_field("Final-Recipient", _address_field(recipient.address, utf8)))                    # 2.3.2
        block.append(_field("Action", action))                                                              # 2.3.3
        status = result.dsn if _STATUS_RE.match(result.dsn or "") else DEFAULT_STATUS[action]
        block.append(_field("Status", status))                                                              # 2.3.4
        remote = _remote_mta_name(result.remote_mta)
        if remote:
            block.append(_field("Remote-MTA", f"dns; {remote}"))                                         # 2.3.5
        diagnostic = _diagnostic(result)
        if diagnostic:
            block.append(_field("Diagnostic-Code", _clean(diagnostic, utf8)))                            # 2.3.6
        last_attempt = _iso_to_datetime(recipient.finished_at) or now
        block.append(_field("Last-Attempt-Date", _rfc5322_date(last_attempt)))                           # 2.3.7
        if action == DELAYED and retry_until is not None:
            block.append(_field("Will-Retry-Until", _rfc5322_date(retry_until)))                         # 2.3.9
        blocks.append("".join(block))
    # RFC 3464 2.1: blocks separated by blank lines
    return "\r\n".join(blocks)


def _diagnostic(result: Result) -> str | None:
    """RFC 3464 2.3.6 `diagnostic-type; text`: smtp for SMTP replies, else x-mta."""
    if result.diagnostic:
        return result.diagnostic
    text = " ".join((result.text or "").split())
    if not text:
        return None
    if _SMTP_REPLY_RE.match(text):
        return "smtp; " + text
    return "x-mta; " + text


def _remote_mta_name(remote: str | None) -> str | None:
    """`mx.example.com[192.0.2.1]:25` -> `mx.example.com`; local couriers -> None."""
    if not remote:
        return None
    name = remote.split("[", 1)[0].strip() if "[" in remote else remote.rsplit(":", 1)[0].strip()
    if not name or "/" in name or "." not in name and ":" not in name:
        return None     # "maildir", a unix socket path: not an MTA on the network
    return name


def _address_field(value: str, utf8: bool, *, orcpt: bool = False) -> str:
    """RFC 3464 2.3.1-2.3.2 `address-type; generic-address` (RFC 6533 3 for utf-8)."""
    if orcpt:
        addr_type, semicolon, address = value.partition(";")
        if not semicolon or not _ADDR_TYPE_RE.match(addr_type.strip()):
            addr_type, address = "rfc822", value
        addr_type = addr_type.strip().lower()
    else:
        addr_type, address = "rfc822", value
    address = address.strip()
    if not address.isascii():
        # RFC 6533 3: non-ASCII addresses are of type utf-8; outside
        # message/global-delivery-status they use utf-8-addr-xtext
        addr_type = "utf-8"
        if not utf8:
            address = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)
    return f"{addr_type}; {_clean(address, utf8)}"


def _xtext_if_needed(value: str, utf8: bool) -> str:
    """RFC 3461 4.4: the ENVID as the client gave it; xtext again where unsafe."""
    def safe(char: str) -> bool:
        return 33 <= ord(char) <= 126 or (utf8 and not char.isascii() and char.isprintable())
    if all(safe(c) for c in value):
        return value
    return "".join(c if safe(c) and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode("utf-8"))
                   for c in value)


def _clean(text: str, utf8: bool) -> str:
    """One header-safe line of text: no CR/LF/controls, ASCII unless utf8, bounded."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if not utf8:
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    words = [w if len(w) <= MAX_FIELD_TEXT else w[:MAX_FIELD_TEXT] for w in text.split(" ")]
    return " ".join(words)


def _field(name: str, value: str, width: int = 78) -> str:
    """`Name: value` folded at spaces (RFC 5322 2.2.3) into lines of about `width`."""
    words = value.split(" ")
    lines = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if len(current) + 1 + len(word) > width:
            lines.append(current)
            current = " " + word        # the space itself becomes the fold
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines) + "\r\n"


def _header_text(text: str, utf8: bool) -> str:
    return _clean(text, utf8)
