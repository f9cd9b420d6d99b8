"""mta.cpus.CpuPlacement in this process: spreading around bcrypt, and a
kernel (or seccomp filter) that refuses sched_setaffinity."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from mta.cpus import CpuPlacement

ALLOWED = frozenset(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(ALLOWED) < 2, reason="one allowed CPU: confining or spreading threads changes nothing to observe")


def in_thread(function):
    """Run in a fresh thread: affinity is per thread, pytest's must not change."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


@needs_two
def test_spread_opens_every_allowed_cpu_then_returns_home():
    def check():
        placement = CpuPlacement()
        os.sched_setaffinity(0, {min(ALLOWED)})   # as confine() leaves a thread
        placement.home = min(ALLOWED)
        with placement.spread():
            inside = frozenset(os.sched_getaffinity(0))
        return inside, frozenset(os.sched_getaffinity(0))

    inside, after = in_thread(check)
    assert inside == ALLOWED
    assert after == {min(ALLOWED)}


def test_spread_without_confine_changes_nothing():
    def check():
        with CpuPlacement().spread():
            return frozenset(os.sched_getaffinity(0))
    assert in_thread(check) == ALLOWED


@needs_two
def test_refused_sched_setaffinity_leaves_the_daemon_running_everywhere(monkeypatch, caplog):
    """systemd's SystemCallFilter=~@resources answers EPERM: warn, carry on."""
    def refuse(pid, cpus):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    placement = CpuPlacement()
    with caplog.at_level(logging.WARNING, logger="mta.cpus"):
        placement.confine()
    assert placement.home is None
    assert "cannot confine threads to one CPU (Operation not permitted)" in caplog.text
    with placement.spread():   # and AUTH's bcrypt still runs
        pass
