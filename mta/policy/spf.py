"""SPF (RFC 7208) at MAIL FROM, with pyspf through mta's resolver.

The identity is the MAIL FROM domain, or the HELO name for the null sender
(RFC 7208 2.4). The result is recorded in a `Received-SPF` header (RFC 7208
9.1) and used by DMARC; `fail` is refused with 550 5.7.23 when
MTA_SPF_REJECT_FAIL is set (RFC 7372 3.2). DNS trouble gives temperror,
which never blocks mail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("mta.policy")


@dataclass(frozen=True)
class SpfResult:
    result: str        # pass fail softfail neutral none temperror permerror
    explanation: str
    identity: str      # "mailfrom" or "helo"
    domain: str        # the domain checked
    sender: str
    client_ip: str
    helo: str

    def received_spf(self, receiver: str) -> str:
        comment = f"{receiver}: {self.explanation}" if self.explanation else receiver
        comment = comment.replace("(", "[").replace(")", "]").replace("\r", " ").replace("\n", " ")
        return (f"Received-SPF: {self.result} ({comment})\r\n\tclient-ip={self.client_ip};"
                f" envelope-from=\"{self.sender}\"; helo={self.helo}; receiver={receiver};"
                f" identity={self.identity}\r\n")


def check(resolver, client_ip: str, sender: str, helo: str, receiver: str) -> SpfResult:
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2] if sender else helo
    try:
        result, explanation = resolver.spf_check2(i=client_ip, s=sender, h=helo, receiver=receiver)
    except Exception as error:   # pyspf raises a variety of things on odd input
        log.warning("SPF check for %s from %s failed: %s", domain, client_ip, error)
        result, explanation = "temperror", f"SPF check failed: {error}"
    return SpfResult(result, explanation or "", identity, domain.lower(), sender, client_ip, helo)
