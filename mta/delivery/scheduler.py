"""The scheduler: which queued message is due, and when to try again.

Owns retry timing. New mail is handed over the moment the spool commits it
(`notify`); deferred mail waits in a heap until its `next_attempt`, which is
also persisted in the envelope, so a restart resumes exactly where the files
say (`scan`). Held mail is never scheduled: it lives outside incoming/ and
deferred/. The "active" set lives here, in memory, not on disk.

Backoff: 300 s doubling up to 4000 s by default (Postfix's minimal and
maximal_backoff_time), configurable with MTA_BACKOFF_MIN/MAX.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import deque

from mta.spool.envelope import EnvelopeError, parse_iso

log = logging.getLogger("mta.delivery")

RESCAN_INTERVAL = 1.0   # incoming/ is listed this often (operator retry/release)


def backoff(attempts: int, minimum: int, maximum: int) -> int:
    """Seconds to wait after the `attempts`-th failed attempt (1, 2, ...)."""
    return max(1, min(maximum, minimum * 2 ** max(0, attempts - 1)))


class Scheduler:
    def __init__(self, spool, clock=time.time):
        self.spool = spool
        self.clock = clock
        self._cond = threading.Condition()
        self._ready: deque[str] = deque()
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}      # id -> due time (0 = ready now)
        self._active: set[str] = set()
        self._deferred_seen: dict[str, int] = {}   # id -> envelope mtime_ns
        self._last_scan = 0.0
        self.stopping = False

    # --- inputs ---

    def notify(self, queue_id: str) -> None:
        """A message was just committed (or made due): deliver it now."""
        with self._cond:
            if queue_id in self._active or self._due.get(queue_id) == 0:
                return
            self._due[queue_id] = 0
            self._ready.append(queue_id)
            self._cond.notify()

    def defer(self, queue_id: str, due: float) -> None:
        with self._cond:
            self._due[queue_id] = due
            heapq.heappush(self._heap, (due, queue_id))
            self._cond.notify()

    def scan(self) -> None:
        """Reconcile with the files: incoming/ is due now, deferred/ when its time comes."""
        present = set()
        for entry in self.spool.entries(("incoming",)):
            present.add(entry.id)
            with self._cond:
                known = entry.id in self._active or self._due.get(entry.id) == 0
            if not known:
                self.notify(entry.id)
        for entry in self.spool.entries(("deferred",)):
            present.add(entry.id)
            try:
                mtime = os.stat(entry.envelope_path).st_mtime_ns
            except FileNotFoundError:
                continue
            if self._deferred_seen.get(entry.id) == mtime:
                continue
            try:
                envelope = self.spool.load(entry)
                due = parse_iso(envelope.next_attempt).timestamp() if envelope.next_attempt else 0.0
            except (OSError, EnvelopeError, ValueError):
                continue
            self._deferred_seen[entry.id] = mtime
            with self._cond:
                if entry.id not in self._active:
                    self._due[entry.id] = due
                    heapq.heappush(self._heap, (due, entry.id))
                    self._cond.notify()
        with self._cond:
            for queue_id in [q for q in self._due if q not in present and q not in self._active]:
                del self._due[queue_id]
            for queue_id in [q for q in self._deferred_seen if q not in present]:
                del self._deferred_seen[queue_id]

    # --- the workers' side ---

    def get(self, timeout: float) -> str | None:
        """The next due message id, marked active; None after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.stopping:
                while self._ready:
                    queue_id = self._ready.popleft()
                    if self._due.get(queue_id) == 0 and queue_id not in self._active:
                        return self._activate(queue_id)
                now = self.clock()
                while self._heap and self._heap[0][0] <= now:
                    due, queue_id = heapq.heappop(self._heap)
                    if self._due.get(queue_id) == due and queue_id not in self._active:
                        return self._activate(queue_id)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                wait = remaining
                if self._heap:
                    wait = min(wait, max(0.01, self._heap[0][0] - now))
                self._cond.wait(wait)
        return None

    def _activate(self, queue_id: str) -> str:
        self._due.pop(queue_id, None)
        self._active.add(queue_id)
        return queue_id

    def done(self, queue_id: str) -> None:
        with self._cond:
            self._active.discard(queue_id)

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()

    @property
    def active_count(self) -> int:
        with self._cond:
            return len(self._active)

    def run_scanner(self, stop_event: threading.Event, extra=None) -> None:
        """Background loop: rescan the spool; `extra()` runs each tick."""
        while not stop_event.wait(RESCAN_INTERVAL):
            try:
                self.scan()
                if extra is not None:
                    extra()
            except Exception:   # never let the scanner die silently
                log.exception("queue scan failed")
