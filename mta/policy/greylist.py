"""Greylisting: (client network, sender, recipient) triplets, 451 4.7.1 on first sight.

The client network is the /24 (IPv4) or /64 (IPv6) so that a sender's pool of
outbound servers passes together. A triplet passes once it is retried after
`delay` seconds and within RETRY_WINDOW; passed triplets are remembered for
PASS_LIFETIME. State is bounded (MAX_TRIPLETS, least recently used dropped)
and persisted to MTA_DATA_DIR/greylist.json so a restart does not
re-greylist everyone. The clock is injected for tests.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict

from mta import replies, safeio
from mta.replies import Reply

log = logging.getLogger("mta.policy")

GREYLIST_FILE = "greylist.json"
RETRY_WINDOW = 4 * 3600
PASS_LIFETIME = 36 * 86400
MAX_TRIPLETS = 200_000
VERSION = 1


def _iso(timestamp: float) -> str | None:
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):   # a damaged greylist.json record
        return None


def client_network(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class Greylist:
    def __init__(self, data_dir: str, delay: int, clock=time.time):
        self.path = os.path.join(data_dir, GREYLIST_FILE)
        self.delay = delay
        self.clock = clock
        self._lock = threading.Lock()
        self._dirty = False
        # key -> [first_seen, last_seen, passed(0/1)]
        self._triplets: OrderedDict[str, list] = OrderedDict()
        self._load()

    @staticmethod
    def key(ip: str, sender: str, recipient: str) -> str:
        text = f"{client_network(ip)}\0{sender.lower()}\0{recipient.lower()}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def check(self, ip: str, sender: str, recipient: str) -> Reply | None:
        key = self.key(ip, sender, recipient)
        now = self.clock()
        with self._lock:
            record = self._triplets.pop(key, None)
            if record is not None:
                first, last, passed = record
                if passed and now - last < PASS_LIFETIME:
                    self._triplets[key] = [first, now, 1]
                    self._dirty = True
                    return None
                if not passed and self.delay <= now - first <= RETRY_WINDOW:
                    self._triplets[key] = [first, now, 1]
                    self._dirty = True
                    return None
                if not passed and now - first < self.delay:
                    self._triplets[key] = [first, now, 0]
                    return replies.GREYLISTED.fmt(seconds=int(self.delay - (now - first)) + 1)
            self._triplets[key] = [now, now, 0]
            self._dirty = True
            while len(self._triplets) > MAX_TRIPLETS:
                self._triplets.popitem(last=False)
        return replies.GREYLISTED.fmt(seconds=self.delay)

    def expire(self) -> None:
        now = self.clock()
        with self._lock:
            for key in [k for k, (first, last, passed) in self._triplets.items()
                        if (passed and now - last >= PASS_LIFETIME) or (not passed and now - first > RETRY_WINDOW)]:
                del self._triplets[key]
                self._dirty = True

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            data = {"version": VERSION, "triplets": dict(self._triplets)}
            self._dirty = False
        try:
            safeio.write_json(self.path, data, mode=0o640, sync_dir=False)
        except OSError as error:
            log.warning("cannot save %s: %s", self.path, error)

    def _load(self) -> None:
        try:
            data = safeio.read_json(self.path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable %s: %s", self.path, error)
            return
        if isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("triplets"), dict):
            for key, value in data["triplets"].items():
                if isinstance(value, list) and len(value) == 3:
                    self._triplets[key] = value

    def entries(self) -> list[dict]:
        """Per-triplet state for the admin API, least recently seen first.

        Triplets are stored hashed, so the key is all there is to show.
        """
        with self._lock:
            items = list(self._triplets.items())
        return [{"key": key, "first_seen": _iso(first), "last_seen": _iso(last), "passed": bool(passed),
                 "retry_after": None if passed else _iso(first + self.delay)}
                for key, (first, last, passed) in items]

    def snapshot(self) -> dict:
        now = self.clock()
        with self._lock:
            records = list(self._triplets.values())
        passed = sum(1 for r in records if r[2])
        return {"delay_seconds": self.delay, "triplets": len(records), "passed": passed,
                "pending": len(records) - passed,
                "oldest_pending_age_seconds": int(max((now - r[0] for r in records if not r[2]), default=0))}
