"""One SMTP session (RFC 5321): the command loop and the `smtp_<VERB>` handlers.

A `Session` owns one client connection, run in its own thread by
`mta.smtp.server`. Per-connection state lives on the session (HELO name,
TLS, authenticated user, error count); per-transaction state lives on a
`Transaction` that RSET, HELO/EHLO, STARTTLS and the end of a message
discard (RFC 5321 4.1.4).

Handlers return a `Reply` from `mta.replies`; `send` is the single writer: it
writes, logs the transcript, counts errors and closes the session when the
error budget is spent (RFC 5321 4.3.2, chasquid's model). Nothing here
writes the spool directly: messages go through `Spool.new_message()`.
"""

from __future__ import annotations

import email.utils
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import struct
from dataclasses import dataclass, field

from mta import metrics, replies
from mta.address import AddressError, Mailbox, parse_path, split_path_and_params
from mta.policy import dkim, dmarc, rbl, spf
from mta.policy.lists import BLACK, WHITE
from mta.replies import Reply
from mta.smtp import auth as sasl
from mta.smtp.data import ClientGone, Content, read_chunk, read_data
from mta.smtp.esmtp import MailParams, ParamError, parse_mail_params, parse_rcpt_params
from mta.spool import Envelope, IncomingMessage, Recipient

log = logging.getLogger("mta.smtp")

DIGITS = re.compile(r"[0-9]+")   # str.isdigit() also accepts "²", which int() refuses
MAX_COMMAND = 512          # RFC 5321 4.5.3.1.4, including CRLF
MAX_ENVELOPE_COMMAND = 1024  # MAIL/RCPT with RFC 3461 parameters (ORCPT: +500)
MAX_AUTH_LINE = 12288      # RFC 4954 4
LINE_LIMITS = {"MAIL": MAX_ENVELOPE_COMMAND, "RCPT": MAX_ENVELOPE_COMMAND, "AUTH": MAX_AUTH_LINE}
MAX_GARBAGE = 65536        # an over-long line is skipped up to this, then we hang up
ERROR_LIMIT = 10           # 5xx replies before 421 (RFC 5321 4.3.2 lets us close)
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH", "TRACE", "HOST:", "USER-AGENT:"})
ROUTING_CHARACTERS = "%!@"  # sender-specified routing in a local part: never relayed


def set_kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket, idle timeout enforced by the kernel (SO_RCVTIMEO/SO_SNDTIMEO).

    With Python's own socket timeout every recv and send is preceded by a
    poll(2), and each system call hands the GIL to another session thread:
    the hand-offs, not the calls, were the largest cost per message.
    A timed-out call fails with EAGAIN, which SessionReader and
    Session._write turn back into socket.timeout. Plain sessions only:
    `Session._start_tls` goes back to Python's timeout.

    Listeners set it on the listening socket, whose accepted sockets
    inherit both options (Linux copies them in accept), so a session only
    calls this when SIGHUP changed smtp_timeout since its listener opened.
    """
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class SessionReader(io.RawIOBase):
    """The raw side of a session's BufferedReader (plain or TLS socket)."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._sock.recv_into(buffer)
        except BlockingIOError:   # SO_RCVTIMEO expired
            raise socket.timeout("timed out") from None


def session_reader(sock: socket.socket) -> io.BufferedReader:
    return io.BufferedReader(SessionReader(sock), 65536)


class CloseSession(Exception):
    """Stop the session now (after whatever reply was already sent)."""


class BadLine(Exception):
    """A command line that cannot be parsed as one (too long, bare CR/LF)."""

    def __init__(self, reply: Reply, description: str):
        super().__init__(description)
        self.reply = reply
        self.description = description


@dataclass
class Transaction:
    sender: Mailbox | None
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)
    message: IncomingMessage | None = None   # set once DATA/BDAT starts
    content: Content | None = None
    bdat_error: Reply | None = None
    spf: object = None                        # SpfResult for inbound mail

    @property
    def sender_text(self) -> str:
        return "" if self.sender is None else str(self.sender)

    def abort(self) -> None:
        if self.message is not None:
            self.message.abort()
            self.message = None


class Session:
    def __init__(self, sock: socket.socket, client_address, listener):
        self.sock = sock
        self.listener = listener
        self.mode = listener.mode
        self.ctx = listener.context
        self.config = self.ctx.config   # one snapshot per session (SIGHUP-safe)
        self.client_ip = client_address[0]
        if self.client_ip.startswith("::ffff:"):
            self.client_ip = self.client_ip[7:]
        self.client_port = client_address[1]
        self.client_name = "unknown"
        self.label = f"{self.client_name}[{self.client_ip}]"
        self.reader = None
        self.helo: str | None = None
        self.esmtp = False
        self.tls_info: str | None = None
        self.tls_version: str | None = None
        self.auth_user: str | None = None
        self.transaction: Transaction | None = None
        self.errors = 0
        self.idle = True          # waiting for a command outside a transaction
        self.whitelisted = False  # skips greylisting, RBL and rate limits
        self.blocked: Reply | None = None   # DNSBL listing: only QUIT is served
        self._pending: list[str] = []       # transcript lines not yet written

    # --- the connection ---

    def run(self) -> None:
        metrics.inc(metrics.SMTP_SESSIONS, self.mode)
        log.info("connect from %s on %s", self.label, self.mode)
        try:
            timeout = self.config.smtp_timeout or 0
            if timeout != self.listener.kernel_timeout:
                set_kernel_timeout(self.sock, timeout)
            refusal = self.ctx.tracker.open(self.client_ip, self.config)
            if refusal is not None:
                self.reader = None
                self._write(refusal.fmt(hostname=self.config.hostname, ip=self.client_ip))
                log.warning("refused %s: %s", self.label, refusal.text.split(":")[-1].strip())
                return
            try:
                self._serve()
            finally:
                self.ctx.tracker.close(self.client_ip)
        except CloseSession:
            pass
        except ClientGone:
            log.info("lost connection from %s during %s", self.label, "DATA" if self.transaction else "command")
        except socket.timeout:
            self._try_send(replies.TIMEOUT.fmt(hostname=self.config.hostname))
            log.info("timeout after %s from %s", self._phase(), self.label)
        except (ssl.SSLError, OSError) as error:
            log.info("lost connection from %s: %s", self.label, error.__class__.__name__)
        finally:
            if self.transaction is not None:
                self.transaction.abort()
            self._close()
            log.info("disconnect from %s", self.label)

    def _serve(self) -> None:
        if self.mode == "submissions":
            self._start_tls()   # RFC 8314 3.3: TLS before the greeting
        self.reader = session_reader(self.sock)
        self.blocked = self._check_rbl()
        if self.blocked is not None:
            # RFC 5321 3.1: a 554 greeting, then 503 to everything but QUIT.
            self._write(self.blocked)
        else:
            self._write(replies.GREETING.fmt(hostname=self.config.hostname))
        while True:
            self.idle = self.transaction is None
            if self.ctx.stopping.is_set() and self.idle:
                self.send(replies.SERVICE_SHUTTING_DOWN.fmt(hostname=self.config.hostname))
                return
            try:
                line = self._read_line(MAX_AUTH_LINE)
            except BadLine as bad:
                self._transcript(f"< {bad.description}")
                self.send(bad.reply)
                continue
            self.idle = False
            if line is None:
                if self.ctx.stopping.is_set():
                    self._try_send(replies.SERVICE_SHUTTING_DOWN.fmt(hostname=self.config.hostname))
                return
            reply = self._dispatch(line)
            if reply is not None:
                self.send(reply)

    def _phase(self) -> str:
        if self.transaction is None:
            return "CONNECT" if self.helo is None else "HELO"
        return "DATA" if self.transaction.message else ("RCPT" if self.transaction.recipients else "MAIL")

    def _close(self) -> None:
        self._flush_transcript()
        try:
            if self.reader is not None:
                self.reader.close()
        except OSError:
            pass
        if isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.settimeout(2)
                self.sock = self.sock.unwrap()   # close_notify (RFC 8446 6.1)
            except (ssl.SSLError, OSError, ValueError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def interrupt(self) -> None:
        """From the shutdown thread: wake a session blocked reading a command."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RD)
        except OSError:
            pass

    # --- reading and writing ---

    def _read_line(self, limit: int) -> bytes | None:
        """One CRLF-terminated line without its CRLF; None at end of input.

        Raises BadLine (with the reply to send) for an over-long line or one
        with a bare CR or LF (RFC 5321 2.3.8: only CRLF ends a line).
        """
        line = self.reader.readline(limit + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            # RFC 5321 4.5.3.1.4/4.5.3.1.5: too long; skip to its end, bounded.
            skipped = len(line)
            while not line.endswith(b"\n"):
                line = self.reader.readline(8192)
                skipped += len(line)
                if not line or skipped > MAX_GARBAGE:
                    self.send(replies.LINE_TOO_LONG)
                    raise CloseSession()
            raise BadLine(replies.LINE_TOO_LONG, "(over-long line)")
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise BadLine(replies.BARE_LF_COMMAND, "(line with bare CR or LF)")
        return line[:-2]

    def _transcript(self, text: str) -> None:
        self._pending.append(text)

    def _flush_transcript(self) -> None:
        """The lines collected since the last flush, as one write."""
        if self._pending:
            if self.ctx.transcript is not None:
                self.ctx.transcript.write(self.label, self._pending)
            self._pending = []

    def _write(self, reply: Reply) -> None:
        for text in reply.lines:
            self._pending.append(f"> {text}")
        # The transcript goes out at errors, at the end of the session and
        # every 64 lines, not per reply: every write(2) hands the GIL over,
        # and hand-offs dominated the profile.
        if reply.code >= 400 or len(self._pending) > 64:
            self._flush_transcript()
        try:
            self.sock.sendall(reply.wire)
        except BlockingIOError:   # SO_SNDTIMEO expired
            raise socket.timeout("timed out") from None

    def _try_send(self, reply: Reply) -> None:
        try:
            self._write(reply)
        except OSError:
            pass

    def send(self, reply: Reply) -> None:
        """The single writer: send, log, count errors, enforce the budget."""
        self._write(reply)
        if reply.code >= 500:
            self.errors += 1
            if self.errors >= ERROR_LIMIT:
                self._write(replies.TOO_MANY_ERRORS.fmt(hostname=self.config.hostname))
                log.warning("too many errors from %s, closing", self.label)
                raise CloseSession()
        if reply.code == 421:
            raise CloseSession()

    def reject(self, reply: Reply, stage: str, reason: str, recipient: str | None = None) -> Reply:
        """Log a policy/protocol refusal Postfix-style and count it."""
        metrics.MESSAGES_REJECTED.labels(reason=reason).inc()
        tx = self.transaction
        log.info("NOQUEUE: reject: %s from %s: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                 stage, self.label, reply, tx.sender_text if tx else "", recipient or "",
                 "ESMTP" if self.esmtp else "SMTP", self.helo or "")
        return reply

    # --- dispatch ---

    def _dispatch(self, raw: bytes) -> Reply | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._transcript(f"< {raw[:100]!r}")
            return replies.UNKNOWN_COMMAND.with_text("Error: invalid characters in command")
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb == "AUTH":
            # Never log an initial response: it holds the password (RFC 4954).
            mechanism = argument.split(" ", 1)[0][:20]
            self._transcript(f"< AUTH {mechanism}{' ****' if ' ' in argument.strip() else ''}")
        else:
            self._transcript(f"< {line}")
        method = VERBS.get(verb)
        metrics.inc(metrics.SMTP_COMMANDS, self.mode, verb if method else "other")
        if "\0" in line:
            return replies.UNKNOWN_COMMAND.with_text("Error: NUL character in command")
        if verb in HTTP_VERBS:
            # A web client or a proxy abuse attempt: hang up (Postfix does too).
            log.warning("non-SMTP command from %s: %s", self.label, line[:60])
            self._write(replies.NON_SMTP)
            raise CloseSession()
        limit = LINE_LIMITS.get(verb, MAX_COMMAND)
        if len(raw) + 2 > limit:
            return replies.LINE_TOO_LONG
        if self.blocked is not None and verb != "QUIT":
            return replies.SEND_QUIT             # RFC 5321 3.1, after a 554 greeting
        if method is None:
            return replies.UNKNOWN_COMMAND
        return method(self, argument.strip(" ") if argument else "")

    # --- connection-level verbs ---

    def _reset(self) -> None:
        if self.transaction is not None:
            self.transaction.abort()
        self.transaction = None

    def _hello(self, argument: str, verb: str) -> str | None:
        if not argument or " " in argument.strip():
            return None
        self._reset()
        self.helo = argument
        return argument

    def smtp_helo(self, argument: str) -> Reply:
        if self._hello(argument, "HELO") is None:
            return replies.BAD_HELO.fmt(verb="HELO")
        self.esmtp = False
        return Reply(250, "", self.config.hostname)

    def smtp_ehlo(self, argument: str) -> Reply:
        if self._hello(argument, "EHLO") is None:
            return replies.BAD_HELO.fmt(verb="EHLO")
        self.esmtp = True
        lines = [
            f"{self.config.hostname} Hello {argument} [{self.client_ip}]",
            "PIPELINING",
            f"SIZE {self.config.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "CHUNKING",
        ]
        if self._tls_offered():
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
        lines.append("HELP")
        return Reply(250, "", "\n".join(lines))

    def smtp_noop(self, argument: str) -> Reply:
        return replies.OK

    def smtp_rset(self, argument: str) -> Reply:
        if argument:
            return replies.SYNTAX.fmt(usage="RSET")
        self._reset()
        return replies.OK

    def smtp_quit(self, argument: str) -> Reply:
        self._write(replies.CLOSING)
        raise CloseSession()

    def smtp_vrfy(self, argument: str) -> Reply:
        if not argument:
            return replies.SYNTAX.fmt(usage="VRFY address")
        return replies.CANNOT_VRFY  # RFC 5321 3.5.3: no address harvesting

    def smtp_expn(self, argument: str) -> Reply:
        return replies.NOT_IMPLEMENTED

    def smtp_help(self, argument: str) -> Reply:
        return replies.HELP

    # --- STARTTLS (RFC 3207) ---

    def _tls_offered(self) -> bool:
        return self.tls_version is None and self.ctx.tls is not None and self.ctx.tls.context is not None

    def smtp_starttls(self, argument: str) -> Reply:
        if argument:
            return replies.SYNTAX.fmt(usage="STARTTLS")
        if self.tls_version is not None:
            return replies.BAD_SEQUENCE.fmt(detail="TLS already active")
        if not self._tls_offered():
            return replies.NOT_IMPLEMENTED
        if self.helo is None:
            return replies.BAD_SEQUENCE.fmt(detail="send EHLO first")
        if self.transaction is not None:
            return replies.BAD_SEQUENCE.fmt(detail="STARTTLS not allowed inside a mail transaction")
        self._write(replies.TLS_READY)
        # CVE-2011-0411: whatever the client pipelined after STARTTLS is in the
        # old reader's buffer; dropping the reader discards it unexecuted.
        self.reader.close()
        self.reader = None
        self._start_tls()
        self.reader = session_reader(self.sock)
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self._reset()
        return None

    def _start_tls(self) -> None:
        context = self.ctx.tls.context if self.ctx.tls else None
        if context is None:
            log.error("no TLS context for %s listener", self.mode)
            raise CloseSession()
        # OpenSSL retries a read that SO_RCVTIMEO cut short instead of
        # failing, so TLS sessions keep Python's own timeout.
        self.sock.settimeout(self.config.smtp_timeout or None)
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError, ValueError) as error:
            metrics.TLS_HANDSHAKES.labels(result="failed").inc()
            log.info("TLS handshake failed with %s: %s", self.label, getattr(error, "reason", None) or error)
            raise CloseSession() from None
        cipher = self.sock.cipher()
        self.tls_version = self.sock.version()
        self.tls_info = f"using {self.tls_version} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
        metrics.TLS_HANDSHAKES.labels(result="ok").inc()
        log.info("%s TLS connection established from %s: %s", self.mode, self.label, self.tls_info)

    # --- AUTH (RFC 4954) ---

    def _auth_allowed_here(self) -> bool:
        return self.mode in ("submission", "submissions")

    def _auth_offered(self) -> bool:
        if not self._auth_allowed_here() or self.auth_user is not None:
            return False
        return self.tls_version is not None or not self.config.tls_required_submission

    def smtp_auth(self, argument: str) -> Reply | None:
        if not self._auth_allowed_here():
            return replies.BAD_SEQUENCE.fmt(detail="authentication not enabled")
        if self.helo is None or not self.esmtp:
            return replies.BAD_SEQUENCE.fmt(detail="send EHLO first")
        if self.auth_user is not None:
            return replies.BAD_SEQUENCE.fmt(detail="already authenticated")
        if self.transaction is not None:
            return replies.BAD_SEQUENCE.fmt(detail="AUTH not allowed during a mail transaction")
        if self.tls_version is None and self.config.tls_required_submission:
            return replies.ENCRYPTION_REQUIRED
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if mechanism not in sasl.MECHANISMS:
            return replies.UNKNOWN_AUTH_MECHANISM
        if self.ctx.lockout.locked(f"ip:{self.client_ip}"):
            log.warning("AUTH from locked-out client %s refused", self.label)
            metrics.AUTH_ATTEMPTS.labels(result="locked").inc()
            return replies.AUTH_LOCKED
        try:
            if mechanism == "PLAIN":
                data = sasl.b64decode(initial) if initial else self._challenge("")
                authzid, username, password = sasl.decode_plain(data)
                if authzid and authzid.lower() != username.lower():
                    # RFC 4616: we authorize only as oneself.
                    return self._auth_failed(username, "authorization identity differs")
            else:
                data = sasl.b64decode(initial) if initial else self._challenge(sasl.LOGIN_USERNAME_CHALLENGE)
                username = sasl.decode_text(data)
                password = sasl.decode_text(self._challenge(sasl.LOGIN_PASSWORD_CHALLENGE))
        except sasl.AuthDecodeError:
            return replies.AUTH_BAD_BASE64
        except _AuthCancelled:
            return replies.AUTH_CANCELLED
        if self.ctx.lockout.locked(f"user:{username.lower()}"):
            metrics.AUTH_ATTEMPTS.labels(result="locked").inc()
            log.warning("AUTH for locked-out user %s from %s refused", username, self.label)
            return replies.AUTH_LOCKED
        if not self.ctx.users.verify(username, password):
            return self._auth_failed(username, "bad credentials")
        self.ctx.lockout.succeed(f"ip:{self.client_ip}", f"user:{username.lower()}")
        self.auth_user = username.lower()
        metrics.AUTH_ATTEMPTS.labels(result="success").inc()
        log.info("%s: AUTH %s succeeded, sasl_username=%s", self.label, mechanism, self.auth_user)
        return replies.AUTH_OK

    def _challenge(self, challenge: str) -> bytes:
        self._write(replies.AUTH_CHALLENGE.fmt(challenge=challenge))
        try:
            line = self._read_line(MAX_AUTH_LINE)
        except BadLine:
            raise sasl.AuthDecodeError("bad line") from None
        if line is None:
            raise ClientGone()
        self._transcript("< ****")
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            raise _AuthCancelled()
        return sasl.b64decode(text)

    def _auth_failed(self, username: str, why: str) -> Reply:
        metrics.AUTH_ATTEMPTS.labels(result="failure").inc()
        locked = self.ctx.lockout.fail(f"ip:{self.client_ip}", f"user:{username.lower()[:256]}")
        log.warning("%s: AUTH failed for %r: %s", self.label, username[:256], why)
        for key in locked:
            metrics.AUTH_LOCKOUTS.inc()
            log.warning("lockout: %s locked for %ss after repeated AUTH failures", key, self.config.auth_lockout_duration)
        return replies.AUTH_FAILED

    # --- MAIL / RCPT ---

    def _needs_auth(self) -> bool:
        return self._auth_allowed_here() and self.config.auth_required and self.auth_user is None

    def _may_relay(self) -> bool:
        return self.auth_user is not None or self.config.in_mynetworks(self.client_ip)

    def smtp_mail(self, argument: str) -> Reply:
        if self.helo is None:
            return replies.BAD_SEQUENCE.fmt(detail="send HELO/EHLO first")
        if self.transaction is not None:
            return replies.BAD_SEQUENCE.fmt(detail="nested MAIL command")
        if self._needs_auth():
            if self.tls_version is None and self.config.tls_required_submission:
                return replies.MUST_STARTTLS
            return replies.AUTH_REQUIRED
        if argument[:5].upper() != "FROM:":
            return replies.SYNTAX.fmt(usage="MAIL FROM:<address>")
        try:
            path, params_text = split_path_and_params(argument[5:])
            if params_text and not self.esmtp:
                return replies.BAD_MAIL_PARAMETER.fmt(detail="parameters need EHLO (RFC 5321 4.1.1.2)")
            params = parse_mail_params(params_text)
        except ParamError as error:
            return error.reply
        except AddressError as error:
            return replies.BAD_SENDER_SYNTAX.fmt(detail=error)
        try:
            sender = parse_path(path, utf8=True, allow_null=True)
        except AddressError as error:
            return replies.BAD_SENDER_SYNTAX.fmt(detail=error)
        if sender is not None and not sender.is_ascii and not params.smtputf8:
            return replies.SMTPUTF8_REQUIRED     # RFC 6531 3.4
        if params.size is not None and params.size > self.config.max_message_size:
            return self.reject(replies.DECLARED_TOO_BIG.fmt(size=params.size, limit=self.config.max_message_size),
                               "MAIL", "size")
        if not self.ctx.spool.has_room(params.size or 0):
            log.warning("spool disk nearly full: refusing mail from %s", self.label)
            return replies.INSUFFICIENT_STORAGE
        refusal = self._check_lists(sender)
        if refusal is not None:
            return refusal
        if not self.whitelisted:
            refusal = self._check_rate(sender)
            if refusal is not None:
                return refusal
        spf_result = None
        if self.config.spf_enabled and not self._trusted():
            spf_result = spf.check(self.ctx.resolver, self.client_ip, "" if sender is None else str(sender),
                                   self.helo, self.config.hostname)
            if spf_result.result == "fail" and self.config.spf_reject_fail and not self.whitelisted:
                return self.reject(replies.SPF_FAIL.fmt(sender=sender or "", detail=spf_result.explanation
                                                        or "not permitted"), "MAIL", "spf")
        if self.auth_user and self.config.sender_login_check and sender is not None \
                and not self._owns(sender):
            return self.reject(replies.SENDER_NOT_OWNED.fmt(address=sender, user=self.auth_user), "MAIL", "sender_login")
        self.transaction = Transaction(sender, params, spf=spf_result)
        return replies.SENDER_OK

    def _trusted(self) -> bool:
        """Authenticated or MTA_MYNETWORKS: outbound mail, not checked as inbound."""
        return self.auth_user is not None or self.config.in_mynetworks(self.client_ip)

    def _check_rbl(self) -> Reply | None:
        """DNSBL at connect (RFC 5782); whitelisted and trusted clients skip it."""
        config = self.config
        if not (config.rbl_enabled and config.rbl_zones) or self.config.in_mynetworks(self.client_ip):
            return None
        if self.ctx.policy.client_status(self.client_ip) == WHITE:
            return None
        listed = rbl.check(self.ctx.resolver, self.client_ip, config.rbl_zones)
        if listed is not None:
            self.reject(listed, "CONNECT", "rbl")
        return listed

    def _check_rate(self, sender: Mailbox | None) -> Reply | None:
        """Token buckets per client IP, user and sender domain (450 4.7.1)."""
        config = self.config
        domain = sender.key.rpartition("@")[2] if sender is not None else ""
        limited = self.ctx.ratelimiter.check([
            ("ip", self.client_ip, config.rate_limit_ip),
            ("user", self.auth_user or "", config.rate_limit_user),
            ("domain", domain, config.rate_limit_domain),
        ])
        if limited is not None:
            log.warning("rate limit: %s from %s", limited.text, self.label)
            return self.reject(limited, "MAIL", "ratelimit")
        return None

    def _check_lists(self, sender: Mailbox | None) -> Reply | None:
        """Black/white lists (policy.json), read fresh for every MAIL."""
        policy = self.ctx.policy
        client, by_sender = policy.statuses(self.client_ip, sender.key if sender is not None else "")
        self.whitelisted = WHITE in (client, by_sender)
        if self.whitelisted:
            return None
        if client == BLACK:
            return self.reject(replies.BLOCKED.fmt(detail=f"<{self.label}>: Client host rejected: Access denied"),
                               "MAIL", "blacklist")
        if by_sender == BLACK:
            return self.reject(replies.BLOCKED.fmt(detail=f"<{sender}>: Sender address rejected: Access denied"),
                               "MAIL", "blacklist")
        return None

    def _owns(self, sender: Mailbox) -> bool:
        """An authenticated user may send as their login or an alias of it."""
        key = sender.key
        if key == self.auth_user:
            return True
        aliases = self.ctx.aliases
        for name in aliases.owners(self.auth_user):
            if name == key:
                return True
            if name.endswith("@*") and key.rpartition("@")[0] == name[:-2] \
                    and self.config.is_local_domain(sender.domain):
                return True
        return False

    def smtp_rcpt(self, argument: str) -> Reply:
        tx = self.transaction
        if tx is None:
            return replies.BAD_SEQUENCE.fmt(detail="need MAIL command")
        if tx.message is not None:
            return replies.BAD_SEQUENCE.fmt(detail="RCPT not allowed during BDAT")
        if argument[:3].upper() != "TO:":
            return replies.SYNTAX.fmt(usage="RCPT TO:<address>")
        try:
            path, params_text = split_path_and_params(argument[3:])
            if params_text and not self.esmtp:
                return replies.BAD_MAIL_PARAMETER.fmt(detail="parameters need EHLO (RFC 5321 4.1.1.3)")
            params = parse_rcpt_params(params_text)
            mailbox = parse_path(path, utf8=True, allow_postmaster=True)
        except ParamError as error:
            return error.reply
        except AddressError as error:
            return replies.BAD_RECIPIENT_SYNTAX.fmt(detail=error)
        if not mailbox.is_ascii and not tx.params.smtputf8:
            return replies.SMTPUTF8_REQUIRED
        if len(tx.recipients) >= self.config.max_recipients:
            return replies.TOO_MANY_RECIPIENTS    # RFC 5321 4.5.3.1.10
        if not mailbox.domain:                    # <Postmaster>, RFC 5321 4.5.1
            mailbox = Mailbox("postmaster", self.config.domain)
        address = str(mailbox)
        refusal = self._check_recipient(mailbox)
        if refusal is None and self.config.greylist_enabled and not self.whitelisted and not self._trusted():
            refusal = self.ctx.greylist.check(self.client_ip, tx.sender_text, address)
            if refusal is not None:
                log.info("greylisted: %s from %s to %s", self.label, tx.sender_text or "<>", address)
                metrics.MESSAGES_REJECTED.labels(reason="greylist").inc()
        if refusal is not None:
            return refusal
        if all(r.address.lower() != address.lower() for r in tx.recipients):
            tx.recipients.append(Recipient(address=address, orcpt=params.orcpt, notify=params.notify))
        return replies.RECIPIENT_OK

    def _check_recipient(self, mailbox: Mailbox) -> Reply | None:
        address = str(mailbox)
        if self.config.is_local_domain(mailbox.domain):
            if any(char in mailbox.unquoted_local for char in ROUTING_CHARACTERS):
                # user%other@local, "user@other"@local, other!user@local: relay tricks.
                return self.reject(replies.ROUTING_NOT_ALLOWED.fmt(address=address), "RCPT", "relay", address)
            if not self._local_recipient_exists(mailbox):
                return self.reject(replies.USER_UNKNOWN.fmt(address=address), "RCPT", "unknown_user", address)
            return None
        if self._may_relay():
            return None
        return self.reject(replies.RELAY_DENIED.fmt(address=address), "RCPT", "relay", address)

    def _local_recipient_exists(self, mailbox: Mailbox) -> bool:
        key = mailbox.key
        if key.rpartition("@")[0] == "postmaster":   # RFC 5321 4.5.1
            return True
        return self.ctx.users.exists(key) or self.ctx.aliases.lookup(key) is not None

    # --- DATA / BDAT ---

    def _begin_message(self) -> Reply | None:
        """Open the spool file and write our Received: header (RFC 5321 4.4)."""
        tx = self.transaction
        if not self.ctx.spool.has_room(tx.params.size or 0):
            return replies.INSUFFICIENT_STORAGE
        try:
            tx.message = self.ctx.spool.new_message()
            tx.message.write(self._received_header(tx.message.id, tx))
        except OSError as error:
            log.error("cannot create queue file: %s", error)
            tx.abort()
            return replies.LOCAL_ERROR
        tx.content = Content(tx.message.write, self.config.max_message_size)
        return None

    def _protocol(self, tx: Transaction) -> str:
        # RFC 3848 / RFC 6531 3.7.3 "with" keywords.
        base = "UTF8SMTP" if tx.params.smtputf8 else ("ESMTP" if self.esmtp else "SMTP")
        if base == "SMTP":
            return base
        suffix = ("S" if self.tls_version else "") + ("A" if self.auth_user else "")
        return base + suffix

    def _received_header(self, queue_id: str, tx: Transaction) -> bytes:
        date = email.utils.format_datetime(email.utils.localtime())
        lines = [f"Received: from {self.helo} ({self.client_name} [{self._ip_literal()}])"]
        if self.tls_info:
            lines.append(f"\t({self.tls_info})")
        lines.append(f"\tby {self.config.hostname} (mta) with {self._protocol(tx)} id {queue_id}")
        if len(tx.recipients) == 1:
            lines.append(f"\tfor <{tx.recipients[0].address}>; {date}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{date}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def _ip_literal(self) -> str:
        try:
            return ("IPv6:" if ipaddress.ip_address(self.client_ip).version == 6 else "") + self.client_ip
        except ValueError:
            return self.client_ip

    def smtp_data(self, argument: str) -> Reply:
        tx = self.transaction
        if argument:
            return replies.SYNTAX.fmt(usage="DATA")
        if tx is None or tx.message is not None:
            return replies.BAD_SEQUENCE.fmt(detail="need MAIL command" if tx is None else "DATA not allowed after BDAT")
        if not tx.recipients:
            return replies.BAD_SEQUENCE.fmt(detail="need RCPT command")
        refusal = self._begin_message()
        if refusal is not None:
            return refusal
        self._write(replies.START_DATA)
        read_data(self.reader, tx.content)
        return self._finish_message()

    def smtp_bdat(self, argument: str) -> Reply:
        parts = argument.split()
        if not (1 <= len(parts) <= 2) or not DIGITS.fullmatch(parts[0]) or len(parts[0]) > 15 \
                or (len(parts) == 2 and parts[1].upper() != "LAST"):
            # Without a valid size we cannot find the next command: hang up.
            self._write(replies.SYNTAX.fmt(usage="BDAT size [LAST]"))
            raise CloseSession()
        size = int(parts[0])
        last = len(parts) == 2
        tx = self.transaction
        refusal = None
        if tx is None:
            refusal = replies.BAD_SEQUENCE.fmt(detail="need MAIL command")
        elif not tx.recipients:
            refusal = replies.BAD_SEQUENCE.fmt(detail="need RCPT command")
        elif tx.message is None and tx.bdat_error is None:
            tx.bdat_error = self._begin_message()
        if refusal is not None:
            read_chunk(self.reader, size, None)   # RFC 3030 2: consume it anyway
            return refusal
        read_chunk(self.reader, size, tx.content.chunk if tx.content else None)
        if not last:
            if tx.bdat_error is not None:
                return tx.bdat_error
            return replies.CHUNK_OK.fmt(size=size)
        if tx.bdat_error is not None:
            error = tx.bdat_error
            self._reset()
            return error
        tx.content.finish_chunks()
        return self._finish_message()

    def _finish_message(self) -> Reply:
        tx = self.transaction
        content = tx.content
        self.transaction = None
        if content.error is not None:
            tx.abort()
            reason = {550: "content", 552: "size", 554: "loop", 452: "storage"}.get(content.error.code, "content")
            return self.reject(content.error, "END-OF-MESSAGE", reason)
        try:
            refusal = self._authenticate(tx, content)
        except OSError as error:
            log.error("%s: cannot rewrite queue file: %s", tx.message.id, error)
            tx.abort()
            return replies.LOCAL_ERROR
        if refusal is not None:
            tx.abort()
            return refusal
        envelope = Envelope(
            id=tx.message.id, sender=tx.sender_text, recipients=tx.recipients, size=content.size,
            body=tx.params.body, smtputf8=tx.params.smtputf8, declared_size=tx.params.size,
            ret=tx.params.ret, envid=tx.params.envid, client_ip=self.client_ip, client_helo=self.helo,
            client_name=self.client_name, protocol=self._protocol(tx), auth_user=self.auth_user,
        )
        try:
            entry = tx.message.commit(envelope)
        except OSError as error:
            log.error("%s: queue file write error: %s", tx.message.id, error)
            tx.abort()
            return replies.INSUFFICIENT_STORAGE if error.errno == 28 else replies.LOCAL_ERROR
        metrics.inc(metrics.MESSAGES_RECEIVED, self.mode)
        log.info("%s: client=%s, helo=<%s>, proto=%s%s, from=<%s>, size=%d, nrcpt=%d (queue active)",
                 entry.id, self.label, self.helo, envelope.protocol,
                 f", sasl_username={self.auth_user}" if self.auth_user else "",
                 envelope.sender, envelope.size, len(envelope.recipients))
        return replies.QUEUED.fmt(queue_id=entry.id)


    def _authenticate(self, tx: Transaction, content: Content) -> Reply | None:
        """End of data: SPF/DKIM/DMARC results for inbound mail (one
        Authentication-Results header, RFC 8601), DKIM signing for outbound
        mail; DMARC p=reject failures are refused (RFC 7489 6.7)."""
        config = self.config
        trusted = self._trusted()
        verify = not trusted and (config.spf_enabled or config.dkim_enabled or config.dmarc_enabled)
        # Reading the message back only pays off when some domain has a key.
        signing = trusted and config.dkim_enabled and dkim.has_keys(config.data_dir)
        if not verify and not signing:
            return None
        small = content.size <= dkim.MAX_DKIM_SIZE
        message = tx.message.read_back() if small and (signing or config.dkim_enabled or config.dmarc_enabled) else None
        headers = _header_fields(message) if message is not None else []
        prefix = b""
        if verify:
            dkim_results = dkim.verify(self.ctx.resolver, message) if config.dkim_enabled and message else []
            dmarc_result = None
            if config.dmarc_enabled and message is not None:
                dmarc_result = dmarc.check(self.ctx.resolver, self.ctx.psl.get(), headers, tx.spf, dkim_results)
                if dmarc_result.result == "fail" and dmarc_result.policy == "reject" and config.dmarc_enforce \
                        and not self.whitelisted:
                    return self.reject(replies.DMARC_REJECT.fmt(domain=dmarc_result.from_domain),
                                       "END-OF-MESSAGE", "dmarc")
            text = dmarc.authentication_results(config.hostname, tx.spf if config.spf_enabled else None,
                                                dkim_results if config.dkim_enabled else None, dmarc_result)
            prefix = text.encode("utf-8")
            if tx.spf is not None:
                prefix += tx.spf.received_spf(config.hostname).encode("utf-8")
            tx.message.prepend(prefix, drop_authres_for=config.hostname)
        elif message is not None:
            domain = dmarc.from_domain(headers)
            key = dkim.find_key(config.data_dir, domain) if domain else None
            if key is not None:
                try:
                    signature = dkim.sign(message, *key)
                except Exception as error:   # a bad key must not lose the message
                    log.error("%s: DKIM signing for %s failed: %s", tx.message.id, key[0], error)
                else:
                    tx.message.prepend(signature)
                    log.info("%s: DKIM-signed d=%s s=%s", tx.message.id, key[0], key[1])
        return None


def _header_fields(message: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) pairs of the header section."""
    fields: list[tuple[str, str]] = []
    head = message.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields


class _AuthCancelled(Exception):
    pass


# The verb table, collected once: "MAIL" -> Session.smtp_mail (aiosmtpd's model).
VERBS = {name[5:].upper(): function for name, function in vars(Session).items() if name.startswith("smtp_")}
