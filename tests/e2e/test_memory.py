"""Bounded memory (issue 2, "How it is shown"): the body is streamed to the
spool as it arrives, so a 35 MB message is accepted while the daemon's RSS
grows by less than 16 MB.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import assert_reply

MESSAGE_BYTES = 35 * 1024 * 1024
LIMIT_GROWTH = 16 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    """VmRSS of the process and all its threads, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.samples.append(rss_bytes(self.pid))
            except (OSError, AssertionError):
                return
            self.stopped.wait(self.interval)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("verb", ["DATA", "BDAT"])
def test_35mb_message_bounded_rss(mta_factory, verb):
    """Streaming to the spool (issue 2; RFC 5321 4.5.3.1.7 allows large messages):
    a 35 MB message via DATA (and via BDAT chunks, RFC 3030) is accepted while
    VmRSS, sampled every 50 ms, stays within 16 MB of the baseline."""
    server = mta_factory({"max_message_size": 40_000_000})
    server.send(subject="warm-up")  # baseline after start-up + one small message
    time.sleep(0.3)
    baseline = rss_bytes(server.pid)

    line = b"0123456789" * 7 + b"xxxxxx\r\n"           # 78 octets
    block = line * (1024 * 1024 // len(line))          # ~1 MB of whole lines
    blocks = MESSAGE_BYTES // len(block)
    header = b"From: <big@example.org>\r\nSubject: big one\r\n\r\n"
    total = len(header) + blocks * len(block) + len(b"the end\r\n")

    sampler = Sampler(server.pid)
    sampler.start()
    try:
        with server.session(timeout=60) as c:
            assert_reply(c.cmd(f"MAIL FROM:<big@example.org> SIZE={total}"), 250)
            assert_reply(c.cmd("RCPT TO:<info@example.com>"), 250)
            if verb == "DATA":
                assert_reply(c.cmd("DATA"), 354)
                c.send(header)
                for _ in range(blocks):
                    c.send(block)
                c.send(b"the end\r\n.\r\n")
                r = c.reply(timeout=120)
            else:
                c.send(f"BDAT {len(header)}\r\n".encode() + header)
                assert_reply(c.reply(), 250)
                for _ in range(blocks):
                    c.send(f"BDAT {len(block)}\r\n".encode() + block)
                    assert_reply(c.reply(timeout=60), 250)
                tail = b"the end\r\n"
                c.send(f"BDAT {len(tail)} LAST\r\n".encode() + tail)
                r = c.reply(timeout=120)
            assert_reply(r, 250, "2.0.0")
            qid = r.queue_id
    finally:
        time.sleep(0.2)
        sampler.stopped.set()
        sampler.join(5)

    assert sampler.samples, "no RSS samples"
    peak = max(sampler.samples)
    growth = peak - baseline
    print(f"\n{verb}: baseline {baseline / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB, "
          f"growth {growth / 2**20:.1f} MB over {len(sampler.samples)} samples")
    assert growth < LIMIT_GROWTH, (
        f"RSS grew by {growth / 2**20:.1f} MB (baseline {baseline / 2**20:.1f} MB, "
        f"peak {peak / 2**20:.1f} MB, {len(sampler.samples)} samples)")

    entry = [m for m in server.queue_list() if m["id"] == qid][0]
    assert total <= entry["size"] <= total + 4096
