"""Fault injection against the live daemon (issue 9): nothing accepted is lost.

- Disk full during DATA: the spool on a 4 MiB tmpfs with queue_min_free=0;
  messages until the disk is full get 452 4.3.1 (or 451 4.3.0), never a
  250 for a message that is not whole on disk; tmp/ holds no leftovers; the
  daemon accepts again once space is freed (Postfix queue_minfree, RFC
  5321 4.2.5 "452 insufficient system storage").
- Read-only spool: the tests run as root, for whom chmod 0555 changes
  nothing, and MTA_USER=nobody cannot work here (the interpreter lives under
  /root, mode 0700: the daemon cannot import after dropping privileges), so
  the spool's tmpfs is remounted read-only (EROFS binds root too): 451/452,
  and mail flows again after remounting read-write.
- A damaged index.json (garbage, truncated, wrong shapes, and an entry
  whose cached summary is damaged) is ignored and rebuilt; damaged
  envelope.json files (not JSON, or JSON with wrong types) are quarantined
  to corrupt/ at restart while the others survive (ARCHITECTURE.md spool
  rules).
- Delivery faults, one daemon, each case its own domain and fake MX on its
  own loopback address: DNS timeouts and SERVFAIL; a server that accepts
  and says nothing (smtp_client_timeout=2); one that closes mid-DATA; one
  that reads the message and closes without the final reply; garbage
  greetings and replies; STARTTLS advertised but the handshake broken ->
  deferred with a 4.x.x status (never bounced, never lost), or delivered
  in plaintext after the opportunistic-TLS fallback (RFC 7435).
- The admin API under bad tokens (RFC 6750) and oversized bodies.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import SMTPClosed, SMTPConn, dot_stuff, free_ports, make_message
from fuzz_support import FakeSMTPServer, smtp_dialog, wait_for
from support.fixtures import dns_server  # noqa: F401  (fixture)

SPOOL_STATES = ("incoming", "deferred", "hold", "bounce")


# --------------------------------------------------------------------------
# a small tmpfs for the spool

@pytest.fixture
def tmpfs():
    """mount(size) -> a fresh tmpfs directory; unmounted at teardown (needs root)."""
    mounts: list[str] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (the tests do not run as root here)")
        directory = tempfile.mkdtemp(prefix="mta-fuzz-tmpfs-")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", directory],
                                capture_output=True, text=True)
        if result.returncode != 0:
            os.rmdir(directory)
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(directory)
        return Path(directory)

    yield mount
    for directory in mounts:
        if subprocess.run(["umount", directory], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", directory], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def send_one(port: int, message: bytes, rcpt: str = "info@example.com") -> tuple[int, str]:
    """One transaction in a fresh session; returns the end-of-data (or earlier)
    reply, or (0, ...) when the server hung up without one."""
    with SMTPConn(port, timeout=30) as conn:
        try:
            conn.start()
            for command in ("MAIL FROM:<sender@example.org>", f"RCPT TO:<{rcpt}>", "DATA"):
                reply = conn.cmd(command)
                if reply.code >= 400:
                    return reply.code, str(reply)
            conn.send(dot_stuff(message) + b".\r\n")
            reply = conn.reply(timeout=60)
        except (SMTPClosed, OSError) as error:
            return 0, f"connection closed without a reply ({error.__class__.__name__})"
        return reply.code, str(reply)


def stored(spool: Path, qid: str) -> tuple[dict, bytes] | None:
    for state in SPOOL_STATES:
        directory = spool / state / qid
        if directory.is_dir():
            return (json.loads((directory / "envelope.json").read_text()),
                    (directory / "message.eml").read_bytes())
    return None


def assert_whole(spool: Path, qid: str, body: bytes) -> None:
    """The stored message is our Received: block plus exactly the message sent."""
    entry = stored(spool, qid)
    assert entry is not None, f"{qid} is listed but not on disk"
    envelope, message = entry
    assert envelope["size"] == len(body), f"{qid}: envelope size {envelope['size']}, sent {len(body)}"
    assert message.endswith(body), f"{qid}: stored message is not the whole message ({len(message)} octets)"
    assert message[:-len(body)].startswith(b"Received: "), message[:200]


# --------------------------------------------------------------------------
# disk full, read-only spool

def test_disk_full_during_data_452_no_partial_message_rfc5321_4_2_5(mta_factory, tmpfs):
    """Disk full while receiving: 452 4.3.1 (or 451 4.3.0), no 250 for a
    message that is not completely on disk, no partial queue file, no
    leftovers in tmp/, and the daemon accepts again once space is freed."""
    spool = tmpfs("4m")
    mta = mta_factory({"spool_dir": str(spool), "queue_min_free": 0, "max_message_size": 10_000_000})
    accepted: dict[str, bytes] = {}
    refusals = []
    wrong = []
    try:
        for n in range(60):
            size = 300_000 if len(refusals) < 2 else [60_000, 6_000, 600][min(len(refusals) - 2, 2)]
            line = (f"filler {n} " + "x" * 70 + "\r\n").encode()
            body = make_message(f"diskfull {n}", "") + line * (size // len(line)) + f"END {n}\r\n".encode()
            code, text = send_one(mta.port, body)
            if code == 250:
                qid = re.search(r"queued as (\S+)", text).group(1)
                accepted[qid] = body
            else:
                if (code, text.split(" ")[1]) not in ((452, "4.3.1"), (451, "4.3.0")):
                    wrong.append(f"message {n} ({len(body)} octets): {text}")
                refusals.append(text)
                if len(refusals) >= 5:
                    break
        assert refusals, "the 4 MiB spool never filled up"
        assert accepted, "nothing was accepted before the disk filled"
        assert mta.alive()
        assert list((spool / "tmp").iterdir()) == [], "a refused message left files in tmp/"
        listed = {m["id"] for m in mta.queue_list()}
        assert listed == set(accepted), (listed ^ set(accepted))
        for qid, body in accepted.items():
            assert_whole(spool, qid, body)
        # free some space: mail is accepted again without a restart
        for qid in list(accepted)[:4]:
            assert mta.cli("queue", "delete", qid).returncode == 0
        code, text = send_one(mta.port, make_message("after disk full", "room again"))
        assert code == 250, text
    finally:
        mta.stop()
    print(f"\naccepted {len(accepted)}, refused {len(refusals)}: {refusals[:3]}")
    # Finding: ENOSPC at commit crashes the session (AttributeError logging
    # tx.message.id after tx.abort() set it to None): no reply at all.
    assert not wrong, "refusals without 452 4.3.1 / 451 4.3.0:\n" + "\n".join(wrong)


def test_read_only_spool_refused_with_4xx_then_recovers(mta_factory, tmpfs):
    """A spool that cannot be written (EROFS, which binds root too): every
    message gets 451 4.3.0 / 452 4.3.1, nothing half-written is queued, and
    after remounting read-write mail flows again; the queued mail survived."""
    spool = tmpfs("16m")
    mta = mta_factory({"spool_dir": str(spool), "queue_min_free": 0})
    try:
        before_body = make_message("before ro", "queued before the spool went read-only")
        code, text = send_one(mta.port, before_body)
        assert code == 250, text
        before = re.search(r"queued as (\S+)", text).group(1)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(spool)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
        try:
            for n in range(3):
                code, text = send_one(mta.port, make_message(f"ro {n}", "spool is read-only"))
                assert code in (451, 452), text
                assert re.search(r" 4\.3\.\d", text), text
            listed = mta.queue_list()
            assert [m["id"] for m in listed] == [before]
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(spool)], capture_output=True)
        code, text = send_one(mta.port, make_message("rw again", "writable again"))
        assert code == 250, text
        assert_whole(spool, before, before_body)
        assert mta.alive()
    finally:
        mta.stop()


# --------------------------------------------------------------------------
# damaged index.json and envelope.json

def test_damaged_index_json_ignored_and_rebuilt(mta):
    """index.json is only a cache (ARCHITECTURE.md): whatever it contains,
    `mta queue list/stats` show the real queue and no traceback. The last
    variant is a finding: an entry whose cached summary is damaged but whose
    mtime still matches is trusted, and the listing dies with KeyError."""
    ids = {mta.send(subject=f"index {n}") for n in range(3)}
    index = mta.spool_dir / "index.json"
    assert {m["id"] for m in mta.queue_list()} == ids
    real = json.loads(index.read_text())
    some_key = sorted(real["entries"])[0]
    variants = {
        "garbage": b"\x00\xff garbage \x89PNG",
        "truncated": index.read_bytes()[: len(index.read_bytes()) // 2],
        "empty": b"",
        "a list": b"[]",
        "wrong version": json.dumps({**real, "version": 99}).encode(),
        "entries a list": json.dumps({"version": 1, "entries": []}).encode(),
        "entry not an object": json.dumps({"version": 1, "entries": {some_key: 5}}).encode(),
        "summary not an object": json.dumps({"version": 1, "entries": {
            some_key: {**real["entries"][some_key], "summary": "x"}}}).encode(),
        "phantom entry": json.dumps({"version": 1, "entries": {
            **real["entries"], "incoming/00000000000000000000": real["entries"][some_key]}}).encode(),
        "damaged summary, mtime still matching": json.dumps({"version": 1, "entries": {
            **real["entries"], some_key: {**real["entries"][some_key], "summary": {}}}}).encode(),
    }
    failures = []
    for name, data in variants.items():
        index.write_bytes(data)
        listing = mta.cli("queue", "list", "--json")
        stats = mta.cli("queue", "stats")
        ok = listing.returncode == 0 and stats.returncode == 0
        if ok:
            try:
                ok = {m["id"] for m in json.loads(listing.stdout)} == ids
            except ValueError:
                ok = False
        if not ok:
            failures.append(f"{name}: list rc={listing.returncode} stats rc={stats.returncode} "
                            f"{(listing.stderr or stats.stderr).strip().splitlines()[-1:]}")
    mta.cli_stderr.clear()   # reported below, with the variant that caused it
    assert not failures, "damaged index.json not survived:\n" + "\n".join(failures)


def test_damaged_envelopes_quarantined_at_restart_others_survive(mta):
    """ARCHITECTURE.md spool rules: unreadable envelopes go to corrupt/,
    never deleted; the other messages survive a restart untouched.
    Syntactically broken JSON is quarantined; the type-damaged ones
    (valid JSON, wrong types) are a finding: Envelope.from_dict accepts
    them, recover() keeps them, and the queue listing/stats crash."""
    good = [mta.send(subject=f"good {n}") for n in range(2)]
    damaged = {mta.send(subject=f"damaged {n}"): kind for n, kind in
               enumerate(["truncated", "not json", "version 2", "arrival not a string",
                          "recipient status a list", "recipients empty"])}
    mta.stop()
    for qid, kind in damaged.items():
        path = mta.spool_dir / "incoming" / qid / "envelope.json"
        data = json.loads(path.read_text())
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:40])
        elif kind == "not json":
            path.write_bytes(b"\xff\xfe\x00garbage")
        elif kind == "version 2":
            path.write_text(json.dumps({**data, "version": 2}))
        elif kind == "arrival not a string":
            path.write_text(json.dumps({**data, "arrival": 5}))
        elif kind == "recipient status a list":
            path.write_text(json.dumps({**data, "recipients": [{**data["recipients"][0], "status": []}]}))
        else:
            path.write_text(json.dumps({**data, "recipients": []}))
    (mta.spool_dir / "index.json").write_text('{"version": 1, "entries": {')
    mta.start()
    corrupt = {p.name.split(".")[0] for p in (mta.spool_dir / "corrupt").iterdir()}
    missing = {f"{qid} ({kind})" for qid, kind in damaged.items() if qid not in corrupt}
    listing = mta.cli("queue", "list", "--json")
    stats = mta.cli("queue", "stats")
    problems = []
    if missing:
        problems.append(f"not quarantined: {sorted(missing)}")
    if listing.returncode != 0 or stats.returncode != 0:
        problems.append(f"queue list rc={listing.returncode}, stats rc={stats.returncode}: "
                        f"{(listing.stderr + stats.stderr).strip().splitlines()[-1:]}")
    else:
        listed = {m["id"] for m in json.loads(listing.stdout)}
        if not set(good) <= listed:
            problems.append(f"good messages lost: {set(good) - listed}")
    for qid in good:
        assert json.loads(mta.queue_show(qid, "--json"))["id"] == qid
        assert "good" in mta.queue_show(qid)
    mta.cli_stderr.clear()
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# delivery faults

def _silent(conn):
    conn.wait_closed(60)


def _close_mid_data(conn):
    def on_data(c):
        c.send(b"354 go ahead\r\n")
        c.readline()
        c.readline()
    smtp_dialog(conn, on_data=on_data)


def _no_final_reply(conn):
    def on_data(c):
        c.send(b"354 go ahead\r\n")
        c.read_data()
    smtp_dialog(conn, on_data=on_data)


def _garbage_greeting(conn):
    conn.send(os.urandom(3000).replace(b"\n", b"\r"))
    conn.wait_closed(10)


def _garbage_after_ehlo(conn):
    conn.send(b"220 fake.test ESMTP\r\n")
    conn.readline()
    conn.send(b"250-fake.test\r\n250 PIPELINING\r\n")
    conn.readline()
    conn.send(os.urandom(500).replace(b"\n", b"") + b"\r\n")
    conn.wait_closed(10)


def _unicode_digits_greeting(conn):
    conn.send("²²² fake.test ESMTP\r\n".encode())
    conn.wait_closed(10)


def _code_999_at_rcpt(conn):
    conn.send(b"220 fake.test ESMTP\r\n")
    while True:
        line = conn.readline().upper()
        if line.startswith(b"EHLO"):
            conn.send(b"250 fake.test\r\n")
        elif line.startswith(b"RCPT"):
            conn.send(b"999 boom\r\n")
        elif line.startswith(b"QUIT"):
            conn.send(b"221 bye\r\n")
            return
        else:
            conn.send(b"250 ok\r\n")


def _broken_tls(store, hang: bool = False):
    """STARTTLS advertised and accepted, then garbage (or silence) instead of a ServerHello."""
    def behaviour(conn):
        conn.send(b"220 fake.test ESMTP\r\n")
        while True:
            verb = conn.readline()[:8].upper()
            if verb.startswith(b"EHLO"):
                conn.send(b"250-fake.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
            elif verb.startswith(b"STARTTLS"):
                conn.send(b"220 go ahead\r\n")
                if not hang:
                    conn.send(os.urandom(200))      # not a ServerHello
                conn.wait_closed(30)
                return
            elif verb.startswith(b"DATA"):
                conn.send(b"354 go\r\n")
                store.append(conn.read_data())
                conn.send(b"250 2.0.0 stored\r\n")
            elif verb.startswith(b"QUIT"):
                conn.send(b"221 bye\r\n")
                return
            else:
                conn.send(b"250 2.0.0 ok\r\n")
    return behaviour


def test_delivery_faults_deferred_with_4xx_never_bounced_never_lost(mta_factory, dns_server):
    """Each remote fault defers the message with a 4.x.x status (RFC 5321
    4.2.5/4.5.4.1 retry; RFC 3463 class 4), none bounces, none is lost; a
    broken STARTTLS handshake falls back to plaintext and delivers (RFC
    7435); a malformed EHLO SIZE value is ignored, not fatal. Findings
    covered: a greeting of Unicode digits ("²²²") and "250-SIZE ²" in EHLO
    kill the attempt with a ValueError traceback (str.isdigit() is not
    ASCII); a 999 reply at RCPT bounces with DSN status 9.0.0."""
    port, = free_ports(1)
    delivered: list[bytes] = []
    cases = {   # domain -> (loopback address, behaviour, expectation)
        "silent.test": ("127.0.0.11", _silent, "deferred"),
        "middata.test": ("127.0.0.12", _close_mid_data, "deferred"),
        "nofinal.test": ("127.0.0.13", _no_final_reply, "deferred"),
        "garbage.test": ("127.0.0.14", _garbage_greeting, "deferred"),
        "garbage2.test": ("127.0.0.15", _garbage_after_ehlo, "deferred"),
        "unidigits.test": ("127.0.0.16", _unicode_digits_greeting, "deferred"),
        "code999.test": ("127.0.0.17", _code_999_at_rcpt, "deferred"),
        "badtls.test": ("127.0.0.18", _broken_tls(delivered), "delivered"),
        "tlshang.test": ("127.0.0.19", _broken_tls(delivered, hang=True), "delivered"),
        "badsize.test": ("127.0.0.20", lambda c: smtp_dialog(c, ehlo_extra=("SIZE \u00b2",), store=delivered),
                         "delivered"),
        "dnstimeout.test": (None, None, "deferred"),
        "servfail.test": (None, None, "deferred"),
        "aservfail.test": (None, None, "deferred"),
    }
    zone = {"dnstimeout.test.": {"MX": "TIMEOUT", "A": "TIMEOUT"}, "servfail.test.": "SERVFAIL",
            "aservfail.test.": {"MX": [(10, "mx.aservfail.test.")]}, "mx.aservfail.test.": "SERVFAIL"}
    servers = []
    for domain, (address, behaviour, _) in cases.items():
        if address:
            zone[f"{domain}."] = {"MX": [(10, f"mx.{domain}.")]}
            zone[f"mx.{domain}."] = {"A": [address]}
            servers.append(FakeSMTPServer(behaviour, port=port, host=address))
    dns_server.set_zone(zone)
    mta = mta_factory({"delivery_workers": 6, "dns_nameservers": dns_server.address, "smtp_port": port,
                       "smtp_client_timeout": 2, "backoff_min": 3600, "backoff_max": 3600,
                       "delay_warning_time": 0})
    try:
        ids = {}
        for domain in cases:
            ids[mta.send("postmaster@example.com", [f"rcpt@{domain}"],
                         make_message(f"fault {domain}", f"token-{domain}"))] = domain

        def settled():
            """Every case either left the queue (delivered, or lost) or waits deferred."""
            queue = {m["id"]: m for m in mta.queue_list()}
            return all(qid not in queue or queue[qid]["status"] == "deferred" for qid in ids)

        wait_for(settled, timeout=45, what="every fault case to be deferred or delivered", interval=0.5)
        queue = {m["id"]: m for m in mta.queue_list()}
        log = mta.log_text()
        problems = []
        for qid, domain in ids.items():
            want = cases[domain][2]
            lines = [l for l in log.splitlines() if l.startswith(f"{qid}: to=<rcpt@{domain}>")]
            if want == "deferred":
                entry = queue.get(qid)
                if entry is None:
                    problems.append(f"{domain}: message left the queue ({lines[-1:] or 'no log line'})")
                    continue
                rcpt = entry["recipients"][0]
                if rcpt["status"] != "deferred" or not rcpt["last_error"]:
                    problems.append(f"{domain}: recipient {rcpt}")
                if not any(re.search(r"dsn=4\.\d+\.\d+, status=deferred", l) for l in lines):
                    problems.append(f"{domain}: no 'dsn=4.x.x, status=deferred' log line: {lines[-1:]}")
            else:
                if qid in queue:
                    problems.append(f"{domain}: not delivered: {queue[qid]['recipients']}")
                elif not any(f"token-{domain}".encode() in m for m in delivered):
                    problems.append(f"{domain}: left the queue but never reached the server: {lines[-1:]}")
            if any("status=bounced" in l for l in lines):
                problems.append(f"{domain}: bounced: {lines}")
        mailbox = Path(mta.config["mailbox_dir"]) / "example.com" / "postmaster" / "new"
        if mailbox.is_dir() and list(mailbox.iterdir()):
            problems.append(f"{len(list(mailbox.iterdir()))} bounce notices reached the sender")
        crashes = [l for l in log.splitlines() if "failed unexpectedly" in l or "delivery failed" in l]
        if "Traceback" in log:
            problems.append(f"traceback in mta.log: {crashes[:3]} "
                            f"{[l for l in log.splitlines() if 'Error' in l and not l.startswith(' ')][:3]}")
        assert not problems, "\n".join(problems)
    finally:
        for server in servers:
            server.stop()
        assert not [e for s in servers for e in s.errors], [e for s in servers for e in s.errors]


# --------------------------------------------------------------------------
# the admin API

def _admin(port: int, method: str, path: str, *, headers=None, body: bytes | None = None,
           timeout: float = 10) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None and "Content-Length" not in (headers or {}) \
                and "Transfer-Encoding" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type") or ""
    finally:
        conn.close()


def test_admin_api_bad_tokens_and_oversized_bodies_rfc6750(mta):
    """RFC 6750: every protected route answers 401 (JSON error) to a
    missing, wrong, malformed or huge token; bodies over the limit get 413
    before they are parsed, also when the declared length is absurd;
    malformed JSON 400, wrong type 415; the API and SMTP still work after."""
    port = mta.config["port_admin"]

    def health_answers() -> bool:
        # The fixture waits for the SMTP banner; the admin thread starts a moment later.
        try:
            return _admin(port, "GET", "/api/health", timeout=3)[0] in (200, 503)
        except OSError:
            return False

    wait_for(health_answers, timeout=10, what="the admin API to answer /api/health")
    token = mta.config["admin_token"]
    bad_tokens = [None, "", "Bearer", "Bearer ", "Basic dGVzdDp0ZXN0", f"Bearer {token}x", f"Bearer {token[:-1]}",
                  "Bearer " + "A" * 7000, f"Token {token}", b"Bearer \xff\xfe\x00".decode("latin-1"),
                  f"Bearer {token} {token}", "Bearer\t" + token[:3]]
    problems = []
    for bad in bad_tokens:
        for method, path in (("GET", "/api/queue/stats"), ("GET", "/api/auth/users"),
                             ("POST", "/api/queue/flush"), ("DELETE", "/api/policy/blacklist/ip/1.2.3.4")):
            headers = {} if bad is None else {"Authorization": bad}
            try:
                status, body, ctype = _admin(port, method, path, headers=headers, body=b"{}" if method == "POST" else None)
            except OSError as error:
                problems.append(f"{method} {path} token {bad!r:.40}: {error!r}")
                continue
            if status not in (401, 400, 431):
                problems.append(f"{method} {path} token {bad!r:.40}: {status}")
            elif status == 401 and "error" not in json.loads(body or b"{}"):
                problems.append(f"{method} {path}: 401 without a JSON error: {body[:100]!r}")
    good = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    cases = [
        ("100 KiB JSON body", "POST", "/api/policy/blacklist/ip", good,
         b'{"ip": "' + b"1" * 100_000 + b'"}', (413,)),
        ("2 MiB body", "POST", "/api/auth/users", good, b"x" * 2_000_000, (413,)),
        ("absurd Content-Length", "POST", "/api/policy/blacklist/ip", {**good, "Content-Length": str(10 ** 12)},
         b"{}", (413, 400)),
        ("chunked 300 KiB", "POST", "/api/policy/blacklist/ip", {**good, "Transfer-Encoding": "chunked"},
         b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [b"x" * 30_000] * 10) + b"0\r\n\r\n", (413,)),
        ("2 MiB body without a token", "POST", "/api/auth/users", {}, b"x" * 2_000_000, (401, 413)),
        ("malformed JSON", "POST", "/api/policy/blacklist/ip", good, b'{"ip": ', (400,)),
        ("JSON array", "POST", "/api/policy/blacklist/ip", good, b"[1, 2]", (400,)),
        ("deep nesting", "POST", "/api/policy/blacklist/ip", good, b"[" * 50_000 + b"]" * 50_000, (400, 413)),
        ("not UTF-8", "POST", "/api/policy/blacklist/ip", good, b'{"ip": "\xff"}', (400,)),
        ("text/plain", "POST", "/api/policy/blacklist/ip", {**good, "Content-Type": "text/plain"},
         b'{"ip": "10.9.9.9"}', (415,)),
        ("unknown field", "POST", "/api/auth/users", good, b'{"username": "a@example.com", "x": 1}', (400,)),
    ]
    for name, method, path, headers, body, expected in cases:
        started = time.monotonic()
        try:
            status, answer, ctype = _admin(port, method, path, headers=headers, body=body, timeout=15)
        except OSError as error:
            problems.append(f"{name}: {error!r} after {time.monotonic() - started:.1f}s")
            continue
        if status not in expected:
            problems.append(f"{name}: {status} {answer[:150]!r}")
        if status == 500:
            problems.append(f"{name}: internal error")
    status, body, _ = _admin(port, "GET", "/api/health")
    assert status == 200, body
    assert mta.send(subject="after admin abuse")
    assert not problems, "\n".join(problems)
