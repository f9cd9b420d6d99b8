"""Logging: `mta.log` for events, `smtp.log` for protocol transcripts.

Logger names follow modules (`mta.smtp`, `mta.spool`, `mta.delivery`); they
all go to mta.log. The SMTP transcript does not go through `logging`: a
session collects its lines and writes them together at an error reply,
every 64 lines and when it ends (`Transcript.write`). Both files are
`LogFile`s: an O_APPEND descriptor written with os.write, lines from many
threads combined into one write when they arrive together, never
interleaved (logging through the stdlib handlers was 39% of the CPU per
message, bench/profile.txt). Rotation needs no signal: a file that
logrotate moved is reopened within a second (like WatchedFileHandler).
Warnings and errors also go to stderr (the systemd journal).
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import re
import sys
import threading
import time

from mta import safeio

FORMAT = "%(asctime)s %(name)s[%(pid)s]: %(message)s"
# A line about a message starts with its queue id (ARCHITECTURE.md habit 8,
# like Postfix's "QUEUEID: to=<...>"), so `grep ^ID` finds its whole history;
# the time and the process follow in brackets.
MESSAGE_FORMAT = "%(message)s [%(asctime)s %(name)s[%(pid)s]]"
_QUEUE_ID_PREFIX = re.compile(r"(?:[0-9A-F]{20}|NOQUEUE): ")
ROTATION_CHECK = 1.0   # seconds between checks that logrotate moved the file

# The logging module does work per record that mta never uses.
logging._srcfile = None
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False


class Clock:
    """ISO 8601 local timestamps with milliseconds, the prefix cached per second."""

    def __init__(self):
        self._cached = (-1, "", "")

    def now(self, at: float | None = None) -> str:
        at = time.time() if at is None else at
        second = int(at)
        cached_second, prefix, zone = self._cached
        if second != cached_second:
            moment = datetime.datetime.fromtimestamp(second).astimezone()
            prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
            offset = moment.strftime("%z")
            zone = f"{offset[:3]}:{offset[3:]}" if offset else ""
            self._cached = (second, prefix, zone)
        return f"{prefix}.{int((at - second) * 1000):03d}{zone}"


class LogFile:
    """An append-only log file shared by all threads (O_APPEND, os.write).

    Writes are combined: a thread that finds another one inside write(2)
    queues its text and returns; the writer takes everything queued on its
    next round. Under load that turns many small writes (each a GIL
    hand-off) into one, and a lone writer still writes at once.
    """

    def __init__(self, path: str):
        self.path = path
        self._queue: collections.deque[str] = collections.deque()
        self._writer = threading.Lock()   # held by the one thread in write(2)
        self.fd, self._identity = self._open()
        self._checked = time.monotonic()

    def _open(self) -> tuple[int, tuple[int, int]]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        stat = os.fstat(fd)
        return fd, (stat.st_dev, stat.st_ino)

    def _check_rotation(self) -> None:
        """Reopen when logrotate moved the file (called by the writer only)."""
        self._checked = time.monotonic()
        try:
            stat = os.stat(self.path)
            if (stat.st_dev, stat.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        old = self.fd
        self.fd, self._identity = self._open()
        os.close(old)

    def write(self, text: str) -> None:
        self._queue.append(text)
        # Whoever holds the writer lock re-checks the queue after releasing
        # it, so text queued here while it was writing is never left behind.
        while self._queue and self._writer.acquire(blocking=False):
            try:
                if time.monotonic() - self._checked >= ROTATION_CHECK:
                    self._check_rotation()
                self._write_queued()
            finally:
                self._writer.release()

    def _write_queued(self) -> None:
        parts = []
        while self._queue:
            parts.append(self._queue.popleft())
        if parts:
            self._write_all("".join(parts).encode("utf-8", "replace"))

    def _write_all(self, data: bytes) -> None:
        try:
            safeio.write_all(self.fd, data)
        except OSError as error:   # a full disk must not stop the daemon
            print(f"mta: cannot write {self.path}: {error.strerror}", file=sys.stderr)

    def close(self) -> None:
        with self._writer:
            self._write_queued()   # lines queued behind the last writer
            try:
                os.close(self.fd)
            except OSError:
                pass


class Transcript:
    """The SMTP protocol transcript (smtp.log)."""

    def __init__(self, output: LogFile | None):
        self.output = output
        self.clock = Clock()

    def write(self, label: str, lines: list[str]) -> None:
        """One session's pending lines, as one write (they stay together)."""
        if self.output is not None and lines:
            stamp = self.clock.now()
            self.output.write("".join(f"{stamp} {label} {text}\n" for text in lines))


class EventFormatter(logging.Formatter):
    """mta.log lines: queue-id lines start with the id, others with the time."""

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        values = {"asctime": self.clock.now(record.created), "name": record.name, "pid": self.pid,
                  "message": message}
        template = MESSAGE_FORMAT if _QUEUE_ID_PREFIX.match(message) else FORMAT
        return template % values


class LogFileHandler(logging.Handler):
    """A logging handler over a LogFile: no lock, no flush, no stat per record."""

    def __init__(self, output: LogFile):
        super().__init__()
        self.output = output

    def createLock(self) -> None:
        self.lock = None   # LogFile writes are atomic appends

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.output.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class Logs:
    """The daemon's two log files, opened once at start-up."""

    def __init__(self, log_dir: str, *, stderr_level: int = logging.WARNING):
        os.makedirs(log_dir, mode=0o750, exist_ok=True)
        # mta.log shows none of these record fields; not gathering them
        # (the logging HOWTO's "Optimization" switches) halves the cost of
        # a log call, and sessions make three or more.
        logging._srcfile = None
        logging.logThreads = False
        logging.logProcesses = False
        logging.logMultiprocessing = False
        self.events = LogFile(os.path.join(log_dir, "mta.log"))
        self.smtp = LogFile(os.path.join(log_dir, "smtp.log"))
        self.transcript = Transcript(self.smtp)
        formatter = EventFormatter()
        handler = LogFileHandler(self.events)
        handler.setFormatter(formatter)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        console.setLevel(stderr_level)
        root = logging.getLogger("mta")
        root.handlers[:] = [handler, console]
        root.setLevel(logging.INFO)
        root.propagate = False
        # Library chatter (waitress) goes to mta.log too, at warning level.
        library = logging.getLogger("waitress")
        library.handlers[:] = [handler]
        library.setLevel(logging.WARNING)
        library.propagate = False

    def close(self) -> None:
        self.events.close()
        self.smtp.close()


def configure_cli(log_dir: str) -> None:
    """Operator commands record their actions in mta.log when it is writable,
    never on the terminal."""
    root = logging.getLogger("mta")
    root.propagate = False
    root.setLevel(logging.INFO)
    try:
        handler = LogFileHandler(LogFile(os.path.join(log_dir, "mta.log")))
        handler.setFormatter(EventFormatter())
        root.handlers[:] = [handler]
    except OSError:
        root.handlers[:] = [logging.NullHandler()]
