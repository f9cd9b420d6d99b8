"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync dir.

Every durable file mta writes (spool envelopes, users.json, policy.json,
keys, Maildir messages) goes through here, so a crash leaves either the old
file or the new one, never a torn one. Nothing edits a file in place after
it has been renamed into place.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o640, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data` atomically and durably."""
    directory = os.path.dirname(path) or "."
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(temp)
        raise
    os.close(fd)
    try:
        os.replace(temp, path)
    except BaseException:
        unlink_quietly(temp)
        raise
    if sync_dir:
        fsync_dir(directory)


def json_bytes(value: Any) -> bytes:
    """Readable, stable JSON for files people look at."""
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def write_json(path: str, value: Any, mode: int = 0o640, *, sync_dir: bool = True) -> None:
    atomic_write(path, json_bytes(value), mode, sync_dir=sync_dir)


def write_new(path: str, data: bytes, mode: int = 0o640) -> None:
    """Create `path` (which must not exist) with `data`, fsynced. Only for a
    directory nobody else can see yet; elsewhere use atomic_write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str) -> Any:
    with open(path, "rb") as handle:
        return json.loads(handle.read().decode("utf-8"))


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class FileLock:
    """An exclusive flock on `path + ".lock"`, for read-modify-write of a
    shared file by several processes (the daemon, `mta`, the admin API)."""

    def __init__(self, path: str):
        self.path = path + ".lock"
        self.fd = -1

    def __enter__(self) -> "FileLock":
        import fcntl
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
        self.fd = -1
