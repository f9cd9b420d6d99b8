"""The one table of SMTP replies: `Reply(code, enhanced, text)`.

Every reply the server sends after the greeting is built here, with its RFC
3463 enhanced status code (RFC 2034 section 3 exempts only the greeting and
the EHLO/HELO replies, and 334/354 intermediate replies carry none). Handlers
return these; the session's single writer sends them. A reply with variable
text is made with `reply.fmt(...)` or `reply.with_text(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # "" for replies that carry no enhanced code
    text: str

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def fmt(self, **values: object) -> "Reply":
        return Reply(self.code, self.enhanced, self.text.format(**values))

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)

    @property
    def lines(self) -> tuple[str, ...]:
        """The reply as wire lines without CRLF; multi-line text uses `\\n`."""
        return self._encoded()[0]

    @property
    def wire(self) -> bytes:
        return self._encoded()[1]

    def _encoded(self) -> tuple[tuple[str, ...], bytes]:
        # Kept on the instance: most replies are constants of this table,
        # sent again and again (functools.cached_property would take a
        # lock on each new reply, and fmt() makes one per use).
        encoded = self.__dict__.get("_encoded_cache")
        if encoded is None:
            parts = self.text.split("\n")
            prefix = f"{self.enhanced} " if self.enhanced else ""
            last = len(parts) - 1
            lines = tuple(f"{self.code}{' ' if index == last else '-'}{prefix}{part}"
                          for index, part in enumerate(parts))
            encoded = (lines, "".join(line + "\r\n" for line in lines).encode("utf-8", "replace"))
            self.__dict__["_encoded_cache"] = encoded
        return encoded

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


# --- 2xx ---
GREETING = Reply(220, "", "{hostname} ESMTP mta")
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
CHUNK_OK = Reply(250, "2.0.0", "Ok: {size} octets received")
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH")
NON_SMTP = Reply(221, "2.7.0", "Error: non-SMTP command received, closing connection")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

# --- 3xx (intermediate: no enhanced code) ---
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
AUTH_CHALLENGE = Reply(334, "", "{challenge}")

# --- 4xx ---
SERVICE_SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} Service shutting down, closing connection")
TIMEOUT = Reply(421, "4.4.2", "{hostname} Error: timeout exceeded, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} Error: too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_IP = Reply(421, "4.7.0", "{hostname} Error: too many connections from {ip}, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} Error: too many errors, closing connection")
RATE_LIMITED = Reply(450, "4.7.1", "Error: rate limit exceeded for {kind} {value} ({limit} messages per hour), try again later")
GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again in {seconds} seconds")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error, try again later")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
AUTH_LOCKED = Reply(454, "4.7.0", "Too many authentication failures, try again later")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to local problem")
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")

# --- 5xx ---
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Error: command line must end with <CR><LF>")
SYNTAX = Reply(501, "5.5.4", "Syntax: {usage}")
BAD_PARAMETER = Reply(501, "5.5.4", "Error: {detail}")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax: {detail}")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax: {detail}")
BAD_HELO = Reply(501, "5.5.4", "Syntax: {verb} hostname")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: {detail}")
UNKNOWN_AUTH_MECHANISM = Reply(504, "5.5.4", "Unsupported authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
USER_UNKNOWN = Reply(550, "5.1.1", "<{address}>: Recipient address rejected: User unknown")
ROUTING_NOT_ALLOWED = Reply(550, "5.7.1", "<{address}>: Recipient address rejected: sender-specified routing is not allowed")
BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> received in message content (SMTP smuggling protection)")
NUL_IN_CONTENT = Reply(550, "5.6.0", "Error: message content contains NUL characters")
TEXT_LINE_TOO_LONG = Reply(550, "5.5.2", "Error: message line longer than 1000 octets (RFC 5321 4.5.3.1.6)")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
DECLARED_TOO_BIG = Reply(552, "5.3.4", "Error: message size {size} exceeds fixed limit {limit}")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "<{address}>: Sender address rejected: not owned by user {user}")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Error: non-ASCII address requires the SMTPUTF8 parameter")
RELAY_DENIED = Reply(554, "5.7.1", "<{address}>: Relay access denied")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (mail loop?)")
BLOCKED = Reply(554, "5.7.1", "{detail}")
RBL_LISTED = Reply(554, "5.7.1", "Service unavailable; client [{ip}] blocked using {zone} ({code})")
SPF_FAIL = Reply(550, "5.7.23", "<{sender}>: SPF validation failed: {detail}")
DMARC_REJECT = Reply(550, "5.7.1", "Message rejected by the DMARC policy of {domain}")
SEND_QUIT = Reply(503, "5.5.1", "Error: service unavailable, send QUIT")
BAD_MAIL_PARAMETER = Reply(555, "5.5.4", "Error: {detail}")
