"""SMTP AUTH users: `MTA_DATA_DIR/users.json`, bcrypt hashes only.

Owns the users file: reading it (re-read when its mtime changes, so `mta
user` and the admin API take effect without a restart), verifying passwords
and changing users with atomic writes. Usernames are full addresses,
compared case-insensitively. The file never holds a plaintext password.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import bcrypt

from mta import safeio
from mta.address import AddressError, parse_mailbox
from mta.spool.envelope import now_iso

log = logging.getLogger("mta.users")

USERS_FILE = "users.json"
VERSION = 1
MAX_PASSWORD = 1024


class UserError(ValueError):
    """Bad username or password, or a conflicting change."""


class UserExists(UserError):
    pass


class NoSuchUser(UserError):
    pass


def normalize_username(name: str) -> str:
    name = (name or "").strip()
    try:
        mailbox = parse_mailbox(name)
    except AddressError as error:
        raise UserError(f"username must be a full address (alice@example.com): {error}") from None
    if mailbox.local.startswith('"'):
        raise UserError("username must not be a quoted local part")
    return mailbox.key


def _check_password(password: str) -> bytes:
    if not isinstance(password, str) or not password:
        raise UserError("password must not be empty")
    if "\n" in password or "\r" in password or "\0" in password:
        raise UserError("password must be one line without NUL")
    data = password.encode("utf-8")
    if len(data) > MAX_PASSWORD:
        raise UserError("password too long")
    return data


def _digest_input(data: bytes) -> bytes:
    # bcrypt ignores bytes past 72; pre-hash long passwords so all of it counts.
    if len(data) <= 72:
        return data
    import base64
    import hashlib
    return base64.b64encode(hashlib.sha256(data).digest())


class UserStore:
    def __init__(self, data_dir: str, rounds: int = 12, spread=contextlib.nullcontext):
        self.path = os.path.join(data_dir, USERS_FILE)
        self.rounds = rounds
        self._spread = spread   # bcrypt may use every CPU (mta.cpus.CpuPlacement.spread)
        self._lock = threading.Lock()
        self._users: dict[str, dict] = {}
        self._mtime: int | None = None
        self._dummy_hash: bytes | None = None

    def _dummy(self) -> bytes:
        # Checking unknown users against a dummy hash keeps their timing the
        # same as known ones (no user enumeration by timing).
        if self._dummy_hash is None:
            with self._spread():
                self._dummy_hash = bcrypt.hashpw(b"dummy password", bcrypt.gensalt(rounds=self.rounds))
        return self._dummy_hash

    def _load(self) -> dict[str, dict]:
        """The users, re-read when the file changes. A damaged file keeps the
        last good users and is logged once (AUTH must not crash a session)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._users, self._mtime = {}, None
            return self._users
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature != self._mtime:
            self._mtime = signature
            try:
                data = safeio.read_json(self.path)
                if not isinstance(data, dict) or data.get("version") != VERSION \
                        or not isinstance(data.get("users"), dict) \
                        or not all(isinstance(v, dict) and isinstance(v.get("hash"), str) for v in data["users"].values()):
                    raise ValueError("unknown format or version")
            except (OSError, ValueError, UnicodeDecodeError) as error:
                log.error("%s is damaged, keeping the previous users: %s", self.path, error)
                return self._users
            self._users = data["users"]
        return self._users

    def users(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._load())

    def exists(self, username: str) -> bool:
        try:
            key = normalize_username(username)
        except UserError:
            return False
        return key in self.users()

    def list(self) -> list[dict]:
        return [{"username": name, "created": info.get("created")} for name, info in sorted(self.users().items())]

    def verify(self, username: str, password: str) -> bool:
        """Constant work whether or not the user exists."""
        try:
            key = normalize_username(username)
            data = _check_password(password)
        except UserError:
            key, data = "", b"x"
        record = self.users().get(key)
        hashed = record["hash"].encode("ascii") if record else self._dummy()
        with self._spread():
            ok = bcrypt.checkpw(_digest_input(data), hashed)
        return ok and record is not None

    def _file_lock(self) -> safeio.FileLock:
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        return safeio.FileLock(self.path)

    def _write(self, users: dict[str, dict]) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        safeio.write_json(self.path, {"version": VERSION, "users": users}, mode=0o640)
        stat = os.stat(self.path)
        self._users, self._mtime = users, (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _hash(self, password: str) -> str:
        data = _digest_input(_check_password(password))
        with self._spread():
            return bcrypt.hashpw(data, bcrypt.gensalt(rounds=self.rounds)).decode("ascii")

    def add(self, username: str, password: str) -> str:
        key = normalize_username(username)
        hashed = self._hash(password)
        with self._lock, self._file_lock():
            users = dict(self._load())
            if key in users:
                raise UserExists(f"user {key} already exists")
            users[key] = {"hash": hashed, "created": now_iso()}
            self._write(users)
        return key

    def set_password(self, username: str, password: str) -> str:
        key = normalize_username(username)
        hashed = self._hash(password)
        with self._lock, self._file_lock():
            users = dict(self._load())
            if key not in users:
                raise NoSuchUser(f"no such user {key}")
            users[key] = {**users[key], "hash": hashed, "changed": now_iso()}
            self._write(users)
        return key

    def delete(self, username: str) -> str:
        key = normalize_username(username)
        with self._lock, self._file_lock():
            users = dict(self._load())
            if key not in users:
                raise NoSuchUser(f"no such user {key}")
            del users[key]
            self._write(users)
        return key
