"""mta.dns against a real DNS server on loopback (tests/support/dnsserver.py).

Every lookup here crosses a real UDP (or TCP) socket to DNSServer, and the
tests check DNSServer.queries to prove it did (INTERFACE.md "DNS").
Timeouts are small so the whole file stays fast.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import time

import dkim
import pytest
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mta import dns as mdns
from mta.dns import NoSuchDomain, NullMX, Resolver, TemporaryDNSError
from support.dnsserver import DNSServer
from support.fixtures import dns_server  # noqa: F401  (until conftest imports it)

FAST = {"timeout": 0.3, "lifetime": 2.0}

ZONE = {
    "example.com.": {
        "MX": [(20, "mx2.example.com."), (10, "mx1.example.com.")],
        "A": ["192.0.2.1"],
        "AAAA": ["2001:db8::1"],
        "TXT": ["v=spf1 ip4:127.0.0.1 mx -all"],
    },
    "mx1.example.com.": {"A": ["192.0.2.11"]},
    "mx2.example.com.": {"A": ["192.0.2.12"], "AAAA": ["2001:db8::12"]},
    "www.example.com.": {"CNAME": "example.com."},
    "implicit.example.": {"A": ["192.0.2.30"], "AAAA": ["2001:db8::30"]},
    "v6only.example.": {"AAAA": ["2001:db8::6"]},
    "textonly.example.": {"TXT": ["hello"]},
    "nullmx.example.": {"MX": [(0, ".")]},
    "equal.example.": {"MX": [(10, "a.equal.example."), (10, "b.equal.example."),
                              (20, "c.equal.example."), (20, "a.equal.example.")]},
    "multi.example.": {"TXT": [("v=spf1 ", "ip4:192.0.2.0/24 ", "-all"), "second record"]},
    "big.example.": {"TXT": ["x" * 3000]},
    "servfail.example.": "SERVFAIL",
    "timeout.example.": "TIMEOUT",
    "mxtimeout.example.": {"A": ["192.0.2.40"], "MX": "TIMEOUT"},
    "xn--bcher-kva.example.": {"MX": [(10, "mx.xn--bcher-kva.example.")]},
    "xn--mller-kva.example.": {"A": ["192.0.2.50"]},
    "1.0.0.127.in-addr.arpa.": {"PTR": ["localhost."]},
    ipaddress.ip_address("2001:db8::1").reverse_pointer + ".": {"PTR": ["host6.example.com."]},
    "2.0.0.127.zen.example.": {"A": ["127.0.0.2"], "TXT": ["listed"]},
    "spf-fail.example.": {"TXT": ["v=spf1 ip4:192.0.2.99 -all"]},
    "spf-temp.example.": "SERVFAIL",
}


@pytest.fixture
def zone_server(dns_server):
    dns_server.set_zone(ZONE)
    return dns_server


@pytest.fixture
def resolver(zone_server):
    return Resolver((zone_server.address,), **FAST)


def dead_port() -> int:
    """A UDP port on 127.0.0.1 nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------
# MX and routing (RFC 5321 5.1, RFC 7505)

def test_mx_sorted_by_preference_and_asked_of_our_server(resolver, zone_server):
    assert resolver.mx("example.com") == [(10, "mx1.example.com"), (20, "mx2.example.com")]
    assert zone_server.queries == [("example.com.", "MX")]


def test_route_orders_by_preference(resolver):
    assert resolver.route("Example.COM.") == ["mx1.example.com", "mx2.example.com"]


def test_route_shuffles_equal_preferences(resolver):
    """RFC 5321 5.1: equal preferences MUST be randomised; each host once, at its best."""
    seen = set()
    for _ in range(40):
        hosts = resolver.route("equal.example")
        assert sorted(hosts[:2]) == ["a.equal.example", "b.equal.example"]
        assert hosts[2:] == ["c.equal.example"]
        seen.add(tuple(hosts[:2]))
    assert seen == {("a.equal.example", "b.equal.example"), ("b.equal.example", "a.equal.example")}


def test_address_literal_routes_without_lookup(resolver, zone_server):
    """RFC 5321 4.1.3 / 5.1: an address literal is the destination itself."""
    assert resolver.route("[192.0.2.5]") == ["192.0.2.5"]
    assert resolver.route("[IPv6:2001:DB8::5]") == ["2001:db8::5"]
    assert resolver.addresses("2001:db8::5") == ["2001:db8::5"]
    with pytest.raises(NoSuchDomain):
        resolver.route("[not-an-ip]")
    assert zone_server.queries == []


def test_no_mx_means_implicit_mx(resolver, zone_server):
    """RFC 5321 5.1: no MX -> the domain itself, preference 0."""
    assert resolver.mx("implicit.example") == []
    assert resolver.route("implicit.example") == ["implicit.example"]
    assert resolver.addresses("implicit.example") == ["192.0.2.30", "2001:db8::30"]
    assert ("implicit.example.", "MX") in zone_server.queries


def test_null_mx(resolver):
    """RFC 7505: a single "0 ." MX means the domain accepts no mail."""
    with pytest.raises(NullMX):
        resolver.mx("nullmx.example")
    with pytest.raises(NullMX):
        resolver.route("nullmx.example")


def test_nxdomain(resolver):
    for call in (resolver.mx, resolver.route, resolver.addresses, resolver.txt):
        with pytest.raises(NoSuchDomain):
            call("nonexistent.example")


def test_nodata_is_not_nxdomain(resolver):
    """A name that exists with other types is NOERROR/NODATA: empty, not NoSuchDomain."""
    assert resolver.addresses("textonly.example") == []
    assert resolver.txt("implicit.example") == []
    # empty non-terminal above sel._domainkey-style names
    assert resolver.txt("zen.example") == []


def test_servfail_is_temporary_and_fast(resolver):
    start = time.monotonic()
    for call in (resolver.mx, resolver.route, resolver.addresses, resolver.txt):
        with pytest.raises(TemporaryDNSError, match="SERVFAIL"):
            call("servfail.example")
    assert time.monotonic() - start < 1.0


def test_timeout_is_temporary_within_lifetime(zone_server):
    resolver = Resolver((zone_server.address,), timeout=0.2, lifetime=0.6)
    start = time.monotonic()
    with pytest.raises(TemporaryDNSError, match="no answer within"):
        resolver.mx("timeout.example")
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 1.0, elapsed
    # retried within the lifetime, all at our server
    assert zone_server.queries.count(("timeout.example.", "MX")) >= 2


def test_mx_timeout_while_a_answers(zone_server):
    resolver = Resolver((zone_server.address,), timeout=0.2, lifetime=0.4)
    with pytest.raises(TemporaryDNSError):
        resolver.route("mxtimeout.example")
    assert resolver.addresses("mxtimeout.example") == ["192.0.2.40"]


# --------------------------------------------------------------------------
# addresses, TXT, PTR, DNSBL

def test_addresses_ipv4_first_then_ipv6(resolver, zone_server):
    assert resolver.addresses("mx2.example.com") == ["192.0.2.12", "2001:db8::12"]
    assert resolver.addresses("v6only.example") == ["2001:db8::6"]
    assert ("v6only.example.", "AAAA") in zone_server.queries


def test_addresses_follow_cname(resolver):
    assert resolver.addresses("www.example.com") == ["192.0.2.1", "2001:db8::1"]


def test_addresses_of_an_ip_literal_need_no_lookup(resolver, zone_server):
    assert resolver.addresses("192.0.2.7") == ["192.0.2.7"]
    assert resolver.addresses("2001:DB8::7") == ["2001:db8::7"]
    assert zone_server.queries == []


def test_txt_joins_strings_per_record(resolver):
    """RFC 7208 3.3: the character-strings of one record are concatenated (the
    order of records in an RRset is not defined, RFC 2181 5)."""
    assert sorted(resolver.txt("multi.example")) == ["second record", "v=spf1 ip4:192.0.2.0/24 -all"]


def test_big_txt_truncated_over_udp_retried_over_tcp(resolver, zone_server):
    assert resolver.txt("big.example") == ["x" * 3000]
    assert zone_server.log == [("big.example.", "TXT", "udp"), ("big.example.", "TXT", "tcp")]


def test_ptr_ipv4_and_ipv6(resolver, zone_server):
    assert resolver.ptr("127.0.0.1") == ["localhost"]
    assert resolver.ptr("2001:db8::1") == ["host6.example.com"]
    assert ("1.0.0.127.in-addr.arpa.", "PTR") in zone_server.queries
    with pytest.raises(NoSuchDomain):
        resolver.ptr("192.0.2.200")
    with pytest.raises(ValueError):
        resolver.ptr("not-an-ip")


def test_dnsbl(resolver, zone_server):
    """RFC 5782: listed = A record in 127/8; NXDOMAIN = not listed."""
    assert mdns.dnsbl_name("127.0.0.2", "zen.example") == "2.0.0.127.zen.example"
    assert mdns.dnsbl_name("::ffff:127.0.0.2", "zen.example") == "2.0.0.127.zen.example"
    assert mdns.dnsbl_name("2001:db8::1", "ZEN.example.") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example")
    assert resolver.a_for_dnsbl(mdns.dnsbl_name("127.0.0.2", "zen.example")) == ["127.0.0.2"]
    assert resolver.a_for_dnsbl(mdns.dnsbl_name("127.0.0.3", "zen.example")) == []
    with pytest.raises(TemporaryDNSError):
        resolver.a_for_dnsbl("2.0.0.127.servfail.example")
    assert ("3.0.0.127.zen.example.", "A") in zone_server.queries


# --------------------------------------------------------------------------
# names

def test_idna_labels_become_a_labels(resolver, zone_server):
    """RFC 5891 4.4: non-ASCII labels are looked up as A-labels."""
    assert resolver.mx("bücher.example") == [(10, "mx.xn--bcher-kva.example")]
    assert ("xn--bcher-kva.example.", "MX") in zone_server.queries
    assert mdns.to_ascii("Bücher.Example.") == "xn--bcher-kva.example"
    # implicit MX of an IDN domain: the A-label form, ready for addresses()
    assert resolver.route("Müller.example") == ["xn--mller-kva.example"]
    assert resolver.addresses("müller.example") == ["192.0.2.50"]
    assert ("xn--mller-kva.example.", "A") in zone_server.queries


def test_invalid_names_are_no_such_domain(resolver, zone_server):
    for name in ("a" * 64 + ".example", "a..example", "", "."):
        with pytest.raises(NoSuchDomain):
            resolver.mx(name)
    assert zone_server.queries == []


# --------------------------------------------------------------------------
# nameservers and ports

def test_nameserver_strings_with_ports():
    resolver = Resolver(("127.0.0.1", "127.0.0.2:5300", "[::1]:5301", "::1"))
    assert resolver.nameservers == ("127.0.0.1:53", "127.0.0.2:5300", "[::1]:5301", "[::1]:53")
    with pytest.raises(ValueError):
        Resolver(("not-an-ip:53",))


def test_dead_first_server_then_second_answers(zone_server):
    resolver = Resolver((f"127.0.0.1:{dead_port()}", zone_server.address), **FAST)
    start = time.monotonic()
    assert resolver.mx("example.com")[0] == (10, "mx1.example.com")
    assert time.monotonic() - start < 1.5
    assert zone_server.queries == [("example.com.", "MX")]


def test_servers_on_one_ip_with_different_ports_are_distinct(zone_server):
    """dnspython keys ports by IP; two servers on 127.0.0.1 must still both be asked."""
    with DNSServer({"example.com.": "SERVFAIL"}) as failing, \
            DNSServer({"example.com.": "TIMEOUT"}) as silent:
        resolver = Resolver((failing.address, silent.address, zone_server.address), **FAST)
        assert resolver.route("example.com") == ["mx1.example.com", "mx2.example.com"]
        assert failing.queries == [("example.com.", "MX")]
        assert silent.queries == [("example.com.", "MX")]
        assert zone_server.queries == [("example.com.", "MX")]


def test_nxdomain_from_first_server_is_final(zone_server):
    with DNSServer({}) as empty:
        resolver = Resolver((empty.address, zone_server.address), **FAST)
        with pytest.raises(NoSuchDomain):
            resolver.mx("example.com")
        assert zone_server.queries == []


def test_all_servers_dead_is_temporary():
    resolver = Resolver((f"127.0.0.1:{dead_port()}", f"127.0.0.1:{dead_port()}"),
                        timeout=0.1, lifetime=0.4)
    start = time.monotonic()
    with pytest.raises(TemporaryDNSError):
        resolver.addresses("example.com")
    assert time.monotonic() - start < 1.5  # two queries (A, AAAA), each bounded


def test_ipv6_nameserver():
    try:
        server = DNSServer(ZONE, host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert server.address.startswith("[::1]:")
        resolver = Resolver((server.address,), **FAST)
        assert resolver.mx("example.com")[0] == (10, "mx1.example.com")
        assert server.queries == [("example.com.", "MX")]
    finally:
        server.stop()


def test_set_zone_while_running(resolver, zone_server):
    assert resolver.addresses("implicit.example") == ["192.0.2.30", "2001:db8::30"]
    zone_server.set_zone({"implicit.example.": {"A": "192.0.2.31"}})
    assert resolver.addresses("implicit.example") == ["192.0.2.31"]  # no stale cache


def test_no_system_nameservers_is_temporary(monkeypatch):
    import dns.resolver

    def broken(*args, **kwargs):
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver, "Resolver", broken)
    resolver = Resolver()
    assert resolver.nameservers == ()
    with pytest.raises(TemporaryDNSError, match="no system nameservers"):
        resolver.mx("example.com")


# --------------------------------------------------------------------------
# dkimpy hook: dkim.verify(..., dnsfunc=resolver.dkim_dnsfunc)

@pytest.fixture(scope="module")
def rsa_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(public).decode("ascii")


MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
           b"Subject: hello\r\nMessage-ID: <1@example.com>\r\n\r\nHi Bob.\r\n")


def test_dkim_verify_through_our_server(zone_server, rsa_key):
    private, public = rsa_key
    zone_server.set_zone({
        **ZONE,
        "sel._domainkey.example.com.": {"TXT": [f"v=DKIM1; k=rsa; p={public}"]},
        "_domainkey.example.com.": {"TXT": ["o=~"]},
    })
    resolver = Resolver((zone_server.address,), **FAST)
    signed = dkim.sign(MESSAGE, b"sel", b"example.com", private) + MESSAGE
    assert dkim.verify(signed, dnsfunc=resolver.dkim_dnsfunc)
    assert ("sel._domainkey.example.com.", "TXT") in zone_server.queries
    # tampered body fails against the same key
    assert not dkim.verify(signed.replace(b"Hi Bob", b"Hi Eve"), dnsfunc=resolver.dkim_dnsfunc)


def test_dkim_dnsfunc_outcomes(resolver):
    assert resolver.dkim_dnsfunc(b"textonly.example.") == b"hello"
    assert resolver.dkim_dnsfunc("textonly.example.", timeout=1) == b"hello"
    assert resolver.dkim_dnsfunc(b"multi.example.") in (b"v=spf1 ip4:192.0.2.0/24 -all",
                                                        b"second record")
    assert resolver.dkim_dnsfunc(b"missing._domainkey.example.com.") is None  # NXDOMAIN
    assert resolver.dkim_dnsfunc(b"implicit.example.") is None                 # NODATA
    assert resolver.dkim_dnsfunc(b"\xff.example.") is None
    with pytest.raises(dkim.DnsTimeoutError):
        resolver.dkim_dnsfunc(b"sel._domainkey.servfail.example.")


def test_dkim_temporary_failure_does_not_verify(resolver, rsa_key):
    """dkimpy 1.1.4 swallows DnsTimeoutError (verify -> False); a caller that
    must report RFC 8601 dkim=temperror wraps the dnsfunc to see it."""
    private, _ = rsa_key
    signed = dkim.sign(MESSAGE, b"sel", b"servfail.example", private) + MESSAGE
    assert not dkim.verify(signed, dnsfunc=resolver.dkim_dnsfunc)

    temporary = []

    def dnsfunc(name, timeout=5):
        try:
            return resolver.dkim_dnsfunc(name, timeout=timeout)
        except dkim.DnsTimeoutError:
            temporary.append(name)
            raise

    assert not dkim.DKIM(signed).verify(dnsfunc=dnsfunc)
    assert temporary == [b"sel._domainkey.servfail.example."]


# --------------------------------------------------------------------------
# pyspf hook: resolver.spf_check2 / spf_query, or spf.DNSLookup = resolver.spf_lookup

def test_spf_check2_pass_through_our_server(resolver, zone_server):
    assert resolver.spf_check2(i="127.0.0.1", s="a@example.com", h="x")[0] == "pass"
    assert ("example.com.", "TXT") in zone_server.queries
    assert spf.DNSLookup is spf.DNSLookup_dnspython  # nothing patched process-wide


def test_spf_results(resolver, zone_server):
    assert resolver.spf_check2(i="192.0.2.1", s="a@spf-fail.example", h="x")[0] == "fail"
    assert resolver.spf_check2(i="192.0.2.99", s="a@spf-fail.example", h="x")[0] == "pass"
    assert resolver.spf_check2(i="192.0.2.1", s="a@spf-temp.example", h="x")[0] == "temperror"
    assert resolver.spf_check2(i="192.0.2.1", s="a@nonexistent.example", h="x")[0] == "none"
    # "mx" mechanism: MX lookup, then the exchanges' A records, all via our server
    zone_server.clear_queries()
    assert resolver.spf_check2(i="192.0.2.12", s="a@example.com", h="x")[0] == "pass"
    assert ("example.com.", "MX") in zone_server.queries
    assert ("mx2.example.com.", "A") in zone_server.queries


def test_spf_query_object(resolver):
    query = resolver.spf_query(i="127.0.0.1", s="a@example.com", h="mail.example.com")
    assert isinstance(query, spf.query)
    result, code, _ = query.check()
    assert (result, code) == ("pass", 250)


def test_spf_lookup_is_a_drop_in_dnslookup(resolver, zone_server, monkeypatch):
    assert sorted(resolver.spf_lookup("example.com", "MX")) == [
        (("example.com", "MX"), (10, "mx1.example.com")),
        (("example.com", "MX"), (20, "mx2.example.com")),
    ]
    assert sorted(resolver.spf_lookup("multi.example", "TXT")) == [
        (("multi.example", "TXT"), (b"second record",)),
        (("multi.example", "TXT"), (b"v=spf1 ", b"ip4:192.0.2.0/24 ", b"-all"))]
    assert resolver.spf_lookup("mx2.example.com", "AAAA") == [
        (("mx2.example.com", "AAAA"), "2001:db8::12")]
    assert resolver.spf_lookup("1.0.0.127.in-addr.arpa", "PTR") == [
        (("1.0.0.127.in-addr.arpa", "PTR"), "localhost")]
    assert resolver.spf_lookup("nonexistent.example", "TXT") == []
    with pytest.raises(spf.TempError):
        resolver.spf_lookup("servfail.example", "TXT")
    # the process-wide hook also works: plain spf.check2 then asks our server
    monkeypatch.setattr(spf, "DNSLookup", resolver.spf_lookup)
    zone_server.clear_queries()
    assert spf.check2(i="127.0.0.1", s="a@example.com", h="x")[0] == "pass"
    assert ("example.com.", "TXT") in zone_server.queries
