"""Message content: the DATA and BDAT readers and the checks on what they read.

DATA (RFC 5321 4.1.1.4, 4.5.2): the message ends at CRLF.CRLF and nowhere
else. A bare LF or bare CR anywhere is never a line end that could end the
message; the message is read to the real end and then refused, as Postfix's
smtpd_forbid_bare_newline does (SMTP smuggling, SEC Consult 2023,
CVE-2023-51764). Lines starting with a dot are unstuffed (4.5.2).

BDAT (RFC 3030): exactly the announced number of octets, even when the
command itself is refused, so the session stays in step.

Both stream into the spool as they read: memory per session is bounded by
one read buffer and one text line (1000 octets, 4.5.3.1.6), whatever the
message size. A clean body is checked and stored in blocks of whole lines
(`Content.lines`), with the same verdicts as line by line. Errors are
recorded, not raised; the first one wins and is answered after the end of
the message.
"""

from __future__ import annotations

from typing import BinaryIO, Callable

from mta import replies
from mta.replies import Reply

MAX_LINE = 1000          # RFC 5321 4.5.3.1.6, including CRLF
READ_CHUNK = 65536
MAX_HOPS = 100           # RFC 5321 6.3: more Received: headers is a loop


class ClientGone(Exception):
    """The client closed the connection in the middle of a message."""


class Content:
    """Checks and stores message content, one line at a time."""

    def __init__(self, write: Callable[[bytes], None], max_size: int):
        self._write = write
        self.max_size = max_size
        self.size = 0
        self.error: Reply | None = None
        self.received_headers = 0
        self.in_headers = True
        self._partial = b""   # BDAT: a line split across chunks

    def _fail(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply

    def line(self, segment: bytes, at_line_start: bool, complete: bool) -> None:
        """`segment` is a complete line with its LF, or a piece of an over-long one."""
        self.size += len(segment)
        if self.error is not None:
            return
        if complete:
            # SMTP smuggling defence: only CRLF ends a line (RFC 5321 2.3.8).
            if segment.count(b"\r") != 1 or not segment.endswith(b"\r\n"):
                self._fail(replies.BARE_NEWLINE)
                return
            if len(segment) > MAX_LINE:
                self._fail(replies.TEXT_LINE_TOO_LONG)
                return
        else:
            self._fail(replies.TEXT_LINE_TOO_LONG)
            return
        if self.in_headers and at_line_start:
            if segment == b"\r\n":
                self.in_headers = False
            elif segment[:9].lower() == b"received:":
                self.received_headers += 1
                if self.received_headers > MAX_HOPS:
                    self._fail(replies.TOO_MANY_HOPS)
                    return
        self._store(segment)

    def lines(self, block: bytes) -> None:
        """Many complete body lines at once, none starting with a dot: the
        checks of `line` done by C string methods over the whole block
        (per-line Python was a third of the CPU for 100 KB messages)."""
        self.size += len(block)
        if self.error is not None:
            return
        texts = block.split(b"\r\n")        # the lines without their CRLF, then b""
        joined = b"".join(texts)
        if b"\r" in joined or b"\n" in joined:  # a CR or LF that is not part of a CRLF
            self._fail(replies.BARE_NEWLINE)
            return
        if len(block) > MAX_LINE and max(map(len, texts)) > MAX_LINE - 2:
            self._fail(replies.TEXT_LINE_TOO_LONG)
            return
        self._store(block)

    def _store(self, data: bytes) -> None:
        """Last checks, then to the spool."""
        if b"\0" in data:
            self._fail(replies.NUL_IN_CONTENT)
            return
        if self.size > self.max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
            return
        try:
            self._write(data)
        except OSError:
            self._fail(replies.INSUFFICIENT_STORAGE)

    def chunk(self, data: bytes) -> None:
        """BDAT: arbitrary octets; lines may span chunks."""
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for item in lines:
            self.line(item + b"\n", True, True)
        if len(self._partial) > MAX_LINE:
            self.line(self._partial, True, False)
            self._partial = b""

    def finish_chunks(self) -> None:
        """BDAT LAST: a final line without CRLF is completed (RFC 5322 2.1)."""
        if self._partial:
            if b"\r" in self._partial:
                self._fail(replies.BARE_NEWLINE)
            self.line(self._partial + b"\r\n", True, True)
            self.size -= 2
            self._partial = b""


def _body_lines(reader) -> bytes:
    """The complete lines already buffered, up to the first one that starts
    with a dot (which may end the data or need unstuffing); b"" if none."""
    buffered = reader.peek(READ_CHUNK)
    end = buffered.rfind(b"\n") + 1
    dot = buffered.find(b"\n.", 0, end)
    if dot >= 0:
        end = dot + 1
    if end == 0 or buffered[:1] == b".":
        return b""
    return reader.read(end)


def read_data(reader, content: Content) -> None:
    """Read DATA content up to CRLF.CRLF into `content` (RFC 5321 4.1.1.4).

    Header lines go one at a time; the body, while it is clean, in blocks of
    whole lines (`Content.lines`). Lines starting with a dot and anything
    after an error take the line-by-line path.
    """
    at_line_start = True
    previous_ended_in_cr = False
    readline = reader.readline
    while True:
        if at_line_start and not content.in_headers and content.error is None:
            block = _body_lines(reader)
            if block:
                content.lines(block)
                at_line_start = block[-2:] == b"\r\n"
                previous_ended_in_cr = False
                continue
        segment = readline(MAX_LINE + 1)
        if not segment:
            raise ClientGone()
        if at_line_start:
            if segment == b".\r\n":
                return
            if segment[:1] == b".":
                segment = segment[1:]   # RFC 5321 4.5.2 transparency
        complete = segment[-1:] == b"\n"
        content.line(segment, at_line_start, complete)
        # Only CRLF ends a line: after "\n" alone, ".\r\n" is not the end of
        # data ("\n.\r\n" smuggling, CVE-2023-51764). The CR of a CRLF may
        # close the previous read when an over-long line was split there.
        at_line_start = segment[-2:] == b"\r\n" or (segment == b"\n" and previous_ended_in_cr)
        previous_ended_in_cr = segment[-1:] == b"\r"


def read_chunk(reader: BinaryIO, size: int, sink: Callable[[bytes], None] | None) -> None:
    """Read exactly `size` octets of a BDAT chunk (RFC 3030 2), feeding `sink`."""
    remaining = size
    while remaining:
        data = reader.read(min(remaining, READ_CHUNK))
        if not data:
            raise ClientGone()
        remaining -= len(data)
        if sink is not None:
            sink(data)
