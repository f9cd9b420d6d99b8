"""Slowloris and connection floods against the live daemon (issue 9).

RFC 5321 4.5.3.2 lets a server time out idle clients (421 4.4.2 after
MTA_SMTP_TIMEOUT); MTA_MAX_CONNECTIONS and MTA_MAX_CONNECTIONS_PER_IP cap
sessions (421 4.7.0). The questions here:

- 40 slowloris connections (one byte a second, never idle long enough to
  time out) plus 200 rapid connect/close cycles, all within
  max_connections=50: a normal client from another address (127.0.0.3)
  is still served within a few seconds each time.
- A flood of 2000 idle connections over the cap: the excess gets a
  clean 421 4.7.0 at once (no hang, no crash), a client arriving while the
  cap is full gets 421 4.7.0 quickly, and once smtp_timeout cuts the idle
  ones (421 4.4.2) new clients are served again.
- Idle in every phase (after the banner, mid-line, after EHLO, in DATA, in
  a BDAT chunk, mid-TLS-handshake): cut after smtp_timeout with 421 4.4.2
  (or closed, where TLS makes a plaintext reply impossible).

Every client binds its own loopback source address so per-IP accounting
is visible (Linux routes all of 127.0.0.0/8 to lo).
"""

from __future__ import annotations

import selectors
import smtplib
import socket
import ssl
import threading
import time

from conftest import SMTPConn
from fuzz_support import client_hello

NORMAL = "127.0.0.3"
FLOOD = 2000


def normal_client(port: int, n: int) -> float:
    """One whole message by smtplib from 127.0.0.3; returns the seconds it took."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(NORMAL, 0)) as client:
        client.ehlo("normal.example")
        refused = client.sendmail("normal@example.org", ["info@example.com"],
                                  f"Subject: normal {n}\r\n\r\nduring the flood\r\n".encode())
        assert refused == {}
    return time.monotonic() - started


def test_slowloris_and_rapid_reconnects_do_not_starve_clients_within_caps(mta_factory):
    """40 one-byte-a-second sessions and 200 connect/close cycles (within
    max_connections=50): a normal client keeps being served in seconds."""
    mta = mta_factory({"max_connections": 50, "max_connections_per_ip": 0, "smtp_timeout": 3})
    stop = threading.Event()
    slow_state = {"open": 0, "cut": 0, "refused": 0}
    rapid_state = {"banner": 0, "refused": 0, "errors": 0}
    lock = threading.Lock()

    def slow(index: int) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", mta.port), timeout=5, source_address=("127.0.0.2", 0))
        except OSError:
            with lock:
                slow_state["refused"] += 1
            return
        with sock:
            banner = sock.recv(1024)
            if not banner.startswith(b"220"):
                with lock:
                    slow_state["refused"] += 1
                return
            with lock:
                slow_state["open"] += 1
            payload = b"EHLO slowloris.example\r\n" * 100
            position = 0
            while not stop.is_set():
                try:
                    sock.sendall(payload[position:position + 1])
                except OSError:
                    with lock:
                        slow_state["cut"] += 1
                    return
                position += 1
                stop.wait(1.0)

    def rapid(worker: int) -> None:
        for n in range(50):
            try:
                sock = socket.create_connection(("127.0.0.1", mta.port), timeout=5,
                                                source_address=("127.0.0.4", 0))
            except OSError:
                with lock:
                    rapid_state["errors"] += 1
                continue
            with sock:
                if n % 3 == 0:
                    # RST instead of FIN: SO_LINGER with a zero timeout
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    continue
                try:
                    first = sock.recv(64)
                except OSError:
                    first = b""
                with lock:
                    if first.startswith(b"220"):
                        rapid_state["banner"] += 1
                    elif first.startswith(b"421"):
                        rapid_state["refused"] += 1

    slow_threads = [threading.Thread(target=slow, args=(n,), daemon=True) for n in range(40)]
    for thread in slow_threads:
        thread.start()
    time.sleep(1.5)
    rapid_threads = [threading.Thread(target=rapid, args=(n,), daemon=True) for n in range(4)]
    for thread in rapid_threads:
        thread.start()
    durations = []
    try:
        for n in range(6):
            durations.append(normal_client(mta.port, n))
            time.sleep(0.7)
        for thread in rapid_threads:
            thread.join(30)
        assert slow_state["open"] == 40 and slow_state["refused"] == 0, slow_state
        assert slow_state["cut"] == 0, f"slow clients sending every second were cut: {slow_state}"
    finally:
        stop.set()
        for thread in slow_threads:
            thread.join(5)
    assert max(durations) < 5, f"normal client took {durations}"
    assert rapid_state["errors"] == 0 and rapid_state["refused"] == 0, rapid_state
    assert mta.alive()
    # every slot came back: a full set of 50 sessions can be opened again
    time.sleep(0.5)
    conns = [SMTPConn(mta.port, source=f"127.0.1.{n % 200 + 1}", timeout=5) for n in range(50)]
    try:
        assert all(c.banner().code == 220 for c in conns)
    finally:
        for c in conns:
            c.close()
    print(f"\nnormal client: {[round(d, 2) for d in durations]} s; rapid: {rapid_state}")


def test_idle_flood_over_the_cap_is_shed_with_421_and_service_recovers(mta_factory):
    """2000 idle connections against max_connections=50: 50 get a banner,
    the rest 421 4.7.0 at once; a client arriving meanwhile gets 421 4.7.0
    within a second (not a hang); smtp_timeout=3 cuts the idle ones with
    421 4.4.2 and the normal client is served again."""
    mta = mta_factory({"max_connections": 50, "max_connections_per_ip": 0, "smtp_timeout": 3})
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytearray] = {}
    for n in range(FLOOD):
        sock = socket.socket()
        sock.bind((f"127.0.{2 + n // 250}.{n % 250 + 1}", 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", mta.port))
        received[sock] = bytearray()
        selector.register(sock, selectors.EVENT_READ)

    def pump(seconds: float, done) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not done():
            for key, _ in selector.select(0.2):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                received[key.fileobj].extend(data)
                if not data:
                    selector.unregister(key.fileobj)

    pump(10, lambda: all(b"\n" in data for data in received.values()))
    banners = sum(1 for data in received.values() if data.startswith(b"220"))
    refused = [bytes(data) for data in received.values() if data.startswith(b"421")]
    assert all(b" 4.7.0 " in data for data in refused), refused[:3]
    assert banners <= 50 and len(refused) >= FLOOD - 50, f"{len(refused)} refused, {banners} banners of {FLOOD}"

    started = time.monotonic()
    with SMTPConn(mta.port, source=NORMAL, timeout=5) as conn:
        reply = conn.reply()
    assert reply.code == 421 and reply.enhanced == "4.7.0", str(reply)
    assert time.monotonic() - started < 2

    # the idle sessions are cut by smtp_timeout (RFC 5321 4.5.3.2): 421 4.4.2
    idle = [sock for sock, data in received.items() if data.startswith(b"220")]
    pump(10, lambda: all(b"421 4.4.2" in received[sock] for sock in idle))
    cut = sum(1 for sock in idle if b"421 4.4.2" in received[sock])
    assert cut == len(idle), f"only {cut} of {len(idle)} idle sessions got 421 4.4.2"
    for sock in received:
        sock.close()
    selector.close()

    duration = None
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        try:
            duration = normal_client(mta.port, 0)
            break
        except smtplib.SMTPConnectError:
            time.sleep(0.3)
    assert duration is not None and duration < 5, "normal client not served after the flood"
    assert mta.alive()


def test_idle_timeout_in_every_phase_421_4_4_2_rfc5321_4_5_3_2(mta_factory):
    """smtp_timeout=3: idle after the banner, mid-line, after EHLO, inside a
    transaction, in DATA, in a BDAT chunk, inside a TLS session -> 421 4.4.2
    and close; idle in a TLS handshake (submissions) -> closed. Nothing is
    queued."""
    mta = mta_factory({"smtp_timeout": 3})
    phases = {
        "banner": [],
        "mid-line": [b"EHL"],
        "after EHLO": [b"EHLO idle.example\r\n"],
        "after MAIL": [b"EHLO idle.example\r\n", b"MAIL FROM:<a@example.org>\r\n"],
        "in DATA": [b"EHLO idle.example\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<info@example.com>\r\n"
                    b"DATA\r\n", b"Subject: half a message\r\n\r\nand then"],
        "in BDAT": [b"EHLO idle.example\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<info@example.com>\r\n"
                    b"BDAT 1000 LAST\r\nonly some"],
    }
    conns = {}
    for n, (name, sends) in enumerate(phases.items()):
        conn = SMTPConn(mta.port, source=f"127.0.2.{n + 1}", timeout=10)
        conn.banner()
        for data in sends:
            conn.send(data)
        conns[name] = conn
    tls = socket.create_connection(("127.0.0.1", mta.config["port_submissions"]), timeout=10)
    tls.sendall(client_hello()[:40])
    # Idle inside an established TLS session: OpenSSL retries reads cut by
    # SO_RCVTIMEO, so TLS sessions need their own timeout (regression).
    client_tls = ssl.create_default_context()
    client_tls.check_hostname = False
    client_tls.verify_mode = ssl.CERT_NONE
    established = client_tls.wrap_socket(
        socket.create_connection(("127.0.0.1", mta.config["port_submissions"]), timeout=10))
    assert established.recv(4096).startswith(b"220 ")
    started = time.monotonic()
    problems = []
    for name, conn in conns.items():
        try:
            rest = conn.read_until_closed(timeout=8)
        except socket.timeout:
            problems.append(f"{name}: not closed after {time.monotonic() - started:.1f}s")
            continue
        if b"421 4.4.2" not in rest:
            problems.append(f"{name}: closed without 421 4.4.2: {rest[-200:]!r}")
        conn.close()
    tls.settimeout(8)
    try:
        while tls.recv(4096):
            pass
    except socket.timeout:
        problems.append("TLS handshake left open")
    except OSError:
        pass
    tls.close()
    rest = b""
    try:
        while chunk := established.recv(4096):
            rest += chunk
    except socket.timeout:
        problems.append("established TLS session left open")
    except (ssl.SSLError, OSError):
        pass
    established.close()
    if b"421 4.4.2" not in rest:
        problems.append(f"established TLS session: closed without 421 4.4.2: {rest!r}")
    assert not problems, "\n".join(problems)
    assert time.monotonic() - started < 8
    assert mta.queue_list() == []
