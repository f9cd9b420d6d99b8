"""Durability of the spool (issue 2, "Spool"; INTERFACE "SMTP": 250 only once
message and envelope are on disk and fsynced; nothing accepted is ever lost or
half-delivered) and the queue CLI working while the daemon runs.
"""

from __future__ import annotations

import json
import signal
import smtplib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import assert_reply, body_lines, make_message

CLIENTS = 10
KILL_AFTER = 1.5
PAUSE = 0.2


def crash_body(token: str, size_class: int) -> str:
    """20 lines .. ~240 KB: big ones make a kill mid-transfer likely."""
    lines = [f"{token} line {i:05d} " + "abcdefghij" * 6 for i in range(20 + 1000 * size_class)]
    return "\r\n".join(lines) + f"\r\nEND-MARKER {token}\r\n"


def test_sigkill_mid_stream_loses_nothing(mta):
    """The crash test of issue 2: CLIENTS concurrent clients send in a loop; the
    daemon is SIGKILLed mid-stream and restarted on the same directories. Every
    message that got 250 is in the queue exactly once and intact (its final marker
    line present); no queued message is partial."""
    accepted: dict[str, str] = {}          # queue id -> token
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        seq = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", mta.port, local_hostname="crash.example.org",
                                  timeout=5) as s:
                    s.ehlo()
                    while not stop.is_set():
                        seq += 1
                        token = f"crash-{n:02d}-{seq:04d}"
                        body = crash_body(token, seq % 4)
                        msg = make_message(token, body)
                        s.mail(f"c{n}@example.org")
                        code, _ = s.rcpt("info@example.com")
                        if code != 250:
                            s.rset()
                            continue
                        code, text = s.data(msg)
                        if code == 250:
                            qid = text.decode().rsplit(" ", 1)[-1]
                            with lock:
                                assert qid not in accepted, f"queue id {qid} reused"
                                accepted[qid] = token
                        # keep the number of messages (each checked by a CLI call) modest
                        stop.wait(PAUSE)
            except (OSError, smtplib.SMTPException):
                if stop.is_set():
                    return
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(KILL_AFTER)
    mta.kill()
    stop.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(accepted) >= 5, f"too few messages accepted before the kill: {len(accepted)}"

    mta.start()  # SO_REUSEADDR: binds at once after a crash
    queue = mta.queue_list()
    ids = [m["id"] for m in queue]
    assert len(ids) == len(set(ids)), "duplicate queue ids"
    missing = sorted(set(accepted) - set(ids))
    assert not missing, f"{len(missing)} accepted messages lost: {missing[:10]}"

    def check(qid: str) -> tuple[str | None, str | None]:
        shown = mta.queue_show(qid)
        lines = body_lines(shown)
        subject = [l for l in lines if l.startswith("Subject: crash-")]
        if len(subject) != 1:
            return f"{qid}: not exactly one Subject: {subject}", None
        token = subject[0].split(" ", 1)[1]
        if qid in accepted and accepted[qid] != token:
            return f"{qid}: holds {token}, expected {accepted[qid]}", token
        seq = int(token.split("-")[2])
        expected = crash_body(token, seq % 4).replace("\r\n", "\n")
        if expected not in shown.replace("\r\n", "\n"):
            return (f"{qid}: body of {token} incomplete (marker present: "
                    f"{('END-MARKER ' + token) in shown})"), token
        return None, token

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, ids))
    problems = [problem for problem, _ in results if problem]
    assert not problems, problems[:10]
    # no message is stored twice (exactly once, also for those whose 250 was lost)
    tokens = [token for _, token in results]
    assert len(tokens) == len(set(tokens)), "a message is queued twice"


def test_queue_survives_graceful_restart(mta):
    """SIGTERM exits 0 (INTERFACE "Commands"); the queue is the same after restart."""
    ids = sorted(mta.send(subject=f"restart {i}") for i in range(3))
    before = {m["id"]: m for m in mta.queue_list()}
    assert sorted(before) == ids
    assert mta.stop() == 0, mta.diagnostics()
    mta.start()
    after = {m["id"]: m for m in mta.queue_list()}
    assert sorted(after) == ids
    for qid in ids:
        for key in ("sender", "size", "arrival"):
            assert after[qid][key] == before[qid][key], (qid, key)
        assert [r["address"] for r in after[qid]["recipients"]] == \
            [r["address"] for r in before[qid]["recipients"]]
        assert after[qid]["status"] == "active"
        assert "Hello." in body_lines(mta.queue_show(qid))


def test_sigterm_exits_zero_with_sessions_open(mta):
    """SIGTERM: stop accepting, let sessions finish or cut them at a bound, exit 0
    (issue 2); a message cut mid-DATA is not queued, not even partially."""
    idle = mta.session()
    mid = mta.session()
    assert_reply(mid.cmd("MAIL FROM:<s@example.org>"), 250)
    assert_reply(mid.cmd("RCPT TO:<info@example.com>"), 250)
    assert_reply(mid.cmd("DATA"), 354)
    mid.send(b"Subject: cut by shutdown\r\n\r\npartial\r\n")
    started = time.monotonic()
    mta.signal(signal.SIGTERM)
    try:
        rc = mta.proc.wait(12)
    finally:
        idle.close()
        mid.close()
    assert rc == 0, mta.diagnostics()
    assert time.monotonic() - started < 12
    mta.start()
    assert mta.queue_list() == []


def test_queue_commands_while_running(mta):
    """`mta queue delete|hold|release|stats` are safe while the daemon runs
    (INTERFACE "Commands"; postsuper -h/-H/-d equivalents)."""
    a = mta.send(subject="hold me")
    b = mta.send(subject="delete me")
    c = mta.send(subject="keep me")

    p = mta.cli("queue", "hold", a)
    assert p.returncode == 0, p.stderr
    status = {m["id"]: m["status"] for m in mta.queue_list()}
    assert status == {a: "hold", b: "active", c: "active"}
    assert [m["id"] for m in mta.queue_list("--status", "hold")] == [a]

    p = mta.cli("queue", "release", a)
    assert p.returncode == 0, p.stderr
    status = {m["id"]: m["status"] for m in mta.queue_list()}
    assert status[a] == "active"

    p = mta.cli("queue", "delete", b)
    assert p.returncode == 0, p.stderr
    assert sorted(mta.queue_ids()) == sorted([a, c])
    p = mta.cli("queue", "show", b)
    assert p.returncode != 0
    p = mta.cli("queue", "delete", "NOSUCHID")
    assert p.returncode != 0
    assert p.stderr.strip(), "an error message is expected"

    p = mta.cli("queue", "stats")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()

    # plain (non-JSON) listing, like mailq
    p = mta.cli("queue", "list")
    assert p.returncode == 0, p.stderr
    assert a in p.stdout and c in p.stdout and b not in p.stdout

    # the daemon is still fine and new mail arrives
    d = mta.send(subject="after cli")
    assert sorted(mta.queue_ids()) == sorted([a, c, d])


def test_index_missing_or_damaged_is_rebuilt(mta):
    """ARCHITECTURE "Spool rules": index.json is only a cache, rebuilt from the
    files when missing or damaged: no message is lost, neither while running nor
    across a restart."""
    ids = sorted(mta.send(subject=f"index {i}") for i in range(3))
    index = mta.spool_dir / "index.json"

    if index.exists():
        index.unlink()
    assert sorted(mta.queue_ids()) == ids

    index.write_bytes(b"\x00{garbage[[[")
    assert sorted(mta.queue_ids()) == ids
    more = mta.send(subject="after garbage")
    ids = sorted(ids + [more])
    assert sorted(mta.queue_ids()) == ids

    assert mta.stop() == 0
    index.write_text('{"version": 999, "messages": "nonsense"')
    mta.start()
    assert sorted(mta.queue_ids()) == ids
    assert mta.stop() == 0
    if index.exists():
        index.unlink()
    mta.start()
    assert sorted(mta.queue_ids()) == ids
    for qid in ids:
        assert "Hello." in body_lines(mta.queue_show(qid))


def test_tmp_leftovers_purged_and_corrupt_envelope_quarantined(mta):
    """ARCHITECTURE "Spool rules": leftovers in tmp are purged at start; an
    unreadable envelope is moved to corrupt/, never deleted, and does not stop
    the daemon or hide the other messages."""
    good = mta.send(subject="good one")
    bad = mta.send(subject="bad one")
    assert mta.stop() == 0

    envelopes = [p for p in mta.spool_dir.rglob("envelope.json") if bad in str(p)]
    assert len(envelopes) == 1, list(mta.spool_dir.rglob("*"))
    envelopes[0].write_text("{ not json")
    tmp_dirs = [p for p in mta.spool_dir.rglob("tmp") if p.is_dir()]
    leftovers = []
    for d in tmp_dirs:
        half = d / "LEFTOVER0000000000001"           # a half-received message
        half.mkdir()
        (half / "message.eml").write_bytes(b"Subject: half\r\n\r\npartial")
        junk = d / "leftover-from-a-crash.tmp"      # a stray file
        junk.write_bytes(b"partial message")
        leftovers += [half, junk]
    assert tmp_dirs, "no tmp/ directory in the spool (ARCHITECTURE: write in tmp/)"

    mta.start()
    ids = mta.queue_ids()
    assert good in ids
    assert bad not in ids or [m for m in mta.queue_list() if m["id"] == bad][0]["status"] != "active"
    assert "good one" in mta.queue_show(good)
    corrupt = [p for p in mta.spool_dir.rglob("*") if "corrupt" in p.parts and bad in str(p)]
    assert corrupt, f"{bad} not quarantined in corrupt/: {sorted(map(str, mta.spool_dir.rglob('*')))}"
    for junk in leftovers:
        assert not junk.exists(), f"tmp leftover not purged: {junk}"
    mta.send(subject="still works")


def test_queue_list_json_shape(mta):
    """INTERFACE "Commands": `queue list --json` is one JSON array of objects with
    id, status, size, arrival, sender, recipients[{address,status,attempts,
    last_error}], next_attempt; an empty queue is []."""
    p = mta.cli("queue", "list", "--json")
    assert p.returncode == 0
    assert json.loads(p.stdout) == []
    mta.send(sender="shape@example.org", recipients=("info@example.com", "abuse@example.com"))
    [entry] = mta.queue_list()
    assert set(entry) >= {"id", "status", "size", "arrival", "sender", "recipients",
                          "next_attempt"}
    assert isinstance(entry["size"], int)
    assert entry["sender"] == "shape@example.org"
    for r in entry["recipients"]:
        assert set(r) >= {"address", "status", "attempts", "last_error"}
