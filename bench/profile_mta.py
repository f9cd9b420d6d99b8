"""Profile mta's acceptance path: `.venv/bin/python bench/run.py --profile`.

With smtp-source sending COUNT (2000) 1 KB messages over 20 sessions to an
mta with delivery_workers = 0, four passes, each on a fresh daemon:
1. no tool attached: the rate, and mta's CPU seconds per message;
2. `py-spy record --gil` attached after start-up: where Python CPU goes;
3. `py-spy record` (every non-idle thread): where sessions spend wall time
   (CPU, fsync, lock waits); both summarised as self and inclusive % per
   function;
4. `strace -f -c -w` (500 messages): system calls per message and their
   wall time per call.

Writes bench/profile.txt (the summary), bench/profile.raw and
bench/profile.gil.raw (py-spy's collapsed stacks, for flamegraph tools);
with --size other than 1024 the names get a -SIZE suffix.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import clients
import servers
from servers import Mta, cleanup, free_port

BENCH_DIR = Path(__file__).resolve().parent
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def ensure_py_spy() -> str:
    candidate = Path(sys.executable).parent / "py-spy"
    if not candidate.exists():
        print("installing py-spy into the venv", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True, timeout=600)
    return str(candidate)


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("/mta/", "/lib/python3"):
        if marker in path:
            path = path[path.index(marker) + 1:]
            break
    return f"{match.group('func')} ({path})"


def summarise(raw: Path, top: int = 30) -> tuple[str, dict]:
    self_counts: collections.Counter = collections.Counter()
    incl_counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = [short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    lines = [f"py-spy samples (non-idle threads): {total}", "",
             f"top {top} by self time (% of samples):"]
    for frame, count in self_counts.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    lines += ["", f"top {top} mta/ functions by inclusive time (% of samples):"]
    shown = 0
    for frame, count in incl_counts.most_common():
        if "(mta/" in frame or "socketserver" in frame or "logging/" in frame:
            lines.append(f"  {100 * count / total:5.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines), {"samples": total, "self": self_counts.most_common(top),
                              "inclusive": incl_counts.most_common(80)}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def plain_run(mta: Mta, count: int, sessions: int, size: int) -> str:
    """No tool attached: the rate and mta's CPU time per accepted message."""
    mta.start()
    before = cpu_seconds(mta.pid)
    run = clients.smtp_source(mta.port, sessions, count, size, timeout=600)
    used = cpu_seconds(mta.pid) - before
    queued = mta.queued()
    mta.stop()
    return (f"plain run: {count} x {size} bytes, {sessions} sessions: {run['rate']} msg/s ({run['seconds']}s), "
            f"{queued} queued; mta used {used:.2f} CPU s = {1000 * used / count:.2f} ms CPU per message "
            f"({100 * used / run['seconds']:.0f}% of one core)")


def spy_run(mta: Mta, py_spy: str, raw: Path, count: int, sessions: int, size: int, gil: bool) -> str:
    mta.start()
    # attached after start-up, so only the acceptance path is sampled
    spy = subprocess.Popen([py_spy, "record", "--pid", str(mta.pid), "--format", "raw", "-o", str(raw),
                            "-r", "250", "--nonblocking", *(["--gil"] if gil else [])],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    servers.on_cleanup(lambda: servers.stop_process(spy, signal.SIGINT, 10))
    time.sleep(2.0)
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy failed: {spy.stderr.read().decode(errors='replace')[-500:]}")
    run = clients.smtp_source(mta.port, sessions, count, size, timeout=600)
    servers.stop_process(spy, signal.SIGINT, grace=30)
    mta.stop()
    what = ("--gil: only the thread holding the GIL is sampled, i.e. where Python CPU time goes" if gil else
            "all non-idle threads: where sessions spend their wall time (CPU, fsync, lock waits)")
    text, _ = summarise(raw)
    return f"py-spy record {what}\n{count} x {size} bytes, {sessions} sessions, {run['rate']} msg/s under py-spy\n{text}"


def strace_counts(mta: Mta, count: int, size: int) -> str:
    if shutil.which("strace") is None:
        return "strace is not installed: no system call counts"
    mta.start()
    out = mta.workdir / "strace.txt"
    # -w: wall-clock time per call (fsync latency, lock waits), not CPU time
    tracer = subprocess.Popen(["strace", "-f", "-c", "-w", "-o", str(out), "-p", str(mta.pid)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    servers.on_cleanup(lambda: servers.stop_process(tracer, signal.SIGINT, 10))
    time.sleep(1.0)
    run = clients.smtp_source(mta.port, 20, count, size, timeout=300)
    servers.stop_process(tracer, signal.SIGINT, grace=30)
    mta.stop()
    lines = [f"strace -f -c -w during {count} x {size} bytes messages, 20 sessions ({run['seconds']}s traced, "
             f"ok={run['ok']}): calls per message, wall time per call"]
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            calls = int(parts[3])
            lines.append(f"  {parts[-1]:<16} {calls / count:7.2f}/msg  {int(parts[2]):>9} us/call  "
                         f"({parts[0]}% of all threads' time in syscalls)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="(accepted, as passed on by run.py)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024, help="message payload bytes")
    args = parser.parse_args()
    py_spy = ensure_py_spy()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    workdir = Path(tempfile.mkdtemp(prefix="mta-profile-"))
    suffix = "" if args.size == 1024 else f"-{args.size}"
    raw = BENCH_DIR / f"profile{suffix}.raw"
    txt = BENCH_DIR / f"profile{suffix}.txt"
    try:
        mta = Mta(workdir, free_port())
        parts = [plain_run(mta, args.count, args.sessions, args.size),
                 spy_run(mta, py_spy, raw.with_suffix(".gil.raw"), args.count, args.sessions, args.size, gil=True),
                 spy_run(mta, py_spy, raw, args.count, args.sessions, args.size, gil=False),
                 strace_counts(mta, min(500, args.count), args.size)]
    finally:
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    report = "\n\n".join(parts) + "\n"
    txt.write_text(report)
    print(report)
    print(f"wrote {txt}, {raw} and {raw.with_suffix('.gil.raw')} (py-spy collapsed stacks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
