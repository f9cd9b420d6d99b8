"""The admin service layer: queue, users, policy, health, in HTTP-free terms.

Owns the operator queries and actions of the admin API: filtering and paging
the queue listing (`filter_messages`, usable by `mta queue list` too), one
message's detail with its parsed header section, the queue/user/policy
changes (always through `Spool`, `UserStore` and `PolicyStore`, the same
methods the `mta` CLI calls, so both are safe while the daemon runs), the
cached queue scan behind the metrics collector and the health report.

It must not know about HTTP: it raises the `ServiceError` subclasses below
and `mta.admin.app` maps them to status codes. It never logs secrets.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

from mta.policy.lists import EntryExists, NoSuchEntry, PolicyError
from mta.spool.envelope import EnvelopeError, parse_iso
from mta.spool.spool import STATUS_BY_STATE, NoSuchMessage, SpoolError, summary
from mta.users import NoSuchUser, UserError, UserExists, normalize_username

log = logging.getLogger("mta.admin")

STATUSES = tuple(STATUS_BY_STATE.values())      # active, deferred, hold, bounce
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_HEADER_BYTES = 256 * 1024
SNAPSHOT_TTL = 2.0        # seconds a queue scan is reused by /api/metrics and health
MAX_DOMAIN_LABELS = 50    # mta_queue_messages_by_domain: top N domains, the rest "other"


# --- errors (mapped to HTTP status codes by mta.admin.app) ---

class ServiceError(Exception):
    """An operator request that cannot be honoured; the message says why."""


class Invalid(ServiceError):
    """Well-formed but invalid value (bad address, IP, status): 422."""


class NotFound(ServiceError):
    """No such message, user or list entry: 404."""


class Conflict(ServiceError):
    """The current state does not allow it (exists, not on hold, busy): 409."""


class Unavailable(ServiceError):
    """Storage failed (disk full, permissions): 503."""


# --- paging and the queue listing ---

def page(items: list, limit: int = DEFAULT_LIMIT, offset: int = 0) -> dict:
    """The list shape of every collection: {"items": [...], "total": N}."""
    items = list(items)
    return {"items": items[offset:offset + limit], "total": len(items)}


def _address_matcher(pattern: str):
    """`a@b.c` matches that address, `@b.c` any address at that domain, `<>` the null sender.

    Case-insensitive, like mailbox keys everywhere else in mta.
    """
    pattern = pattern.strip().lower()
    if pattern == "<>":
        return lambda address: address == ""
    if pattern.startswith("@"):
        return lambda address: address.lower().endswith(pattern) and address != ""
    return lambda address: address.lower() == pattern


def filter_messages(summaries: list[dict], *, status: str | None = None, sender: str | None = None,
                    recipient: str | None = None) -> list[dict]:
    """Filter queue summaries (the `mta queue list --json` shape), order kept.

    `status` is one of active/deferred/hold/bounce; `sender` and `recipient`
    follow `_address_matcher`. Raises Invalid for a bad status or an empty
    pattern. `mta queue list` can use this for its --status too.
    """
    if status is not None and status not in STATUSES:
        raise Invalid(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    checks = []
    if status is not None:
        checks.append(lambda item: item["status"] == status)
    if sender is not None:
        if not sender.strip():
            raise Invalid("sender filter must not be empty (use <> for the null sender)")
        match_sender = _address_matcher(sender)
        checks.append(lambda item: match_sender(item["sender"]))
    if recipient is not None:
        if not recipient.strip() or recipient.strip() == "<>":
            raise Invalid("recipient filter must be an address or @domain")
        match_rcpt = _address_matcher(recipient)
        checks.append(lambda item: any(match_rcpt(r["address"]) for r in item["recipients"]))
    return [item for item in summaries if all(check(item) for check in checks)]


def parse_header_section(raw: bytes) -> list[list[str]]:
    """RFC 5322 2.2: header fields as [name, value] pairs, in order, unfolded.

    Unfolding (2.2.3) drops the CRLF before continuation whitespace. Bytes
    that are not UTF-8 (RFC 6532 allows UTF-8) are shown as U+FFFD.
    """
    text = raw.decode("utf-8", "replace")
    fields: list[list[str]] = []
    for line in text.splitlines():
        if line[:1] in (" ", "\t"):
            if fields:
                fields[-1][1] += line
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            continue        # not a header field (a stray line): skip it
        fields.append([name.rstrip(), value.lstrip(" \t")])
    return fields


class QueueService:
    """Queue listing and operator actions (postqueue/postsuper equivalents)."""

    def __init__(self, spool, scheduler=None):
        self.spool = spool
        self.scheduler = scheduler

    def stats(self) -> dict:
        return self._io(self.spool.stats)

    def messages(self, *, limit: int = DEFAULT_LIMIT, offset: int = 0, status: str | None = None,
                 sender: str | None = None, recipient: str | None = None) -> dict:
        summaries = self._io(self.spool.summaries)
        return page(filter_messages(summaries, status=status, sender=sender, recipient=recipient),
                    limit, offset)

    def message(self, queue_id: str) -> dict:
        """Summary plus the header section; re-found if it moves while we read it."""
        for _ in range(5):
            entry = self.spool.find(queue_id)
            if entry is None:
                break
            try:
                envelope = self.spool.load(entry)
                headers = self.spool.read_headers(entry, limit=MAX_HEADER_BYTES)
            except FileNotFoundError:
                continue            # moved between find and read (delivery, operator)
            except EnvelopeError as error:
                raise Conflict(f"{queue_id}: envelope unreadable: {error}") from None
            except OSError as error:
                raise Unavailable(f"{queue_id}: cannot read: {error.strerror}") from None
            item = summary(envelope, entry.status)
            item["headers"] = parse_header_section(headers)
            return item
        raise NotFound(f"{queue_id}: no such message in the queue")

    def delete(self, queue_id: str) -> None:
        self._act(self.spool.delete, queue_id)

    def hold(self, queue_id: str) -> dict:
        self._act(self.spool.hold, queue_id)
        return {"id": queue_id, "status": "hold"}

    def release(self, queue_id: str) -> dict:
        self._act(self.spool.release, queue_id)
        self._wake(queue_id)
        return {"id": queue_id, "status": "active"}

    def retry(self, queue_id: str) -> dict:
        self._act(self.spool.retry, queue_id)
        self._wake(queue_id)
        return {"id": queue_id, "status": "active"}

    def flush(self) -> dict:
        count = self._io(self.spool.flush)
        if self.scheduler is not None:
            for entry in self.spool.entries(("incoming",)):
                self.scheduler.notify(entry.id)
        return {"flushed": count}

    def _wake(self, queue_id: str) -> None:
        """Make the change take effect now rather than at the next rescan."""
        if self.scheduler is not None:
            self.scheduler.notify(queue_id)

    @staticmethod
    def _act(action, queue_id: str) -> None:
        try:
            action(queue_id)
        except NoSuchMessage as error:
            raise NotFound(str(error)) from None
        except SpoolError as error:
            raise Conflict(str(error)) from None
        except FileNotFoundError:
            raise NotFound(f"{queue_id}: no such message in the queue") from None
        except OSError as error:
            raise Unavailable(f"{queue_id}: spool error: {error.strerror}") from None

    @staticmethod
    def _io(function):
        try:
            return function()
        except OSError as error:
            raise Unavailable(f"spool error: {error.strerror or error}") from None


# --- users ---

class UserService:
    """SMTP AUTH users; hashes never leave UserStore through here."""

    PUBLIC_FIELDS = ("created", "changed")

    def __init__(self, users):
        self.users = users

    def list(self, *, limit: int = DEFAULT_LIMIT, offset: int = 0) -> dict:
        return page(self._read(self.users.list), limit, offset)

    def get(self, username: str) -> dict:
        key = self._key(username)
        record = self._read(self.users.users).get(key)
        if record is None:
            raise NotFound(f"no such user {key}")
        return self._public(key, record)

    def add(self, username: str, password: str) -> dict:
        try:
            key = self._write(self.users.add, username, password)
        except UserExists as error:
            raise Conflict(str(error)) from None
        except UserError as error:
            raise Invalid(str(error)) from None
        log.info("admin API: added user %s", key)
        return self.get(key)

    def set_password(self, username: str, password: str) -> dict:
        key = self._key(username)
        try:
            self._write(self.users.set_password, key, password)
        except NoSuchUser as error:
            raise NotFound(str(error)) from None
        except UserError as error:
            raise Invalid(str(error)) from None
        log.info("admin API: changed the password of %s", key)
        return self.get(key)

    def delete(self, username: str) -> None:
        key = self._key(username)
        try:
            self._write(self.users.delete, key)
        except NoSuchUser as error:
            raise NotFound(str(error)) from None
        log.info("admin API: deleted user %s", key)

    @staticmethod
    def _key(username: str) -> str:
        """A name in a path that is not a valid username names no user: 404."""
        try:
            return normalize_username(username)
        except UserError as error:
            raise NotFound(f"no such user {username!r}: {error}") from None

    def _public(self, key: str, record: dict) -> dict:
        return {"username": key, **{name: record.get(name) for name in self.PUBLIC_FIELDS}}

    @staticmethod
    def _read(function):
        try:
            return function()
        except UserError as error:      # users.json in an unknown format
            raise Unavailable(str(error)) from None
        except (OSError, ValueError) as error:
            raise Unavailable(f"cannot read the users file: {error}") from None

    @staticmethod
    def _write(function, *args):
        try:
            return function(*args)
        except OSError as error:
            raise Unavailable(f"cannot write the users file: {error.strerror or error}") from None


# --- black and white lists ---

class PolicyService:
    def __init__(self, policy):
        self.policy = policy

    def entries(self, name: str, field_name: str, *, limit: int = DEFAULT_LIMIT, offset: int = 0) -> dict:
        try:
            return page(self.policy.entries(name, field_name), limit, offset)
        except PolicyError as error:
            raise Unavailable(str(error)) from None
        except (OSError, ValueError) as error:
            raise Unavailable(f"cannot read the policy file: {error}") from None

    def add(self, name: str, field_name: str, value: str) -> dict:
        try:
            normalized = self.policy.add(name, field_name, value)
        except EntryExists as error:
            raise Conflict(str(error)) from None
        except PolicyError as error:
            raise Invalid(str(error)) from None
        except OSError as error:
            raise Unavailable(f"cannot write the policy file: {error.strerror or error}") from None
        log.info("admin API: added %s %s to the %s", field_name, normalized, name)
        return {field_name: normalized}

    def remove(self, name: str, field_name: str, value: str) -> None:
        try:
            normalized = self.policy.remove(name, field_name, value)
        except NoSuchEntry as error:
            raise NotFound(str(error)) from None
        except PolicyError as error:      # not even a valid entry: it is not listed
            raise NotFound(f"{value!r} is not on the {name}: {error}") from None
        except OSError as error:
            raise Unavailable(f"cannot write the policy file: {error.strerror or error}") from None
        log.info("admin API: removed %s %s from the %s", field_name, normalized, name)


# --- the cached queue scan (metrics, health) ---

@dataclass
class QueueShape:
    """One scan of the queue, aggregated (Postfix qshape-like)."""

    by_status: dict = field(default_factory=lambda: {status: 0 for status in STATUSES})
    by_domain: dict = field(default_factory=dict)   # recipient domain -> messages
    bytes: int = 0
    oldest_arrival: datetime.datetime | None = None

    @property
    def depth(self) -> int:
        return sum(self.by_status.values())

    def oldest_age_seconds(self) -> float:
        if self.oldest_arrival is None:
            return 0.0
        now = datetime.datetime.now(datetime.timezone.utc)
        return max(0.0, (now - self.oldest_arrival).total_seconds())


def shape_of(summaries: list[dict], max_domains: int = MAX_DOMAIN_LABELS) -> QueueShape:
    """Aggregate summaries; domains of open recipients, top `max_domains` then "other"."""
    shape = QueueShape()
    domains: collections.Counter = collections.Counter()
    oldest = None
    for item in summaries:
        shape.by_status[item["status"]] = shape.by_status.get(item["status"], 0) + 1
        shape.bytes += item["size"]
        if oldest is None or item["arrival"] < oldest:
            oldest = item["arrival"]
        open_domains = {r["address"].rpartition("@")[2].lower() for r in item["recipients"]
                        if r["status"] in ("pending", "deferred")}
        domains.update(d for d in open_domains if d)
    ranked = domains.most_common()
    shape.by_domain = dict(ranked[:max_domains])
    rest = sum(count for _, count in ranked[max_domains:])
    if rest:
        shape.by_domain["other"] = shape.by_domain.get("other", 0) + rest
    if oldest:
        try:
            shape.oldest_arrival = parse_iso(oldest)
        except ValueError:
            pass
    return shape


class QueueSnapshot:
    """The queue scan, reused for `ttl` seconds so scrapes and health checks are cheap.

    Thread-safe: concurrent callers wait for one scan instead of each
    scanning. A failed scan keeps the last good shape (logged once per
    failure).
    """

    def __init__(self, spool, ttl: float = SNAPSHOT_TTL, clock=time.monotonic):
        self.spool = spool
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._shape = QueueShape()
        self._taken: float | None = None

    def get(self) -> QueueShape:
        with self._lock:
            now = self.clock()
            if self._taken is None or now - self._taken >= self.ttl:
                try:
                    self._shape = shape_of(self.spool.summaries())
                except (OSError, ValueError) as error:
                    log.warning("queue scan for metrics failed: %s", error)
                self._taken = now
            return self._shape


# --- health ---

def probe_spool(spool) -> str | None:
    """Create and remove a file in the spool's tmp/; None when that works."""
    path = os.path.join(spool.root, "tmp", f".health.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        os.unlink(path)
    except OSError as error:
        return f"spool not writable: {path}: {error.strerror or error}"
    return None


def _thread_state(thread) -> str:
    if thread is None or thread.ident is None:
        return "starting"
    return "up" if thread.is_alive() else "dead"


def health(deps) -> tuple[bool, dict]:
    """Liveness and readiness: listeners up, spool writable with room, workers alive."""
    config = deps.config()
    reasons = []
    listeners = []
    for listener in deps.listeners:
        state = _thread_state(getattr(listener, "thread", None))
        listeners.append({"mode": listener.mode, "address": listener.server_address[0],
                          "port": listener.port, "up": state == "up"})
        if state != "up":
            reasons.append(f"{listener.mode} listener on {listener.server_address[0]} "
                           f"port {listener.port} is {'not started' if state == 'starting' else 'down'}")
    problem = probe_spool(deps.spool)
    if problem:
        reasons.append(problem)
    try:
        free = deps.spool.free_bytes()
    except OSError:
        free = 0
    if not problem and free < deps.spool.min_free:
        reasons.append(f"spool disk nearly full: {free} bytes free, queue_min_free is {deps.spool.min_free}")
    shape = deps.snapshot.get() if deps.snapshot is not None else shape_of(deps.spool.summaries())
    pool = deps.pool
    delivery = {"workers": config.delivery_workers if pool is not None else 0,
                "paused": pool is None,
                "active": deps.scheduler.active_count if deps.scheduler is not None else 0}
    if pool is not None:
        dead = sum(1 for thread in pool.threads if _thread_state(thread) == "dead")
        if dead:
            reasons.append(f"{dead} delivery worker threads died")
    body = {
        "status": "unavailable" if reasons else "ok",
        "listeners": listeners,
        "spool": {"writable": problem is None, "free_bytes": free},
        "queue": {"depth": shape.depth},
        "delivery": delivery,
    }
    if deps.smtp is not None:
        with deps.smtp.sessions_lock:
            body["smtp"] = {"sessions": len(deps.smtp.sessions)}
    if reasons:
        body["reason"] = "; ".join(reasons)
    return not reasons, body
