"""A real DNS server on loopback for tests, built on dnspython.

Owns nothing of mta: it is the far side of every DNS lookup in the tests,
so they exercise the daemon's real resolver over real UDP and TCP sockets
(INTERFACE.md "DNS": every lookup goes to MTA_DNS_NAMESERVERS).

    zone = {
        "example.com.": {
            "MX": [(10, "mx1.example.com."), (20, "mx2.example.com.")],
            "A": ["127.0.0.1"], "AAAA": ["::1"],
            "TXT": ["v=spf1 ip4:127.0.0.1 -all",      # one string per record,
                    ("part one ", "part two")],         # or several strings
        },
        "nullmx.example.": {"MX": [(0, ".")]},
        "alias.example.": {"CNAME": "example.com."},
        "servfail.example.": "SERVFAIL",                 # whole name
        "slow.example.": {"A": ["127.0.0.1"], "MX": "TIMEOUT"},  # one type
    }
    with DNSServer(zone) as server:
        env["MTA_DNS_NAMESERVERS"] = server.address   # "127.0.0.1:PORT"
        ...
        assert ("example.com.", "MX") in server.queries

Records: MX values are (preference, target); TXT values are a string or a
tuple of strings (strings over 255 octets are split into 255-octet
character-strings, RFC 1035 3.3.14); CNAME/PTR/NS and any other type take
the rdata in zone-file text form ("A": "192.0.2.1" or a list of them).
Names are case-insensitive, relative names are taken as absolute, and
non-ASCII names are IDNA-encoded.

Answers (RFC 1035 4.1.1 RCODEs):
- name in the zone, type present: NOERROR with the records (AA set);
- name in the zone (or an empty non-terminal above one), type absent:
  NOERROR with no answer (NODATA);
- a CNAME at the name: the CNAME plus the target's answer, chased inside
  the zone (RFC 1034 3.6.2; at most 8 links);
- name not in the zone: NXDOMAIN;
- behaviour strings, for a whole name (and every name below it that is not
  itself in the zone) or for one type: "SERVFAIL", "REFUSED", "NXDOMAIN",
  and "TIMEOUT" (the query is recorded but never answered).
UDP answers that do not fit 512 octets (or the client's EDNS size) are sent
truncated with TC set, so clients retry over TCP (RFC 7766).

One background thread serves UDP and TCP on the same OS-assigned port of
127.0.0.1. `set_zone()` swaps the records atomically while running. Every
question is recorded in `queries` as (lower-case absolute name, type text)
and in `log` as (name, type, "udp"|"tcp"); `errors` collects exceptions
raised inside the server thread (a test can assert it stays empty).
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Any, Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

BEHAVIOURS = frozenset({"SERVFAIL", "REFUSED", "NXDOMAIN", "TIMEOUT"})
TTL = 60
MAX_CNAME_CHAIN = 8
_POLL_SECONDS = 1.0  # stop() also wakes the loop at once


class _Zone:
    """The compiled zone: name -> behaviour, or name -> {rdtype: behaviour | [rdata]}."""

    def __init__(self, zone: Mapping[str, Any]):
        self.entries: dict[dns.name.Name, Any] = {}
        self.existing: set[dns.name.Name] = set()  # names plus empty non-terminals
        for key, value in zone.items():
            name = _name(key)
            if isinstance(value, str):
                if value.upper() not in BEHAVIOURS:
                    raise ValueError(f"{key}: unknown behaviour {value!r}; use one of {sorted(BEHAVIOURS)}")
                self.entries[name] = value.upper()
            elif isinstance(value, Mapping):
                self.entries[name] = {
                    dns.rdatatype.from_text(rtype.upper()): _compile_records(name, rtype.upper(), records)
                    for rtype, records in value.items()}
            else:
                raise ValueError(f"{key}: expected a dict of records or a behaviour string")
            ancestor = name
            while ancestor != dns.name.root:
                self.existing.add(ancestor)
                ancestor = ancestor.parent()

    def behaviour_above(self, name: dns.name.Name) -> str | None:
        """A whole-name behaviour also covers the names below it (a broken zone)."""
        while name != dns.name.root:
            name = name.parent()
            entry = self.entries.get(name)
            if isinstance(entry, str):
                return entry
        return None


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, origin=dns.name.root)


def _compile_records(owner: dns.name.Name, rtype: str, records: Any):
    if isinstance(records, str) and records.upper() in BEHAVIOURS:
        return records.upper()
    rdtype = dns.rdatatype.from_text(rtype)
    if isinstance(records, (str, bytes)) or (rtype == "MX" and _is_mx_pair(records)):
        records = [records]
    return [_rdata(rdtype, rtype, record) for record in records]


def _is_mx_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int)


def _rdata(rdtype: dns.rdatatype.RdataType, rtype: str, value: Any) -> dns.rdata.Rdata:
    if rtype in ("TXT", "SPF"):
        strings: Iterable[Any] = (value,) if isinstance(value, (str, bytes)) else value
        chunks: list[bytes] = []
        for string in strings:
            data = string.encode("utf-8") if isinstance(string, str) else bytes(string)
            # RFC 1035 3.3.14: character-strings of at most 255 octets.
            if not data:
                chunks.append(b"")
            chunks.extend(data[i:i + 255] for i in range(0, len(data), 255))
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, rdtype, chunks)
    if rtype == "MX":
        preference, target = value
        text = f"{int(preference)} {target}"
    else:
        text = str(value)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text, origin=dns.name.root,
                                relativize=False)


class DNSServer:
    """A DNS server for `zone` on 127.0.0.1 (or `host`, e.g. "::1"), UDP and TCP on one port."""

    def __init__(self, zone: Mapping[str, Any] | None = None, host: str = "127.0.0.1"):
        self.host = host
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.queries: list[tuple[str, str]] = []
        self.log: list[tuple[str, str, str]] = []
        self.errors: list[str] = []  # exceptions inside the server thread (should stay empty)
        self._zone = _Zone(zone or {})
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._port = 0
        self._wake_send: socket.socket | None = None
        self._wake_recv: socket.socket | None = None

    # -- lifecycle
    def start(self) -> "DNSServer":
        assert self._thread is None, "already started"
        self._udp, self._tcp = self._bind_pair()
        self._port = self._udp.getsockname()[1]
        self._wake_send, self._wake_recv = socket.socketpair()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"dnsserver-{self._port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        try:
            self._wake_send.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        self._thread = None
        for sock in (self._udp, self._tcp, self._wake_send, self._wake_recv):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_send = self._wake_recv = None

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _bind_pair(self) -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket bound to the same free port."""
        last: OSError | None = None
        for _ in range(50):
            udp = socket.socket(self._family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
                tcp.listen(16)
            except OSError as error:
                last = error
                udp.close()
                tcp.close()
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError(f"no port free for both UDP and TCP: {last}")

    # -- public state
    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """"127.0.0.1:PORT" ("[::1]:PORT"), the form MTA_DNS_NAMESERVERS takes."""
        if self._family == socket.AF_INET6:
            return f"[{self.host}]:{self._port}"
        return f"{self.host}:{self._port}"

    def set_zone(self, zone: Mapping[str, Any]) -> None:
        compiled = _Zone(zone)
        with self._lock:
            self._zone = compiled

    def clear_queries(self) -> None:
        with self._lock:
            self.queries.clear()
            self.log.clear()

    # -- serving
    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._udp, selectors.EVENT_READ, "udp")
        selector.register(self._tcp, selectors.EVENT_READ, "listen")
        selector.register(self._wake_recv, selectors.EVENT_READ, "wake")
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(_POLL_SECONDS):
                    try:
                        self._event(selector, key, buffers)
                    except Exception as error:  # a bug here must not kill the server
                        self.errors.append(repr(error))
        finally:
            for conn in buffers:
                conn.close()
            selector.close()

    def _event(self, selector: selectors.BaseSelector, key: selectors.SelectorKey,
               buffers: dict[socket.socket, bytearray]) -> None:
        sock = key.fileobj
        if key.data == "wake":
            return
        if key.data == "udp":
            self._serve_udp(sock)
        elif key.data == "listen":
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            buffers[conn] = bytearray()
            selector.register(conn, selectors.EVENT_READ, "tcp")
        elif not self._serve_tcp(sock, buffers[sock]):
            selector.unregister(sock)
            buffers.pop(sock, None)
            sock.close()

    def _serve_udp(self, sock: socket.socket) -> None:
        try:
            wire, peer = sock.recvfrom(65535)
        except OSError:
            return
        query = _parse(wire)
        if query is None:
            return
        response = self._answer(query, "udp")
        if response is None:
            return
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            data = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 1035 4.2.1 / RFC 7766: truncate, the client retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            data = truncated.to_wire(max_size=limit)
        try:
            sock.sendto(data, peer)
        except OSError:
            pass

    def _serve_tcp(self, conn: socket.socket, buffer: bytearray) -> bool:
        """Read what is there and answer every complete message; False when closed."""
        try:
            chunk = conn.recv(65535)
        except OSError:
            return False
        if not chunk:
            return False
        buffer.extend(chunk)
        while len(buffer) >= 2:
            length = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + length:
                break
            wire = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            query = _parse(wire)
            if query is None:
                return False
            response = self._answer(query, "tcp")
            if response is None:
                continue  # TIMEOUT: keep the connection, say nothing
            data = response.to_wire()
            try:
                conn.sendall(len(data).to_bytes(2, "big") + data)
            except OSError:
                return False
        return True

    def _answer(self, query: dns.message.Message, transport: str) -> dns.message.Message | None:
        response = dns.message.make_response(query, recursion_available=True)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        record = (qname.to_text().lower(), dns.rdatatype.to_text(qtype))
        with self._lock:
            zone = self._zone
            self.queries.append(record)
            self.log.append((*record, transport))

        name = qname
        for _ in range(MAX_CNAME_CHAIN + 1):
            entry = zone.entries.get(name)
            if entry is None:
                behaviour = zone.behaviour_above(name)
                if behaviour is not None:
                    return _behave(behaviour, response)
                if name not in zone.existing:
                    response.set_rcode(dns.rcode.NXDOMAIN)  # RFC 6604: of the last name
                return response
            if isinstance(entry, str):
                return _behave(entry, response)
            records = entry.get(qtype)
            if isinstance(records, str):
                return _behave(records, response)
            if records:
                response.answer.append(dns.rrset.from_rdata_list(name, TTL, records))
                return response
            cname = entry.get(dns.rdatatype.CNAME)
            if not cname or isinstance(cname, str) or qtype == dns.rdatatype.CNAME:
                return response  # NODATA
            response.answer.append(dns.rrset.from_rdata_list(name, TTL, cname))
            name = cname[0].target
        return response


def _behave(behaviour: str, response: dns.message.Message) -> dns.message.Message | None:
    if behaviour == "TIMEOUT":
        return None
    response.answer.clear()
    response.set_rcode(dns.rcode.from_text(behaviour))
    return response


def _parse(wire: bytes) -> dns.message.Message | None:
    try:
        message = dns.message.from_wire(wire)
    except Exception:  # hostile or broken input: ignore, like a real server would
        return None
    if message.flags & dns.flags.QR:
        return None
    return message
