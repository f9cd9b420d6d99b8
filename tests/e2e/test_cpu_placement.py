"""single_cpu: the daemon's threads share one CPU (mta.cpus).

GIL hand-offs between threads on different CPUs were half of the CPU per
message at 20 sessions; the daemon confines every thread it runs, and
leaves the set alone when told not to or when it has only one CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import assert_reply

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one allowed CPU: confining or spreading threads changes nothing to observe")


def thread_cpus(pid: int) -> dict[int, frozenset[int]]:
    """Allowed CPUs of each thread of `pid`, as the kernel reports them."""
    placement = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            placement[int(task.name)] = frozenset(os.sched_getaffinity(int(task.name)))
        except ProcessLookupError:
            continue
    return placement


def test_every_thread_runs_on_one_allowed_cpu(mta_factory):
    server = mta_factory({"delivery_workers": 2})
    # sessions, delivery workers and the admin API's threads all exist now
    with server.session() as c:
        assert_reply(c.cmd("NOOP"), 250)
        placement = thread_cpus(server.pid)
        c.cmd("QUIT")
    assert len(placement) > 5, placement
    sets = set(placement.values())
    assert len(sets) == 1, placement
    (cpus,) = sets
    assert len(cpus) == 1 and cpus <= os.sched_getaffinity(0)
    assert f"threads confined to CPU {min(cpus)}" in server.log_text()


def test_single_cpu_false_keeps_every_allowed_cpu(mta_factory):
    server = mta_factory({"single_cpu": False})
    with server.session() as c:
        assert_reply(c.cmd("NOOP"), 250)
        placement = thread_cpus(server.pid)
        c.cmd("QUIT")
    assert set(placement.values()) == {frozenset(os.sched_getaffinity(0))}
    assert "confined" not in server.log_text()
