"""The processes the benchmark starts: mta, a private Postfix, smtp-sink.

Every process started here is registered with `cleanup` so that `run.py`
stops it on normal exit, on an error, on Ctrl-C and on SIGTERM. Children run
in their own session (process group), so a Ctrl-C in the terminal reaches
only the benchmark, which then stops them in order.

The private Postfix instance lives entirely under the benchmark's work
directory: its own config directory (a copy of /etc/postfix/master.cf with
`chroot` off and smtpd moved to a loopback high port, plus a small generated
main.cf), its own queue and data directories and its own log file through
postlogd. It is driven with `postfix -c DIR start|stop|reload` and
`postsuper -c DIR`. As root, `postfix -c` needs no `alternate_config_directories`
entry in the system main.cf (only the set-gid postqueue/postdrop would), so
the system Postfix is neither touched nor used.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --- cleanup registry ---------------------------------------------------------

_cleanups: list = []
_cleanup_lock = threading.Lock()


def on_cleanup(func) -> None:
    with _cleanup_lock:
        _cleanups.append(func)


def cleanup() -> None:
    """Run every registered stop function once, newest first."""
    while True:
        with _cleanup_lock:
            if not _cleanups:
                return
            func = _cleanups.pop()
        try:
            func()
        except Exception as error:  # keep stopping the others
            print(f"bench: cleanup: {error}", file=sys.stderr)


# --- helpers --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.settimeout(5)
                sock.recv(512)  # the banner: the server is really serving
                sock.sendall(b"QUIT\r\n")
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port} after {timeout:.0f}s")


def wait_port_closed(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return
        time.sleep(0.05)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        pass
    return out


def rss_kb(pid: int) -> int:
    value = proc_status(pid).get("VmRSS", "0 kB")
    return int(value.split()[0])


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (plus its reaped children's with `children`)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def children_of(ppid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        # comm may contain spaces or parentheses: split after the last ')'
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == ppid:
            pids.append(int(name))
    return pids


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    _kill_quietly(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _kill_quietly(proc.pid, signal.SIGKILL)
        proc.wait(10)


def run_quiet(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout.strip()[-500:]}")
    return result


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- mta ----------------------------------------------------------------------

class Mta:
    """One `mta serve` at a time; `start()` gives it a fresh, empty spool."""

    BASE = {
        "hostname": "mta-bench.localdomain",
        "domain": "bench.invalid",
        "listen_address": "127.0.0.1",
        "port_submission": 0,
        "port_submissions": 0,
        "port_admin": 0,
        "delivery_workers": 0,
        "max_connections_per_ip": 0,
        "max_message_size": 36_000_000,   # the memory figure's 35 MB messages (Postfix: same)
        "rate_limit_ip": 0,
        "rate_limit_user": 0,
        "rate_limit_domain": 0,
        "spf_enabled": False,
        "dkim_enabled": False,
        "dmarc_enabled": False,
        "mynetworks": "127.0.0.0/8",
        # nothing here needs DNS (relayhost is an address literal); a closed
        # loopback port keeps any stray lookup off the network
        "dns_nameservers": "127.0.0.1:9",
    }

    def __init__(self, workdir: Path, port: int, options: dict | None = None):
        self.workdir = workdir / "mta"
        self.options = dict(options or {})   # config keys every run gets (bench --mta-option)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "aliases").touch()
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.wrapped = False
        self.spool: Path | None = None
        self.settings: dict = {}
        self._log = None
        on_cleanup(self.stop)

    def start(self, wrapper: list[str] | None = None, spool_under: Path | None = None, **overrides) -> None:
        """Start with a fresh spool (in the work directory, or under `spool_under`);
        `wrapper` (e.g. py-spy record ... --) runs mta under a tool."""
        self.stop()
        self.wrapped = bool(wrapper)
        self.generation += 1
        self.spool = (spool_under or self.workdir) / f"spool.{self.generation}"
        settings = dict(self.BASE)
        settings.update({
            "port_relay": self.port,
            "spool_dir": str(self.spool),
            "data_dir": str(self.workdir / "data"),      # kept: the TLS key is made once
            "log_dir": str(self.workdir / "log"),
            "mailbox_dir": str(self.workdir / "mail"),
            "aliases": str(self.workdir / "aliases"),
            "max_connections": 2500,
        })
        settings.update(self.options)
        settings.update(overrides)
        self.settings = settings
        config = self.workdir / "mta.toml"
        config.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items()))
        env = {key: value for key, value in os.environ.items() if not key.startswith("MTA_")}
        env["PYTHONPATH"] = str(ROOT)
        self._log = open(self.workdir / "serve.out", "ab")
        self.proc = subprocess.Popen([*(wrapper or []), sys.executable, "-m", "mta", "serve", "--config", str(config)],
                                     cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.port, 60, self.proc)
        except RuntimeError as error:
            tail = (self.workdir / "serve.out").read_text(errors="replace")[-1500:]
            self.stop()
            raise RuntimeError(f"mta did not start: {error}\n{tail}") from None

    @property
    def pid(self) -> int:
        """The mta process (under a wrapper: the wrapper's python child)."""
        if not self.wrapped:
            return self.proc.pid
        for _ in range(100):
            for pid in children_of(self.proc.pid):
                if comm(pid).startswith("python"):
                    return pid
            time.sleep(0.05)
        raise RuntimeError("mta process not found under its wrapper")

    def queued(self) -> int:
        """Messages committed to the spool (any state directory)."""
        total = 0
        for state in ("incoming", "deferred", "hold", "bounce"):
            try:
                total += len(os.listdir(self.spool / state))
            except FileNotFoundError:
                pass
        return total

    def stop(self) -> None:
        if self.proc is not None:
            if self.wrapped and self.proc.poll() is None:
                try:  # stop mta itself; the wrapper then writes its output and exits
                    _kill_quietly(self.pid, signal.SIGTERM)
                    self.proc.wait(30)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
            stop_process(self.proc, signal.SIGTERM, grace=20)
            self.proc = None
            wait_port_closed(self.port, 5)
        if self._log is not None:
            self._log.close()
            self._log = None
        # The spool stays until the bench removes its work directory: see
        # Postfix.clear_queue for why nothing is deleted between runs.


# --- Postfix ----------------------------------------------------------------------

class Postfix:
    """A private Postfix 3.x instance under `workdir/postfix`, on loopback only.

    Acceptance runs use "hold" mode: `smtpd_data_restrictions =
    check_client_access static:HOLD` makes cleanup(8) write each queue file
    as usual (fsynced before smtpd says 250) but into the hold queue, which
    the queue manager never schedules, so nothing is delivered or deferred
    afterwards (the Postfix counterpart of mta's delivery_workers = 0).
    `clear_queue` empties it between runs.
    """

    def __init__(self, workdir: Path, port: int, sink_port: int):
        self.base = workdir / "postfix"
        self.conf = self.base / "conf"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.log = self.base / "log" / "maillog"
        self.port = port
        self.sink_port = sink_port
        self.service = f"127.0.0.1:{port}/inet"
        self.running = False
        self.aside = 0     # hold queues moved aside by clear_queue
        for path in (self.conf, self.queue, self.data, self.log.parent):
            path.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "myhostname": "postfix-bench.localdomain",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            # the memory figure sends 35 MB messages (Postfix default: 10240000)
            "message_size_limit": "36000000",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.base),
        }
        (self.conf / "main.cf").write_text("".join(f"{key} = {value}\n" for key, value in main.items()))
        self.postconf("-M#", "smtp/inet")  # the system's port-25 smtpd: not ours
        self.postconf("-M", f"{self.service} = 127.0.0.1:{port} inet n - n - - smtpd")
        self.postconf("-F", "*/*/chroot = n")  # a chroot would need copies of /etc files
        if "postlog" not in self.postconf("-M").stdout:
            self.postconf("-M", "postlog/unix-dgram = postlog unix-dgram n - n - 1 postlogd")
        self.hold(True)
        on_cleanup(self.stop)

    def postconf(self, *args: str) -> subprocess.CompletedProcess:
        return run_quiet(["postconf", "-c", str(self.conf), *args])

    def _postfix(self, command: str, timeout: float = 60) -> None:
        result = run_quiet(["postfix", "-c", str(self.conf), command], timeout=timeout, check=False)
        if result.returncode != 0:
            # Postfix writes its fatal message to stderr only on a terminal
            detail = run_quiet(["script", "-qec", f"postfix -c {self.conf} {command}", "/dev/null"],
                               timeout=timeout, check=False).stdout.strip()
            raise RuntimeError(f"postfix {command} failed: {detail or result.stdout.strip()}")

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if comm(pid) == "master" else None

    def start(self) -> None:
        self._postfix("start")
        self.running = True
        wait_port(self.port, 30)

    def stop(self) -> None:
        if not self.running and self.master_pid() is None:
            return
        pid = self.master_pid()
        run_quiet(["postfix", "-c", str(self.conf), "stop"], timeout=60, check=False)
        deadline = time.monotonic() + 15
        while pid is not None and comm(pid) == "master" and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and comm(pid) == "master":
            run_quiet(["postfix", "-c", str(self.conf), "abort"], timeout=30, check=False)
            _kill_quietly(pid, signal.SIGKILL)
        self.running = False
        wait_port_closed(self.port, 5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        self._postfix("reload")
        time.sleep(1.0)  # master re-reads its tables; services restart lazily

    def hold(self, on: bool) -> None:
        self.postconf("-e", "smtpd_data_restrictions = " + ("check_client_access static:HOLD" if on else ""))

    def set_smtpd_maxproc(self, value: str) -> None:
        self.postconf("-F", f"{self.service}/process_limit = {value}")

    def clear_queue(self) -> None:
        """Empty the queue for the next run: held mail is moved out of the
        queue directory, not deleted, and `postsuper -d ALL` removes what is
        left elsewhere (normally nothing).

        Deleting thousands of files just before a run would slow that run,
        whichever server it measures: ext4 without a journal (this VM's root
        fs) skips each inode freed in the last minute or more, one by one,
        when it allocates a new one (fs/ext4/ialloc.c, recently_deleted). Both
        servers' queues are therefore removed only with the work directory.
        """
        hold = self.queue / "hold"
        if hold.is_dir() and any(os.scandir(hold)):
            info = hold.stat()
            self.aside += 1
            aside = self.base / "aside"
            aside.mkdir(exist_ok=True)
            os.rename(hold, aside / f"hold.{self.aside}")
            os.mkdir(hold, stat.S_IMODE(info.st_mode))
            os.chown(hold, info.st_uid, info.st_gid)
        run_quiet(["postsuper", "-c", str(self.conf), "-d", "ALL"], timeout=300, check=False)

    def queued(self, queue: str = "hold") -> int:
        total = 0
        for _dirpath, _dirnames, filenames in os.walk(self.queue / queue):
            total += len(filenames)
        return total

    def pids(self) -> list[int]:
        master = self.master_pid()
        return [] if master is None else [master, *children_of(master)]

    def cpu_seconds(self) -> float:
        """CPU used by the whole instance so far: live processes plus those
        the master has reaped (its cutime/cstime)."""
        master = self.master_pid()
        if master is None:
            return 0.0
        return cpu_seconds(master, children=True) + sum(cpu_seconds(pid) for pid in children_of(master))

    def smtpd_pids(self) -> list[int]:
        master = self.master_pid()
        return [] if master is None else [pid for pid in children_of(master) if comm(pid) == "smtpd"]


# --- smtp-sink ----------------------------------------------------------------------

class Sink:
    """smtp-sink with running counters (-c) parsed from its output."""

    def __init__(self, port: int):
        self.port = port
        self.count = 0
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "postfix", "-m", "2048", "-t", "300", f"127.0.0.1:{port}", "4096"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        on_cleanup(self.stop)
        threading.Thread(target=self._read, daemon=True, name="sink-reader").start()
        wait_port(port, 10, self.proc)

    def _read(self) -> None:
        pattern = re.compile(rb"mesg=(\d+)")
        pending = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in reversed(records):
                match = pattern.search(record)
                if match:
                    with self._cond:
                        self.count = max(self.count, int(match.group(1)))
                        self._cond.notify_all()
                    break

    def wait_for(self, target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, grace=5)
