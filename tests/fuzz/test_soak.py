"""A bounded soak with SIGKILL restarts: every accepted message is delivered (issue 9).

RFC 5321 6.1: once a server has said 250 to the end of data it has taken
responsibility for the message; INTERFACE.md: "Nothing accepted is ever
lost or half-delivered". For about a minute, 8 sender threads send
messages with unique tokens (to remote addresses relayed via MTA_RELAYHOST
to Postfix's smtp-sink dumping every message to a file, and to local
Maildirs), while the test SIGKILLs the daemon at random moments 4 times
and restarts it. A ledger records every (token, recipient) that got a 250.
At the end the daemon runs undisturbed, the queue is flushed and drains,
and every ledger entry must be found delivered at least once: in a sink
dump carrying its X-Rcpt-Args, or in the recipient's Maildir. Duplicates
(a kill between the remote 250 and the envelope update) are allowed and
counted; losses are not.

MTA_SOAK_SECONDS (default 50) sets the traffic phase; MTA_SOAK_SEED the kill times.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import free_ports
from fuzz_support import Sink, wait_for

pytestmark = pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="postfix's smtp-sink is not installed")

SECONDS = float(os.environ.get("MTA_SOAK_SECONDS", "50"))
SEED = int(os.environ.get("MTA_SOAK_SEED", str(int(time.time()))))
SENDERS = 8
KILLS = 4
REMOTE = ["r1@remote.example", "r2@remote.example"]
LOCAL = ["alice@example.com", "postmaster@example.com"]
END_RE = re.compile(rb"end-(soak-\d+-\d+)\r?\n")


def test_soak_sigkill_restarts_lose_no_accepted_message_rfc5321_6_1(mta_factory):
    rng = random.Random(SEED)
    port, = free_ports(1)
    sink = Sink(port)
    try:
        run_soak(mta_factory, sink, port, rng)
    finally:
        sink.cleanup()


def run_soak(mta_factory, sink: Sink, port: int, rng: random.Random) -> None:
    mta = mta_factory({"relayhost": f"[127.0.0.1]:{port}", "delivery_workers": 4, "backoff_min": 1,
                       "backoff_max": 2, "smtp_client_timeout": 10, "delay_warning_time": 0,
                       "max_connections_per_ip": 0},
                      users={"alice@example.com": "pw-alice-soak"})
    ledger: list[tuple[str, str]] = []
    attempts = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        local_rng = random.Random(SEED * 100 + worker)
        n = 0
        while not stop.is_set():
            n += 1
            token = f"soak-{worker}-{n}"
            rcpts = local_rng.sample(REMOTE + LOCAL, local_rng.randint(1, 3))
            body = (f"From: <soak@example.org>\r\nTo: <{rcpts[0]}>\r\nSubject: {token}\r\n"
                    f"Message-ID: <{token}@soak.example>\r\n\r\n"
                    + "".join(f"line {i} of {token}\r\n" for i in range(local_rng.randint(1, 60)))
                    + f"end-{token}\r\n").encode()
            try:
                with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
                    refused = client.sendmail("soak@example.org", rcpts, body)
                with lock:
                    attempts["accepted"] += 1
                    ledger.extend((token, r) for r in rcpts if r not in refused)
            except (OSError, smtplib.SMTPException) as error:
                with lock:
                    attempts[type(error).__name__] += 1
                stop.wait(0.2)         # the daemon is probably down: try again soon
                continue
            stop.wait(local_rng.uniform(0.02, 0.15))

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(SENDERS)]
    kill_times = sorted(rng.uniform(4, SECONDS - 6) for _ in range(KILLS))
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for when in kill_times:
            time.sleep(max(0.0, started + when - time.monotonic()))
            mta.kill()                                  # SIGKILL, as a crash
            time.sleep(rng.uniform(0.05, 1.0))
            mta.start()
        time.sleep(max(0.0, started + SECONDS - time.monotonic()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert mta.alive(), mta.diagnostics()

    # the final run: deferred mail made due now, then the queue must drain
    mta.cli("queue", "flush")
    wait_for(lambda: not mta.queue_list(), timeout=60, what="an empty queue", interval=1)
    time.sleep(1)

    delivered: Counter = Counter()
    for dump in sink.messages():
        match = END_RE.search(dump)
        if not match:
            continue                              # a transfer cut short by a kill
        token = match.group(1).decode()
        for rcpt in re.findall(rb"^X-Rcpt-Args: <([^>]*)>", dump, re.M):
            delivered[(token, rcpt.decode().lower())] += 1
    for address in LOCAL:
        local, domain = address.split("@")
        new = Path(mta.config["mailbox_dir"]) / domain / local / "new"
        for path in (new.iterdir() if new.is_dir() else []):
            match = END_RE.search(path.read_bytes())
            if match:
                delivered[(match.group(1).decode(), address)] += 1

    lost = [(token, rcpt) for token, rcpt in ledger if delivered[(token, rcpt.lower())] == 0]
    duplicates = sum(count - 1 for key, count in delivered.items() if count > 1)
    accepted_tokens = {token for token, _ in ledger}
    print(f"\nsoak seed {SEED}: {len(accepted_tokens)} messages / {len(ledger)} deliveries accepted, "
          f"kills at {[round(t, 1) for t in kill_times]} s, client outcomes {dict(attempts)}, "
          f"lost {len(lost)}, duplicate deliveries {duplicates}")
    assert len(accepted_tokens) > 100, f"too little traffic to mean anything: {dict(attempts)}"
    assert not lost, f"{len(lost)} accepted deliveries lost (seed {SEED}), e.g. {lost[:10]}"
