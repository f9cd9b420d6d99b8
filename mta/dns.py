"""The daemon's one DNS client (INTERFACE.md, "DNS"), on dnspython.

Owns every DNS lookup the daemon makes -- MX routing for delivery, A/AAAA,
PTR, TXT for SPF/DKIM/DMARC, DNSBL queries -- and the single place where
`MTA_DNS_NAMESERVERS` takes effect: a `Resolver` built with nameservers
asks only those (each with its own port), otherwise the system's
/etc/resolv.conf. It turns dnspython's outcomes into three explicit ones:
an answer (possibly empty: NODATA), `NoSuchDomain` (NXDOMAIN, permanent) and
`TemporaryDNSError` (SERVFAIL, REFUSED, timeouts, nothing reachable). It
knows nothing about queues, retries or policy: callers decide what an
outcome means for a message.

Nameservers. dnspython 2.3 keeps per-server ports in
`dns.resolver.Resolver.nameserver_ports`, a dict keyed by IP, so one
dnspython resolver cannot hold `127.0.0.1:5301` and `127.0.0.1:5302` at
once. Each configured server therefore gets its own
`dns.resolver.Resolver(configure=False)` (nameservers=[ip],
nameserver_ports={ip: port}), and `Resolver._query` walks them in order the
way dnspython walks its own list: each attempt gets at most `timeout`
seconds; a server that answers SERVFAIL/REFUSED or refuses the connection is
dropped for this query; silent ones are retried round after round until
`lifetime` seconds have passed for the query. NXDOMAIN and NODATA from any
server are final. No cache: the recursive resolver behind us caches, and a
stub cache would only make tests and `set_zone` changes lie.

Names. Every name is made absolute (no search list) and non-ASCII labels
are converted to A-labels before the query (RFC 5890/5891; IDNA 2008 with
UTS 46 mapping when the `idna` package is installed, else Python's IDNA
2003 codec). A name that cannot exist in the DNS (label over 63 octets,
empty label, bad IDNA) is `NoSuchDomain`.

Using this resolver from the mail-authentication libraries (so that SPF,
DKIM and DMARC lookups also obey `MTA_DNS_NAMESERVERS`):

- dkimpy: every verifying entry point takes a ``dnsfunc``; pass
  `Resolver.dkim_dnsfunc`, e.g. ``dkim.verify(msg, dnsfunc=r.dkim_dnsfunc)``,
  ``dkim.DKIM(msg).verify(dnsfunc=r.dkim_dnsfunc)``,
  ``dkim.ARC(msg).verify(dnsfunc=r.dkim_dnsfunc)``. dkimpy calls it as
  ``dnsfunc(name: bytes, timeout=5)`` and expects the first TXT record's
  strings joined as bytes, or None when there is none; a temporary failure
  raises `dkim.DnsTimeoutError`. dkimpy 1.1.4 catches that itself and
  verifies False (logging to "dkimpy"), so a caller that must report RFC
  6376 TEMPFAIL / RFC 8601 dkim=temperror wraps dkim_dnsfunc in a function
  that notes the DnsTimeoutError before re-raising it.
- pyspf 2.0.14: all DNS goes through `spf.query.dns()`, which calls the
  module-level function `spf.DNSLookup(name, qtype, strict, timeout)`
  (bound at import to `spf.DNSLookup_dnspython`, which uses dnspython's
  *global default resolver*, i.e. resolv.conf). `Resolver.spf_lookup` is a
  drop-in replacement with the same return shape. Use
  `Resolver.spf_query(i=, s=, h=)` / `Resolver.spf_check2(i=, s=, h=)`:
  they build a subclass of `spf.query` whose `dns` method is pyspf's own
  code re-bound to a globals mapping in which `DNSLookup` is this
  resolver's `spf_lookup` -- pyspf's CNAME, caching and void-lookup logic
  unchanged, no process-wide patching, safe with several resolvers and
  threads. (The blunt alternative, ``spf.DNSLookup = r.spf_lookup`` once at
  start-up, also works but is process-wide state.)
"""

from __future__ import annotations

import ipaddress
import random
import time
import types
from typing import Any, Callable

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from mta.config import split_host_port

DEFAULT_PORT = 53

# RFC 5890/5891 (IDNA 2008, UTS 46 mapping) when the idna package is there.
_IDNA_CODEC = dns.name.IDNA_2008_Practical if dns.name.have_idna_2008 else dns.name.IDNA_2003

__all__ = [
    "DNSError", "NoSuchDomain", "NullMX", "TemporaryDNSError",
    "Resolver", "to_ascii", "dnsbl_name",
]


class DNSError(Exception):
    """Base of the outcomes a lookup can have besides an answer."""


class NoSuchDomain(DNSError):
    """NXDOMAIN (RFC 1035 4.1.1 RCODE 3), or a name that cannot exist: permanent."""


class NullMX(DNSError):
    """The domain publishes a null MX (RFC 7505 3): it accepts no mail. Permanent."""


class TemporaryDNSError(DNSError):
    """SERVFAIL, REFUSED, timeout, no nameserver reachable: try again later."""


def _to_name(text: str) -> dns.name.Name:
    """An absolute dns.name.Name; non-ASCII labels become A-labels (RFC 5891 4.4)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str domain name, got {text!r}")
    stripped = text.strip()
    if not stripped or stripped == ".":
        raise NoSuchDomain(f"empty domain name {text!r}")
    try:
        return dns.name.from_text(stripped, origin=dns.name.root, idna_codec=_IDNA_CODEC)
    except (dns.exception.DNSException, UnicodeError, ValueError) as error:
        raise NoSuchDomain(f"{text!r} is not a valid domain name: {error}") from None


def _host_text(name: dns.name.Name) -> str:
    """Lower-case, A-label, no trailing dot."""
    return name.to_text(omit_final_dot=True).lower()


def to_ascii(domain: str) -> str:
    """`domain` in lower-case A-label form without a trailing dot (raises NoSuchDomain)."""
    return _host_text(_to_name(domain))


def dnsbl_name(ip: str, zone: str) -> str:
    """The DNSBL query name for `ip` in `zone` (RFC 5782 2.1 IPv4, 2.4 IPv6 nibbles)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    reverse = address.reverse_pointer  # "1.0.0.127.in-addr.arpa" / "...ip6.arpa"
    labels = reverse.rsplit(".", 2)[0]
    return f"{labels}.{to_ascii(zone)}"


def _parse_endpoint(text: str) -> tuple[str, int]:
    host, port = split_host_port(text, DEFAULT_PORT)
    ipaddress.ip_address(host)  # ValueError names the bad one
    return host, port


def _endpoint_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Resolver:
    """Stub resolver over `nameservers` ("ip", "ip:port", "[v6]:port"), else resolv.conf.

    `timeout` bounds one attempt at one server; `lifetime` bounds one query
    (an `addresses()` call makes two queries). Thread-safe: no state changes
    after construction except the random generator used for shuffling.
    """

    def __init__(self, nameservers: tuple[str, ...] = (), timeout: float = 5.0,
                 lifetime: float = 10.0):
        if timeout <= 0 or lifetime <= 0:
            raise ValueError("timeout and lifetime must be positive")
        self._timeout = float(timeout)
        self._lifetime = float(lifetime)
        self._random = random.Random()
        self._config_error = ""
        if nameservers:
            servers = [_parse_endpoint(text) for text in nameservers]
        else:
            servers = self._system_nameservers()
        self._servers: tuple[tuple[str, int], ...] = tuple(servers)
        self._endpoints = tuple(self._make_endpoint(ip, port) for ip, port in self._servers)
        self._spf_query_class: type | None = None

    def _system_nameservers(self) -> list[tuple[str, int]]:
        try:
            system = dns.resolver.Resolver(configure=True)
        except dns.exception.DNSException as error:
            # No usable resolv.conf: every lookup is a temporary failure, so
            # mail waits in the queue instead of bouncing.
            self._config_error = f"no system nameservers: {error}"
            return []
        return [(ip, system.nameserver_ports.get(ip, system.port))
                for ip in system.nameservers if _is_ip(ip)]

    def _make_endpoint(self, ip: str, port: int) -> dns.resolver.Resolver:
        endpoint = dns.resolver.Resolver(configure=False)
        endpoint.nameservers = [ip]
        endpoint.nameserver_ports = {ip: port}
        endpoint.port = port
        endpoint.timeout = self._timeout
        endpoint.lifetime = self._lifetime
        endpoint.cache = None
        endpoint.retry_servfail = False
        return endpoint

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The servers asked, in order, as "ip:port" / "[v6]:port"."""
        return tuple(_endpoint_text(ip, port) for ip, port in self._servers)

    def __repr__(self) -> str:
        return (f"Resolver(nameservers={list(self.nameservers)}, timeout={self._timeout}, "
                f"lifetime={self._lifetime})")

    # ------------------------------------------------------------------
    # the one query loop

    def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
               lifetime: float | None = None) -> dns.resolver.Answer | None:
        """The answer (rrset not None), None for NODATA; raises NoSuchDomain or
        TemporaryDNSError. CNAMEs are followed by dnspython within the response."""
        what = f"{name.to_text()} {dns.rdatatype.to_text(rdtype)}"
        if not self._endpoints:
            raise TemporaryDNSError(f"{what}: {self._config_error or 'no nameservers configured'}")
        budget = self._lifetime if lifetime is None else min(lifetime, self._lifetime)
        deadline = time.monotonic() + budget
        live = list(zip(self._servers, self._endpoints))
        problems: dict[str, str] = {}
        while live:
            for server, endpoint in list(live):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TemporaryDNSError(
                        f"{what}: no answer within {budget:g}s ({_describe(problems)})")
                label = _endpoint_text(*server)
                try:
                    answer = endpoint.resolve(
                        name, rdtype, search=False, raise_on_no_answer=False,
                        lifetime=min(self._timeout, remaining))
                except dns.resolver.NXDOMAIN:
                    raise NoSuchDomain(f"{what}: no such domain (NXDOMAIN from {label})") from None
                except dns.exception.Timeout:
                    problems[label] = "timeout"  # silent: ask again next round
                except dns.resolver.NoNameservers as error:
                    problems[label] = _rcode_text(error)
                    live.remove((server, endpoint))
                except dns.exception.DNSException as error:  # YXDOMAIN, malformed answers
                    problems[label] = f"{type(error).__name__}: {error}"
                    live.remove((server, endpoint))
                else:
                    return answer if answer.rrset is not None else None
        raise TemporaryDNSError(f"{what}: all nameservers failed ({_describe(problems)})")

    # ------------------------------------------------------------------
    # MX routing (RFC 5321 5.1, RFC 7505)

    def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX records as (preference, host), lowest preference first.

        [] when the domain exists but has no MX (the caller falls back to the
        implicit MX, RFC 5321 5.1). Raises NullMX when the only MX is the
        null MX "0 ." (RFC 7505 3; any set whose every target is the root
        counts as null), NoSuchDomain on NXDOMAIN, TemporaryDNSError.
        Root targets mixed with real ones are dropped (RFC 7505 3 forbids
        the mix; the real ones are still usable).
        """
        answer = self._query(_to_name(domain), dns.rdatatype.MX)
        if answer is None:
            return []
        records = sorted(((rdata.preference, rdata.exchange) for rdata in answer),
                         key=lambda record: record[0])
        usable = [(preference, _host_text(exchange)) for preference, exchange in records
                  if exchange != dns.name.root]
        if not usable:
            raise NullMX(f"{to_ascii(domain)} publishes a null MX and accepts no mail (RFC 7505)")
        return usable

    def route(self, domain: str) -> list[str]:
        """The hosts to try for `domain`, in order (RFC 5321 5.1).

        MX hosts by preference, equal preferences in random order, each host
        once (at its best preference); [domain in A-label form] when there is
        no MX (implicit MX). An address literal ("[192.0.2.1]",
        "[IPv6:2001:db8::1]", RFC 5321 4.1.3) routes to that address with no
        lookup. Raises NullMX, NoSuchDomain, TemporaryDNSError.
        """
        literal = _address_literal(domain)
        if literal is not None:
            return [literal]
        records = self.mx(domain)
        if not records:
            return [to_ascii(domain)]  # implicit MX, preference 0
        hosts: list[str] = []
        seen: set[str] = set()
        group: list[str] = []
        group_preference = None
        for preference, host in records + [(None, "")]:
            if preference != group_preference:
                # RFC 5321 5.1: equal preferences MUST be randomised.
                self._random.shuffle(group)
                hosts.extend(group)
                group, group_preference = [], preference
            if host and host not in seen:
                seen.add(host)
                group.append(host)
        return hosts

    # ------------------------------------------------------------------
    # addresses, reverse, text

    def addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of `host` (an IP literal is returned as is).

        [] when the name exists with neither. Raises NoSuchDomain on NXDOMAIN,
        TemporaryDNSError when neither query gave data and one failed
        temporarily. CNAMEs are followed.
        """
        if _is_ip(host):
            return [str(ipaddress.ip_address(host))]
        name = _to_name(host)
        found: list[str] = []
        temporary: TemporaryDNSError | None = None
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = self._query(name, rdtype)
            except TemporaryDNSError as error:
                temporary = error
                continue
            if answer is not None:
                found.extend(rdata.address for rdata in answer)
        if not found and temporary is not None:
            raise temporary
        return found

    def txt(self, name: str) -> list[str]:
        """Each TXT record with its strings joined (RFC 7208 3.3, RFC 6376
        3.6.2.2), decoded as UTF-8 (bad bytes replaced). [] on NODATA;
        NoSuchDomain on NXDOMAIN."""
        return [record.decode("utf-8", errors="replace") for record in self._txt_bytes(_to_name(name))]

    def _txt_bytes(self, name: dns.name.Name, lifetime: float | None = None) -> list[bytes]:
        answer = self._query(name, dns.rdatatype.TXT, lifetime)
        return [] if answer is None else [b"".join(rdata.strings) for rdata in answer]

    def ptr(self, ip: str) -> list[str]:
        """PTR names of `ip` (in-addr.arpa / ip6.arpa), without trailing dot.
        [] on NODATA; NoSuchDomain on NXDOMAIN; ValueError for a bad IP."""
        address = ipaddress.ip_address(ip)
        answer = self._query(dns.reversename.from_address(str(address)), dns.rdatatype.PTR)
        return [] if answer is None else [_host_text(rdata.target) for rdata in answer]

    def a_for_dnsbl(self, name: str) -> list[str]:
        """A records of a DNSBL query name (RFC 5782 2.1/2.4: listings are A
        records, also for IPv6 clients). NXDOMAIN and NODATA mean "not
        listed": []. TemporaryDNSError is raised; callers must not block mail
        on it."""
        try:
            answer = self._query(_to_name(name), dns.rdatatype.A)
        except NoSuchDomain:
            return []
        return [] if answer is None else [rdata.address for rdata in answer]

    # ------------------------------------------------------------------
    # dkimpy hook

    def dkim_dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record at `name`, strings joined.

        None when there is no record (NXDOMAIN, NODATA, undecodable name);
        raises `dkim.DnsTimeoutError` on a temporary failure (RFC 6376 6.1.2
        TEMPFAIL), which dkimpy turns into a failed verification; see the
        module docstring. Usage: ``dkim.verify(message, dnsfunc=r.dkim_dnsfunc)``.
        """
        import dkim

        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
        try:
            records = self._txt_bytes(_to_name(name), lifetime=timeout)
        except NoSuchDomain:
            return None
        except TemporaryDNSError as error:
            raise dkim.DnsTimeoutError(str(error)) from None
        return records[0] if records else None

    # ------------------------------------------------------------------
    # pyspf hooks

    def spf_lookup(self, name: str, qtype: str, strict: Any = True,
                   timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
        """Drop-in replacement for pyspf's `spf.DNSLookup(name, qtype, strict, timeout)`.

        Returns ``[((name, qtype), value), ...]`` like
        `spf.DNSLookup_dnspython`: A/AAAA -> address text, MX -> (preference,
        host), PTR -> host, TXT/SPF -> tuple of bytes strings. NXDOMAIN and
        NODATA -> []; a temporary failure raises `spf.TempError` (RFC 7208
        2.6.6 temperror).
        """
        import spf

        try:
            rdtype = dns.rdatatype.from_text(qtype)
            answer = self._query(_to_name(name), rdtype, lifetime=timeout)
        except NoSuchDomain:
            return []
        except TemporaryDNSError as error:
            raise spf.TempError(f"DNS {error}") from None
        if answer is None:
            return []
        key = (name, qtype)
        values: list[tuple[tuple[str, str], Any]] = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                values.append((key, rdata.address))
            elif qtype == "MX":
                values.append((key, (rdata.preference, _host_text(rdata.exchange))))
            elif qtype == "PTR":
                values.append((key, _host_text(rdata.target)))
            elif qtype in ("TXT", "SPF"):
                values.append((key, tuple(rdata.strings)))
        return values

    def spf_query(self, i: str, s: str, h: str, **kwargs: Any):
        """An `spf.query` (pyspf) whose every lookup goes through this resolver.

        Same arguments as `spf.query` (local, receiver, strict, timeout,
        verbose, querytime); ``.check()`` gives (result, code, explanation).
        """
        return self._spf_class()(i=i, s=s, h=h, **kwargs)

    def spf_check2(self, i: str, s: str, h: str, local: Any = None, receiver: Any = None,
                   timeout: float = 20, verbose: bool = False,
                   querytime: float = 20) -> tuple[str, str]:
        """`spf.check2` through this resolver: (result, explanation), result one
        of pass, fail, softfail, neutral, none, temperror, permerror (RFC 7208 2.6)."""
        res, _, exp = self.spf_query(i=i, s=s, h=h, local=local, receiver=receiver,
                                     timeout=timeout, verbose=verbose,
                                     querytime=querytime).check()
        return res, exp

    def _spf_class(self) -> type:
        if self._spf_query_class is None:
            self._spf_query_class = _spf_query_class(self.spf_lookup)
        return self._spf_query_class


def _spf_query_class(lookup: Callable[..., list]) -> type:
    """A subclass of `spf.query` whose `dns` method calls `lookup` instead of
    the module-level `spf.DNSLookup`: pyspf's own `query.dns` code, re-bound
    to a copy of its module globals with `DNSLookup` replaced."""
    import spf

    original = spf.query.dns
    if "DNSLookup" not in original.__code__.co_names:
        raise RuntimeError("this pyspf's query.dns() no longer calls DNSLookup; "
                           "update mta.dns._spf_query_class")
    scope = dict(original.__globals__)
    scope["DNSLookup"] = lookup
    rebound = types.FunctionType(original.__code__, scope, original.__name__,
                                 original.__defaults__, original.__closure__)
    rebound.__kwdefaults__ = original.__kwdefaults__
    rebound.__doc__ = original.__doc__
    return type("ResolverSPFQuery", (spf.query,), {"dns": rebound, "__module__": __name__})


def _address_literal(domain: str) -> str | None:
    """The IP of an RFC 5321 4.1.3 address literal, None for a domain name."""
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        raise NoSuchDomain(f"{domain!r} is not a valid address literal") from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _rcode_text(error: dns.resolver.NoNameservers) -> str:
    """What the server said, from dnspython's error tuples (server, tcp, port, error, response)."""
    reasons = []
    for entry in error.kwargs.get("errors", []) or []:
        problem = entry[3] if len(entry) > 3 else entry
        reasons.append(problem if isinstance(problem, str) else type(problem).__name__)
    return ", ".join(reasons) or "failed"


def _describe(problems: dict[str, str]) -> str:
    return "; ".join(f"{server}: {problem}" for server, problem in problems.items()) or "no reply"
