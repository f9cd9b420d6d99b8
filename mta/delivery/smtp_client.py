"""Outbound SMTP: deliver one message to one destination, per-recipient results.

Owns the client side of RFC 5321: destination hosts in order (MX by
preference, or the relayhost), next host on connection failure or a 4xx/5xx
greeting, EHLO (HELO fallback), opportunistic STARTTLS (RFC 3207; no
certificate check, RFC 7435; a failed handshake falls back to plaintext once),
PIPELINING (RFC 2920), SIZE (RFC 1870), DSN pass-through (RFC 3461),
SMTPUTF8 (RFC 6531 3.4: a peer without it gets no UTF-8 envelope, 5.6.7),
the client timeouts of RFC 5321 4.5.3.2, a per-destination concurrency cap
and a short-lived connection cache for several messages to one host.
It never decides retries or bounces: it returns `Result`s.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from mta.delivery.result import Result
from mta.smtp.esmtp import encode_xtext

log = logging.getLogger("mta.delivery")

CONNECT_TIMEOUT = 30.0
DESTINATION_CONCURRENCY = 20   # like Postfix's default_destination_concurrency_limit
CACHE_IDLE = 5.0               # seconds a finished connection waits for reuse
_REPLY_CODE = re.compile(r"[2-5][0-9][0-9]")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class ProtocolError(Exception):
    """The peer broke the protocol or the connection died."""


@dataclass
class SmtpReply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    def dsn(self) -> str:
        match = _ENHANCED.match(self.lines[0] if self.lines else "")
        if match and match.group(1) == str(self.code)[0]:
            return ".".join(match.groups())
        return f"{str(self.code)[0]}.0.0"


@dataclass
class Connection:
    sock: socket.socket
    reader: object
    host: str
    ip: str
    port: int
    extensions: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    last_used: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return f"{self.host}[{self.ip}]:{self.port}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self, timeout: float) -> SmtpReply:
        self.sock.settimeout(timeout)
        lines = []
        while True:
            line = self.reader.readline(4096)
            if not line:
                raise ProtocolError("connection closed by peer")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            # RFC 5321 4.2: three ASCII digits, the first 2-5, then " " or "-".
            if not _REPLY_CODE.match(text) or (len(text) > 3 and text[3] not in " -"):
                raise ProtocolError(f"malformed reply {text[:80]!r}")
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return SmtpReply(int(text[:3]), lines)
            if len(lines) > 100:
                raise ProtocolError("reply too long")

    def command(self, line: str, timeout: float) -> SmtpReply:
        self.send(line.encode("utf-8") + b"\r\n")
        return self.read_reply(timeout)

    def close(self, quit_first: bool = True) -> None:
        if quit_first:
            try:
                self.sock.settimeout(5)
                self.send(b"QUIT\r\n")
                self.read_reply(5)
            except (OSError, ProtocolError):
                pass
        for closer in (self.reader.close, self.sock.close):
            try:
                closer()
            except OSError:
                pass


class SmtpClient:
    def __init__(self, hostname: str, resolver, *, port: int = 25, relayhost: str = "",
                 timeout: float = 300.0, connect_timeout: float = CONNECT_TIMEOUT):
        self.hostname = hostname
        self.resolver = resolver
        self.port = port
        self.relayhost = relayhost
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.tls_context = ssl.create_default_context()
        self.tls_context.check_hostname = False
        self.tls_context.verify_mode = ssl.CERT_NONE   # opportunistic TLS (RFC 7435)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], list[Connection]] = {}
        self._limits: dict[str, threading.BoundedSemaphore] = {}
        self._no_tls: dict[tuple[str, int], float] = {}

    # --- routing ---

    def _targets(self, domain: str) -> list[tuple[str, int]]:
        """(host, port) in the order to try (RFC 5321 5.1)."""
        from mta import dns as dnsmod
        if self.relayhost:
            from mta.config import split_host_port
            bracketed = self.relayhost.startswith("[")
            host, port = split_host_port(self.relayhost, self.port)
            if bracketed:
                return [(host, port)]
            try:
                return [(h, port) for h in self.resolver.route(host)]
            except dnsmod.NoSuchDomain:
                return [(host, port)]
        return [(host, self.port) for host in self.resolver.route(domain)]

    def _addresses(self, host: str) -> list[str]:
        import ipaddress
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            return self.resolver.addresses(host)

    def destination_slot(self, key: str) -> threading.BoundedSemaphore:
        with self._lock:
            if key not in self._limits:
                self._limits[key] = threading.BoundedSemaphore(DESTINATION_CONCURRENCY)
            return self._limits[key]

    # --- delivery ---

    def deliver(self, envelope, message_path: str, size: int, domain: str, recipients: list) -> dict[str, Result]:
        """Deliver to every recipient of one destination domain in one transaction."""
        from mta import dns as dnsmod
        addresses = [r.address for r in recipients]
        try:
            targets = self._targets(domain)
        except dnsmod.NullMX:
            return self._all(addresses, Result.permanent(
                "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)"))
        except dnsmod.NoSuchDomain:
            return self._all(addresses, Result.permanent(
                "5.1.2", f"Host or domain name not found. Name service error for name={domain} type=MX: Host not found"))
        except dnsmod.TemporaryDNSError as error:
            return self._all(addresses, Result.temporary(
                "4.4.3", f"Host or domain name not found. Name service error for name={domain} type=MX: {error}"))
        # RFC 5321 5.1: ourselves and every less preferred MX are not tried.
        for index, (host, _) in enumerate(targets):
            if host.lower().rstrip(".") == self.hostname.lower():
                targets = targets[:index]
                break
        if not targets:
            return self._all(addresses, Result.permanent("5.4.6", f"mail for {domain} loops back to myself"))
        slot = self.destination_slot(self.relayhost or domain)
        with slot:
            return self._deliver_to_targets(envelope, message_path, size, targets, recipients)

    def _all(self, addresses: list[str], result: Result) -> dict[str, Result]:
        return {address: result for address in addresses}

    def _deliver_to_targets(self, envelope, message_path, size, targets, recipients) -> dict[str, Result]:
        from mta import dns as dnsmod
        addresses = [r.address for r in recipients]
        last = Result.temporary("4.4.1", "no mail exchanger could be reached")
        for host, port in targets:
            try:
                ips = self._addresses(host)
            except dnsmod.TemporaryDNSError as error:
                last = Result.temporary("4.4.3", f"Host or domain name lookup for {host} failed: {error}")
                continue
            except dnsmod.NoSuchDomain:
                last = Result.temporary("4.4.4", f"Host {host} not found")
                continue
            for ip in ips:
                try:
                    connection = self._connect(host, ip, port)
                except _NextHost as skip:
                    last = skip.result
                    continue
                try:
                    results = self._transaction(connection, envelope, message_path, size, recipients)
                except (OSError, ProtocolError, socket.timeout) as error:
                    connection.close(quit_first=False)
                    text = "conversation timed out" if isinstance(error, socket.timeout) else f"lost connection: {error}"
                    return self._all(addresses, Result.temporary("4.4.2", f"{text} with {connection.label}",
                                                                 connection.label))
                self._release(connection)
                return results
        return self._all(addresses, last)

    def _connect(self, host: str, ip: str, port: int) -> Connection:
        """A ready (post-EHLO, post-STARTTLS) connection, cached or new."""
        cached = self._take_cached(ip, port)
        if cached is not None:
            try:
                if cached.command("RSET", 30).code == 250:
                    return cached
            except (OSError, ProtocolError):
                pass
            cached.close(quit_first=False)
        use_tls = self._no_tls.get((ip, port), 0) < time.monotonic()
        try:
            return self._open(host, ip, port, use_tls)
        except _TlsFailed as error:
            # Opportunistic TLS: fall back to plaintext once, and say so.
            log.warning("TLS handshake with %s[%s]:%d failed (%s); retrying without TLS", host, ip, port, error)
            self._no_tls[(ip, port)] = time.monotonic() + 3600
            return self._open(host, ip, port, False)

    def _open(self, host: str, ip: str, port: int, use_tls: bool) -> Connection:
        label = f"{host}[{ip}]:{port}"
        try:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            sock.connect((ip, port))
        except socket.timeout:
            sock.close()
            raise _NextHost(Result.temporary("4.4.1", f"connect to {label}: Connection timed out")) from None
        except OSError as error:
            sock.close()
            raise _NextHost(Result.temporary("4.4.1", f"connect to {label}: {error.strerror or error}")) from None
        connection = Connection(sock, sock.makefile("rb"), host, ip, port)
        try:
            greeting = connection.read_reply(self.timeout)          # RFC 5321 4.5.3.2.1
            if greeting.code != 220:
                connection.close()
                raise _NextHost(Result.temporary(greeting.dsn() if greeting.code < 500 else "4.0.0",
                                                 f"host {label} refused to talk to me: {greeting}", label,
                                                 f"smtp; {greeting}"))
            self._ehlo(connection)
            if use_tls and "STARTTLS" in connection.extensions:
                reply = connection.command("STARTTLS", self.timeout)
                if reply.code == 220:
                    try:
                        connection.reader.close()
                        connection.sock = self.tls_context.wrap_socket(connection.sock, server_hostname=host
                                                                       if not _is_ip(host) else None)
                    except (ssl.SSLError, OSError) as error:
                        connection.close(quit_first=False)
                        raise _TlsFailed(str(error)) from None
                    connection.reader = connection.sock.makefile("rb")
                    connection.tls = True
                    self._ehlo(connection)
            return connection
        except (OSError, ProtocolError) as error:
            connection.close(quit_first=False)
            raise _NextHost(Result.temporary("4.4.2", f"lost connection with {label} while greeting: {error}",
                                             label)) from None

    def _ehlo(self, connection: Connection) -> None:
        reply = connection.command(f"EHLO {self.hostname}", self.timeout)
        connection.extensions = {}
        if reply.code == 250:
            for line in reply.lines[1:]:
                keyword, _, value = line.partition(" ")
                connection.extensions[keyword.upper()] = value
            return
        reply = connection.command(f"HELO {self.hostname}", self.timeout)
        if reply.code != 250:
            raise ProtocolError(f"HELO rejected: {reply}")

    def _transaction(self, connection: Connection, envelope, message_path, size, recipients) -> dict[str, Result]:
        label = connection.label
        ext = connection.extensions
        addresses = [r.address for r in recipients]
        if envelope.smtputf8 and "SMTPUTF8" not in ext and not (envelope.sender.isascii()
                                                                and all(a.isascii() for a in addresses)):
            return self._all(addresses, Result.permanent(
                "5.6.7", f"SMTPUTF8 is required, but was not offered by host {label}", label))
        limit = ext.get("SIZE", "")
        if re.fullmatch(r"[0-9]{1,20}", limit) and int(limit) and size > int(limit):
            return self._all(addresses, Result.permanent(
                "5.3.4", f"message size {size} exceeds size limit {limit} of server {label}", label))
        mail = f"MAIL FROM:<{envelope.sender}>"
        if "SIZE" in ext:
            mail += f" SIZE={size}"
        if envelope.body == "8BITMIME" and "8BITMIME" in ext:
            mail += " BODY=8BITMIME"
        if envelope.smtputf8 and "SMTPUTF8" in ext:
            mail += " SMTPUTF8"
        dsn = "DSN" in ext
        if dsn and envelope.ret:
            mail += f" RET={envelope.ret}"
        if dsn and envelope.envid:
            mail += f" ENVID={encode_xtext(envelope.envid)}"
        rcpts = []
        for recipient in recipients:
            line = f"RCPT TO:<{recipient.address}>"
            if dsn and recipient.notify:
                line += f" NOTIFY={','.join(recipient.notify)}"
            if dsn and recipient.orcpt:
                addr_type, _, original = recipient.orcpt.partition(";")
                line += f" ORCPT={addr_type};{encode_xtext(original)}"
            rcpts.append(line)
        pipelining = "PIPELINING" in ext
        if pipelining:
            # RFC 2920 3.1: MAIL, RCPTs and DATA go in one write.
            connection.send(("\r\n".join([mail, *rcpts, "DATA"]) + "\r\n").encode("utf-8"))
            mail_reply = connection.read_reply(self.timeout)
            rcpt_replies = [connection.read_reply(self.timeout) for _ in rcpts]
            data_reply = connection.read_reply(120)
        else:
            mail_reply = connection.command(mail, self.timeout)
            if mail_reply.code != 250:
                rcpt_replies, data_reply = [], None
            else:
                rcpt_replies = [connection.command(line, self.timeout) for line in rcpts]
                data_reply = connection.command("DATA", 120) if any(r.code // 100 == 2 for r in rcpt_replies) else None

        def failure(reply: SmtpReply, stage: str) -> Result:
            text = f"host {label} said: {reply} (in reply to {stage} command)"
            maker = Result.permanent if reply.code >= 500 else Result.temporary
            return maker(reply.dsn(), text, label, f"smtp; {reply}")

        if mail_reply.code != 250:
            if data_reply is not None and data_reply.code == 354:
                connection.send(b".\r\n")
                connection.read_reply(600)
            return self._all(addresses, failure(mail_reply, "MAIL FROM"))
        results: dict[str, Result] = {}
        accepted = []
        for recipient, reply in zip(recipients, rcpt_replies):
            if reply.code // 100 == 2:
                accepted.append(recipient.address)
            else:
                results[recipient.address] = failure(reply, "RCPT TO")
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                connection.send(b".\r\n")       # RFC 2920 3.1: send an empty message
                connection.read_reply(600)
            return results
        if data_reply is None or data_reply.code != 354:
            reply = data_reply or SmtpReply(451, ["4.0.0 DATA not accepted"])
            for address in accepted:
                results[address] = failure(reply, "DATA")
            return results
        self._send_content(connection, message_path)
        final = connection.read_reply(600)                        # RFC 5321 4.5.3.2.6
        for address in accepted:
            if final.code // 100 == 2:
                results[address] = Result(kind="delivered", dsn=final.dsn() if final.dsn()[0] == "2" else "2.0.0",
                                          text=f"{final}", remote_mta=label, diagnostic=f"smtp; {final}")
            else:
                results[address] = failure(final, "end of DATA")
        return results

    def _send_content(self, connection: Connection, message_path: str) -> None:
        """Stream the spool file with dot-stuffing (RFC 5321 4.5.2)."""
        connection.sock.settimeout(180)                          # RFC 5321 4.5.3.2.5
        buffer = []
        buffered = 0
        with open(message_path, "rb") as handle:
            for line in handle:
                if line[:1] == b".":
                    line = b"." + line
                buffer.append(line)
                buffered += len(line)
                if buffered >= 65536:
                    connection.send(b"".join(buffer))
                    buffer, buffered = [], 0
        if buffer and not buffer[-1].endswith(b"\r\n"):
            buffer.append(b"\r\n")
        buffer.append(b".\r\n")
        connection.send(b"".join(buffer))

    # --- connection cache ---

    def _take_cached(self, ip: str, port: int) -> Connection | None:
        now = time.monotonic()
        with self._lock:
            pool = self._cache.get((ip, port), [])
            while pool:
                connection = pool.pop()
                if now - connection.last_used < CACHE_IDLE:
                    return connection
                threading.Thread(target=connection.close, daemon=True).start()
        return None

    def _release(self, connection: Connection) -> None:
        connection.last_used = time.monotonic()
        with self._lock:
            self._cache.setdefault((connection.ip, connection.port), []).append(connection)

    def prune(self) -> None:
        """Close connections idle longer than CACHE_IDLE (called by the scheduler)."""
        now = time.monotonic()
        stale = []
        with self._lock:
            for key, pool in self._cache.items():
                keep = [c for c in pool if now - c.last_used < CACHE_IDLE]
                stale.extend(c for c in pool if now - c.last_used >= CACHE_IDLE)
                self._cache[key] = keep
        for connection in stale:
            connection.close()

    def close_all(self) -> None:
        with self._lock:
            pools, self._cache = list(self._cache.values()), {}
        for pool in pools:
            for connection in pool:
                connection.close()


class _NextHost(Exception):
    def __init__(self, result: Result):
        super().__init__(result.text)
        self.result = result


class _TlsFailed(Exception):
    pass


def _is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False

