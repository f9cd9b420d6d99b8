"""Logging set-up: `mta.log` for events, `smtp.log` for protocol transcripts.

Logger names follow modules (`mta.smtp`, `mta.spool`, `mta.delivery`);
`mta.transcript` goes to smtp.log only. Files are opened with
WatchedFileHandler so logrotate can move them without a signal. Warnings
and errors are also written to stderr (the systemd journal).
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import re
import sys

FORMAT = "%(asctime)s %(name)s[%(process)d]: %(message)s"
# A line about a message starts with its queue id (ARCHITECTURE.md habit 8,
# like Postfix's "QUEUEID: to=<...>"), so `grep ^ID` finds its whole history;
# the time and the process follow in brackets.
MESSAGE_FORMAT = "%(message)s [%(asctime)s %(name)s[%(process)d]]"
_QUEUE_ID_PREFIX = re.compile(r"(?:[0-9A-F]{20}|NOQUEUE): ")


class _IsoFormatter(logging.Formatter):
    def __init__(self, fmt=FORMAT):
        super().__init__(fmt)
        self._message_style = logging.PercentStyle(MESSAGE_FORMAT)

    def formatTime(self, record, datefmt=None):
        return datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")

    def formatMessage(self, record):
        if _QUEUE_ID_PREFIX.match(record.message):
            return self._message_style.format(record)
        return super().formatMessage(record)


def configure(log_dir: str, *, stderr_level: int = logging.WARNING) -> None:
    os.makedirs(log_dir, mode=0o750, exist_ok=True)
    formatter = _IsoFormatter(FORMAT)

    events = logging.handlers.WatchedFileHandler(os.path.join(log_dir, "mta.log"), encoding="utf-8")
    events.setFormatter(formatter)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.setLevel(stderr_level)
    root = logging.getLogger("mta")
    root.handlers[:] = [events, console]
    root.setLevel(logging.INFO)
    root.propagate = False

    transcript = logging.getLogger("mta.transcript")
    handler = logging.handlers.WatchedFileHandler(os.path.join(log_dir, "smtp.log"), encoding="utf-8")
    handler.setFormatter(formatter)
    transcript.handlers[:] = [handler]
    transcript.setLevel(logging.INFO)
    transcript.propagate = False

    # Library chatter (waitress, falcon) goes to mta.log too, at warning level.
    for name in ("waitress",):
        library = logging.getLogger(name)
        library.handlers[:] = [events]
        library.setLevel(logging.WARNING)
        library.propagate = False


def configure_cli() -> None:
    """Commands log to the daemon's mta.log when they can, never to the terminal."""
    logging.getLogger("mta").addHandler(logging.NullHandler())
    logging.getLogger("mta").propagate = False
