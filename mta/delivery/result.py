"""The outcome of one delivery attempt for one recipient.

Couriers (SMTP client, Maildir, LMTP) return a `Result` per recipient; the
queue, not the courier, decides what follows: delivered, retry later
(temporary) or bounce (permanent). This is chasquid's courier model.
"""

from __future__ import annotations

from dataclasses import dataclass

DELIVERED = "delivered"
TEMPORARY = "temporary"
PERMANENT = "permanent"


@dataclass(frozen=True)
class Result:
    kind: str                 # DELIVERED, TEMPORARY or PERMANENT
    dsn: str                  # RFC 3463 status, e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str                 # human-readable detail, e.g. the remote reply
    remote_mta: str | None = None   # "mx.example.com[192.0.2.1]:25" or "maildir" etc.
    diagnostic: str | None = None   # RFC 3464 Diagnostic-Code value, e.g. "smtp; 550 5.1.1 ..."

    @classmethod
    def delivered(cls, text: str = "Ok", remote_mta: str | None = None, dsn: str = "2.0.0") -> "Result":
        return cls(DELIVERED, dsn, text, remote_mta)

    @classmethod
    def temporary(cls, dsn: str, text: str, remote_mta: str | None = None, diagnostic: str | None = None) -> "Result":
        return cls(TEMPORARY, dsn, text, remote_mta, diagnostic)

    @classmethod
    def permanent(cls, dsn: str, text: str, remote_mta: str | None = None, diagnostic: str | None = None) -> "Result":
        return cls(PERMANENT, dsn, text, remote_mta, diagnostic)

    @property
    def status_word(self) -> str:
        """Postfix's mta.log status= word."""
        return {DELIVERED: "sent", TEMPORARY: "deferred", PERMANENT: "bounced"}[self.kind]
