"""Where the daemon's threads run (`single_cpu`): all on one CPU.

Python runs one thread at a time (the GIL), and every system call hands it
over. When the threads of a busy daemon sit on different CPUs, each
hand-over is a cross-CPU wake-up: with 20 SMTP sessions on two CPUs those
wake-ups were half of mta's CPU time per message (95 context switches per
message against 9 on one CPU), and the second CPU bought little Python
work in return. So at start-up the daemon confines its threads to one of
the CPUs it may use (systemd's CPUAffinity= or taskset still choose that
set); the other CPUs keep the kernel's deferred work (journal commits,
interrupts) and every other process. Figures: README, capacity planning.

Work that runs without the GIL for long (bcrypt) spreads back over all
allowed CPUs while it runs, so a burst of AUTH does not stall sessions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

log = logging.getLogger("mta.cpus")


class CpuPlacement:
    def __init__(self):
        self.allowed = frozenset(os.sched_getaffinity(0))
        self.home: int | None = None

    def confine(self) -> None:
        """Every thread of the process onto one allowed CPU; threads started
        later inherit it. Several daemons on one host spread by process id."""
        if len(self.allowed) < 2:
            return
        cpus = sorted(self.allowed)
        home = cpus[os.getpid() % len(cpus)]
        try:
            os.sched_setaffinity(0, {home})
        except OSError as error:   # e.g. a seccomp filter without sched_setaffinity
            log.warning("cannot confine threads to one CPU (%s): running on CPUs %s",
                        error.strerror, ",".join(map(str, cpus)))
            return
        self.home = home
        for tid in map(int, os.listdir("/proc/self/task")):
            if tid != threading.get_native_id():
                try:
                    os.sched_setaffinity(tid, {home})
                except OSError:
                    pass   # the thread has just ended
        log.info("threads confined to CPU %d of %s (single_cpu; README: capacity planning)", home,
                 ",".join(map(str, cpus)))

    @contextlib.contextmanager
    def spread(self):
        """Run a long GIL-free computation on any allowed CPU."""
        if self.home is None:
            yield
            return
        os.sched_setaffinity(0, self.allowed)
        try:
            yield
        finally:
            os.sched_setaffinity(0, {self.home})
