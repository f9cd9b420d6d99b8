"""The queue on disk: the only code that writes the spool.

Layout under MTA_SPOOL_DIR (Maildir-style, after OpenSMTPD's queue_fs):

    tmp/<id>/          a message being received; purged at start-up
    incoming/<id>/     committed, waiting for (or in) delivery: status "active"
    deferred/<id>/     waiting for its next attempt: status "deferred"
    hold/<id>/         held by the operator: status "hold"
    bounce/<id>/       finished with failures, notification pending: "bounce"
    corrupt/<id>/      unreadable entries, quarantined, never deleted
    maildrop/          local submissions by `mta sendmail` (mode 1733), turned
                       into queue entries by the daemon (mta.spool.pickup)
    index.json         a cache of the listing; rebuilt when missing or damaged

Each message directory holds `message.eml` (immutable, as received with our
Received: header, CRLF line ends) and `envelope.json` (versioned, replaced
atomically). A message is committed by renaming its directory from tmp/ to
incoming/ after fsyncing the file, the envelope and the directory, then the
parent is fsynced (RFC 5321 6.1: accepting means taking responsibility).
The daemon and `mta queue` coordinate through flock on message directories.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from mta import safeio
from mta.spool.envelope import Envelope, EnvelopeError, now_iso, parse_iso
from mta.spool.lock import DirLock, LockBusy

log = logging.getLogger("mta.spool")

MESSAGE_FILE = "message.eml"
ENVELOPE_FILE = "envelope.json"
INDEX_FILE = "index.json"
INDEX_VERSION = 1

# state directory -> status shown to operators (INTERFACE.md queue stats)
STATUS_BY_STATE = {"incoming": "active", "deferred": "deferred", "hold": "hold", "bounce": "bounce"}
STATE_BY_STATUS = {status: state for state, status in STATUS_BY_STATE.items()}
STATES = tuple(STATUS_BY_STATE)
QUEUE_ID_RE = re.compile(r"[0-9A-F]{14}[0-9A-F]{6}\Z")
LOCK_WAIT = 10.0
MAX_FIELD_CHECK = 65536
FREE_SPACE_CHECK = 1.0   # seconds a free-space measurement is reused  # header fields longer than this are not inspected when rewriting  # seconds an operator command waits for a delivery to finish
MAILDROP = "maildrop"
MAILDROP_MODE = 0o1733  # any local user may drop a file; only the owner may list (sticky)


class SpoolError(Exception):
    """An operator request the spool cannot honour (unknown id, busy)."""


class NoSuchMessage(SpoolError):
    pass


def new_queue_id() -> str:
    """20 hex digits: microseconds since the epoch, then 24 random bits.

    Sorts by arrival and is safe as a file name. Not a secret (it is in
    every Received: header), so `random` serves: secrets would cost a
    getrandom(2), a GIL hand-off, per message. Callers create the name
    with O_EXCL or mkdir and draw again on a clash.
    """
    return f"{time.time_ns() // 1000:014X}{random.getrandbits(24):06X}"


@dataclass(frozen=True)
class Entry:
    id: str
    state: str
    path: str

    @property
    def status(self) -> str:
        return STATUS_BY_STATE[self.state]

    @property
    def message_path(self) -> str:
        return os.path.join(self.path, MESSAGE_FILE)

    @property
    def envelope_path(self) -> str:
        return os.path.join(self.path, ENVELOPE_FILE)


def summary(envelope: Envelope, status: str) -> dict:
    """The listing shape of INTERFACE.md (`mta queue list --json`, API)."""
    return {
        "id": envelope.id,
        "status": status,
        "size": envelope.size,
        "arrival": envelope.arrival,
        "sender": envelope.sender,
        "recipients": [
            {"address": r.address, "status": r.status, "attempts": r.attempts, "last_error": r.last_error}
            for r in envelope.recipients
        ],
        "next_attempt": envelope.next_attempt,
    }


def _claims_authserv(field: list[bytes], authserv_id: str) -> bool:
    """Is this an Authentication-Results field naming `authserv_id`?

    The field is unfolded and comments are removed first: RFC 8601 2.2 allows
    CFWS before the authserv-id, and section 5 says such fields claiming our
    id are forgeries to be removed.
    """
    name, _, value = b"".join(field).partition(b":")
    if name.strip().lower() != b"authentication-results":
        return False
    text = value.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
    while True:
        stripped = re.sub(r"\([^()]*\)", " ", text)   # innermost comments first
        if stripped == text:
            break
        text = stripped
    first = text.split(";")[0].split()
    return bool(first) and first[0].lower() == authserv_id.lower()


def _valid_summary(value) -> bool:
    """A cached listing entry is used only if it has the listing's shape."""
    if not isinstance(value, dict):
        return False
    shape = {"id": str, "status": str, "size": int, "arrival": str, "sender": str, "recipients": list}
    if not all(isinstance(value.get(key), kind) for key, kind in shape.items()):
        return False
    return all(isinstance(r, dict) and isinstance(r.get("address"), str) and isinstance(r.get("status"), str)
               for r in value["recipients"])


class MessageWriter:
    """message.eml while it is received: bytes gathered up to 64 KiB, then
    one write(2). The built-in buffered file costs an fstat and an lseek
    at open, each a GIL hand-off under load, for nothing used here."""

    LIMIT = 65536

    def __init__(self, path: str, flags: int):
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, 0o640)
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        safeio.write_all(self.fd, bytes(self._pending))
        self._pending.clear()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self.fd)
            self.fd = -1


class IncomingMessage:
    """A message being received into tmp/<id>/; `commit` or `abort` it."""

    def __init__(self, spool: "Spool"):
        self.spool = spool
        while True:
            self.id = new_queue_id()
            self.path = os.path.join(spool.root, "tmp", self.id)
            try:
                os.mkdir(self.path, 0o750)
                break
            except FileExistsError:
                continue
        self.message_path = os.path.join(self.path, MESSAGE_FILE)
        self.file = MessageWriter(self.message_path, os.O_CREAT | os.O_EXCL)
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.bytes_written += len(data)

    def read_back(self) -> bytes:
        """The message received so far, as it will be queued."""
        self.file.flush()
        with open(self.message_path, "rb") as handle:
            return handle.read()

    def prepend(self, headers: bytes, drop_authres_for: str | None = None) -> None:
        """Put trace headers above the message received so far (before commit).

        Rewrites the not yet visible file once: new headers, then the old
        header section without Authentication-Results claiming our
        authserv-id (RFC 8601 5: they are forgeries), then the body.
        """
        self.file.flush()
        self.file.close()
        old_path = self.message_path
        new_path = old_path + ".new"
        with open(old_path, "rb") as source, open(new_path, "wb") as target:
            target.write(headers)
            field: list[bytes] = []   # one header field, its folded lines
            size = 0

            def flush() -> None:
                if field and not (drop_authres_for and _claims_authserv(field, drop_authres_for)):
                    target.writelines(field)
                field.clear()

            for line in source:
                if line in (b"\r\n", b"\n"):
                    flush()
                    target.write(line)
                    break
                if line[:1] not in (b" ", b"\t"):   # a new header field starts
                    flush()
                    size = 0
                field.append(line)
                size += len(line)
                if size > MAX_FIELD_CHECK:        # bound memory: pass huge fields through
                    target.writelines(field)
                    field.clear()
            else:
                flush()
            shutil.copyfileobj(source, target, 1 << 20)
        os.replace(new_path, old_path)
        self.file = MessageWriter(old_path, os.O_APPEND)

    def commit(self, envelope: Envelope) -> Entry:
        """Make the message durable and visible; only then may we say 250."""
        envelope.id = self.id
        self.file.flush()
        os.fsync(self.file.fd)
        self.file.close()
        # Nobody can see tmp/<id>/ yet: the envelope needs no temp+rename.
        safeio.write_new(os.path.join(self.path, ENVELOPE_FILE), envelope.to_json())
        safeio.fsync_dir(self.path)
        target = os.path.join(self.spool.root, "incoming", self.id)
        os.rename(self.path, target)
        self.spool.fsync_state_dir("incoming")
        self.spool.notify_new(self.id)
        return Entry(self.id, "incoming", target)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        shutil.rmtree(self.path, ignore_errors=True)


class Spool:
    def __init__(self, root: str, min_free: int = 0):
        self.root = root
        self.min_free = min_free
        self._index_lock = threading.Lock()
        self._listeners: list = []
        self._free_cache = (-FREE_SPACE_CHECK, 0)
        self._dir_fds: dict[str, int] = {}

    # --- set-up and recovery ---

    def setup(self) -> None:
        for name in ("tmp", *STATES, "corrupt"):
            os.makedirs(os.path.join(self.root, name), mode=0o750, exist_ok=True)
        maildrop = os.path.join(self.root, MAILDROP)
        if not os.path.isdir(maildrop):
            os.makedirs(maildrop, mode=0o700, exist_ok=True)
            os.chmod(maildrop, MAILDROP_MODE)  # makedirs' mode is cut by the umask

    def recover(self) -> int:
        """Start-up: purge half-received messages, quarantine unreadable ones.

        Returns how many messages are queued. Run by the daemon before it
        listens; `mta queue` never runs it (the daemon may be receiving).
        """
        self.setup()
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            log.info("%s: removed incomplete message left by a crash", name.split(".")[0])
        count = 0
        for entry in list(self.entries()):
            for leftover in os.listdir(entry.path):
                if leftover.endswith(".tmp"):
                    os.unlink(os.path.join(entry.path, leftover))
            try:
                self.load(entry)
                if not os.path.isfile(entry.message_path):
                    raise EnvelopeError("message file missing")
                count += 1
            except (EnvelopeError, OSError, ValueError) as error:
                self.quarantine(entry, str(error))
        return count

    def quarantine(self, entry: Entry, reason: str) -> None:
        target = os.path.join(self.root, "corrupt", entry.id)
        if os.path.exists(target):
            target += "." + secrets.token_hex(3)
        os.rename(entry.path, target)
        log.error("%s: moved to corrupt/: %s", entry.id, reason)

    # --- receiving ---

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_room(self, size: int = 0) -> bool:
        """Postfix-like queue_minfree: keep min_free bytes after this message.

        The free space is measured at most every FREE_SPACE_CHECK seconds;
        a write that still runs out of space is caught (452) where it fails.
        """
        now = time.monotonic()
        checked, free = self._free_cache
        if now - checked >= FREE_SPACE_CHECK:
            try:
                free = self.free_bytes()
            except OSError:
                return False
            self._free_cache = (now, free)
        return free - size >= self.min_free

    def fsync_state_dir(self, state: str) -> None:
        """fsync a state directory through a descriptor kept open."""
        fd = self._dir_fds.get(state)
        if fd is None:
            fd = os.open(os.path.join(self.root, state), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fd = self._dir_fds.setdefault(state, fd)
        os.fsync(fd)

    def new_message(self) -> IncomingMessage:
        return IncomingMessage(self)

    def inject(self, data: bytes, envelope: Envelope) -> Entry:
        """Queue a message made here (a DSN): same commit path as SMTP."""
        message = self.new_message()
        try:
            message.write(data)
            envelope.size = len(data)
            return message.commit(envelope)
        except BaseException:
            message.abort()
            raise

    def add_listener(self, callback) -> None:
        """`callback(queue_id)` runs after each commit (the scheduler's wake-up)."""
        self._listeners.append(callback)

    def notify_new(self, queue_id: str) -> None:
        for callback in self._listeners:
            callback(queue_id)

    # --- reading ---

    def entries(self, states: tuple[str, ...] = STATES) -> Iterator[Entry]:
        for state in states:
            directory = os.path.join(self.root, state)
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            for name in names:
                if QUEUE_ID_RE.match(name):
                    yield Entry(name, state, os.path.join(directory, name))

    def find(self, queue_id: str) -> Entry | None:
        if not QUEUE_ID_RE.match(queue_id or ""):
            return None
        for state in STATES:
            path = os.path.join(self.root, state, queue_id)
            if os.path.isdir(path):
                return Entry(queue_id, state, path)
        return None

    def load(self, entry: Entry) -> Envelope:
        try:
            data = safeio.read_json(entry.envelope_path)
        except FileNotFoundError:
            raise
        except (ValueError, UnicodeDecodeError) as error:
            raise EnvelopeError(f"unreadable envelope: {error}") from None
        envelope = Envelope.from_dict(data)
        if envelope.id != entry.id:
            raise EnvelopeError(f"envelope id {envelope.id!r} does not match directory")
        return envelope

    def read_message(self, entry: Entry) -> bytes:
        with open(entry.message_path, "rb") as handle:
            return handle.read()

    def read_headers(self, entry: Entry, limit: int = 1_000_000) -> bytes:
        """The header section of the stored message (up to the blank line)."""
        lines = []
        total = 0
        with open(entry.message_path, "rb") as handle:
            for line in handle:
                if line in (b"\r\n", b"\n") or total > limit:
                    break
                lines.append(line)
                total += len(line)
        return b"".join(lines)

    # --- the listing cache ---

    def _read_index(self) -> dict:
        try:
            data = safeio.read_json(os.path.join(self.root, INDEX_FILE))
            if isinstance(data, dict) and data.get("version") == INDEX_VERSION and isinstance(data.get("entries"), dict):
                return data["entries"]
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        return {}

    def summaries(self) -> list[dict]:
        """Every queued message's summary, oldest first.

        The files are the truth: each envelope is stat()ed and only re-read
        when its mtime differs from the cached one; index.json is rewritten
        when anything changed, and rebuilt whole when missing or damaged.
        """
        with self._index_lock:
            cached = self._read_index()
            fresh: dict = {}
            changed = False
            for entry in self.entries():
                key = f"{entry.state}/{entry.id}"
                try:
                    mtime = os.stat(entry.envelope_path).st_mtime_ns
                except FileNotFoundError:
                    continue  # being moved or removed right now
                item = cached.get(key)
                if not (isinstance(item, dict) and item.get("mtime_ns") == mtime and _valid_summary(item.get("summary"))):
                    try:
                        item = {"mtime_ns": mtime, "summary": summary(self.load(entry), entry.status)}
                    except (OSError, EnvelopeError):
                        continue
                    changed = True
                fresh[key] = item
            if changed or len(fresh) != len(cached):
                try:
                    safeio.write_json(os.path.join(self.root, INDEX_FILE),
                                      {"version": INDEX_VERSION, "entries": fresh}, mode=0o640, sync_dir=False)
                except OSError as error:
                    log.warning("cannot write %s: %s", INDEX_FILE, error)
        items = [item["summary"] for item in fresh.values()]
        items.sort(key=lambda s: s["id"])
        return items

    def stats(self) -> dict:
        """Counts by status, bytes and the oldest message's age (INTERFACE.md)."""
        by_status = {status: 0 for status in STATUS_BY_STATE.values()}
        total = 0
        oldest = None
        for item in self.summaries():
            by_status[item["status"]] += 1
            total += item["size"]
            if oldest is None or item["arrival"] < oldest:
                oldest = item["arrival"]
        age = 0
        if oldest:
            age = max(0, int((datetime.datetime.now(datetime.timezone.utc) - parse_iso(oldest)).total_seconds()))
        return {"by_status": by_status, "bytes": total, "oldest_age_seconds": age}

    # --- changing queued messages (daemon and operator) ---

    def lock(self, queue_id: str, wait: float = LOCK_WAIT) -> tuple[Entry, DirLock]:
        """Find and lock a message; the entry is valid while the lock is held."""
        deadline = time.monotonic() + wait
        while True:
            entry = self.find(queue_id)
            if entry is None:
                raise NoSuchMessage(f"{queue_id}: no such message in the queue")
            try:
                lock = DirLock(entry.path, wait=max(0.0, deadline - time.monotonic()))
            except FileNotFoundError:
                continue  # moved between find and open: look again
            except LockBusy:
                raise SpoolError(f"{queue_id}: message is busy (being delivered), try again") from None
            if lock.same_inode(entry.path):
                return entry, lock
            lock.release()

    def try_lock(self, entry: Entry) -> DirLock | None:
        """Non-blocking lock for a delivery worker; None when busy or gone."""
        try:
            lock = DirLock(entry.path)
        except (LockBusy, FileNotFoundError):
            return None
        if not lock.same_inode(entry.path):
            lock.release()
            return None
        return lock

    def move(self, entry: Entry, state: str) -> Entry:
        """Move a locked message to another state directory."""
        if state == entry.state:
            return entry
        target = os.path.join(self.root, state, entry.id)
        os.rename(entry.path, target)
        self.fsync_state_dir(state)
        return Entry(entry.id, state, target)

    def write_envelope(self, entry: Entry, envelope: Envelope) -> None:
        safeio.atomic_write(entry.envelope_path, envelope.to_json())

    def remove(self, entry: Entry) -> None:
        """Delete a locked message: one rename out of the queue, then cleanup."""
        trash = os.path.join(self.root, "tmp", f"{entry.id}.removed.{secrets.token_hex(3)}")
        os.rename(entry.path, trash)
        self.fsync_state_dir(entry.state)
        try:
            for name in (ENVELOPE_FILE, MESSAGE_FILE):
                os.unlink(os.path.join(trash, name))
            os.rmdir(trash)
        except OSError:   # something else in there: tmp/ is purged at start anyway
            shutil.rmtree(trash, ignore_errors=True)

    # --- operator commands (`mta queue`, admin API); safe while the daemon runs ---

    def delete(self, queue_id: str) -> None:
        entry, lock = self.lock(queue_id)
        with lock:
            self.remove(entry)
        log.info("%s: removed by the operator", queue_id)

    def hold(self, queue_id: str) -> None:
        entry, lock = self.lock(queue_id)
        with lock:
            self.move(entry, "hold")
        log.info("%s: placed on hold", queue_id)

    def release(self, queue_id: str) -> None:
        entry, lock = self.lock(queue_id)
        with lock:
            if entry.state != "hold":
                raise SpoolError(f"{queue_id}: message is not on hold")
            self._make_due(entry)
            self.move(entry, "incoming")
        log.info("%s: released from hold", queue_id)

    def retry(self, queue_id: str) -> None:
        """Make a deferred message due now (postqueue -i)."""
        entry, lock = self.lock(queue_id)
        with lock:
            if entry.state == "hold":
                raise SpoolError(f"{queue_id}: message is on hold; release it first")
            self._make_due(entry)
            self.move(entry, "incoming")
        log.info("%s: scheduled for immediate retry", queue_id)

    def flush(self) -> int:
        """Make every deferred message due now (postqueue -f); returns the count."""
        count = 0
        for entry in list(self.entries(("deferred",))):
            try:
                self.retry(entry.id)
                count += 1
            except SpoolError:
                continue
        return count

    def _make_due(self, entry: Entry) -> None:
        envelope = self.load(entry)
        if envelope.next_attempt is not None:
            envelope.next_attempt = now_iso()
            self.write_envelope(entry, envelope)
