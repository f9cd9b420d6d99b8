"""Local delivery: the Maildir and LMTP couriers.

Owns the last hop for local domains. Both couriers take final addresses
(alias expansion is done before, see mta.aliases), read the spool message
file (CRLF line ends, immutable) and return one `Result` per address; the
queue, not the courier, decides what happens next (chasquid's model).

- `MaildirCourier` writes `MAILBOX_DIR/<domain>/<local part>/` Maildirs
  (the layout of maildir(5) and CPython's `mailbox.Maildir.add`): the copy
  is written in `tmp/` under a unique name, fsynced, renamed into `new/`
  and `new/` is fsynced, so a crash leaves no half message in `new/`. The
  stored copy has LF line ends (the Maildir convention) and starts with
  `Return-Path:` (RFC 5321 4.4) and `Delivered-To:` (as Postfix's
  local(8)). Messages are streamed: memory does not grow with their size.
  A mailbox name that could leave MAILBOX_DIR (`..`, `/`, a leading dot)
  is refused, never resolved.
- `LmtpCourier` speaks LMTP (RFC 2033) to a server such as Dovecot over TCP
  (`host:port`) or a unix socket (`/path`): one transaction for all
  addresses, one reply per accepted recipient after the data. The server
  writes Return-Path and Delivered-To itself.

Both refuse mail loops (RFC 5321 6.3) with 5.4.6: more than 100
`Received:` headers, or a `Delivered-To:` header naming the address being
delivered to.

Neither courier retries, logs the mta.log delivery line, or touches the
spool: that is the worker pool's job.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from typing import BinaryIO

from mta.config import split_host_port
from mta import safeio
from mta.delivery.result import Result
from mta.spool.envelope import Envelope

log = logging.getLogger("mta.delivery.local")

MAX_RECEIVED = 100              # RFC 5321 6.3: more hops than this is a loop
HEADER_SCAN_LIMIT = 1024 * 1024  # header octets examined for loop detection
READ_CHUNK = 65536
DIR_MODE = 0o700                # Maildir directories: the mailbox owner only
FILE_MODE = 0o600
LMTP_PORT = 24                  # RFC 2033 5 leaves the port to configuration; 24 is customary
MAX_REPLY_LINE = 4096           # RFC 5321 4.5.3.1.5 says 512; be lenient, but bounded
MAX_REPLY_LINES = 100


# --------------------------------------------------------------------------
# loop detection (RFC 5321 6.3)

@dataclass(frozen=True)
class HeaderFacts:
    """What loop detection needs from the message header."""

    received: int                    # number of Received: fields
    delivered_to: frozenset[str]     # lower-cased addresses of Delivered-To: fields


def scan_headers(message_path: str, limit: int = HEADER_SCAN_LIMIT) -> HeaderFacts:
    """Count Received: and collect Delivered-To: in the header section (folded lines joined)."""
    received = 0
    delivered: set[str] = set()
    fields: list[bytes] = []
    total = 0
    with open(message_path, "rb") as handle:
        while total < limit:
            line = handle.readline(8192)
            if not line or line in (b"\r\n", b"\n"):
                break
            total += len(line)
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += line          # RFC 5322 2.2.3 folding
            else:
                fields.append(line)
    for field in fields:
        name, colon, value = field.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == b"received":
            received += 1
        elif name == b"delivered-to":
            delivered.add(_bare_address(value.decode("utf-8", "replace")))
    return HeaderFacts(received, frozenset(delivered))


def _bare_address(text: str) -> str:
    text = " ".join(text.split())
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.strip().lower()


def loop_result(facts: HeaderFacts, address: str) -> Result | None:
    """A permanent 5.4.6 when delivering to `address` would close a loop."""
    if facts.received > MAX_RECEIVED:
        # RFC 5321 6.3: too many Received: fields
        return Result.permanent("5.4.6", f"mail forwarding loop for {address} (more than {MAX_RECEIVED} "
                                         "Received: headers)")
    if address.lower() in facts.delivered_to:
        # RFC 5321 6.3 (and Postfix local(8)): we delivered this very message here before
        return Result.permanent("5.4.6", f"mail forwarding loop for {address}")
    return None


# --------------------------------------------------------------------------
# Maildir

class MailboxNameError(ValueError):
    """The address cannot name a mailbox directory safely."""


def _check_component(part: str, what: str) -> None:
    # Path traversal: a name is one directory entry, never "..", never
    # hidden, never containing a separator or a control character.
    if not part:
        raise MailboxNameError(f"empty {what}")
    if part.startswith("."):
        raise MailboxNameError(f"{what} starts with '.'")
    if "/" in part or "\\" in part:
        raise MailboxNameError(f"{what} contains a path separator")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
        raise MailboxNameError(f"{what} contains a control character")
    if len(part.encode("utf-8", "surrogateescape")) > 255:
        raise MailboxNameError(f"{what} too long for a file name")


def maildir_path(mailbox_dir: str, address: str) -> str:
    """`MAILBOX_DIR/<domain>/<local part>`; raises MailboxNameError when unsafe."""
    local, at, domain = address.rpartition("@")
    if not at:
        raise MailboxNameError("address without a domain")
    _check_component(local, "local part")
    _check_component(domain, "domain")
    root = os.path.abspath(mailbox_dir)
    path = os.path.join(root, domain, local)
    # Belt and braces: the lexical result must stay below the root.
    if os.path.commonpath([root, os.path.normpath(path)]) != root or os.path.normpath(path) != path:
        raise MailboxNameError("mailbox path leaves the mailbox directory")
    return path


class MaildirCourier:
    """Delivers to `mailbox_dir/<domain>/<local part>/` Maildirs."""

    def __init__(self, mailbox_dir: str):
        self.mailbox_dir = os.path.abspath(mailbox_dir)
        self.hostname = _maildir_hostname(socket.gethostname() or "localhost")

    def deliver(self, envelope: Envelope, message_path: str, addresses: list[str]) -> dict[str, Result]:
        results: dict[str, Result] = {}
        try:
            facts = scan_headers(message_path)
        except OSError as error:
            failure = _disk_error(error, "cannot read queued message")
            return {address: failure for address in addresses}
        for address in addresses:
            if address in results:
                continue
            results[address] = self._deliver_one(envelope, message_path, address, facts)
        return results

    def _deliver_one(self, envelope: Envelope, message_path: str, address: str, facts: HeaderFacts) -> Result:
        loop = loop_result(facts, address)
        if loop is not None:
            return loop
        try:
            path = maildir_path(self.mailbox_dir, address)
        except MailboxNameError as error:
            # RFC 3463 5.1.3: bad destination mailbox address syntax
            return Result.permanent("5.1.3", f"invalid mailbox name for {address}: {error}", remote_mta="maildir")
        prefix = (f"Return-Path: <{envelope.sender}>\n"       # RFC 5321 4.4; "<>" for the null sender
                  f"Delivered-To: {address}\n").encode("utf-8")
        try:
            self._ensure_maildir(path)
            self._store(path, prefix, message_path)
        except OSError as error:
            log.warning("%s: maildir delivery to %s failed: %s", envelope.id, address, error)
            return _disk_error(error, f"cannot deliver to maildir {path}")
        return Result.delivered("delivered to maildir", remote_mta="maildir")

    def _ensure_maildir(self, path: str) -> None:
        """Create the missing levels of root/domain/user/{tmp,new,cur}, durably."""
        domain_dir = os.path.dirname(path)
        if not os.path.isdir(self.mailbox_dir):
            os.makedirs(self.mailbox_dir, mode=DIR_MODE, exist_ok=True)
        for directory in (domain_dir, path,
                          os.path.join(path, "tmp"), os.path.join(path, "new"), os.path.join(path, "cur")):
            try:
                os.mkdir(directory, DIR_MODE)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from None
                continue
            # the new directory entry must survive a crash too
            safeio.fsync_dir(os.path.dirname(directory))

    def _store(self, path: str, prefix: bytes, message_path: str) -> None:
        """tmp/, write, fsync, rename into new/, fsync new/ (maildir(5); mailbox.Maildir.add)."""
        name = self._unique_name()
        temp = os.path.join(path, "tmp", name)
        try:
            with open(temp, "xb", opener=lambda p, flags: os.open(p, flags | os.O_CLOEXEC, FILE_MODE)) as out:
                out.write(prefix)
                with open(message_path, "rb") as source:
                    _copy_crlf_to_lf(source, out)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temp, os.path.join(path, "new", name))
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        safeio.fsync_dir(os.path.join(path, "new"))

    def _unique_name(self) -> str:
        # maildir(5)/Dovecot style: seconds.M<usec>P<pid>R<random>.<host>
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micro}P{os.getpid()}R{secrets.token_hex(8)}.{self.hostname}"


def _maildir_hostname(name: str) -> str:
    # maildir(5): '/' and ':' in the host name are written as \057 and \072
    return name.replace("/", "\\057").replace(":", "\\072")


def _copy_crlf_to_lf(source: BinaryIO, out: BinaryIO) -> None:
    """Stream `source` to `out`, turning CRLF into LF; a CR at a chunk's end waits."""
    pending = b""
    while True:
        chunk = source.read(READ_CHUNK)
        if not chunk:
            break
        data = pending + chunk
        if data.endswith(b"\r"):
            data, pending = data[:-1], b"\r"
        else:
            pending = b""
        out.write(data.replace(b"\r\n", b"\n"))
    out.write(pending)


def _disk_error(error: OSError, what: str) -> Result:
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return Result.temporary("4.3.1", f"{what}: {reason}", remote_mta="maildir")     # RFC 3463 X.3.1 system full
    if error.errno == errno.EDQUOT:
        return Result.temporary("4.2.2", f"{what}: {reason}", remote_mta="maildir")     # RFC 3463 X.2.2 mailbox full
    return Result.temporary("4.3.0", f"{what}: {reason}", remote_mta="maildir")


# --------------------------------------------------------------------------
# LMTP (RFC 2033)

class LmtpError(Exception):
    """The LMTP conversation broke down (bad reply, connection lost)."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.code} " + " ".join(line for line in self.lines if line)

    @property
    def enhanced(self) -> str | None:
        """RFC 2034 / RFC 3463 code at the start of the text, when its class agrees."""
        match = _ENHANCED_RE.match(self.lines[0] if self.lines else "")
        if match and int(match.group(1)[0]) == self.code // 100:
            return match.group(1)
        return None


_ENHANCED_RE = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: |\Z)")
_REPLY_RE = re.compile(rb"([2-5]\d\d)([ -]?)(.*?)\r?\n?\Z", re.S)


class _Connection:
    def __init__(self, target: str, timeout: float):
        if target.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target)
            except BaseException:
                sock.close()
                raise
            self.label = target
        else:
            host, port = split_host_port(target, LMTP_PORT)
            sock = socket.create_connection((host, port), timeout=timeout)
            peer = sock.getpeername()[0]
            self.label = f"{host}[{peer}]:{port}"
        self.sock = sock
        self.reader = sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> Reply:
        lines = []
        code = None
        while True:
            raw = self.reader.readline(MAX_REPLY_LINE)
            if not raw:
                raise LmtpError("connection closed by the server")
            if not raw.endswith(b"\n"):
                raise LmtpError("reply line too long")
            match = _REPLY_RE.match(raw)
            if not match or (code is not None and int(match.group(1)) != code):
                raise LmtpError(f"malformed reply {raw[:80]!r}")
            code = int(match.group(1))
            lines.append(match.group(3).decode("utf-8", "replace").strip())
            if match.group(2) != b"-":
                return Reply(code, tuple(lines))
            if len(lines) >= MAX_REPLY_LINES:
                raise LmtpError("reply with too many lines")

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()


class LmtpCourier:
    """Delivers through an LMTP server (RFC 2033), e.g. Dovecot's lmtp."""

    def __init__(self, target: str, hostname: str, timeout: float = 300):
        if not target.startswith("/"):
            split_host_port(target, LMTP_PORT)    # ValueError now rather than at delivery time
        self.target = target
        self.hostname = hostname
        self.timeout = timeout

    def deliver(self, envelope: Envelope, message_path: str, addresses: list[str]) -> dict[str, Result]:
        results: dict[str, Result] = {}
        try:
            facts = scan_headers(message_path)
        except OSError as error:
            failure = Result.temporary("4.3.0", f"cannot read queued message: {error.strerror or error}")
            return {address: failure for address in addresses}
        todo: list[str] = []
        for address in addresses:
            if address in results or address in todo:
                continue
            loop = loop_result(facts, address)
            if loop is not None:
                results[address] = loop
            elif any(c in address for c in "\r\n\0<>"):
                # never let an address inject a command line
                results[address] = Result.permanent("5.1.3", f"invalid address {address!r}")
            else:
                todo.append(address)
        if todo:
            results.update(self._transaction(envelope, message_path, todo))
        return results

    def _transaction(self, envelope: Envelope, message_path: str, addresses: list[str]) -> dict[str, Result]:
        results: dict[str, Result] = {}
        try:
            conn = _Connection(self.target, self.timeout)
        except socket.timeout:
            failure = Result.temporary("4.4.2", f"connect to {self.target}: timed out", remote_mta=self.target)
            return {address: failure for address in addresses}
        except OSError as error:
            # RFC 3463 X.4.1: no answer from host
            failure = Result.temporary("4.4.1", f"connect to {self.target}: {error.strerror or error}",
                                       remote_mta=self.target)
            return {address: failure for address in addresses}
        stage = "greeting"
        try:
            reply = conn.read_reply()
            if reply.code != 220:
                return _all(addresses, _unusable(reply, stage, conn.label))
            stage = "LHLO"
            conn.send(f"LHLO {self.hostname}\r\n".encode("ascii", "replace"))   # RFC 2033 4.1
            reply = conn.read_reply()
            if reply.code != 250:
                return _all(addresses, _unusable(reply, stage, conn.label))
            extensions = {line.split(" ", 1)[0].upper() for line in reply.lines[1:] if line}

            mail = f"MAIL FROM:<{envelope.sender}>"
            if (envelope.body or "").upper() == "8BITMIME" and "8BITMIME" in extensions:
                mail += " BODY=8BITMIME"                                   # RFC 6152 2
            if envelope.smtputf8:
                if "SMTPUTF8" in extensions:
                    mail += " SMTPUTF8"                                    # RFC 6531 3.4
                elif not (envelope.sender.isascii() and all(a.isascii() for a in addresses)):
                    # RFC 6531 3.5: non-ASCII addresses need a server that takes them
                    failure = Result.permanent("5.6.7", f"{conn.label} does not support SMTPUTF8",
                                               remote_mta=conn.label)
                    self._quit(conn)
                    return _all(addresses, failure)
            commands = [mail] + [f"RCPT TO:<{address}>" for address in addresses]
            if "PIPELINING" in extensions:
                # RFC 2920 3.1: MAIL and RCPT may go out together
                stage = "MAIL FROM"
                conn.send("".join(c + "\r\n" for c in commands).encode("utf-8"))
                replies = [conn.read_reply() for _ in commands]
            else:
                replies = []
                for command in commands:
                    stage = command.split(":", 1)[0]
                    conn.send((command + "\r\n").encode("utf-8"))
                    replies.append(conn.read_reply())
                    if len(replies) == 1 and replies[0].code // 100 != 2:
                        break
            if replies[0].code // 100 != 2:
                self._quit(conn)
                return _all(addresses, _mapped(replies[0], "MAIL FROM", conn.label))
            accepted = []
            for address, reply in zip(addresses, replies[1:]):
                if reply.code // 100 == 2:
                    accepted.append(address)
                else:
                    results[address] = _mapped(reply, "RCPT TO", conn.label)
            if not accepted:
                self._quit(conn)
                return results

            stage = "DATA"
            conn.send(b"DATA\r\n")
            reply = conn.read_reply()
            if reply.code != 354:
                results.update(_all(accepted, _mapped(reply, "DATA", conn.label)))
                self._quit(conn)
                return results
            stage = "end of DATA"
            with open(message_path, "rb") as source:
                _send_dot_stuffed(conn, source)
            # RFC 2033 4.2: one reply per accepted recipient, in RCPT order
            for address in accepted:
                results[address] = _mapped(conn.read_reply(), "end of DATA", conn.label)
            self._quit(conn)
            return results
        except socket.timeout:
            failure = Result.temporary("4.4.2", f"conversation with {conn.label} timed out while sending {stage}",
                                       remote_mta=conn.label)
        except (OSError, LmtpError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            failure = Result.temporary("4.4.2", f"lost connection with {conn.label} while sending {stage}: {reason}",
                                       remote_mta=conn.label)
        finally:
            conn.close()
        for address in addresses:
            results.setdefault(address, failure)
        return results

    @staticmethod
    def _quit(conn: _Connection) -> None:
        try:
            conn.send(b"QUIT\r\n")
            conn.read_reply()
        except (OSError, LmtpError):
            pass


def _all(addresses: list[str], result: Result) -> dict[str, Result]:
    return {address: result for address in addresses}


def _mapped(reply: Reply, command: str, remote: str) -> Result:
    """2xx delivered, 4xx temporary, 5xx permanent; status from the reply (RFC 3463)."""
    text = str(reply)
    klass = reply.code // 100
    dsn = reply.enhanced or f"{klass}.0.0"
    if klass == 2:
        return Result.delivered(text, remote_mta=remote, dsn=dsn)
    diagnostic = "smtp; " + text
    detail = f"{text} (in reply to {command} command)"
    if klass == 5:
        return Result.permanent(dsn, detail, remote_mta=remote, diagnostic=diagnostic)
    if klass == 4:
        return Result.temporary(dsn, detail, remote_mta=remote, diagnostic=diagnostic)
    return Result.temporary("4.5.0", f"unexpected reply {detail}", remote_mta=remote, diagnostic=diagnostic)


def _unusable(reply: Reply, stage: str, remote: str) -> Result:
    """A refused greeting or LHLO: our own server is unwell, so defer, never bounce."""
    text = str(reply)
    status = reply.enhanced or "4.0.0"
    status = "4" + status[1:]
    return Result.temporary(status, f"{remote} refused to talk to us: {text} (in reply to {stage})",
                            remote_mta=remote, diagnostic="smtp; " + text)


def _send_dot_stuffed(conn: _Connection, source: BinaryIO) -> None:
    """Send the message as DATA: CRLF line ends, dot-stuffed, then CRLF.CRLF.

    RFC 5321 4.5.2: a line starting with '.' gets one more. Only CRLF ends a
    line; a bare LF is sent as CRLF, so the server can never see an end of
    data we did not mean (SMTP smuggling).
    """
    buffer = bytearray()
    at_line_start = True
    previous_cr = False
    while True:
        piece = source.readline(READ_CHUNK)
        if not piece:
            break
        if at_line_start and piece[:1] == b".":
            buffer += b"."
        if piece.endswith(b"\n"):
            if not piece.endswith(b"\r\n") and not (piece == b"\n" and previous_cr):
                piece = piece[:-1] + b"\r\n"
            at_line_start = True
        else:
            at_line_start = False
        previous_cr = piece.endswith(b"\r")
        buffer += piece
        if len(buffer) >= READ_CHUNK:
            conn.send(bytes(buffer))
            buffer.clear()
    if not at_line_start:
        buffer += b"\r\n"
    buffer += b".\r\n"
    conn.send(bytes(buffer))
