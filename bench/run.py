#!/usr/bin/env python3
"""mta vs Postfix on this machine, in one run: `make bench` (`ARGS=--quick`).

Starts its own mta (`python -m mta serve` with a generated config) and its
own Postfix instance (private config, queue and log directories, loopback
high ports; see servers.py), plus one `smtp-sink`, measures six figures for
both, prints a table with ratios and writes bench/results.json,
bench/results.png and bench/RESULTS.md. Everything it started is stopped
at the end, on an error, on Ctrl-C and on SIGTERM.

Figures (median of --reps runs; --quick: one run, smaller counts):
  1 acceptance   smtp-source, 1 KB and 100 KB, 1/20/100 sessions, queued
                 durably and not delivered (mta: delivery_workers = 0;
                 Postfix: HOLD, see servers.Postfix)
  2 relay        N messages from smtp-source (20 sessions) until smtp-sink
                 has received all of them (mta: relayhost, 10 workers)
  3 latency      "\\r\\n.\\r\\n" -> 250, p50/p99, 20 sessions in parallel
  4 concurrency  idle sessions held at once, daemon RSS, refusals
  5 memory       idle RSS; RSS growth while ten 35 MB messages arrive at once
  6 ceiling      smtp-source -> smtp-sink alone; the disk's fsyncs per second
Listen-queue overflows (TcpExt ListenOverflows, system-wide) are counted
around every measured run.

Requires root (Postfix's master runs as root) and Postfix 3.x
(postfix, postconf, postsuper, smtp-source, smtp-sink).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients  # noqa: E402
import servers  # noqa: E402
from servers import Mta, Postfix, Sink, cleanup, free_port, pss_kb, rss_kb  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
KB = 1024

FIGURES = ("ceiling", "memory", "accept", "latency", "relay", "concurrency")

FULL = {
    "reps": 3,
    "accept": {(1 * KB, 1): 400, (1 * KB, 20): 1500, (1 * KB, 100): 1500,
               (100 * KB, 1): 150, (100 * KB, 20): 500, (100 * KB, 100): 500},
    "relay": 2000,
    "latency_per_thread": 50,
    "idle_sessions": 2000,
    "big": (10, 35_000_000),
}
QUICK = {
    "reps": 1,
    "accept": {key: max(100, count // 4) for key, count in FULL["accept"].items()},
    "relay": 500,
    "latency_per_thread": 15,
    "idle_sessions": 500,
    "big": (10, 10_000_000),
}
LATENCY_THREADS = 20
RELAY_SESSIONS = 20
IDLE_TIMEOUT = 90.0


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return None
    return round(a / b, 2)


def size_label(size: int) -> str:
    return f"{size // KB} KB" if size < 1_000_000 else f"{size / 1e6:g} MB"


def mb(kb):
    return None if kb is None else round(kb / 1024, 1)


# --- the machine ------------------------------------------------------------------

def mta_options(pairs: list[str]) -> dict:
    """--mta-option KEY=VALUE (VALUE in TOML syntax) -> {KEY: value}."""
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError as error:
            raise SystemExit(f"--mta-option {pair!r}: {error}") from None
    return options


def file_system(path: Path) -> str:
    """The file system both queues live on, and for ext4 whether it journals:
    without a journal, ext4 scans inodes freed in the last minute before
    reusing one, which makes every file created cost more after a run that
    deleted thousands (both servers create files per message)."""
    best = ("", "", "")
    with open("/proc/mounts") as handle:
        for line in handle:
            device, mount, kind = line.split()[:3]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[1]):
                best = (device, mount, kind)
    device, mount, kind = best
    if kind == "ext4":
        name = os.path.basename(os.path.realpath(device))
        kind += " with journal" if os.path.exists(f"/proc/fs/jbd2/{name}-8") else " without journal"
    return f"{kind} on {device} (mounted at {mount})"


def machine(workdir: Path) -> dict:
    model = ""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    postfix_version = servers.run_quiet(["postconf", "-d", "-h", "mail_version"], check=False).stdout.strip()
    git = servers.run_quiet(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], check=False).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": model, "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "postfix": postfix_version, "mta_git": git, "loadavg_at_start": os.getloadavg(),
            "file_system": file_system(workdir)}


def tmpfs_dir() -> Path | None:
    """A private directory on /dev/shm for the tmpfs ceiling, removed at exit."""
    if file_system(Path("/dev/shm")).split()[0] != "tmpfs":
        return None
    path = Path(tempfile.mkdtemp(prefix="mta-bench-", dir="/dev/shm"))
    servers.on_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


# --- the figures --------------------------------------------------------------------

class Bench:
    def __init__(self, args, plan: dict, workdir: Path):
        self.args = args
        self.plan = plan
        self.workdir = workdir
        self.results: dict = {"figures": {}}
        self.sink_port = free_port()
        self.sink = Sink(self.sink_port)
        self.mta = Mta(workdir, free_port(), options=mta_options(args.mta_option))
        self.tmpfs = tmpfs_dir()   # the ceiling of mta's own work: a spool that costs no disk
        self.postfix = Postfix(workdir, free_port(), self.sink_port)
        log(f"ports: mta {self.mta.port}, Postfix {self.postfix.port}, smtp-sink {self.sink_port}; work dir {workdir}")
        self.postfix.start()

    def order(self, rep: int):
        """Alternate who goes first, so drift in the machine's load cancels out."""
        return ("mta", "postfix") if rep % 2 == 0 else ("postfix", "mta")

    # 6: the ceiling ----------------------------------------------------------------
    def ceiling(self) -> None:
        out = {"fsync_1_thread": clients.fsync_rate(self.workdir / "fsync1", 1),
               "fsync_8_threads": clients.fsync_rate(self.workdir / "fsync8", 8)}
        shutil.rmtree(self.workdir / "fsync1", ignore_errors=True)
        shutil.rmtree(self.workdir / "fsync8", ignore_errors=True)
        log(f"disk: {out['fsync_1_thread']}/s create+fsync+rename+dir-fsync from 1 thread, "
            f"{out['fsync_8_threads']}/s from 8")
        sink = {}
        for (size, sessions), count in self.plan["accept"].items():
            runs = [clients.smtp_source(self.sink_port, sessions, count, size, timeout=30 + count / 10)
                    for _ in range(self.plan["reps"])]
            key = f"{size_label(size)} x {sessions}"
            sink[key] = {"median": median(r["rate"] for r in runs), "runs": runs,
                         "overflows": sum(r["overflows"] for r in runs)}
            log(f"smtp-sink {key}: {sink[key]['median']} msg/s")
        out["smtp_sink"] = sink
        self.results["figures"]["ceiling"] = out

    # 5: memory --------------------------------------------------------------------------
    def memory(self) -> None:
        parallel, size = self.plan["big"]
        out = {"messages": parallel, "size": size}
        # mta: a fresh daemon, idle, then `parallel` big messages at once
        self.mta.start()
        time.sleep(2)
        idle = rss_kb(self.mta.pid)
        with clients.Sampler(lambda: rss_kb(self.mta.pid)) as peak:
            run = clients.smtp_source(self.mta.port, parallel, parallel, size, timeout=600)
        hwm = int(servers.proc_status(self.mta.pid).get("VmHWM", "0 kB").split()[0])
        queued = self.mta.queued()
        self.mta.stop()
        out["mta"] = {"idle_rss_kb": idle, "peak_rss_kb": peak.peak, "growth_kb": peak.peak - idle,
                      "vmhwm_kb": hwm, "run": run, "queued": queued}
        log(f"mta memory: idle {mb(idle)} MB, +{mb(peak.peak - idle)} MB with {parallel} x "
            f"{size_label(size)} ({run['seconds']}s, queued {queued})")
        # Postfix: a fresh instance; RSS (and PSS) summed over all its processes
        self.postfix.restart()
        self.postfix.clear_queue()
        time.sleep(2)
        pids = self.postfix.pids()
        idle = sum(rss_kb(p) for p in pids)
        idle_pss = sum(pss_kb(p) for p in pids)
        with clients.Sampler(lambda: sum(rss_kb(p) for p in self.postfix.pids())) as peak, \
                clients.Sampler(lambda: sum(pss_kb(p) for p in self.postfix.pids()), 0.1) as peak_pss:
            run = clients.smtp_source(self.postfix.port, parallel, parallel, size, timeout=600)
        queued = self.postfix.queued()
        self.postfix.clear_queue()
        out["postfix"] = {"idle_rss_kb": idle, "idle_pss_kb": idle_pss, "idle_processes": len(pids),
                          "peak_rss_kb": peak.peak, "growth_kb": peak.peak - idle,
                          "peak_pss_kb": peak_pss.peak, "growth_pss_kb": peak_pss.peak - idle_pss,
                          "run": run, "queued": queued}
        log(f"Postfix memory: idle {mb(idle)} MB RSS / {mb(idle_pss)} MB PSS in {len(pids)} processes, "
            f"+{mb(peak.peak - idle)} MB RSS / +{mb(peak_pss.peak - idle_pss)} MB PSS "
            f"({run['seconds']}s, queued {queued})")
        self.results["figures"]["memory"] = out

    # 1: acceptance -------------------------------------------------------------------------
    def accept_once(self, who: str, size: int, sessions: int, count: int) -> dict:
        timeout = 30 + count / 10
        if who in ("mta", "mta_tmpfs"):
            self.mta.start(spool_under=self.tmpfs if who == "mta_tmpfs" else None)
            cpu = servers.cpu_seconds(self.mta.pid)
            run = clients.smtp_source(self.mta.port, sessions, count, size, timeout)
            run["cpu_s"] = round(servers.cpu_seconds(self.mta.pid) - cpu, 3)
            run["queued"] = self.mta.queued()
            self.mta.stop()
        else:
            self.postfix.clear_queue()
            cpu = self.postfix.cpu_seconds()
            run = clients.smtp_source(self.postfix.port, sessions, count, size, timeout)
            run["cpu_s"] = round(self.postfix.cpu_seconds() - cpu, 3)
            run["queued"] = self.postfix.queued()
            self.postfix.clear_queue()
        run["cpu_ms_per_msg"] = round(1000 * run["cpu_s"] / count, 3)
        if run["ok"] and run["queued"] != count:
            run["error"] = f"{run['queued']} of {count} messages queued"
        return run

    def accept(self) -> None:
        out = {}
        for (size, sessions), count in self.plan["accept"].items():
            key = f"{size_label(size)} x {sessions}"
            ceiling = ("mta_tmpfs",) if self.tmpfs else ()   # after the pair, every repetition
            runs = {who: [] for who in ("mta", "postfix", *ceiling)}
            for rep in range(self.plan["reps"]):
                for who in self.order(rep) + ceiling:
                    runs[who].append(self.accept_once(who, size, sessions, count))
            cell = {"count": count}
            for who in runs:
                cell[who] = {"median": median(r["rate"] for r in runs[who]), "runs": runs[who],
                             "cpu_ms_per_msg": median(r["cpu_ms_per_msg"] for r in runs[who]),
                             "overflows": sum(r["overflows"] for r in runs[who])}
            cell["ratio"] = ratio(cell["mta"]["median"], cell["postfix"]["median"])
            out[key] = cell
            log(f"accept {key} ({count} msgs): mta {cell['mta']['median']} msg/s, "
                f"Postfix {cell['postfix']['median']} msg/s, ratio {cell['ratio']}; CPU per message: "
                f"mta {cell['mta']['cpu_ms_per_msg']} ms, Postfix {cell['postfix']['cpu_ms_per_msg']} ms"
                + (f"; mta on tmpfs {cell['mta_tmpfs']['median']} msg/s, "
                   f"{cell['mta_tmpfs']['cpu_ms_per_msg']} ms" if "mta_tmpfs" in cell else "")
                + self._errors(runs))
        self.results["figures"]["accept"] = out

    @staticmethod
    def _errors(runs: dict) -> str:
        errors = [f"{who}: {r['error']}" for who in runs for r in runs[who] if r.get("error")]
        return ("  ERRORS: " + "; ".join(errors[:4])) if errors else ""

    # 3: latency ------------------------------------------------------------------------
    def latency(self) -> None:
        per_thread = self.plan["latency_per_thread"]
        runs = {"mta": [], "postfix": []}
        for rep in range(self.plan["reps"]):
            for who in self.order(rep):
                if who == "mta":
                    self.mta.start()
                    runs[who].append(clients.latency_run(self.mta.port, LATENCY_THREADS, per_thread))
                    self.mta.stop()
                else:
                    self.postfix.clear_queue()
                    runs[who].append(clients.latency_run(self.postfix.port, LATENCY_THREADS, per_thread))
                    self.postfix.clear_queue()
        out = {"sessions": LATENCY_THREADS, "messages_per_run": LATENCY_THREADS * per_thread}
        for who in runs:
            out[who] = {"p50_ms": median(r["p50_ms"] for r in runs[who]),
                        "p99_ms": median(r["p99_ms"] for r in runs[who]),
                        "runs": runs[who], "overflows": sum(r["overflows"] for r in runs[who])}
        log(f"latency: mta p50 {out['mta']['p50_ms']} ms p99 {out['mta']['p99_ms']} ms; "
            f"Postfix p50 {out['postfix']['p50_ms']} ms p99 {out['postfix']['p99_ms']} ms"
            + "".join(f"  ERRORS {who}: {r['errors']}" for who in runs for r in runs[who] if r["errors"]))
        self.results["figures"]["latency"] = out

    # 2: relay end to end ----------------------------------------------------------------
    def relay_once(self, who: str, count: int) -> dict:
        port = self.mta.port if who == "mta" else self.postfix.port
        if who == "mta":
            self.mta.start(delivery_workers=10, relayhost=f"[127.0.0.1]:{self.sink_port}")
        else:
            self.postfix.clear_queue()
        base = self.sink.count
        overflows = clients.listen_overflows()
        start = time.monotonic()
        source = clients.start_smtp_source(port, RELAY_SESSIONS, count, 1 * KB)
        timeout = 60 + count / 5
        done = self.sink.wait_for(base + count, timeout)
        elapsed = time.monotonic() - start
        try:
            _, stderr = source.communicate(timeout=max(5.0, timeout - elapsed))
        except subprocess.TimeoutExpired:
            servers.stop_process(source, signal.SIGKILL)
            stderr = b"smtp-source timed out"
        received = self.sink.count - base
        run = {"seconds": round(elapsed, 3), "rate": round(count / elapsed, 1) if done else None,
               "ok": done and source.returncode == 0, "received": received,
               "overflows": clients.listen_overflows() - overflows,
               "error": "" if done and source.returncode == 0 else
               f"received {received} of {count}; smtp-source: {stderr.decode(errors='replace').strip()[-200:]}"}
        if who == "mta":
            self.mta.stop()
        else:
            self.postfix.clear_queue()
        return run

    def relay(self) -> None:
        count = self.plan["relay"]
        self.postfix.hold(False)
        self.postfix.reload()
        try:
            runs = {"mta": [], "postfix": []}
            for rep in range(self.plan["reps"]):
                for who in self.order(rep):
                    runs[who].append(self.relay_once(who, count))
        finally:
            self.postfix.hold(True)
            self.postfix.reload()
        out = {"count": count, "sessions": RELAY_SESSIONS}
        for who in runs:
            out[who] = {"median": median(r["rate"] for r in runs[who]),
                        "seconds": median(r["seconds"] for r in runs[who] if r["ok"]),
                        "runs": runs[who], "overflows": sum(r["overflows"] for r in runs[who])}
        out["ratio"] = ratio(out["mta"]["median"], out["postfix"]["median"])
        log(f"relay {count} msgs: mta {out['mta']['median']} msg/s, Postfix {out['postfix']['median']} msg/s, "
            f"ratio {out['ratio']}" + self._errors(runs))
        self.results["figures"]["relay"] = out

    # 4: concurrency --------------------------------------------------------------------
    def concurrency(self) -> None:
        count = self.plan["idle_sessions"]
        out = {"sessions": count,
               "settings": {"mta": "max_connections = 2500, max_connections_per_ip = 0",
                            "postfix": "smtpd maxproc (master.cf) = 2100 (default_process_limit 100 "
                                       "otherwise); 127.0.0.0/8 is exempt from anvil limits by default"}}
        self.mta.start()
        tally, socks = clients.hold_idle_sessions(self.mta.port, count, IDLE_TIMEOUT)
        time.sleep(1)
        status = servers.proc_status(self.mta.pid)
        tally.update({"rss_kb": rss_kb(self.mta.pid), "threads": int(status.get("Threads", 0))})
        clients.close_all(socks)
        self.mta.stop()
        out["mta"] = tally
        log(f"mta {count} idle sessions: {tally}")

        self.postfix.stop()
        self.postfix.set_smtpd_maxproc("2100")
        try:
            self.postfix.start()
            tally, socks = clients.hold_idle_sessions(self.postfix.port, count, IDLE_TIMEOUT)
            time.sleep(1)
            smtpd = self.postfix.smtpd_pids()
            every = self.postfix.pids()
            tally.update({"rss_kb": sum(rss_kb(p) for p in smtpd), "pss_kb": sum(pss_kb(p) for p in smtpd),
                          "smtpd_processes": len(smtpd),
                          "instance_rss_kb": sum(rss_kb(p) for p in every),
                          "instance_pss_kb": sum(pss_kb(p) for p in every)})
            clients.close_all(socks)
        finally:
            self.postfix.stop()
            self.postfix.set_smtpd_maxproc("-")
            self.postfix.start()
        out["postfix"] = tally
        log(f"Postfix {count} idle sessions: {tally}")
        self.results["figures"]["concurrency"] = out


# --- the report -------------------------------------------------------------------------

def rows(results: dict) -> list[dict]:
    """One dict per table row: figure, what, mta, postfix, ratio, better, ceiling, overflows."""
    figures = results["figures"]
    out = []

    def add(figure, what, mta_value, pf_value, better, ceiling="", overflows="", unit=""):
        out.append({"figure": figure, "what": what, "unit": unit, "mta": mta_value, "postfix": pf_value,
                    "ratio": ratio(mta_value, pf_value), "better": better, "ceiling": ceiling,
                    "overflows": overflows})

    ceiling = figures.get("ceiling", {})
    if "accept" in figures:
        for key, cell in figures["accept"].items():
            sink = ceiling.get("smtp_sink", {}).get(key, {}).get("median", "")
            add("1 accept", f"{key} sessions ({cell['count']} msgs)", cell["mta"]["median"],
                cell["postfix"]["median"], "higher", sink,
                f"{cell['mta']['overflows']} / {cell['postfix']['overflows']}", "msg/s")
        for key, cell in figures["accept"].items():
            if key.endswith(" x 20"):
                add("1 accept", f"CPU per message, {key} sessions (Postfix: all its processes)",
                    cell["mta"]["cpu_ms_per_msg"], cell["postfix"]["cpu_ms_per_msg"], "lower", "", "", "ms")
    if "relay" in figures:
        cell = figures["relay"]
        add("2 relay", f"{cell['count']} msgs, {cell['sessions']} sessions, to smtp-sink",
            cell["mta"]["median"], cell["postfix"]["median"], "higher", "",
            f"{cell['mta']['overflows']} / {cell['postfix']['overflows']}", "msg/s")
    if "latency" in figures:
        cell = figures["latency"]
        flows = f"{cell['mta']['overflows']} / {cell['postfix']['overflows']}"
        add("3 latency", f"p50 end-of-data -> 250, {cell['sessions']} sessions", cell["mta"]["p50_ms"],
            cell["postfix"]["p50_ms"], "lower", "", flows, "ms")
        add("3 latency", f"p99 end-of-data -> 250, {cell['sessions']} sessions", cell["mta"]["p99_ms"],
            cell["postfix"]["p99_ms"], "lower", "", flows, "ms")
    if "concurrency" in figures:
        cell = figures["concurrency"]
        flows = f"{cell['mta']['overflows']} / {cell['postfix']['overflows']}"
        add("4 concurrency", f"idle sessions greeted (of {cell['sessions']})", cell["mta"]["greeted"],
            cell["postfix"]["greeted"], "higher", "", flows, "sessions")
        add("4 concurrency", "refused / failed / no banner in time",
            f"{cell['mta']['refused']} / {cell['mta']['failed']} / {cell['mta']['waiting']}",
            f"{cell['postfix']['refused']} / {cell['postfix']['failed']} / {cell['postfix']['waiting']}",
            "lower", "", flows)
        add("4 concurrency", "RSS while held (mta; Postfix: sum over smtpd)", mb(cell["mta"]["rss_kb"]),
            mb(cell["postfix"]["rss_kb"]), "lower",
            f"Postfix smtpd PSS {mb(cell['postfix'].get('pss_kb'))}", "", "MB")
    if "memory" in figures:
        cell = figures["memory"]
        label = f"{cell['messages']} x {size_label(cell['size'])} at once"
        add("5 memory", "RSS idle (Postfix: all processes)", mb(cell["mta"]["idle_rss_kb"]),
            mb(cell["postfix"]["idle_rss_kb"]), "lower", f"Postfix PSS {mb(cell['postfix']['idle_pss_kb'])}",
            "", "MB")
        add("5 memory", f"RSS growth, {label}", mb(cell["mta"]["growth_kb"]), mb(cell["postfix"]["growth_kb"]),
            "lower", f"Postfix PSS +{mb(cell['postfix']['growth_pss_kb'])}",
            f"{cell['mta']['run']['overflows']} / {cell['postfix']['run']['overflows']}", "MB")
    if ceiling:
        for key, cell in ceiling.get("smtp_sink", {}).items():
            add("6 ceiling", f"smtp-source -> smtp-sink, {key} sessions", None, None, "", cell["median"],
                str(cell["overflows"]), "msg/s")
        add("6 ceiling", "disk: create+write 1 KB+fsync+rename+dir fsync, 1 thread", None, None, "",
            ceiling["fsync_1_thread"], "", "/s")
        add("6 ceiling", "disk: same, 8 threads", None, None, "", ceiling["fsync_8_threads"], "", "/s")
    for key, cell in figures.get("accept", {}).items():
        if "mta_tmpfs" in cell:
            add("6 ceiling", f"mta, spool on tmpfs (not durable), vs Postfix on disk, {key} sessions",
                cell["mta_tmpfs"]["median"], cell["postfix"]["median"], "higher",
                f"mta CPU {fmt(cell['mta_tmpfs']['cpu_ms_per_msg'])} ms/msg",
                f"{cell['mta_tmpfs']['overflows']} / {cell['postfix']['overflows']}", "msg/s")
    return out


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: dict) -> str:
    header = ["figure", "measure", "unit", "mta", "Postfix", "mta/Postfix", "better", "ceiling / note",
              "listen overflows mta / Postfix"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(results):
        blank = row["mta"] is None and row["postfix"] is None
        cells = [row["figure"], row["what"], row["unit"], "" if blank else fmt(row["mta"]),
                 "" if blank else fmt(row["postfix"]), "" if blank else fmt(row["ratio"]), row["better"], fmt(row["ceiling"]) if row["ceiling"] != "" else "",
                 row["overflows"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (make bench installs it)")
        return
    figures = results["figures"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    colors = {"mta": "#1f77b4", "Postfix": "#d62728", "smtp-sink": "#bbbbbb"}

    def bars(ax, labels, series, title, ylabel, log_scale=False):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            drawn = ax.bar(xs, [v or 0 for v in values], width, label=name, color=colors.get(name))
            ax.bar_label(drawn, labels=[fmt(v) for v in values], fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=8)

    if "accept" in figures:
        keys = list(figures["accept"])
        series = {"mta": [figures["accept"][k]["mta"]["median"] for k in keys],
                  "Postfix": [figures["accept"][k]["postfix"]["median"] for k in keys]}
        sink = figures.get("ceiling", {}).get("smtp_sink")
        if sink:
            series["smtp-sink"] = [sink.get(k, {}).get("median") for k in keys]
        bars(axes[0][0], [k.replace(" x ", "\nx") for k in keys], series,
             "1. acceptance, durable, msg/s (size x sessions)", "msg/s")
    labels, values = [], []
    for key, cell in figures.get("accept", {}).items():
        labels.append("accept\n" + key.replace(" x ", "\nx"))
        values.append(cell["ratio"])
    if "relay" in figures:
        labels.append("relay\nend to end")
        values.append(figures["relay"]["ratio"])
    if labels:
        ax = axes[0][1]
        drawn = ax.bar(range(len(labels)), [v or 0 for v in values], 0.6, color=colors["mta"])
        ax.bar_label(drawn, labels=[fmt(v) for v in values], fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.5, color="green", linewidth=0.8, linestyle="--", label="goal 1.5")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title("1./2. throughput ratio mta / Postfix (same run)", fontsize=10)
        ax.set_ylabel("ratio")
        ax.legend(fontsize=8)
    if "latency" in figures:
        lat = figures["latency"]
        bars(axes[1][0], ["p50", "p99"], {"mta": [lat["mta"]["p50_ms"], lat["mta"]["p99_ms"]],
                                          "Postfix": [lat["postfix"]["p50_ms"], lat["postfix"]["p99_ms"]]},
             f"3. end-of-data -> 250 latency, {lat['sessions']} sessions (lower is better)", "ms")
    labels, m, p = [], [], []
    if "memory" in figures:
        mem = figures["memory"]
        labels += ["idle RSS", f"RSS growth\n{mem['messages']} x {size_label(mem['size'])}"]
        m += [mb(mem["mta"]["idle_rss_kb"]), mb(mem["mta"]["growth_kb"])]
        p += [mb(mem["postfix"]["idle_rss_kb"]), mb(mem["postfix"]["growth_kb"])]
    if "concurrency" in figures:
        conc = figures["concurrency"]
        labels.append(f"RSS with {conc['sessions']}\nidle sessions")
        m.append(mb(conc["mta"]["rss_kb"]))
        p.append(mb(conc["postfix"]["rss_kb"]))
    if labels:
        bars(axes[1][1], labels, {"mta": m, "Postfix": p},
             "4./5. memory, MB, log scale (Postfix: sum of its processes' RSS)", "MB", log_scale=True)
    fig.suptitle(f"mta vs Postfix {results['machine']['postfix']} - {results['date']} - "
                 f"{results['machine']['nproc']} CPUs ({results['machine']['cpu']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


NOTES = """\
Only the ratios of one run mean anything: this is a small shared machine
(other test suites may run at the same time), and absolute figures move by
up to 2x between runs. Figures are medians of {reps} run(s) per cell; the
order mta/Postfix alternates between repetitions.

How it is measured (bench/run.py, bench/servers.py, bench/clients.py):

- Both servers listen on 127.0.0.1 high ports and relay for 127.0.0.0/8.
  mta: `python -m mta serve` with a generated TOML config, SPF/DKIM/DMARC
  and rate limits off, a fresh spool for every run. Postfix {postfix}: a
  private instance (own config, queue, data and log directories;
  `postfix -c DIR`), default tuning (default_process_limit 100, listen
  backlog = max(maxproc, default_process_limit)), durable queue, logging to
  a file through postlogd, chroot off; `message_size_limit` raised to
  36000000 and mta's `max_message_size` to the same, for the big messages.
- Acceptance (figure 1) and latency (3): mail is queued durably and not
  delivered. mta runs with `delivery_workers = 0`. Postfix runs with
  `smtpd_data_restrictions = check_client_access static:HOLD`: cleanup(8)
  still writes and fsyncs the queue file before smtpd answers 250, but into
  the hold queue, which qmgr never schedules (no delivery attempt, no
  deferred-queue churn). Every run starts on an empty queue: mta is
  restarted on a new spool directory, Postfix's hold directory is moved
  aside (then `postsuper -d ALL`). No queue is deleted until the bench
  ends: on ext4 without a journal, inodes freed in the last minute or more are
  skipped one by one when files are created, which slowed whichever server
  ran just after a deletion. The number of messages found queued after each
  run is checked against the number sent.
  smtp-source opens one connection per message (no -d).
- Relay (2): time from starting smtp-source until smtp-sink has counted
  every message. mta: relayhost [127.0.0.1]:SINK, delivery_workers 10.
  Postfix: relayhost [127.0.0.1]:SINK, default smtp concurrency and
  connection caching.
- Latency (3): 20 Python client threads, one session each, timing from
  sending "\\r\\n.\\r\\n" to reading the 250.
- Concurrency (4): all connections opened at once (non-blocking), counted
  as greeted when a 220 arrives within {idle_timeout:.0f} s. mta:
  max_connections 2500, max_connections_per_ip 0. Postfix: the smtpd
  service's maxproc raised to 2100 in master.cf for this figure only
  (otherwise only 100 sessions get a banner); loopback is exempt from
  anvil's per-client limits by default. RSS is mta's VmRSS against the sum
  of the smtpd processes' VmRSS (their PSS, which counts shared pages once,
  is given beside it).
- Memory (5): idle RSS of a fresh daemon (Postfix: master, qmgr, pickup,
  postlogd... summed), then the peak growth, sampled every 50 ms, while
  smtp-source sends {big} messages in parallel sessions.
- Ceiling (6): the same smtp-source runs against smtp-sink alone, and a
  create+write(1 KB)+fsync+rename+directory-fsync loop for 2 s.
- Listen overflows: `TcpExt ListenOverflows` from /proc/net/netstat (what
  `nstat -az TcpExtListenOverflows` reads), before and after each run,
  summed per cell. It is system-wide, so other processes can add to it.
"""


def write_report(results: dict, args) -> str:
    text = table(results)
    (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    chart(results, BENCH_DIR / "results.png")
    m = results["machine"]
    notes = NOTES.format(reps=results["plan"]["reps"], postfix=m["postfix"], idle_timeout=IDLE_TIMEOUT,
                         big=f"{results['plan']['big'][0]} x {size_label(results['plan']['big'][1])}")
    md = [f"# mta vs Postfix: benchmark results", "",
          f"- date: {results['date']} (took {results['seconds'] / 60:.1f} min)",
          f"- command: `{results['command']}`" + (" (quick mode)" if args.quick else ""),
          f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['memory_gb']} GB RAM, Linux {m['kernel']}, "
          f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
          f"- software: Python {m['python']}, Postfix {m['postfix']}, mta {m['mta_git']}"
          + (f", mta options {', '.join(m['mta_options'])}" if m.get("mta_options") else ""),
          f"- work directory (both queues): {m['file_system']}",
          "", text, "",
          "mta/Postfix above 1 means mta is ahead where higher is better, and behind where lower is better. "
          "The ceiling column is smtp-source against smtp-sink (no server work at all). "
          "The tmpfs rows run the same mta, in the same cells, with its spool on tmpfs: no disk "
          "cost at all, so they bound what one mta process reaches on this machine.",
          "", notes,
          "Raw runs: `bench/results.json`; chart: `bench/results.png`.", ""]
    (BENCH_DIR / "RESULTS.md").write_text("\n".join(md))
    return text


# --- main ---------------------------------------------------------------------------------

def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log(f"warning: open files limited to {target} (hard limit); the concurrency figure may suffer")


def check_tools() -> None:
    missing = [tool for tool in ("postfix", "postconf", "postsuper", "smtp-source", "smtp-sink")
               if shutil.which(tool) is None]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)} (apt-get install postfix)")
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (it starts a private Postfix instance, whose master runs as root)")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run per cell, smaller counts")
    parser.add_argument("--reps", type=int, help="runs per cell (default 3, --quick 1)")
    parser.add_argument("--only", help=f"comma list of figures to run: {','.join(FIGURES)}")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--mta-option", metavar="KEY=VALUE", action="append", default=[],
                        help="an mta config key for every mta run, e.g. single_cpu=false (TOML value); "
                             "the work directory, and so both queues, follows TMPDIR")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the figures: profile mta's acceptance path (bench/profile_mta.py; "
                             "takes --count N --sessions N --size BYTES)")
    if "--profile" in sys.argv[1:]:  # its own options: see bench/profile_mta.py
        import profile_mta
        return profile_mta.main()
    args = parser.parse_args()

    check_tools()
    plan = dict(QUICK if args.quick else FULL)
    if args.reps:
        plan["reps"] = args.reps
    only = FIGURES if not args.only else tuple(f.strip() for f in args.only.split(","))
    unknown = set(only) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(sorted(unknown))}")
    raise_fd_limit(plan["idle_sessions"] * 2 + 1000)

    signal.signal(signal.SIGINT, _terminate)   # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    atexit.register(cleanup)
    workdir = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    os.chmod(workdir, 0o755)  # Postfix daemons drop to the postfix user
    started = time.monotonic()
    argv = " ".join(sys.argv[1:])
    if os.environ.get("MAKELEVEL"):
        command = "make bench" + (f" ARGS='{argv}'" if argv else "")
    else:
        command = f".venv/bin/python bench/run.py {argv}"
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": command.strip(), "machine": {**machine(workdir), "mta_options": args.mta_option},
               "plan": {"reps": plan["reps"], "accept": {f"{size_label(s)} x {n}": c for (s, n), c in
                                                          plan["accept"].items()},
                        "relay": plan["relay"], "latency_messages": plan["latency_per_thread"] * LATENCY_THREADS,
                        "idle_sessions": plan["idle_sessions"], "big": plan["big"]},
               "figures": {}}
    failed = False
    try:
        bench = Bench(args, plan, workdir)
        bench.results = results
        for figure in FIGURES:
            if figure in only:
                log(f"--- {figure}")
                try:
                    getattr(bench, figure)()
                except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                    failed = True
                    log(f"{figure} failed: {error}")
                    results.setdefault("errors", {})[figure] = str(error)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        cleanup()
        return 130
    finally:
        cleanup()
        if not args.keep and not failed:
            shutil.rmtree(workdir, ignore_errors=True)
        elif workdir.exists():
            log(f"work directory kept: {workdir}")
    results["seconds"] = round(time.monotonic() - started, 1)
    text = write_report(results, args)
    print()
    print(text)
    print()
    print(f"wrote {BENCH_DIR / 'RESULTS.md'}, {BENCH_DIR / 'results.json'}, {BENCH_DIR / 'results.png'} "
          f"in {results['seconds'] / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
