"""Load generators and probes: smtp-source runs, a latency client, an idle
session holder, a disk fsync probe, listen-overflow counters, RSS sampling.

Everything is bounded: every run has a time limit, every loop a count.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path

SENDER = "from@example.org"
RECIPIENT = "to@remote.test"


def listen_overflows() -> int:
    """TcpExt ListenOverflows, system-wide (what `nstat -az TcpExtListenOverflows` reads)."""
    with open("/proc/net/netstat") as handle:
        lines = handle.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return 0


def smtp_source(port: int, sessions: int, count: int, size: int, timeout: float) -> dict:
    """One `smtp-source` run; returns seconds, msg/s, exit status, overflows."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size), "-c",
           "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    overflows = listen_overflows()
    start = time.monotonic()
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=timeout, text=True)
        elapsed = time.monotonic() - start
        ok = result.returncode == 0
        error = result.stderr.strip()[-300:] if not ok else ""
    except subprocess.TimeoutExpired:
        elapsed = time.monotonic() - start
        ok, error = False, f"timeout after {timeout:.0f}s"
    return {"seconds": round(elapsed, 3), "rate": round(count / elapsed, 1) if ok else None, "ok": ok,
            "error": error, "overflows": listen_overflows() - overflows, "count": count}


def start_smtp_source(port: int, sessions: int, count: int, size: int) -> subprocess.Popen:
    return subprocess.Popen(["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size), "-c",
                             "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


# --- latency: time from "\r\n.\r\n" to the 250 ---------------------------------------

def _message(size: int, number: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency {number}\r\n"
            f"Message-ID: <lat{number}.{time.time_ns()}@example.org>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    return head.encode() + body[:-2]  # the final CRLF goes with the terminator


class _Conversation:
    def __init__(self, port: int, timeout: float):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def reply(self) -> bytes:
        while True:
            line = self.reader.readline(4096)
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return line

    def command(self, text: str, expect: bytes) -> None:
        self.sock.sendall(text.encode() + b"\r\n")
        line = self.reply()
        if not line.startswith(expect):
            raise RuntimeError(f"{text!r} -> {line!r}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        self.reader.close()
        self.sock.close()


def latency_run(port: int, threads: int, per_thread: int, size: int = 1024, timeout: float = 120) -> dict:
    """`threads` sessions in parallel, each sending `per_thread` messages."""
    samples: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)
    deadline = time.monotonic() + timeout

    def worker(index: int) -> None:
        mine = []
        try:
            conv = _Conversation(port, 30)
            conv.reply()  # banner
            conv.command("EHLO latency.example.org", b"250")
            try:
                barrier.wait(30)
            except threading.BrokenBarrierError:
                pass
            for number in range(per_thread):
                if time.monotonic() > deadline:
                    raise TimeoutError("run time limit")
                conv.command(f"MAIL FROM:<{SENDER}>", b"250")
                conv.command(f"RCPT TO:<{RECIPIENT}>", b"250")
                conv.command("DATA", b"354")
                conv.sock.sendall(_message(size, index * per_thread + number))
                start = time.perf_counter()
                conv.sock.sendall(b"\r\n.\r\n")
                line = conv.reply()
                mine.append(time.perf_counter() - start)
                if not line.startswith(b"250"):
                    raise RuntimeError(f"end of data -> {line!r}")
            conv.close()
        except Exception as error:  # reported, not raised: the other threads go on
            with lock:
                errors.append(f"{error.__class__.__name__}: {error}")
            try:
                barrier.abort()
            except Exception:
                pass
        with lock:
            samples.extend(mine)

    overflows = listen_overflows()
    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    start = time.monotonic()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(max(1.0, deadline - time.monotonic() + 5))
    elapsed = time.monotonic() - start
    samples.sort()

    def pct(p: float):
        if not samples:
            return None
        return round(samples[min(len(samples) - 1, int(p / 100 * len(samples)))] * 1000, 2)

    return {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": pct(100),
            "messages": len(samples), "seconds": round(elapsed, 2), "errors": errors[:5],
            "ok": not errors and len(samples) == threads * per_thread,
            "overflows": listen_overflows() - overflows}


# --- concurrency: idle sessions held open -----------------------------------------------

def hold_idle_sessions(port: int, count: int, timeout: float) -> tuple[dict, list[socket.socket]]:
    """Open `count` connections at once and wait for each one's banner.

    Returns the tally and the open sockets (the caller measures memory,
    then closes them). greeted = got 220; refused = got another reply
    (421 ...); failed = reset/closed/error; waiting = no banner in time.
    """
    overflows = listen_overflows()
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    tally = {"greeted": 0, "refused": 0, "failed": 0, "waiting": 0}
    refusals: dict[str, int] = {}
    start = time.monotonic()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, 115):  # EINPROGRESS
            tally["failed"] += 1
            sock.close()
            continue
        socks.append(sock)
        selector.register(sock, selectors.EVENT_READ)
    pending = len(socks)
    deadline = start + timeout
    last_banner = start
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            selector.unregister(sock)
            pending -= 1
            try:
                data = sock.recv(512)
            except OSError:
                data = b""
            if data.startswith(b"220"):
                tally["greeted"] += 1
                last_banner = time.monotonic()
            elif data:
                tally["refused"] += 1
                text = data[:40].decode(errors="replace").strip()
                refusals[text] = refusals.get(text, 0) + 1
            else:
                tally["failed"] += 1
    tally["waiting"] = pending
    selector.close()
    tally["seconds_to_last_banner"] = round(last_banner - start, 2)
    tally["overflows"] = listen_overflows() - overflows
    if refusals:
        tally["refusals"] = refusals
    return tally, socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


# --- the disk ------------------------------------------------------------------------

def fsync_rate(directory: Path, threads: int, seconds: float = 2.0) -> float:
    """create + write 1 KB + fsync + rename + fsync(dir), per second, in total."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = [0] * threads
    stop_at = time.monotonic() + seconds
    payload = b"x" * 1024

    def loop(index: int) -> None:
        sub = directory / f"t{index}"
        sub.mkdir(exist_ok=True)
        dir_fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        number = 0
        try:
            while time.monotonic() < stop_at:
                temp = sub / f"tmp.{number}"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, payload)
                os.fsync(fd)
                os.close(fd)
                os.rename(temp, sub / f"msg.{number}")
                os.fsync(dir_fd)
                number += 1
        finally:
            os.close(dir_fd)
        counts[index] = number

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - start
    return round(sum(counts) / elapsed, 1)


# --- memory sampling -------------------------------------------------------------------

class Sampler:
    """Samples `measure()` (kB) every `interval` s in a thread; keeps the peak."""

    def __init__(self, measure, interval: float = 0.05):
        self.measure = measure
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.measure())
            except Exception:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.peak = max(self.peak, self.measure())
        except Exception:
            pass
