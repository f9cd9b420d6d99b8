"""Anti-abuse against the running daemon (issue 6): rate limits, black and
white lists, greylisting, DNSBL, SPF, DKIM, DMARC, Authentication-Results
and DKIM signing.

The daemon is a black box started by conftest's factories; the far side of
every DNS lookup is the loopback `DNSServer` from tests/support (real UDP and
TCP), the queue is read with `mta queue show`, the logs from the log
directory and the counters from `GET /api/metrics`. 127.0.0.1 is outside
`mynetworks` ("192.0.2.0/24") wherever inbound checks must apply; other
loopback addresses (127.0.0.2, ...) stand in for other clients. Signatures
made by the daemon are verified independently: dkimpy in-process, dkimpy's
`dkimverify` command and OpenDKIM's `opendkim-testmsg` (the two commands read
/etc/resolv.conf, port 53: they run in a private mount namespace whose
resolv.conf points at a port-53 relay to the test DNSServer).

Every test names the RFC section or the attack it checks.
"""

from __future__ import annotations

import base64
import ssl
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest

from conftest import (HOSTNAME, SMTPClosed as SMTPClosedError, SMTPConn, assert_reply, dot_stuff, make_message,
                      send_mail)
from support.dnsserver import DNSServer
from support.fixtures import dns_server  # noqa: F401  (fixture)

# dkimpy 1.1.4's own source warns when compiled on Python 3.11
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")

OUTSIDER = {"mynetworks": "192.0.2.0/24"}   # 127.0.0.1 is an ordinary Internet client
RCPT = "postmaster@example.com"              # always exists (RFC 5321 4.5.1)
ALICE, BOB = "alice@example.com", "bob@example.com"
PASSWORD = "Rate-limit-pw-1"


# --------------------------------------------------------------------------
# helpers

def write_policy(server, blacklist=None, whitelist=None) -> None:
    """policy.json in its documented format, replaced atomically.

    The daemon re-reads the file when its mtime changes; file timestamps
    move in kernel ticks (a few ms), so two writes in one tick would look
    like one. The short sleep keeps consecutive writes apart.
    """
    def lists(given):
        given = given or {}
        return {field: list(given.get(field, [])) for field in ("ip", "sender", "domain")}

    data_dir = Path(server.config["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    time.sleep(0.02)
    tmp = data_dir / "policy.json.test-tmp"
    tmp.write_text(json.dumps({"version": 1, "blacklist": lists(blacklist), "whitelist": lists(whitelist)}))
    os.replace(tmp, data_dir / "policy.json")


def deliver(conn: SMTPConn, sender: str, rcpt: str = RCPT, message: bytes | None = None):
    """MAIL/RCPT/DATA; returns the first refusal or the end-of-data reply."""
    r = conn.cmd(f"MAIL FROM:<{sender}>")
    if r.code != 250:
        return r
    r = conn.cmd(f"RCPT TO:<{rcpt}>")
    if r.code != 250:
        conn.cmd("RSET")
        return r
    r = conn.cmd("DATA")
    assert_reply(r, 354)
    message = message or make_message("anti-abuse", "Hello.\r\n", sender=sender or "nobody@nowhere.test", to=rcpt)
    conn.send(dot_stuff(message) + b".\r\n")
    return conn.reply(timeout=30)


def send_one(server, sender: str, rcpt: str = RCPT, message: bytes | None = None,
             source: str | None = None, helo: str = "client.example.org"):
    with SMTPConn(server.port, source=source) as conn:
        conn.start(helo)
        reply = deliver(conn, sender, rcpt, message)
        conn.cmd("QUIT")
    return reply


def submission(server, user: str, password: str, source: str | None = None) -> SMTPConn:
    """Port 587 (RFC 6409): EHLO, STARTTLS (RFC 3207), EHLO, AUTH PLAIN (RFC 4954)."""

    conn = SMTPConn(server.submission_port, source=source)
    conn.start()
    assert_reply(conn.cmd("STARTTLS"), 220)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn.sock = context.wrap_socket(conn.sock, server_hostname=HOSTNAME)
    conn.ehlo()
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    assert_reply(conn.cmd(f"AUTH PLAIN {blob}"), 235)
    return conn


def metric(server, name: str, **labels) -> float:
    """One sample of GET /api/metrics (0 when the series is absent)."""
    url = f"http://127.0.0.1:{server.config['port_admin']}/api/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def header_fields(text: str) -> list[tuple[str, str]]:
    """(name, unfolded value) of the header section of `mta queue show` output."""
    head = text.replace("\r\n", "\n").split("\n\n", 1)[0]
    fields: list[str] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += " " + line.strip()
        else:
            fields.append(line)
    return [(n.strip(), v.strip()) for n, _, v in (f.partition(":") for f in fields)]


def authres(text: str) -> list[str]:
    return [v for n, v in header_fields(text) if n.lower() == "authentication-results"]


def _strip_comments(value: str) -> str:
    """Leading CFWS comments of an A-R value (RFC 8601 2.2: [CFWS] authserv-id)."""
    return re.sub(r"^\s*(\([^)]*\)\s*)*", "", value)


def ours(text: str) -> str:
    """Our one Authentication-Results header (RFC 8601), asserted unique."""
    mine = [v for v in authres(text) if re.split(r"[;\s]", _strip_comments(v), 1)[0].lower() == HOSTNAME]
    assert len(mine) == 1, f"expected exactly one A-R from {HOSTNAME}, got {authres(text)}"
    return mine[0]


def results(value: str) -> dict[str, str]:
    """method -> "result props" of one A-R value ("id; spf=pass smtp.mailfrom=x; ...")."""
    out = {}
    for part in value.split(";")[1:]:
        part = part.strip()
        method, _, rest = part.partition("=")
        out[method.strip()] = rest.strip()
    return out


def received_spf(text: str) -> list[str]:
    return [v for n, v in header_fields(text) if n.lower() == "received-spf"]


def rsa_key() -> tuple[bytes, str]:
    """(private PEM, public p= value) of a fresh RSA-2048 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode("ascii")


def dkim_sign(message: bytes, selector: str, domain: str, pem: bytes) -> bytes:
    import dkim
    signature = dkim.sign(message, selector.encode(), domain.encode(), pem,
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject", b"message-id"])
    return signature + message


def txt_dnsfunc(server: DNSServer):
    """dkimpy's dnsfunc, asking the test DNSServer (UDP, TCP when truncated)."""
    def lookup(name, timeout=5):
        qname = name.decode() if isinstance(name, bytes) else name
        query = dns.message.make_query(qname, dns.rdatatype.TXT)
        response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=timeout)
        if response.flags & dns.flags.TC:
            response = dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=timeout)
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None
    return lookup


# --------------------------------------------------------------------------
# rate limits (INTERFACE.md: N per hour is a bucket of N tokens, N+1 gets 450 4.7.1)

def test_rate_limit_per_ip_and_domain_whitelist_exempt(mta_factory):
    """Token buckets per client IP and per sender domain: the message over the
    limit gets 450 4.7.1 (RFC 3463 4.7.1, a temporary policy refusal), logged
    with its reason and counted; a whitelisted client is exempt."""
    s = mta_factory({**OUTSIDER, "rate_limit_ip": 3, "rate_limit_domain": 2})
    before = metric(s, "mta_messages_rejected_total", reason="ratelimit")

    # per IP: three messages from 127.0.0.1 (three sender domains), the fourth MAIL is refused
    with s.session() as c:
        for n in range(3):
            assert_reply(deliver(c, f"user@ip{n}.example"), 250, "2.0.0")
        r = c.cmd("MAIL FROM:<user@ip3.example>")
        assert_reply(r, 450, "4.7.1")
        assert "ip" in r.text, str(r)
    # the bucket belongs to the IP: another client still sends
    assert_reply(send_one(s, "user@ip4.example", source="127.0.0.2"), 250, "2.0.0")

    # per sender domain: two messages from two clients, the third (a third client) is refused
    assert_reply(send_one(s, "a@dom.example", source="127.0.0.4"), 250, "2.0.0")
    assert_reply(send_one(s, "b@dom.example", source="127.0.0.5"), 250, "2.0.0")
    r = send_one(s, "c@dom.example", source="127.0.0.6")
    assert_reply(r, 450, "4.7.1")
    assert "domain" in r.text and "dom.example" in r.text, str(r)
    assert_reply(send_one(s, "c@other-dom.example", source="127.0.0.6"), 250, "2.0.0")

    # whitelisted client: skips rate limits (five messages, one sender domain)
    write_policy(s, whitelist={"ip": ["127.0.0.7"]})
    with SMTPConn(s.port, source="127.0.0.7") as c:
        c.start()
        for n in range(5):
            assert_reply(deliver(c, f"w{n}@white.example"), 250, "2.0.0")   # over both limits

    log = s.log_text()
    assert re.search(r"reject: MAIL from \S*\[127\.0\.0\.1\]: 450 4\.7\.1 .*rate limit.*\bip\b", log), log[-3000:]
    assert re.search(r"reject: MAIL .*450 4\.7\.1 .*rate limit.*domain dom\.example", log), log[-3000:]
    assert metric(s, "mta_messages_rejected_total", reason="ratelimit") == before + 2


def test_rate_limit_per_authenticated_user(mta_factory):
    """Per-user bucket on submission (RFC 6409 + RFC 4954 AUTH under STARTTLS):
    user N+1 gets 450 4.7.1 from any IP, another user of the same domain is not affected."""
    s = mta_factory({"rate_limit_user": 2}, users={ALICE: PASSWORD, BOB: PASSWORD})
    with submission(s, user=ALICE, password=PASSWORD) as c:
        for _ in range(2):
            assert_reply(deliver(c, ALICE, "someone@remote.example"), 250, "2.0.0")
        r = c.cmd(f"MAIL FROM:<{ALICE}>")
        assert_reply(r, 450, "4.7.1")
        assert "user" in r.text and ALICE in r.text, str(r)
    with submission(s, user=ALICE, password=PASSWORD, source="127.0.0.2") as c:
        assert_reply(c.cmd(f"MAIL FROM:<{ALICE}>"), 450, "4.7.1")
    with submission(s, user=BOB, password=PASSWORD) as c:
        assert_reply(deliver(c, BOB, "someone@remote.example"), 250, "2.0.0")
    assert re.search(r"reject: MAIL .*450 4\.7\.1 .*rate limit.*user alice@example\.com", s.log_text())


# --------------------------------------------------------------------------
# black and white lists (policy.json)

@pytest.fixture(scope="module")
def lists_mta(module_mta_factory):
    return module_mta_factory({**OUTSIDER}, name="lists")


LIST_CASES = [
    # (id, blacklist, whitelist, client source, sender, expected code)
    ("ip", {"ip": ["127.0.0.1"]}, {}, None, "a@good.example", 554),
    ("ip-other-client", {"ip": ["127.0.0.1"]}, {}, "127.0.0.2", "a@good.example", 250),
    ("cidr-v4", {"ip": ["127.0.0.0/8"]}, {}, "127.0.0.9", "a@good.example", 554),
    ("cidr-v4-outside", {"ip": ["127.0.0.0/30"]}, {}, "127.0.0.9", "a@good.example", 250),
    ("ipv6-entry-not-v4", {"ip": ["::1", "::/0", "2001:db8::/32"]}, {}, None, "a@good.example", 250),
    ("sender", {"sender": ["spam@bad.example"]}, {}, None, "spam@bad.example", 554),
    ("sender-case-insensitive", {"sender": ["spam@bad.example"]}, {}, None, "SPAM@Bad.Example", 554),
    ("sender-other-address", {"sender": ["spam@bad.example"]}, {}, None, "ham@bad.example", 250),
    ("domain", {"domain": ["bad.example"]}, {}, None, "x@bad.example", 554),
    ("domain-subdomain", {"domain": ["bad.example"]}, {}, None, "x@mail.bad.example", 554),
    ("domain-not-suffix-match", {"domain": ["bad.example"]}, {}, None, "x@notbad.example", 250),
    ("null-sender-vs-domain-list", {"domain": ["bad.example"]}, {}, None, "", 250),
    ("null-sender-blacklisted-ip", {"ip": ["127.0.0.1"]}, {}, None, "", 554),
    ("whitelist-sender-beats-ip", {"ip": ["127.0.0.0/8"]}, {"sender": ["vip@good.example"]}, None,
     "vip@good.example", 250),
    ("whitelist-ip-beats-domain", {"domain": ["bad.example"]}, {"ip": ["127.0.0.1"]}, None, "x@bad.example", 250),
    ("whitelist-domain-beats-sender", {"sender": ["x@good.example"]}, {"domain": ["good.example"]}, None,
     "x@good.example", 250),
]


@pytest.mark.parametrize("blacklist, whitelist, source, sender, code",
                         [c[1:] for c in LIST_CASES], ids=[c[0] for c in LIST_CASES])
def test_black_and_white_lists(lists_mta, blacklist, whitelist, source, sender, code):
    """Access lists at MAIL (Postfix check_client_access/check_sender_access):
    IP, IPv4 CIDR, sender address, sender domain and subdomains -> 554 5.7.1;
    an IPv6 entry never matches an IPv4 client; a whitelist entry wins."""
    write_policy(lists_mta, blacklist, whitelist)
    with SMTPConn(lists_mta.port, source=source) as c:
        c.start()
        r = c.cmd(f"MAIL FROM:<{sender}>")
        assert_reply(r, code, "5.7.1" if code == 554 else "2.1.0")
        c.cmd("QUIT")


def test_list_change_applies_in_open_session(lists_mta):
    """policy.json edits take effect on the next MAIL of an already open session
    (no restart, no SIGHUP), and the refusal is logged and counted."""
    write_policy(lists_mta)
    before = metric(lists_mta, "mta_messages_rejected_total", reason="blacklist")
    with lists_mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<x@later-bad.example>"), 250)
        assert_reply(c.cmd("RSET"), 250)
        write_policy(lists_mta, blacklist={"domain": ["later-bad.example"]})
        assert_reply(c.cmd("MAIL FROM:<x@later-bad.example>"), 554, "5.7.1")
        write_policy(lists_mta)
        assert_reply(c.cmd("MAIL FROM:<x@later-bad.example>"), 250)
        c.cmd("QUIT")
    assert metric(lists_mta, "mta_messages_rejected_total", reason="blacklist") == before + 1
    assert re.search(r"reject: MAIL from .*554 5\.7\.1 <x@later-bad\.example>", lists_mta.log_text())


def test_damaged_policy_file_does_not_break_sessions(mta_factory):
    """An operator's typo in policy.json must not cost a dropped session or a
    traceback: the daemon answers MAIL (keeping the last good lists, or 4xx)."""
    s = mta_factory({**OUTSIDER})
    write_policy(s, blacklist={"ip": ["127.0.0.1"]})
    with s.session() as c:
        assert_reply(c.cmd("MAIL FROM:<a@good.example>"), 554, "5.7.1")
        c.cmd("QUIT")
    time.sleep(0.02)
    Path(s.config["data_dir"], "policy.json").write_text('{"version": 1, "blacklist": {"ip": [')
    with s.session() as c:
        try:
            r = c.cmd("MAIL FROM:<a@good.example>")
        except SMTPClosedError:
            pytest.fail("the session was dropped without a reply (damaged policy.json)\n" + s.log_text()[-2000:])
        assert r.code in (554, 451, 450), f"expected the last good list (554) or 4xx, got {r}"
        c.cmd("QUIT")


# --------------------------------------------------------------------------
# greylisting

def _rcpt(server, sender: str, rcpt: str, source: str | None = None):
    with SMTPConn(server.port, source=source) as c:
        c.start()
        assert_reply(c.cmd(f"MAIL FROM:<{sender}>"), 250)
        r = c.cmd(f"RCPT TO:<{rcpt}>")
        c.cmd("QUIT")
    return r


def test_greylisting_triplets_over_time(mta_factory):
    """Greylisting (RFC 6647 2.1, 4.1): a new (client /24, sender, recipient)
    triplet gets 451 4.7.1; an early retry is still deferred (and does not
    restart the clock); after the delay it passes and is remembered; each
    recipient is its own triplet; whitelisted clients and senders skip it."""
    s = mta_factory({**OUTSIDER, "greylist_enabled": True, "greylist_delay": 2})
    before = metric(s, "mta_messages_rejected_total", reason="greylist")
    t0 = time.monotonic()
    assert_reply(_rcpt(s, "grey@sender.example", RCPT), 451, "4.7.1")
    time.sleep(1.0)
    assert_reply(_rcpt(s, "grey@sender.example", RCPT), 451, "4.7.1")
    time.sleep(max(0.0, t0 + 2.3 - time.monotonic()))
    assert_reply(send_one(s, "grey@sender.example"), 250, "2.0.0")
    # the passed triplet passes at once, also from another host of the same /24
    assert_reply(_rcpt(s, "grey@sender.example", RCPT, source="127.0.0.2"), 250, "2.1.5")
    # another recipient is another triplet
    assert_reply(_rcpt(s, "grey@sender.example", "info@example.com"), 451, "4.7.1")
    # whitelisted client / sender: no greylisting
    write_policy(s, whitelist={"ip": ["10.0.0.0/8", "127.0.0.3"], "sender": ["friend@white.example"]})
    assert_reply(_rcpt(s, "new@sender.example", "abuse@example.com", source="127.0.0.3"), 250, "2.1.5")
    assert_reply(_rcpt(s, "friend@white.example", "abuse@example.com"), 250, "2.1.5")
    assert metric(s, "mta_messages_rejected_total", reason="greylist") == before + 3
    assert "greylisted" in s.log_text()


def test_greylisting_state_survives_restart(mta_factory):
    """Greylist state is persisted (data_dir/greylist.json): after a restart a
    passed triplet passes at once and a pending one passes once its delay is
    over, instead of greylisting every sender again (RFC 6647 5)."""
    s = mta_factory({**OUTSIDER, "greylist_enabled": True, "greylist_delay": 1})
    assert_reply(_rcpt(s, "a@sender.example", RCPT), 451, "4.7.1")
    time.sleep(1.2)
    assert_reply(_rcpt(s, "a@sender.example", RCPT), 250, "2.1.5")
    assert_reply(_rcpt(s, "b@sender.example", RCPT), 451, "4.7.1")   # pending
    t_pending = time.monotonic()
    s.restart()
    assert Path(s.config["data_dir"], "greylist.json").exists()
    time.sleep(max(0.0, t_pending + 1.2 - time.monotonic()))
    assert_reply(_rcpt(s, "a@sender.example", RCPT), 250, "2.1.5")
    assert_reply(_rcpt(s, "b@sender.example", RCPT), 250, "2.1.5")
    assert_reply(_rcpt(s, "c@sender.example", RCPT), 451, "4.7.1")


# --------------------------------------------------------------------------
# DNSBL (RFC 5782) at connect

def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


V6_NAME = ".".join(reversed("0" * 31 + "1"))   # ::1 in nibble form (RFC 5782 2.4)


@pytest.fixture
def rbl_mta(mta_factory, dns_server):
    dns_server.set_zone({
        "2.0.0.127.bl.test.": {"A": "127.0.0.2", "TXT": "listed for spam"},
        "3.0.0.127.bl.test.": "SERVFAIL",
        "4.0.0.127.bl.test.": "TIMEOUT",
        "5.0.0.127.bl.test.": {"A": "127.0.0.2"},
        "6.0.0.127.bl.test.": {"A": "127.255.255.254"},   # a list's "query refused" code, not a listing
        f"{V6_NAME}.bl.test.": {"A": "127.0.0.2"},
    })
    listen = "127.0.0.1,::1" if _ipv6_loopback() else "127.0.0.1"
    return mta_factory({**OUTSIDER, "rbl_enabled": True, "rbl_zones": "bl.test",
                        "dns_nameservers": dns_server.address, "listen_address": listen})


def _assert_blocked_session(server, dns, conn: SMTPConn) -> None:
    """RFC 5321 3.1: after a 554 greeting, 503 to every command but QUIT."""
    try:
        greeting = conn.banner()
        assert_reply(greeting, 554, "5.7.1")
        assert "bl.test" in greeting.text, str(greeting)
        for command in ("EHLO client.example.org", "HELO client.example.org", "MAIL FROM:<a@b.example>",
                        f"RCPT TO:<{RCPT}>", "DATA", "RSET", "NOOP", "STARTTLS"):
            assert_reply(conn.cmd(command), 503, "5.5.1")
        assert_reply(conn.cmd("QUIT"), 221)
        assert conn.is_closed(5), "still open after QUIT"
    except (AssertionError, OSError, SMTPClosedError) as error:
        raise AssertionError(f"{error}\ntranscript: {conn.transcript}\nDNS log: {dns.log}\n"
                             + server.diagnostics()) from error


def test_rbl_listed_client_gets_554_greeting(rbl_mta, dns_server):
    """A client listed in the DNSBL (reversed-octet query, RFC 5782 2.1) gets a
    554 5.7.1 greeting naming the zone, then 503 5.5.1 to everything but QUIT
    (RFC 5321 3.1); the refusal is logged and counted. An IPv6 client is
    looked up by reversed nibbles (RFC 5782 2.4)."""
    before = metric(rbl_mta, "mta_messages_rejected_total", reason="rbl")
    with SMTPConn(rbl_mta.port, source="127.0.0.2") as c:
        _assert_blocked_session(rbl_mta, dns_server, c)
    assert ("2.0.0.127.bl.test.", "A") in dns_server.queries
    log = rbl_mta.log_text()
    assert re.search(r"reject: CONNECT from \S*\[127\.0\.0\.2\]: 554 5\.7\.1 .*bl\.test", log), log[-3000:]
    after = metric(rbl_mta, "mta_messages_rejected_total", reason="rbl")
    assert after == before + 1, (before, after)
    if "::1" in rbl_mta.config["listen_address"]:
        with SMTPConn(rbl_mta.port, host="::1") as c:
            _assert_blocked_session(rbl_mta, dns_server, c)
        assert (f"{V6_NAME}.bl.test.", "A") in dns_server.queries


def test_rbl_unlisted_failing_or_whitelisted_clients_get_220(rbl_mta, dns_server):
    """Not listed (NXDOMAIN), a list's error code (127.255.255.x), a SERVFAIL
    zone: normal 220 (RFC 5782 5: DNS trouble never blocks mail); a
    whitelisted client is not even looked up."""
    write_policy(rbl_mta, whitelist={"ip": ["127.0.0.5"]})
    for source in ("127.0.0.1", "127.0.0.6", "127.0.0.3", "127.0.0.5"):
        started = time.monotonic()
        with SMTPConn(rbl_mta.port, source=source) as c:
            c.start()
            assert_reply(c.cmd("MAIL FROM:<a@b.example>"), 250)
            c.cmd("QUIT")
        assert time.monotonic() - started < 3, f"{source}: greeting took {time.monotonic() - started:.1f}s"
    assert ("5.0.0.127.bl.test.", "A") not in dns_server.queries


def test_rbl_timeout_does_not_block(rbl_mta, dns_server):
    """A DNSBL that never answers costs at most the resolver's lifetime, then
    the normal 220 greeting (RFC 5782 5)."""
    started = time.monotonic()
    with SMTPConn(rbl_mta.port, source="127.0.0.4", timeout=25) as c:
        greeting = c.banner()
        elapsed = time.monotonic() - started
        assert_reply(greeting, 220)
        c.cmd("QUIT")
    assert ("4.0.0.127.bl.test.", "A") in dns_server.queries
    assert elapsed < 15, f"greeting after {elapsed:.1f}s"


# --------------------------------------------------------------------------
# SPF, DKIM verification, DMARC, Authentication-Results: two shared daemons

@pytest.fixture(scope="module")
def signer_key():
    return rsa_key()


@pytest.fixture(scope="module")
def auth_dns(signer_key):
    _, public = signer_key
    spf_pass = "v=spf1 ip4:127.0.0.1 -all"
    zone = {
        "pass.test.": {"TXT": spf_pass},
        "fail.test.": {"TXT": "v=spf1 -all"},
        "soft.test.": {"TXT": "v=spf1 ~all"},
        "broken.test.": "SERVFAIL",
        "helo.test.": {"TXT": spf_pass},
        "badhelo.test.": {"TXT": "v=spf1 -all"},
        "signer.test.": {"TXT": "v=spf1 -all"},
        "sel._domainkey.signer.test.": {"TXT": f"v=DKIM1; k=rsa; p={public}"},
        "_dmarc.signer.test.": {"TXT": "v=DMARC1; p=reject"},
        "spfonly.test.": {"TXT": spf_pass},
        "_dmarc.spfonly.test.": {"TXT": "v=DMARC1; p=reject"},
        # organizational domains under a multi-label public suffix (PSL)
        "_dmarc.shop.co.uk.": {"TXT": "v=DMARC1; p=none; sp=reject"},
        "_dmarc.nosp.co.uk.": {"TXT": "v=DMARC1; p=reject"},
    }
    with DNSServer(zone) as server:
        yield server
    assert not server.errors, server.errors


AUTH_CHECKS = {"spf_enabled": True, "dkim_enabled": True, "dmarc_enabled": True}


@pytest.fixture(scope="module")
def inbound_mta(module_mta_factory, auth_dns):
    """Inbound checks that only record (spf_reject_fail and dmarc_enforce off)."""
    return module_mta_factory({**OUTSIDER, **AUTH_CHECKS, "spf_reject_fail": False, "dmarc_enforce": False,
                               "dns_nameservers": auth_dns.address}, name="inbound")


@pytest.fixture(scope="module")
def strict_mta(module_mta_factory, auth_dns):
    """Inbound checks that refuse (spf_reject_fail and dmarc_enforce on)."""
    return module_mta_factory({**OUTSIDER, **AUTH_CHECKS, "spf_reject_fail": True, "dmarc_enforce": True,
                               "dns_nameservers": auth_dns.address}, name="strict")


def queued_text(server, reply) -> str:
    assert_reply(reply, 250, "2.0.0")
    assert reply.queue_id, str(reply)
    return server.queue_show(reply.queue_id)


SPF_CASES = [
    # (id, MAIL FROM, HELO, expected result, A-R property)
    ("pass", "user@pass.test", "client.example.org", "pass", "smtp.mailfrom=user@pass.test"),
    ("fail-recorded", "user@fail.test", "client.example.org", "fail", "smtp.mailfrom=user@fail.test"),
    ("softfail", "user@soft.test", "client.example.org", "softfail", "smtp.mailfrom=user@soft.test"),
    ("temperror-servfail", "user@broken.test", "client.example.org", "temperror", "smtp.mailfrom=user@broken.test"),
    ("null-sender-helo", "", "helo.test", "pass", "smtp.helo=helo.test"),
]


@pytest.mark.parametrize("sender, helo, result, prop", [c[1:] for c in SPF_CASES], ids=[c[0] for c in SPF_CASES])
def test_spf_results_recorded(inbound_mta, sender, helo, result, prop):
    """SPF (RFC 7208) at MAIL FROM, or the HELO identity for the null sender
    (2.4): the result is in Received-SPF (9.1) and in our Authentication-Results
    (RFC 8601 2.7.2); temperror (SERVFAIL) and, when not enforced, fail never
    stop the mail."""
    message = make_message(f"spf {result}", "Hello.\r\n", sender=sender or "daemon@helo.test")
    text = queued_text(inbound_mta, send_one(inbound_mta, sender, message=message, helo=helo))
    spf = results(ours(text)).get("spf", "")
    assert spf.split()[0] == result and prop in spf, ours(text)
    headers = received_spf(text)
    assert len(headers) == 1 and headers[0].split()[0] == result, headers
    assert "client-ip=127.0.0.1" in headers[0]
    assert ("identity=helo" if not sender else "identity=mailfrom") in headers[0], headers


def test_spf_fail_rejected_at_mail(strict_mta):
    """SPF fail with spf_reject_fail: 550 5.7.23 at MAIL FROM (RFC 7208 8.4,
    RFC 7372 3.2), also for the null sender's HELO identity; counted."""
    before = metric(strict_mta, "mta_messages_rejected_total", reason="spf")
    with strict_mta.session() as c:
        assert_reply(c.cmd("MAIL FROM:<user@fail.test>"), 550, "5.7.23")
        assert_reply(c.cmd("MAIL FROM:<user@pass.test>"), 250)
        c.cmd("QUIT")
    with SMTPConn(strict_mta.port) as c:
        c.start("badhelo.test")
        assert_reply(c.cmd("MAIL FROM:<>"), 550, "5.7.23")
        c.cmd("QUIT")
    assert metric(strict_mta, "mta_messages_rejected_total", reason="spf") == before + 2


def _signer_message(subject: str, sender: str = "user@signer.test", body: str = "Signed body.\r\n") -> bytes:
    return make_message(subject, body, sender=sender)


def test_dkim_verification(inbound_mta, signer_key):
    """DKIM (RFC 6376 6): a good signature is dkim=pass header.d=signer.test;
    a body changed in transit is dkim=fail (body hash, 3.7); no signature is
    dkim=none (RFC 8601 2.7.1)."""
    pem, _ = signer_key
    good = dkim_sign(_signer_message("dkim good"), "sel", "signer.test", pem)
    text = queued_text(inbound_mta, send_one(inbound_mta, "bounce@pass.test", message=good))
    dkim_result = results(ours(text))["dkim"]
    assert dkim_result.startswith("pass") and "header.d=signer.test" in dkim_result, ours(text)

    tampered = dkim_sign(_signer_message("dkim bad"), "sel", "signer.test", pem).replace(
        b"Signed body.", b"Signed b0dy.")
    text = queued_text(inbound_mta, send_one(inbound_mta, "bounce@pass.test", message=tampered))
    assert results(ours(text))["dkim"].startswith("fail"), ours(text)

    text = queued_text(inbound_mta, send_one(inbound_mta, "bounce@pass.test",
                                             message=_signer_message("dkim none")))
    assert results(ours(text))["dkim"].startswith("none"), ours(text)


def test_dmarc_recorded_when_not_enforced(inbound_mta, signer_key):
    """DMARC (RFC 7489 6.6): From: signer.test with unaligned SPF (pass.test)
    and no DKIM fails; with dmarc_enforce off it is accepted and recorded as
    dmarc=fail with the policy; an aligned DKIM pass is dmarc=pass."""
    text = queued_text(inbound_mta, send_one(inbound_mta, "bounce@pass.test",
                                             message=_signer_message("dmarc fail")))
    dmarc = results(ours(text))["dmarc"]
    assert dmarc.startswith("fail") and "p=reject" in dmarc and "header.from=signer.test" in dmarc, dmarc
    assert results(ours(text))["spf"].startswith("pass")   # SPF passed, but for pass.test: not aligned

    pem, _ = signer_key
    signed = dkim_sign(_signer_message("dmarc pass"), "sel", "signer.test", pem)
    text = queued_text(inbound_mta, send_one(inbound_mta, "bounce@pass.test", message=signed))
    assert results(ours(text))["dmarc"].startswith("pass"), ours(text)


def test_dmarc_reject_enforced(strict_mta, signer_key, queue_unchanged):
    """DMARC p=reject (RFC 7489 6.7, 10.3) with dmarc_enforce: a From: domain
    failing both SPF and DKIM alignment gets 550 5.7.1 at end of data and
    nothing is queued; aligned DKIM (relaxed, a From subdomain too) or aligned
    SPF passes."""
    before = metric(strict_mta, "mta_messages_rejected_total", reason="dmarc")
    with queue_unchanged(strict_mta):
        r = send_one(strict_mta, "bounce@pass.test", message=_signer_message("dmarc reject"))
        assert_reply(r, 550, "5.7.1")
        assert "signer.test" in r.text, str(r)
    assert metric(strict_mta, "mta_messages_rejected_total", reason="dmarc") == before + 1

    pem, _ = signer_key
    signed = dkim_sign(_signer_message("dmarc dkim aligned"), "sel", "signer.test", pem)
    assert results(ours(queued_text(strict_mta, send_one(strict_mta, "bounce@pass.test", message=signed)))
                   )["dmarc"].startswith("pass")
    relaxed = dkim_sign(_signer_message("dmarc relaxed", sender="news@mail.signer.test"), "sel", "signer.test", pem)
    assert_reply(send_one(strict_mta, "bounce@pass.test", message=relaxed), 250, "2.0.0")
    spf_aligned = make_message("dmarc spf aligned", "Hi.\r\n", sender="user@spfonly.test")
    assert_reply(send_one(strict_mta, "user@spfonly.test", message=spf_aligned), 250, "2.0.0")


def test_dmarc_organizational_domain_and_sp(strict_mta):
    """RFC 7489 6.6.3: without a record at the From domain, the organizational
    domain's (Public Suffix List: shop.co.uk, not co.uk) applies, with sp=
    for subdomains (6.3) and p= when there is no sp=."""
    psl = Path("/usr/share/publicsuffix/public_suffix_list.dat")
    if not psl.exists():
        pytest.skip("Debian package publicsuffix is not installed")
    r = send_one(strict_mta, "bounce@pass.test", message=make_message("sp reject", "x\r\n", sender="a@mail.shop.co.uk"))
    assert_reply(r, 550, "5.7.1")
    r = send_one(strict_mta, "bounce@pass.test", message=make_message("p none", "x\r\n", sender="a@shop.co.uk"))
    dmarc = results(ours(queued_text(strict_mta, r)))["dmarc"]
    assert dmarc.startswith("fail") and "p=none" in dmarc, dmarc
    r = send_one(strict_mta, "bounce@pass.test", message=make_message("p inherit", "x\r\n", sender="a@mail.nosp.co.uk"))
    assert_reply(r, 550, "5.7.1")


@pytest.mark.parametrize("forged", [
    "Authentication-Results: mx.test.example; dkim=pass header.d=signer.test",
    "Authentication-Results: MX.Test.Example; spf=pass smtp.mailfrom=user@signer.test",
    "Authentication-Results: mx.test.example 1; dmarc=pass header.from=signer.test",
    "Authentication-Results:\r\n\tmx.test.example;\r\n\tdkim=pass header.d=signer.test",
    "Authentication-Results: (checked) mx.test.example; dkim=pass header.d=signer.test",
], ids=["plain", "case", "version", "folded", "comment"])
def test_authentication_results_forgery_removed(inbound_mta, forged):
    """RFC 8601 5: A-R headers claiming our authserv-id (MTA_HOSTNAME) that
    arrive from outside are forgeries and are removed, however written; A-R
    of other ADMDs are kept; we add exactly one of our own."""
    foreign = "Authentication-Results: other.example; spf=fail smtp.mailfrom=x@other.example"
    message = make_message("forged A-R", "Hello.\r\n", sender="user@pass.test",
                           extra_headers=f"{forged}\r\n{foreign}\r\n")
    text = queued_text(inbound_mta, send_one(inbound_mta, "user@pass.test", message=message))
    mine = ours(text)   # exactly one claims our id
    assert "header.d=signer.test" not in mine and "signer.test" not in mine, mine
    assert [v for v in authres(text) if v.startswith("other.example")] == \
        ["other.example; spf=fail smtp.mailfrom=x@other.example"], authres(text)
    assert len(authres(text)) == 2, authres(text)


# --------------------------------------------------------------------------
# DKIM signing (RFC 6376, RFC 8463), verified by independent implementations

class Port53Relay:
    """UDP and TCP on HOST:53, relayed to the test DNSServer: glibc's resolver
    (used by libopendkim) and dnspython's default resolver (used by
    `dkimverify`) only ask port 53 of the servers in /etc/resolv.conf."""

    def __init__(self, target_port: int, host: str = "127.0.53.1"):
        self.host, self.target = host, ("127.0.0.1", target_port)
        self.stop_event = threading.Event()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.udp.bind((host, 53))
            self.tcp.bind((host, 53))
            self.tcp.listen(8)
        except OSError:
            self.close()
            raise
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._udp_loop, self._tcp_loop)]
        for thread in self.threads:
            thread.start()

    def _udp_loop(self):
        while not self.stop_event.is_set():
            try:
                data, peer = self.udp.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                up.settimeout(3)
                try:
                    up.sendto(data, self.target)
                    self.udp.sendto(up.recv(65535), peer)
                except OSError:
                    pass

    @staticmethod
    def _read_exact(sock, n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _tcp_loop(self):
        while not self.stop_event.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (socket.timeout, OSError):
                continue
            try:
                with conn, socket.create_connection(self.target, timeout=3) as up:
                    conn.settimeout(3)
                    while True:
                        length = self._read_exact(conn, 2)
                        up.sendall(length + self._read_exact(conn, int.from_bytes(length, "big")))
                        length = self._read_exact(up, 2)
                        conn.sendall(length + self._read_exact(up, int.from_bytes(length, "big")))
            except (EOFError, OSError):
                pass

    def close(self):
        self.stop_event.set()
        for sock in (self.udp, self.tcp):
            sock.close()


def _can_use_mount_namespace() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def system_resolver(dns_server, tmp_path):
    """run(args, input) runs a command whose /etc/resolv.conf points at dns_server."""
    if not _can_use_mount_namespace():
        pytest.skip("needs root and unshare(1) to give a tool its own /etc/resolv.conf")
    relay = None
    for last in range(1, 20):
        try:
            relay = Port53Relay(dns_server.port, host=f"127.0.53.{last}")
            break
        except OSError:
            continue
    if relay is None:
        pytest.skip("no free 127.0.53.x:53 for the DNS relay")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {relay.host}\noptions timeout:2 attempts:2\n")
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'

    def run(args, input: bytes):
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                               str(resolv), *args], input=input, capture_output=True, timeout=30)

    yield run
    relay.close()


def _publish_keygen_record(server, dns_server, domain: str, selector: str, *algorithm: str) -> str:
    p = server.cli("dkim", "keygen", "--domain", domain, "--selector", selector, *algorithm)
    assert p.returncode == 0, p.stderr
    record = "".join(re.findall(r'"([^"]*)"', p.stdout))
    assert p.stdout.startswith(f"{selector}._domainkey.{domain}.") and "p=" in record, p.stdout
    dns_server.set_zone({f"{selector}._domainkey.{domain}.": {"TXT": record}})
    return record


def _signed_from_queue(server, sender: str = ALICE) -> bytes:
    message = make_message("signed by mta", "Line one.\r\n\r\n  spaced   line  \r\n", sender=sender,
                           to="bob@remote.example", extra_headers="Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n")
    with server.session() as c:   # 127.0.0.1 is in mynetworks: outbound mail
        r = send_mail(c, sender, ["bob@remote.example"], message)
        c.cmd("QUIT")
    assert_reply(r, 250, "2.0.0")
    text = server.queue_show(r.queue_id)
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def _dkim_tags(message: bytes) -> dict[str, str]:
    fields = header_fields(message.decode("utf-8"))
    signatures = [v for n, v in fields if n.lower() == "dkim-signature"]
    assert len(signatures) == 1, signatures
    return {k.strip(): "".join(v.split()) for k, _, v in (p.partition("=") for p in signatures[0].split(";")) if k.strip()}


def _verify_independently(message: bytes, dns_server, system_resolver, opendkim: bool = True) -> None:
    import dkim
    assert dkim.verify(message, dnsfunc=txt_dnsfunc(dns_server)), "dkimpy: signature did not verify"
    tampered = message.replace(b"Subject: signed by mta", b"Subject: signed by mtA")
    assert not dkim.verify(tampered, dnsfunc=txt_dnsfunc(dns_server)), "dkimpy accepted a changed Subject"

    dkimverify = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[2] / ".venv"),
                      "bin", "dkimverify")
    if dkimverify.exists():
        p = system_resolver([str(dkimverify)], message)
        assert p.returncode == 0 and b"signature ok" in p.stdout, (p.stdout, p.stderr)
    if opendkim:
        if shutil.which("opendkim-testmsg") is None:
            pytest.skip("opendkim-testmsg (Debian opendkim-tools) is not installed")
        p = system_resolver(["opendkim-testmsg"], message)
        assert p.returncode == 0, f"opendkim-testmsg: rc={p.returncode} {p.stderr!r}"
        p = system_resolver(["opendkim-testmsg"], tampered)
        assert p.returncode != 0, "opendkim-testmsg accepted a changed Subject"


def test_dkim_signing_rsa(mta_factory, dns_server, system_resolver):
    """RFC 6376: mail from mynetworks for a domain with a key (`mta dkim keygen`)
    is signed rsa-sha256, relaxed/relaxed (3.4), From signed (5.4); the
    signature verifies with dkimpy, dkimpy's dkimverify and OpenDKIM."""
    s = mta_factory({"dkim_enabled": True})
    record = _publish_keygen_record(s, dns_server, "example.com", "s1")
    assert "k=rsa" in record
    message = _signed_from_queue(s)
    tags = _dkim_tags(message)
    assert (tags["d"], tags["s"], tags["a"], tags["c"]) == ("example.com", "s1", "rsa-sha256", "relaxed/relaxed"), tags
    assert "from" in tags["h"].lower().split(":"), tags
    _verify_independently(message, dns_server, system_resolver)
    assert "DKIM-signed d=example.com s=s1" in s.log_text()


def test_dkim_signing_ed25519(mta_factory, dns_server, system_resolver):
    """RFC 8463: an Ed25519 key signs ed25519-sha256; verified by dkimpy (with
    PyNaCl), dkimverify and OpenDKIM (2.11 supports RFC 8463)."""
    pytest.importorskip("nacl", reason="dkimpy verifies Ed25519 with PyNaCl")
    s = mta_factory({"dkim_enabled": True})
    record = _publish_keygen_record(s, dns_server, "example.com", "s2", "--algorithm", "ed25519")
    assert "k=ed25519" in record
    message = _signed_from_queue(s)
    tags = _dkim_tags(message)
    assert (tags["d"], tags["s"], tags["a"]) == ("example.com", "s2", "ed25519-sha256"), tags
    _verify_independently(message, dns_server, system_resolver)
