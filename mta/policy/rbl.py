"""DNSBL (RFC 5782) checks of the connecting client, at connect.

A client is listed in a zone when `reversed-ip.zone` has an A record in
127.0.0.0/8 (except 127.255.255.0/24, which Spamhaus and others use for
query errors, RFC 5782 2.3 leaves codes to the list). IPv4 uses reversed
octets, IPv6 reversed nibbles. DNS failures never block mail: a timeout or
SERVFAIL counts as "not listed" and is logged.
"""

from __future__ import annotations

import ipaddress
import logging

from mta import replies
from mta.replies import Reply

log = logging.getLogger("mta.policy")


def check(resolver, ip: str, zones: tuple[str, ...]) -> Reply | None:
    from mta.dns import DNSError, dnsbl_name
    for zone in zones:
        try:
            answers = resolver.a_for_dnsbl(dnsbl_name(ip, zone))
        except DNSError as error:
            log.warning("DNSBL %s lookup for %s failed (%s); not blocking", zone, ip, error)
            continue
        for answer in answers:
            try:
                code = ipaddress.ip_address(answer)
            except ValueError:
                continue
            if code in ipaddress.ip_network("127.0.0.0/8") and code not in ipaddress.ip_network("127.255.255.0/24"):
                return replies.RBL_LISTED.fmt(ip=ip, zone=zone, code=answer)
    return None
