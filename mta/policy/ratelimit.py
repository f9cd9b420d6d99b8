"""Rate limits: token buckets per client IP, authenticated user and sender domain.

A limit of N messages per hour is a bucket of N tokens refilled over the hour
(INTERFACE.md): message N+1 inside the hour gets 450 4.7.1. A limit of 0 is
no limit. Memory is bounded: at most MAX_KEYS buckets are kept, least
recently used dropped first (a dropped bucket is a full one, which can only
favour the client briefly), and full buckets are not stored at all.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from mta import replies
from mta.replies import Reply

MAX_KEYS = 100_000
WINDOW = 3600.0


class RateLimiter:
    def __init__(self, clock=time.monotonic, max_keys: int = MAX_KEYS):
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float, int]] = OrderedDict()  # key -> (tokens, stamp, capacity)

    def _take(self, key: str, capacity: int, now: float) -> bool:
        tokens, stamp, _ = self._buckets.pop(key, (float(capacity), now, capacity))
        tokens = min(float(capacity), tokens + (now - stamp) * capacity / WINDOW)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if tokens < capacity:
            self._buckets[key] = (tokens, now, capacity)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return allowed

    def check(self, limits: list[tuple[str, str, int]]) -> Reply | None:
        """`limits` are (kind, value, per_hour); None when all allow a message.

        Every bucket is charged only when all of them have a token, so one
        refusal does not drain the others.
        """
        now = self.clock()
        active = [(kind, value, limit) for kind, value, limit in limits if limit > 0 and value]
        with self._lock:
            for kind, value, limit in active:
                key = f"{kind}:{value}"
                tokens, stamp, _ = self._buckets.get(key, (float(limit), now, limit))
                if min(float(limit), tokens + (now - stamp) * limit / WINDOW) < 1.0:
                    return replies.RATE_LIMITED.fmt(kind=kind, value=value, limit=limit)
            for kind, value, limit in active:
                self._take(f"{kind}:{value}", limit, now)
        return None

    def snapshot(self) -> list[dict]:
        now = self.clock()
        with self._lock:
            items = list(self._buckets.items())
        result = []
        for key, (tokens, stamp, capacity) in items:
            kind, _, value = key.partition(":")
            current = min(float(capacity), tokens + (now - stamp) * capacity / WINDOW)
            if current < capacity:
                result.append({"kind": kind, "key": value, "limit_per_hour": capacity,
                               "tokens": round(current, 2)})
        return result
