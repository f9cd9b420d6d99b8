"""What the admin API needs from the running daemon, in one small dataclass.

`mta.main` builds an `AdminDeps` once (through `mta.admin.serve.start_admin`)
from the objects it already owns; the API never builds shared objects
itself and never reaches into the daemon otherwise. Also defines the
interface of the anti-abuse state shown by `GET /api/policy/ratelimits` and
`GET /api/policy/greylist` (`AbuseStateProvider`), an empty default, and the
adapter over the daemon's RateLimiter and Greylist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence


class AbuseStateProvider(Protocol):
    """Current anti-abuse state, read by the admin API on each request.

    Implementations must be thread-safe (Waitress serves from several
    threads) and cheap (copy under a lock, no I/O). Items are JSON-ready
    dicts; the API pages them with limit/offset.

    ratelimits():        buckets that are not full: {"kind": "ip"|"user"|
                         "domain", "key": str, "limit_per_hour": int,
                         "tokens": float}
    greylist():          triplets: {"key": hashed triplet, "first_seen",
                         "last_seen", "retry_after" (ISO 8601 or null),
                         "passed": bool}
    greylist_summary():  counts: {"enabled", "delay_seconds", "triplets",
                         "passed", "pending", "oldest_pending_age_seconds"}
    """

    def ratelimits(self) -> Iterable[dict]: ...

    def greylist(self) -> Iterable[dict]: ...

    def greylist_summary(self) -> dict: ...


class NoAbuseState:
    """No buckets, no triplets: for an API built without the anti-abuse state."""

    def ratelimits(self) -> Iterable[dict]:
        return ()

    def greylist(self) -> Iterable[dict]:
        return ()

    def greylist_summary(self) -> dict:
        return {}


class DaemonAbuseState:
    """The daemon's `mta.policy.ratelimit.RateLimiter` and `mta.policy.greylist.Greylist`."""

    def __init__(self, ratelimiter, greylist, config: Callable[[], Any]):
        self._ratelimiter = ratelimiter
        self._greylist = greylist
        self._config = config

    def ratelimits(self) -> Iterable[dict]:
        return self._ratelimiter.snapshot() if self._ratelimiter is not None else ()

    def greylist(self) -> Iterable[dict]:
        return self._greylist.entries() if self._greylist is not None else ()

    def greylist_summary(self) -> dict:
        summary = self._greylist.snapshot() if self._greylist is not None else {}
        return {"enabled": bool(self._config().greylist_enabled), **summary}


@dataclass
class AdminDeps:
    spool: Any                          # mta.spool.Spool
    users: Any                          # mta.users.UserStore
    policy: Any                         # mta.policy.lists.PolicyStore
    config: Callable[[], Any]           # the current Config (replaced on SIGHUP)
    token: str                          # the bearer token; never logged
    listeners: Sequence = ()            # mta.smtp.server.Listener objects
    smtp: Any = None                    # mta.smtp.server.SmtpContext (session count)
    scheduler: Any = None               # mta.delivery.scheduler.Scheduler; None = delivery paused
    pool: Any = None                    # mta.delivery.pool.DeliveryPool; None = delivery paused
    snapshot: Any = None                # mta.admin.service.QueueSnapshot (cached scan)
    abuse: AbuseStateProvider = field(default_factory=NoAbuseState)
