"""End to end: the Sendmail interface (INTERFACE.md "Commands", issue 7).

`python -m mta sendmail` runs as a real subprocess the way cron, PHP mail()
and git send-email run /usr/sbin/sendmail; the daemon picks the message up
from the maildrop. Covered: a message submitted while the daemon is down
waits and is delivered once it starts, with the submitting user recorded;
a cron-like environment; -f/-F; -bp; hostile maildrop files (garbage, a
huge header line, a symlink, a FIFO) that must never crash the daemon and
go to corrupt/; and, when the tests run as root, a submission by another
user (nobody) whose file the daemon attributes to that user.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, write_toml
from conftest import wait_for as _wait_for

PICKUP_TIMEOUT = 15.0


def wait_for(predicate, timeout: float = PICKUP_TIMEOUT, what: str = "condition"):
    return _wait_for(predicate, timeout, what)


def sendmail(server, *args: str, stdin: bytes = b"", env: dict | None = None, cwd=None,
             python: str = sys.executable, user=None) -> subprocess.CompletedProcess:
    run_env = dict(server.env)
    if env is not None:
        run_env = env
    as_user = {"user": user, "group": user_group(user), "extra_groups": []} if user else {}
    proc = subprocess.run([python, "-m", "mta", "sendmail", *args], input=stdin, env=run_env,
                          cwd=str(cwd or server.root), capture_output=True, timeout=30, **as_user)
    server.cli_stderr.append(proc.stderr.decode("utf-8", "replace"))
    return proc


def user_group(user: str) -> int:
    import pwd
    return pwd.getpwnam(user).pw_gid


def maildrop(server) -> list[str]:
    path = server.spool_dir / "maildrop"
    return sorted(os.listdir(path)) if path.exists() else []


def corrupt(server) -> list[str]:
    return sorted(os.listdir(server.spool_dir / "corrupt"))


def envelope(server, qid: str) -> dict:
    return json.loads(server.queue_show(qid, "--json"))


def wait_queued(server, count: int) -> list[dict]:
    return wait_for(lambda: (lambda q: q if len(q) >= count else None)(server.queue_list()),
                    what=f"{count} queued message(s); maildrop={maildrop(server)}")


MESSAGE = (b"From: Web App <app@example.org>\n"
           b"To: postmaster@example.com\n"
           b"Cc: Someone <someone@example.net>\n"
           b"Bcc: hidden@example.org\n"
           b"Subject: sent with sendmail -t -i\n"
           b"\n"
           b"first line\n"
           b".\n"
           b"after a lone dot (kept with -i)\n")


def test_daemon_down_then_started_delivers_with_submitter(mta_factory):
    srv = mta_factory({"delivery_workers": 2}, start=False)
    p = sendmail(srv, "-t", "-i", stdin=MESSAGE)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"" and p.stderr == b""
    assert len(maildrop(srv)) == 1                      # waits in the spool

    srv.start()
    # Delivered once the daemon runs: postmaster@ always exists (a Maildir).
    mailbox = Path(srv.config["mailbox_dir"]) / "example.com" / "postmaster" / "new"
    files = wait_for(lambda: list(mailbox.glob("*")) if mailbox.exists() else [], what="delivery to postmaster")
    assert maildrop(srv) == []
    text = files[0].read_bytes()
    assert b"Received: (from " in text and b"@localhost)" in text
    assert b"after a lone dot (kept with -i)" in text
    assert b"hidden@example.org" not in text and b"Bcc:" not in text
    assert b"Message-ID: <" in text and b"Date: " in text
    log = srv.log_text()
    assert "submitter=" in log and "uid=" in log


def test_submitter_and_recipients_recorded_in_envelope(mta):
    p = sendmail(mta, "-t", "-i", stdin=MESSAGE)
    assert p.returncode == 0, p.stderr
    (item,) = wait_queued(mta, 1)
    env = envelope(mta, item["id"])
    import pwd
    me = pwd.getpwuid(os.getuid()).pw_name
    assert env["submitter"] == me
    assert env["sender"] == f"{me}@example.com"
    assert sorted(r["address"] for r in env["recipients"]) == \
        ["hidden@example.org", "postmaster@example.com", "someone@example.net"]
    shown = mta.queue_show(item["id"])
    assert "Bcc" not in shown and "From: Web App <app@example.org>" in shown


def test_cron_like_environment(mta):
    """`echo | sendmail user@example.com` from cron: tiny environment, cwd /, a pipe."""
    env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": "/", "LOGNAME": "root",
           "MTA_CONFIG": mta.env["MTA_CONFIG"], "PYTHONPATH": mta.env["PYTHONPATH"]}
    p = sendmail(mta, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "postmaster@example.com",
                 stdin=b"\n", env=env, cwd="/")
    assert p.returncode == 0, p.stderr
    p = subprocess.run(f"echo | {sys.executable} -m mta sendmail -odi -oem postmaster@example.com",
                       shell=True, env=env, cwd="/", capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    items = wait_queued(mta, 2)
    shown = mta.queue_show(items[0]["id"])
    assert "From: CronDaemon <" in shown


def test_f_and_F(mta):
    p = sendmail(mta, "-f", "sender@example.org", "-F", "Jane Doe", "postmaster@example.com",
                 stdin=b"Subject: flags\n\nbody\n")
    assert p.returncode == 0, p.stderr
    p = sendmail(mta, "-f", "<>", "postmaster@example.com", stdin=b"Subject: null\n\nbody\n")
    assert p.returncode == 0, p.stderr
    items = wait_queued(mta, 2)
    assert [i["sender"] for i in items] == ["sender@example.org", ""]
    shown = mta.queue_show(items[0]["id"])
    assert "From: Jane Doe <sender@example.org>" in shown


def test_bp_is_mailq(mta):
    assert sendmail(mta, "postmaster@example.com", stdin=b"Subject: q\n\nx\n").returncode == 0
    (item,) = wait_queued(mta, 1)
    p = sendmail(mta, "-bp")
    assert p.returncode == 0, p.stderr
    assert item["id"].encode() in p.stdout and b"postmaster@example.com" in p.stdout
    listing = mta.cli("queue", "list")
    assert listing.stdout.encode() == p.stdout


def test_bad_flags_and_addresses_exit_codes(mta):
    assert sendmail(mta, "-Z", "a@example.org", stdin=b"x").returncode == 64
    assert sendmail(mta, "not an address", stdin=b"x").returncode == 64
    assert sendmail(mta, "-t", stdin=b"Subject: nobody\n\n").returncode == 64
    assert maildrop(mta) == []


def test_hostile_maildrop_files_never_crash_the_daemon(mta, tmp_path):
    drop = mta.spool_dir / "maildrop"
    secret = tmp_path / "secret.txt"
    secret.write_text('{"format":"mta-maildrop","version":1,"recipients":["x@example.org"],"flags":{}}\n'
                      "Subject: secret\n\nsecret\n")
    (drop / ("0" * 20 + ".1111111111111111")).write_bytes(b"\x00garbage\xff" * 1000)
    (drop / ("0" * 20 + ".2222222222222222")).write_bytes(b"{" * 5_000_000 + b"\n")   # huge header line
    os.symlink(secret, drop / ("0" * 20 + ".3333333333333333"))
    os.mkfifo(drop / ("0" * 20 + ".4444444444444444"))
    (drop / "not-a-maildrop-name").write_bytes(b"x")
    wait_for(lambda: len(corrupt(mta)) >= 5, what="hostile files in corrupt/")
    assert mta.alive()
    assert maildrop(mta) == []
    assert mta.queue_list() == []                         # the symlink target was not read
    assert secret.exists()
    # ... and a good submission still goes through
    assert sendmail(mta, "postmaster@example.com", stdin=b"Subject: ok\n\nx\n").returncode == 0
    wait_queued(mta, 1)
    assert mta.alive()
    assert mta.log_text().count("moved to corrupt/") >= 5


# --- another local user ------------------------------------------------------------

def _world_reachable(path: Path) -> bool:
    path = path.resolve()
    for part in [path, *path.parents]:
        if not os.stat(part).st_mode & stat.S_IXOTH:
            return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run sendmail as another user")
def test_other_user_is_the_submitter(mta_factory):
    """A file dropped by `nobody` is attributed to nobody, whatever its content says."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if not system_python or not _world_reachable(REPO_ROOT):
        pytest.skip("no system python3 or the repository is not readable by other users")
    version = subprocess.run([system_python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True)
    if version.stdout.strip() != "True":
        pytest.skip("system python3 is older than 3.11 (tomllib)")
    shared = Path(tempfile.mkdtemp(prefix="mta-sendmail-"))
    try:
        os.chmod(shared, 0o711)
        srv = mta_factory({"spool_dir": str(shared / "spool")})
        config = shared / "mta.toml"
        write_toml(config, srv.config)
        os.chmod(config, 0o644)
        os.chmod(shared / "spool", 0o711)
        env = {"PATH": "/usr/bin:/bin", "MTA_CONFIG": str(config), "PYTHONPATH": str(REPO_ROOT),
               "PYTHONDONTWRITEBYTECODE": "1"}
        p = sendmail(srv, "-f", "forged@example.org", "postmaster@example.com",
                     stdin=b"Subject: from nobody\n\nx\n", env=env, cwd="/", python=system_python, user="nobody")
        assert p.returncode == 0, p.stderr
        (item,) = wait_queued(srv, 1)
        env_data = envelope(srv, item["id"])
        assert env_data["submitter"] == "nobody"
        assert env_data["sender"] == "forged@example.org"      # -f is allowed, the submitter is recorded
        assert "(from nobody@localhost)" in srv.queue_show(item["id"])
        # nobody cannot list the drop box or read the queue
        p = sendmail(srv, "-bp", env=env, cwd="/", python=system_python, user="nobody")
        assert p.returncode == 77 and b"permission denied" in p.stderr, p
    finally:
        shutil.rmtree(shared, ignore_errors=True)
