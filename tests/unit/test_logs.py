"""Unit tests for mta.logs.LogFile: the combined O_APPEND writer behind
mta.log and smtp.log.

Lines from many threads are combined into fewer writes; these tests hold
the guarantees an operator relies on: every line written exactly once and
whole (no interleaving), nothing left queued at close, and a file moved by
logrotate reopened.
"""

from __future__ import annotations

import collections
import threading

from mta import logs


def test_concurrent_lines_each_written_once_and_whole(tmp_path):
    """16 threads x 400 lines while others hold the writer: every line lands
    exactly once, never cut or mixed with another."""
    log_file = logs.LogFile(str(tmp_path / "mta.log"))
    start = threading.Barrier(16)

    def writer(number: int) -> None:
        start.wait()
        for line in range(400):
            log_file.write(f"thread {number} line {line} " + "x" * (line % 97) + "\n")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log_file.close()
    lines = (tmp_path / "mta.log").read_text().splitlines()
    counts = collections.Counter(lines)
    expected = {f"thread {n} line {i} " + "x" * (i % 97) for n in range(16) for i in range(400)}
    assert set(counts) == expected
    assert all(count == 1 for count in counts.values())
    per_thread = collections.defaultdict(list)
    for text in lines:
        _, number, _, line, _ = text.split(" ", 4)
        per_thread[number].append(int(line))
    assert all(order == sorted(order) for order in per_thread.values()), "one thread's lines out of order"


def test_close_writes_what_is_still_queued(tmp_path):
    """A line queued behind the last writer (which then lost the race to
    close) is written by close, not dropped."""
    log_file = logs.LogFile(str(tmp_path / "mta.log"))
    log_file._writer.acquire()          # another thread is inside write(2)
    log_file.write("queued behind the writer\n")
    assert (tmp_path / "mta.log").read_text() == ""
    log_file._writer.release()
    log_file.close()
    assert (tmp_path / "mta.log").read_text() == "queued behind the writer\n"


def test_file_moved_by_logrotate_is_reopened(tmp_path):
    """logrotate renames the file; the next write after ROTATION_CHECK goes
    to a new file at the old path (like WatchedFileHandler)."""
    path = tmp_path / "mta.log"
    log_file = logs.LogFile(str(path))
    log_file.write("before\n")
    path.rename(tmp_path / "mta.log.1")
    log_file._checked -= logs.ROTATION_CHECK
    log_file.write("after\n")
    log_file.close()
    assert (tmp_path / "mta.log.1").read_text() == "before\n"
    assert path.read_text() == "after\n"
