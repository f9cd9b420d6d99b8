"""SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN mechanisms, and lockout.

The session drives the exchange; this module decodes what the client sends
and keeps the failure counts that lock out an IP or a username for a while
(MTA_AUTH_LOCKOUT_*). Memory for failure records is bounded.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections import OrderedDict

MECHANISMS = ("PLAIN", "LOGIN")
LOGIN_USERNAME_CHALLENGE = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD_CHALLENGE = base64.b64encode(b"Password:").decode()
MAX_TRACKED = 100_000


class AuthDecodeError(ValueError):
    """The client's response is not valid base64 or not a valid payload."""


def b64decode(text: str) -> bytes:
    """Strict base64 (RFC 4954 4): '=' alone is the empty initial response."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise AuthDecodeError("invalid base64") from None


def decode_plain(data: bytes) -> tuple[str, str, str]:
    """RFC 4616 2: [authzid] NUL authcid NUL passwd -> (authzid, authcid, passwd)."""
    parts = data.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise AuthDecodeError("malformed PLAIN response")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise AuthDecodeError("PLAIN response is not UTF-8") from None
    return authzid, authcid, password


def decode_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthDecodeError("response is not UTF-8") from None
    if "\0" in text:
        raise AuthDecodeError("NUL in response")
    return text


class Lockout:
    """Failures per key ("ip:1.2.3.4", "user:a@b") in a sliding window."""

    def __init__(self, failures: int, window: int, duration: int, clock=time.monotonic):
        self.failures = failures
        self.window = window
        self.duration = duration
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._locked_until: OrderedDict[str, float] = OrderedDict()

    def configure(self, failures: int, window: int, duration: int) -> None:
        with self._lock:
            self.failures, self.window, self.duration = failures, window, duration

    def locked(self, *keys: str) -> bool:
        if self.failures <= 0:
            return False
        now = self.clock()
        with self._lock:
            for key in keys:
                until = self._locked_until.get(key)
                if until is not None:
                    if until > now:
                        return True
                    del self._locked_until[key]
        return False

    def fail(self, *keys: str) -> list[str]:
        """Record a failure; returns the keys that just became locked."""
        if self.failures <= 0:
            return []
        now = self.clock()
        newly_locked = []
        with self._lock:
            for key in keys:
                times = [t for t in self._failures.pop(key, []) if now - t < self.window]
                times.append(now)
                if len(times) >= self.failures:
                    self._locked_until[key] = now + self.duration
                    self._locked_until.move_to_end(key)
                    newly_locked.append(key)
                else:
                    self._failures[key] = times
            while len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)
            while len(self._locked_until) > MAX_TRACKED:
                self._locked_until.popitem(last=False)
        return newly_locked

    def succeed(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)

    def snapshot(self) -> dict[str, float]:
        now = self.clock()
        with self._lock:
            return {key: round(until - now) for key, until in self._locked_until.items() if until > now}
