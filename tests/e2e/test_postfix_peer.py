"""A real Postfix as the receiving peer (issue 4): mta -> Postfix -> smtp-sink.

The private Postfix instance is the benchmark's (bench/servers.py): its own
config, queue and log directories, loopback only, relaying everything to an
smtp-sink. mta finds it by MX in a loopback DNS server, speaks EHLO,
PIPELINING, DSN and 8BITMIME to it, and its per-recipient replies decide what
happens: accepted mail reaches the sink; a recipient Postfix refuses bounces.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_ports, make_message
from support.fixtures import dns_server  # noqa: F401  (fixture)
from test_delivery import maildir_messages, sinks, wait_for  # noqa: F401  (sinks is a fixture)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("postfix") is None or shutil.which("smtp-sink") is None,
    reason="needs root and Postfix (postfix, smtp-sink) to run a private Postfix instance")


@pytest.fixture
def postfix(sinks):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from servers import Postfix
    finally:
        sys.path.pop(0)
    port, sink_port = free_ports(2)
    sink = sinks(sink_port)
    # Postfix's daemons run as user postfix: pytest's root-private tmp_path won't do.
    workdir = Path(tempfile.mkdtemp(prefix="mta-postfix-"))
    os.chmod(workdir, 0o755)
    instance = Postfix(workdir, port, sink_port)
    instance.hold(False)
    # a recipient Postfix refuses at RCPT time, to see mta bounce it
    instance.postconf("-e", "smtpd_recipient_restrictions = check_recipient_access "
                            "inline:{ { refused@remote.test = REJECT 5.1.1 no such user here } }, "
                            "permit_mynetworks, reject")
    instance.start()
    try:
        yield instance, sink
    finally:
        instance.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_delivery_through_a_real_postfix(postfix, mta_factory, dns_server):
    """RFC 5321 against Postfix's smtpd: one transaction, per-recipient results:
    the accepted recipient reaches the sink through Postfix, the refused one
    bounces back to the local sender as an RFC 3464 DSN."""
    instance, sink = postfix
    dns_server.set_zone({"remote.test.": {"MX": [(10, "mx.remote.test.")]},
                         "mx.remote.test.": {"A": ["127.0.0.1"]}})
    mta = mta_factory({"delivery_workers": 2, "dns_nameservers": dns_server.address,
                       "smtp_port": instance.port, "backoff_min": 1, "delay_warning_time": 0},
                      users={"alice@example.com": "pw-alice-1"})
    qid = mta.send("alice@example.com", ["bob@remote.test", "refused@remote.test"],
                   make_message("via postfix", "relayed by a real Postfix", sender="alice@example.com"))
    message = wait_for(sink.received(b"relayed by a real Postfix"), timeout=30, what="message at the sink")
    assert qid.encode() in message, "our Received header is kept"
    assert b"postfix-bench.localdomain" in message, "Postfix added its own Received header"
    dsn = wait_for(lambda: maildir_messages(mta, "alice@example.com"), timeout=30, what="DSN for the refused one")[0]
    assert b"Final-Recipient: rfc822; refused@remote.test" in dsn and b"Status: 5.1.1" in dsn
    assert b"bob@remote.test" not in dsn.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]
    log = mta.log_text()
    assert f"{qid}: to=<bob@remote.test>" in log and "status=sent" in log
    assert f"{qid}: to=<refused@remote.test>" in log and "status=bounced" in log
