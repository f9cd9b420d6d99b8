"""The envelope file (`envelope.json`): versioned, human-readable JSON.

Owns the envelope's schema: who sent the message, to whom, with which
ESMTP parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461
RET/ENVID/NOTIFY/ORCPT), from which client, and per-recipient delivery
state. An unknown version is refused (`EnvelopeError`) so the spool can
quarantine it instead of guessing.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

VERSION = 1

# Recipient states. A message is finished when no recipient is pending/deferred.
PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
BOUNCED = "bounced"
OPEN_STATES = frozenset({PENDING, DEFERRED})


class EnvelopeError(ValueError):
    """The envelope file is unreadable or of an unknown version."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


_TYPES = {"str": (str,), "int": (int,), "bool": (bool,), "str | None": (str, type(None)),
          "int | None": (int, type(None)), "list[str] | None": (list, type(None))}


def _check_types(item) -> None:
    """Every field has the type its annotation says (a damaged file must be
    quarantined at start-up, not crash a delivery later)."""
    for name, annotation in item.__annotations__.items():
        value = getattr(item, name)
        allowed = _TYPES.get(annotation)
        if allowed is None:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise EnvelopeError(f"malformed envelope: {name} is {type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise EnvelopeError(f"malformed envelope: {name} holds a non-string")
    if hasattr(item, "arrival"):
        try:
            parse_iso(item.arrival)
            if item.next_attempt is not None:
                parse_iso(item.next_attempt)
        except ValueError:
            raise EnvelopeError("malformed envelope: bad timestamp") from None
    if hasattr(item, "status") and item.status not in (PENDING, DEFERRED, DELIVERED, BOUNCED):
        raise EnvelopeError(f"malformed envelope: unknown recipient status {item.status!r}")
    if hasattr(item, "address") and "@" not in item.address:
        raise EnvelopeError(f"malformed envelope: recipient {item.address!r} is not an address")


@dataclass
class Recipient:
    address: str
    orcpt: str | None = None          # RFC 3461 4.2, "addr-type;xtext-decoded"
    notify: list[str] | None = None   # RFC 3461 4.1: NEVER or SUCCESS/FAILURE/DELAY
    status: str = PENDING
    attempts: int = 0
    last_error: str | None = None
    dsn_status: str | None = None     # RFC 3463 code of the last result
    remote_mta: str | None = None
    finished_at: str | None = None
    delay_notified: bool = False

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATES


def _recipient_dict(recipient: Recipient) -> dict[str, Any]:
    data = dict(recipient.__dict__)
    if recipient.notify is not None:
        data["notify"] = list(recipient.notify)
    return data


@dataclass
class Envelope:
    id: str
    sender: str                       # "" is the null reverse-path
    recipients: list[Recipient]
    arrival: str = field(default_factory=now_iso)
    size: int = 0                     # octets as the client sent them
    body: str | None = None           # RFC 6152: 7BIT / 8BITMIME
    smtputf8: bool = False            # RFC 6531
    declared_size: int | None = None  # RFC 1870
    ret: str | None = None            # RFC 3461 4.3: FULL / HDRS
    envid: str | None = None          # RFC 3461 4.4
    client_ip: str | None = None
    client_helo: str | None = None
    client_name: str | None = None
    protocol: str = "ESMTP"
    auth_user: str | None = None
    submitter: str | None = None      # local user for sendmail injection
    next_attempt: str | None = None
    attempts: int = 0
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        # dataclasses.asdict deep-copies every value: a measurable share of
        # the CPU per message. Only the lists need copying here.
        data = dict(self.__dict__)
        data["recipients"] = [_recipient_dict(r) for r in self.recipients]
        return data

    def to_json(self) -> bytes:
        """The envelope file. One line: with `indent`, json falls back from
        its C encoder to Python, a visible cost per message (`mta queue show
        --json` prints it indented)."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> "Envelope":
        if not isinstance(data, dict):
            raise EnvelopeError("envelope is not a JSON object")
        if data.get("version") != VERSION:
            raise EnvelopeError(f"unknown envelope version {data.get('version')!r}")
        try:
            recipients = [Recipient(**item) for item in data["recipients"]]
            fields = {k: v for k, v in data.items() if k != "recipients"}
            envelope = cls(recipients=recipients, **fields)
        except (TypeError, KeyError) as error:
            raise EnvelopeError(f"malformed envelope: {error}") from None
        if not recipients:
            raise EnvelopeError("malformed envelope: no recipients")
        for item in (envelope, *recipients):
            _check_types(item)
        return envelope

    @property
    def open_recipients(self) -> list[Recipient]:
        return [r for r in self.recipients if r.is_open]
