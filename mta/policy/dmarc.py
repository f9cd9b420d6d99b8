"""DMARC (RFC 7489) and the Authentication-Results header (RFC 8601).

Owns policy discovery (_dmarc.<From domain>, then the organizational
domain, RFC 7489 6.6.3), identifier alignment (relaxed or strict, for SPF
and DKIM, 3.1), the organizational domain from the Public Suffix List
(Debian's `publicsuffix` package file; without it, the last two labels),
and the one Authentication-Results header mta adds. p=reject failures are
refused with 550 5.7.1 when MTA_DMARC_ENFORCE is set; p=quarantine is
recorded in the header (delivery is not changed).
"""

from __future__ import annotations

import email.utils
import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger("mta.policy")

PSL_PATHS = ("/usr/share/publicsuffix/public_suffix_list.dat",)


class PublicSuffixList:
    """Organizational domain per the PSL algorithm (rules, wildcards, exceptions)."""

    def __init__(self, paths=PSL_PATHS):
        self.rules: set[str] = set()
        self.exceptions: set[str] = set()
        for path in paths:
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    for line in handle:
                        rule = line.strip().split(" ")[0].lower()
                        if not rule or rule.startswith("//"):
                            continue
                        if rule.startswith("!"):
                            self.exceptions.add(rule[1:])
                        else:
                            self.rules.add(rule)
                break

    def public_suffix(self, domain: str) -> str:
        labels = domain.lower().rstrip(".").split(".")
        if not self.rules:
            return labels[-1]
        for index in range(len(labels)):
            candidate = ".".join(labels[index:])
            if candidate in self.exceptions:
                return ".".join(labels[index + 1:])
            wildcard = ".".join(["*", *labels[index + 1:]])
            if candidate in self.rules or (index + 1 < len(labels) and wildcard in self.rules):
                return candidate
        return labels[-1]

    def organizational(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")
        suffix = self.public_suffix(domain)
        if domain == suffix:
            return domain
        prefix = domain[: -len(suffix) - 1]
        return f"{prefix.split('.')[-1]}.{suffix}"


@dataclass(frozen=True)
class DmarcResult:
    result: str          # pass fail none temperror permerror
    policy: str          # none quarantine reject (the one that applies)
    from_domain: str

    def authres(self) -> str:
        if not self.from_domain:
            return f"dmarc={self.result}"
        if self.result == "none":
            return f"dmarc=none header.from={self.from_domain}"
        return f"dmarc={self.result} (p={self.policy}) header.from={self.from_domain}"


def from_domain(headers: list[tuple[str, str]]) -> str | None:
    """The RFC5322.From domain; None unless exactly one From with one address."""
    values = [value for name, value in headers if name.lower() == "from"]
    if len(values) != 1:
        return None
    addresses = [a for _, a in email.utils.getaddresses(values) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].lower().rstrip(">").strip()


def _record(resolver, domain: str) -> dict[str, str] | None:
    from mta.dns import NoSuchDomain
    try:
        texts = resolver.txt(f"_dmarc.{domain}")
    except NoSuchDomain:
        return None
    records = [t for t in texts if t.lower().startswith("v=dmarc1")]
    if len(records) != 1:
        return None
    tags = {}
    for part in records[0].split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags[name.strip().lower()] = value.strip()
    return tags


def aligned(a: str, b: str, mode: str, psl: PublicSuffixList) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return psl.organizational(a) == psl.organizational(b)


def check(resolver, psl: PublicSuffixList, headers, spf, dkim_results) -> DmarcResult:
    from mta.dns import TemporaryDNSError
    domain = from_domain(headers)
    if domain is None:
        return DmarcResult("permerror", "none", "")
    organizational = psl.organizational(domain)
    try:
        tags = _record(resolver, domain)
        at_org = False
        if tags is None and organizational != domain:
            tags, at_org = _record(resolver, organizational), True
    except TemporaryDNSError:
        return DmarcResult("temperror", "none", domain)
    if tags is None:
        return DmarcResult("none", "none", domain)
    policy = tags.get("p", "none").lower()
    if at_org and "sp" in tags:
        policy = tags["sp"].lower()
    if policy not in ("none", "quarantine", "reject"):
        policy = "none"
    spf_ok = spf is not None and spf.result == "pass" and aligned(spf.domain, domain, tags.get("aspf", "r"), psl)
    dkim_ok = any(r.result == "pass" and aligned(r.domain, domain, tags.get("adkim", "r"), psl)
                  for r in dkim_results)
    return DmarcResult("pass" if spf_ok or dkim_ok else "fail", policy, domain)


def authentication_results(authserv_id: str, spf, dkim_results, dmarc) -> str:
    """One RFC 8601 header; `None` parts are left out."""
    parts = []
    if spf is not None:
        prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
        value = spf.sender if spf.identity == "mailfrom" else spf.helo
        parts.append(f"spf={spf.result} {prop}={value}")
    for result in dkim_results or ():
        parts.append(result.authres())
    if dmarc is not None:
        parts.append(dmarc.authres())
    if not parts:
        parts.append("none")
    return f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"


class PslHolder:
    """Loads the PSL once, on first use (it is ~10k rules)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._psl: PublicSuffixList | None = None

    def get(self) -> PublicSuffixList:
        with self._lock:
            if self._psl is None:
                self._psl = PublicSuffixList()
            return self._psl
