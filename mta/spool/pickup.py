"""Local submission: the maildrop directory, its file format and the pickup.

`mta sendmail` runs as any local user while the daemon runs as `mta` (or is
not running at all), so the two meet in a drop box, as in Postfix
(postdrop -> maildrop -> pickup -> cleanup):

    MTA_SPOOL_DIR/maildrop/        mode 1733: anyone may create a file, nobody
                                   but the owner (mta) may list, and the
                                   sticky bit stops users removing each
                                   other's files
    maildrop/.tmp-<random>         a submission being written
    maildrop/<id>.<random>         a complete submission (renamed into place)

A maildrop file is one line of versioned JSON (envelope sender, recipients,
full name, flags), then the message exactly as the program gave it to
sendmail. `submit` writes it (write, fsync, rename); `Pickup` is the
daemon's thread that turns each file into a normal queue entry through
`Spool.new_message()` / `IncomingMessage.commit()`, then removes the file:
commit first, unlink second, so a crash can duplicate a message but never
lose one.

The daemon treats every maildrop file as hostile input: it never follows a
symlink, opens nothing but a regular file with a single link, bounds what
it reads by MTA_MAX_MESSAGE_SIZE, validates the header line and every
address, and takes the submitting user from the file's owner (fstat), never
from the file's content. Files it cannot use are moved to `corrupt/` with a
log line; nothing in the maildrop can stop or crash the daemon.

`build_message` is the Postfix cleanup step for local submissions, shared by
the sendmail client (to fail early with a sysexits code) and the pickup
(which does it again, for real): dot handling (-i), line ends to CRLF, -t
recipient extraction, Bcc removal, missing From:/Date:/Message-ID: added.
"""

from __future__ import annotations

import email.utils
import errno
import json
import logging
import os
import pwd
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field

from mta import safeio
from mta.address import AddressError, parse_mailbox
from mta.spool.envelope import Envelope, Recipient
from mta.spool.spool import MAILDROP, new_queue_id

log = logging.getLogger("mta.pickup")

FILE_MODE = 0o644              # the daemon's user must read what any user drops
FORMAT = "mta-maildrop"
FORMAT_VERSION = 1
TEMP_PREFIX = ".tmp-"
NAME_RE = re.compile(r"[0-9A-F]{20}\.[0-9a-f]{16}\Z")
MAX_HEADER_LINE = 1 << 20      # the JSON line: 1 MiB is room for MAX_RECIPIENTS long addresses
MAX_RECIPIENTS = 1000          # command line plus -t headers
MAX_FULL_NAME = 256
MAX_LINE = 998                 # RFC 5322 2.1.1, without CRLF
STALE_TEMP_SECONDS = 3600      # a .tmp- file this old belongs to a dead sendmail
SCAN_INTERVAL = 1.0
MAX_IGNORED = 10000            # names the pickup could neither use nor move

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


class SubmissionError(ValueError):
    """The submission is unusable; `exit_code` is its sysexits code for sendmail."""

    def __init__(self, message: str, exit_code: int = 64):
        super().__init__(message)
        self.exit_code = exit_code


EX_USAGE, EX_DATAERR = 64, 65


@dataclass
class Submission:
    """What the sendmail command line says about a message."""

    recipients: list[str] = field(default_factory=list)
    sender: str | None = None       # -f; None: <login>@MTA_DOMAIN of the submitting user
    full_name: str | None = None    # -F; None: the user's GECOS name
    extract: bool = False           # -t
    ignore_dots: bool = False       # -i / -oi

    def header_line(self) -> bytes:
        data = {"format": FORMAT, "version": FORMAT_VERSION, "sender": self.sender,
                "recipients": self.recipients, "full_name": self.full_name,
                "flags": {"t": self.extract, "i": self.ignore_dots}}
        line = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(line) > MAX_HEADER_LINE:
            raise SubmissionError("too many or too long recipient arguments")
        return line

    @classmethod
    def from_header_line(cls, line: bytes) -> "Submission":
        """Parse and validate the (untrusted) first line of a maildrop file."""
        if len(line) > MAX_HEADER_LINE:
            raise SubmissionError("header line too long")
        try:
            data = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise SubmissionError("header line is not JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SubmissionError("not a maildrop file")
        if data.get("version") != FORMAT_VERSION:
            raise SubmissionError(f"unknown maildrop version {data.get('version')!r}")
        sender, recipients = data.get("sender"), data.get("recipients")
        full_name, flags = data.get("full_name"), data.get("flags")
        if sender is not None and not isinstance(sender, str):
            raise SubmissionError("bad sender")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise SubmissionError("bad recipients")
        if len(recipients) > MAX_RECIPIENTS:
            raise SubmissionError("too many recipients")
        if full_name is not None and not isinstance(full_name, str):
            raise SubmissionError("bad full name")
        if not isinstance(flags, dict) or not all(isinstance(flags.get(k, False), bool) for k in ("t", "i")):
            raise SubmissionError("bad flags")
        return cls(recipients=recipients, sender=sender, full_name=full_name,
                   extract=flags.get("t", False), ignore_dots=flags.get("i", False))


@dataclass
class Prepared:
    sender: str                 # "" is the null reverse-path
    recipients: list[str]
    message: bytes              # CRLF line ends, without our Received:
    eightbit: bool
    smtputf8: bool


@dataclass(frozen=True)
class LocalUser:
    uid: int
    login: str
    gecos: str

    @classmethod
    def from_uid(cls, uid: int) -> "LocalUser":
        try:
            entry = pwd.getpwuid(uid)
            login, gecos = entry.pw_name, entry.pw_gecos.split(",")[0]
        except KeyError:
            login, gecos = f"uid{uid}", ""
        # Only characters that are safe in a local part and a header comment.
        login = re.sub(r"[^A-Za-z0-9._+-]", "_", login)[:64] or f"uid{uid}"
        return cls(uid, login, gecos)


# --- cleanup: turning sendmail input into a queued message ---

def read_input(stream, limit: int, ignore_dots: bool) -> bytes:
    """Read a message from sendmail's standard input.

    Without -i a line holding only "." ends the input (sendmail(8)); lines
    are otherwise taken as they are (no SMTP dot-unstuffing). More than
    `limit` octets raise SubmissionError (EX_DATAERR).
    """
    parts: list[bytes] = []
    total = 0
    while True:
        line = stream.readline(65536)
        if not line:
            break
        if not ignore_dots and line in (b".\n", b".\r\n", b"."):
            break
        total += len(line)
        if total > limit:
            raise SubmissionError(f"message too big (more than {limit} octets)", EX_DATAERR)
        parts.append(line)
    return b"".join(parts)


def _split_lines(raw: bytes, ignore_dots: bool) -> list[bytes]:
    """Lines without their ends: CRLF, bare LF and bare CR all end a line."""
    data = raw.replace(b"\0", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not ignore_dots and b"." in lines:
        lines = lines[:lines.index(b".")]
    return lines


def _split_long(line: bytes, continuation: bytes) -> list[bytes]:
    """RFC 5322 2.1.1: no line longer than 998 octets; longer ones are broken."""
    if len(line) <= MAX_LINE:
        return [line]
    pieces = [line[:MAX_LINE]]
    rest = line[MAX_LINE:]
    step = MAX_LINE - len(continuation)
    while rest:
        pieces.append(continuation + rest[:step])
        rest = rest[step:]
    return pieces


def _parse_headers(lines: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """Split into header fields (each a list of physical lines) and body lines.

    The header section ends at the first empty line, or at the first line
    that is neither a field nor a continuation (that line starts the body).
    A leading mbox "From " line is dropped.
    """
    if lines and lines[0].startswith(b"From ") and not _FIELD_NAME.match(lines[0]):
        lines = lines[1:]
    fields: list[list[bytes]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line == b"":
            index += 1
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD_NAME.match(line):
            fields.append([line])
        else:
            break
        index += 1
    return fields, lines[index:]


def _field_name(lines: list[bytes]) -> str:
    return lines[0].split(b":", 1)[0].decode("ascii", "replace").strip().lower()


def _field_value(lines: list[bytes]) -> str:
    text = b" ".join(line.strip() if i else line.split(b":", 1)[1].strip() for i, line in enumerate(lines))
    return text.decode("utf-8", "replace")


def normalize_address(text: str, domain: str, what: str) -> str:
    """A sendmail address argument: bare local parts get @MTA_DOMAIN (Postfix
    append_at_myorigin); the result must be a valid RFC 5321 mailbox."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if any(ord(char) < 32 or char in "<>" for char in text) or not text:
        raise SubmissionError(f"bad {what} address {text!r}")
    if "@" not in text:
        text = f"{text}@{domain}"
    try:
        mailbox = parse_mailbox(text)
    except AddressError as error:
        raise SubmissionError(f"bad {what} address {text!r}: {error}") from None
    if len(str(mailbox).encode("utf-8")) > 254:
        raise SubmissionError(f"bad {what} address {text!r}: too long")
    return str(mailbox)


def split_address_list(text: str) -> list[str]:
    """A header's `a@b, Joe <c@d>` -> ["a@b", "c@d"] (RFC 5322 address-list, groups flattened)."""
    return [address for _, address in email.utils.getaddresses([text]) if address]


def split_argument(text: str) -> list[str]:
    """A command-line recipient: `a@b`, `a@b, c@d` or `Joe <c@d>`; nothing is
    silently repaired (a space in an address stays and is refused)."""
    result = []
    for piece in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*\Z)', text):
        piece = piece.strip()
        match = re.search(r"<([^<>]*)>\s*\Z", piece)
        if match and not piece.startswith("<"):
            piece = match.group(1)
        if piece:
            result.append(piece)
    return result


def build_message(submission: Submission, raw: bytes, *, user: LocalUser, domain: str,
                  hostname: str, max_size: int, queue_id: str, now: float | None = None) -> Prepared:
    """Postfix cleanup for a local submission; raises SubmissionError."""
    if len(raw) > max_size * 2 + MAX_LINE:
        raise SubmissionError(f"message too big (limit {max_size} octets)", EX_DATAERR)
    fields, body = _parse_headers(_split_lines(raw, submission.ignore_dots))

    recipients: list[str] = []
    for argument in submission.recipients:
        recipients.extend(split_argument(argument) or [argument])
    if submission.extract:
        # RFC 5322 3.6.6: with Resent- fields, the resent recipients are the ones.
        names = {_field_name(f) for f in fields}
        wanted = ({"resent-to", "resent-cc", "resent-bcc"}
                  if names & {"resent-to", "resent-cc", "resent-bcc"} else {"to", "cc", "bcc"})
        for item in fields:
            if _field_name(item) in wanted:
                recipients.extend(split_address_list(_field_value(item)))
    # Blind copies stay blind, with or without -t (sendmail(8)).
    fields = [f for f in fields if _field_name(f) not in ("bcc", "resent-bcc")]

    unique: dict[str, str] = {}
    for address in recipients:
        address = normalize_address(address, domain, "recipient")
        unique.setdefault(address.lower(), address)
    if not unique:
        raise SubmissionError("no recipient addresses (give them as arguments, or use -t)")
    if len(unique) > MAX_RECIPIENTS:
        raise SubmissionError(f"too many recipients (limit {MAX_RECIPIENTS})")

    if submission.sender is None:
        sender = f"{user.login}@{domain}"
    elif submission.sender.strip() in ("", "<>"):
        sender = ""
    else:
        sender = normalize_address(submission.sender, domain, "sender")

    names = {_field_name(f) for f in fields}
    added: list[bytes] = []
    if "from" not in names:
        full_name = submission.full_name if submission.full_name is not None else user.gecos
        full_name = re.sub(r"[\x00-\x1f\x7f]", " ", full_name).strip()[:MAX_FULL_NAME]
        address = sender or f"MAILER-DAEMON@{hostname}"
        added.append(b"From: " + _from_header(full_name, address).encode("utf-8"))
    if "date" not in names:
        added.append(b"Date: " + email.utils.formatdate(now, localtime=True).encode("ascii"))
    if "message-id" not in names:
        added.append(f"Message-ID: <{queue_id}@{hostname}>".encode("utf-8"))

    out: list[bytes] = []
    for item in fields:
        for line in item:
            out.extend(_split_long(line, b" "))
    out.extend(added)
    out.append(b"")
    for line in body:
        out.extend(_split_long(line, b""))
    message = b"\r\n".join(out) + b"\r\n"
    if len(message) > max_size:
        raise SubmissionError(f"message too big (limit {max_size} octets)", EX_DATAERR)
    addresses = [sender, *unique.values()]
    return Prepared(sender=sender, recipients=list(unique.values()), message=message,
                    eightbit=any(byte >= 0x80 for byte in message),
                    smtputf8=not all(a.isascii() for a in addresses))


def received_header(user: LocalUser, hostname: str, queue_id: str, recipients: list[str]) -> bytes:
    """RFC 5321 4.4 trace field for a local submission (Postfix/sendmail style)."""
    date = email.utils.format_datetime(email.utils.localtime())
    lines = [f"Received: (from {user.login}@localhost)",
             f"\tby {hostname} (mta, from userid {user.uid}) id {queue_id}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


# --- the sendmail side ---

def maildrop_path(spool_dir: str) -> str:
    return os.path.join(spool_dir, MAILDROP)


def submit(spool_dir: str, submission: Submission, raw: bytes) -> str:
    """Drop a message into the maildrop atomically; returns its file name.

    Raises OSError when the maildrop cannot be written (EX_TEMPFAIL).
    """
    directory = maildrop_path(spool_dir)
    header = submission.header_line()
    temp = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask: the daemon's user must read it
        view = memoryview(header + b"\n" + raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        safeio.unlink_quietly(temp)
        raise
    os.close(fd)
    name = f"{new_queue_id()}.{secrets.token_hex(8)}"
    try:
        os.rename(temp, os.path.join(directory, name))
    except BaseException:
        safeio.unlink_quietly(temp)
        raise
    try:
        safeio.fsync_dir(directory)
    except OSError:
        pass  # others may not open (read) the drop box; the file itself is fsynced
    return name


def _printable(name: str) -> str:
    """A hostile file name, safe for one log line."""
    return name[:100].encode("unicode_escape").decode("ascii")


# --- the daemon side ---

class Pickup:
    """The daemon's maildrop reader: a thread scanning every second.

    `config()` returns the current configuration (it changes on SIGHUP).
    """

    def __init__(self, spool, config, interval: float = SCAN_INTERVAL, on_commit=None):
        self.spool = spool
        self.config = config
        self.interval = interval
        self.on_commit = on_commit
        self.directory = maildrop_path(spool.root)
        self.corrupt = os.path.join(spool.root, "corrupt")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ignored: set[str] = set()
        self._failing: set[str] = set()
        self._waiting_for_room = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pickup", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception as error:  # never let the drop box stop the pickup
                log.error("maildrop scan failed: %s: %s", error.__class__.__name__, error)
            self._stop.wait(self.interval)

    def scan(self) -> int:
        """Pick up every complete file now; returns how many were queued."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return 0
        count = 0
        for name in names:
            if self._stop.is_set():
                break
            if name in self._ignored:
                continue
            try:
                if self.process(name):
                    count += 1
            except Exception as error:
                log.error("maildrop/%s: %s: %s", _printable(name), error.__class__.__name__, error)
                self._quarantine(name, f"internal error: {error.__class__.__name__}")
        return count

    def process(self, name: str) -> bool:
        path = os.path.join(self.directory, name)
        if name.startswith(TEMP_PREFIX):
            self._remove_stale_temp(name, path)
            return False
        if not NAME_RE.match(name):
            self._quarantine(name, "unexpected file name")
            return False
        config = self.config()
        limit = config.max_message_size * 2 + MAX_LINE + MAX_HEADER_LINE + 1
        try:
            # O_NOFOLLOW: a symlink is refused (ELOOP), never followed;
            # O_NONBLOCK: a FIFO cannot make us wait.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as error:
            reason = "symbolic link" if error.errno == errno.ELOOP else f"cannot open: {error.strerror}"
            self._quarantine(name, reason)
            return False
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                problem = "not a regular file"
            elif info.st_nlink != 1:
                problem = f"{info.st_nlink} hard links"
            elif info.st_size > limit:
                problem = f"too big ({info.st_size} octets)"
            else:
                problem = None
                data = handle.read(limit + 1)
        user = LocalUser.from_uid(info.st_uid)
        if problem is None and len(data) > limit:
            problem = "too big (grew while being read)"
        if problem is not None:
            self._quarantine(name, problem, user)
            return False
        header, newline, raw = data.partition(b"\n")
        try:
            if not newline:
                raise SubmissionError("no header line")
            submission = Submission.from_header_line(header)
        except SubmissionError as error:
            self._quarantine(name, str(error), user)
            return False

        if not self.spool.has_room(len(raw)):
            if not self._waiting_for_room:
                log.warning("maildrop/%s: not enough free space in the spool, will retry", name)
            self._waiting_for_room = True
            return False
        self._waiting_for_room = False
        message = self.spool.new_message()
        try:
            prepared = build_message(submission, raw, user=user, domain=config.domain,
                                     hostname=config.hostname, max_size=config.max_message_size,
                                     queue_id=message.id)
        except SubmissionError as error:
            message.abort()
            self._quarantine(name, str(error), user)
            return False
        envelope = Envelope(
            id=message.id, sender=prepared.sender,
            recipients=[Recipient(address=address) for address in prepared.recipients],
            size=len(prepared.message), body="8BITMIME" if prepared.eightbit else None,
            smtputf8=prepared.smtputf8, client_name="localhost", protocol="local",
            submitter=user.login)
        try:
            message.write(received_header(user, config.hostname, message.id, prepared.recipients))
            message.write(prepared.message)
            entry = message.commit(envelope)
        except OSError as error:
            # The spool, not the file, is the problem: keep the file, try again later.
            message.abort()
            if name not in self._failing:
                log.error("maildrop/%s: queue file write error, will retry: %s", name, error.strerror or error)
            self._failing.add(name)
            return False
        except BaseException:
            message.abort()
            raise
        self._failing.discard(name)
        # Committed: only now may the maildrop file go (a crash in between
        # queues the message twice; it never loses it).
        try:
            os.unlink(path)
            safeio.fsync_dir(self.directory)
        except OSError as error:
            log.error("%s: cannot remove maildrop/%s (it may be queued again): %s", entry.id, name, error.strerror)
            self._remember(name)
        log.info("%s: uid=%d from=<%s> submitter=%s", entry.id, user.uid, prepared.sender, user.login)
        log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", entry.id, prepared.sender,
                 envelope.size, len(envelope.recipients))
        if self.on_commit is not None:
            self.on_commit(entry)
        return True

    def _remove_stale_temp(self, name: str, path: str) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if time.time() - info.st_mtime < STALE_TEMP_SECONDS:
            return
        try:
            if stat.S_ISDIR(info.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
            log.info("maildrop/%s: removed an incomplete submission (uid=%d)", name, info.st_uid)
        except OSError:
            self._remember(name)

    def _quarantine(self, name: str, reason: str, user: LocalUser | None = None) -> None:
        """Move an unusable file to corrupt/ (never deleted), with a log line."""
        path = os.path.join(self.directory, name)
        if user is None:
            try:
                user = LocalUser.from_uid(os.lstat(path).st_uid)
            except OSError:
                pass
        owner = f" (uid={user.uid} {user.login})" if user else ""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "_"
        target = os.path.join(self.corrupt, f"maildrop.{safe}.{secrets.token_hex(3)}")
        try:
            os.makedirs(self.corrupt, mode=0o750, exist_ok=True)
            os.rename(path, target)
            log.error("maildrop/%s%s: moved to corrupt/%s: %s", _printable(name),
                      owner, os.path.basename(target), reason)
            return
        except FileNotFoundError:
            return
        except OSError as error:
            problem = error.strerror
        try:
            # A directory we may not move (its owner's): remove it when empty.
            os.rmdir(path)
            log.error("maildrop/%s%s: removed: %s", _printable(name), owner, reason)
            return
        except OSError:
            pass
        log.error("maildrop/%s%s: ignored: %s; cannot move it to corrupt/: %s",
                  _printable(name), owner, reason, problem)
        self._remember(name)

    def _remember(self, name: str) -> None:
        if len(self._ignored) < MAX_IGNORED:
            self._ignored.add(name)


def _from_header(full_name: str, address: str) -> str:
    """`Name <address>`; a UTF-8 address is written as is (RFC 6532), since
    email.utils.formataddr only encodes the display name."""
    if address.isascii():
        return email.utils.formataddr((full_name, address), "utf-8")
    if not full_name:
        return f"<{address}>"
    name = email.utils.formataddr((full_name, "x@x"), "utf-8").rsplit("<", 1)[0].strip()
    return f"{name} <{address}>"
