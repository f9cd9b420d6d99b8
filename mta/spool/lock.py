"""fcntl locks that let the daemon and `mta queue` share the spool safely.

A message is locked by flock(2) on its directory. The lock follows the
inode, so after waiting for it the holder must check the directory is still
where it looked (`same_inode`): another process may have moved or removed
it meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time


class LockBusy(Exception):
    """The message is locked by someone else (usually a delivery)."""


class DirLock:
    """An exclusive flock on a directory, released by `release()` or `with`."""

    def __init__(self, path: str, *, wait: float = 0.0):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(self.fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise LockBusy(path) from None
                time.sleep(0.05)

    def same_inode(self, path: str) -> bool:
        try:
            return os.stat(path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
