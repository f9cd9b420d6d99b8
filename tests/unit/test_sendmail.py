"""Unit tests of local submission: mta.spool.pickup and `mta sendmail`.

The cleanup step (build_message), the maildrop file format, the sendmail
command line (flags cron, PHP mail() and git send-email pass, sysexits
codes) and the daemon's pickup against hostile maildrop files: garbage,
huge header lines, symlinks, FIFOs, hard links, directories. Nothing in
the maildrop may crash the pickup or lose a good message.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import stat
import sys
from types import SimpleNamespace

import pytest

from mta import cli
from mta.spool import Spool
from mta.spool import pickup
from mta.spool.pickup import LocalUser, Pickup, Submission, SubmissionError, build_message

USER = LocalUser(1000, "alice", "Alice Example")
HOST = "mx.test.example"
DOMAIN = "example.com"


def build(raw: bytes, **kw) -> pickup.Prepared:
    return build_message(Submission(**kw), raw, user=USER, domain=DOMAIN, hostname=HOST,
                         max_size=100_000, queue_id="0123456789ABCDEF0123", now=0)


def headers_of(message: bytes) -> list[bytes]:
    return message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# --- cleanup ---------------------------------------------------------------

def test_lf_line_ends_become_crlf_and_missing_headers_are_added():
    p = build(b"Subject: hi\n\nline one\nline two\n", recipients=["bob@example.org"])
    assert p.message.count(b"\r\n") == p.message.count(b"\n")
    head = headers_of(p.message)
    assert head[0] == b"Subject: hi"
    assert b"From: Alice Example <alice@example.com>" in head
    assert any(h.startswith(b"Date: ") for h in head)
    assert b"Message-ID: <0123456789ABCDEF0123@mx.test.example>" in head
    assert p.message.endswith(b"\r\n\r\nline one\r\nline two\r\n")
    assert p.sender == "alice@example.com"          # default: <login>@MTA_DOMAIN
    assert p.recipients == ["bob@example.org"]


def test_existing_from_date_message_id_are_kept():
    raw = b"From: Me <me@example.org>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <x@y>\n\nbody\n"
    head = headers_of(build(raw, recipients=["b@example.org"]).message)
    assert [h for h in head if h.lower().startswith((b"from:", b"date:", b"message-id:"))] == \
        [b"From: Me <me@example.org>", b"Date: Mon, 1 Jan 2024 00:00:00 +0000", b"Message-ID: <x@y>"]


def test_full_name_flag_and_non_ascii_name_is_encoded():
    head = headers_of(build(b"\n", recipients=["b@example.org"], full_name="Jürgen\r\nBcc: x@y").message)
    from_line = [h for h in head if h.startswith(b"From:")][0]
    assert from_line.isascii() and b"=?utf-8?" in from_line and b"<alice@example.com>" in from_line
    assert not any(h.startswith(b"Bcc") for h in head)   # no header injection through -F


def test_dot_ends_input_without_i_and_not_with_it():
    raw = b"Subject: s\n\nbefore\n.\nafter\n"
    assert b"after" not in build(raw, recipients=["b@example.org"]).message
    assert build(raw, recipients=["b@example.org"], ignore_dots=True).message.endswith(b"before\r\n.\r\nafter\r\n")
    # no SMTP unstuffing in sendmail mode: "..x" stays "..x"
    assert b"\r\n..x\r\n" in build(b"\n..x\n", recipients=["b@example.org"]).message


def test_read_input_stops_at_dot_line_and_bounds_size():
    assert pickup.read_input(io.BytesIO(b"a\n.\nb\n"), 100, False) == b"a\n"
    assert pickup.read_input(io.BytesIO(b"a\n.\nb\n"), 100, True) == b"a\n.\nb\n"
    with pytest.raises(SubmissionError) as error:
        pickup.read_input(io.BytesIO(b"x" * 1000), 100, True)
    assert error.value.exit_code == 65


def test_t_extracts_to_cc_bcc_and_removes_bcc():
    raw = (b"To: a@example.org, Joe <joe@example.net>\nCc: c@example.org\n"
           b"Bcc: hidden@example.org,\n  other@example.org\nSubject: s\n\nbody\n")
    p = build(raw, extract=True)
    assert p.recipients == ["a@example.org", "joe@example.net", "c@example.org",
                            "hidden@example.org", "other@example.org"]
    assert b"hidden" not in p.message and b"Bcc" not in p.message
    assert b"  other" not in p.message                      # the continuation line went too


def test_t_uses_resent_headers_when_present():
    raw = b"To: old@example.org\nResent-To: new@example.org\nResent-Bcc: secret@example.org\n\nx\n"
    p = build(raw, extract=True)
    assert p.recipients == ["new@example.org", "secret@example.org"]
    assert b"secret" not in p.message


def test_t_adds_to_command_line_recipients_and_deduplicates():
    p = build(b"To: A@Example.org\n\nx\n", extract=True, recipients=["a@example.org", "b@example.org"])
    assert p.recipients == ["a@example.org", "b@example.org"]


def test_bare_local_part_gets_the_domain_and_bad_addresses_are_refused():
    assert build(b"x\n", recipients=["root"]).recipients == ["root@example.com"]
    assert build(b"x\n", recipients=["root"], sender="daemon").sender == "daemon@example.com"
    assert build(b"x\n", recipients=["root"], sender="").sender == ""
    assert build(b"x\n", recipients=["root"], sender="<>").sender == ""
    for bad in ("a b@example.org", "x@", "@x", "a@b@c", "a@exa mple.org", "x\r\nRCPT@x"):
        with pytest.raises(SubmissionError) as error:
            build(b"x\n", recipients=[bad])
        assert error.value.exit_code == 64, bad
    with pytest.raises(SubmissionError):
        build(b"x\n", recipients=["b@example.org"], sender="bad sender@")


def test_no_recipients_is_a_usage_error():
    with pytest.raises(SubmissionError, match="no recipient") as error:
        build(b"Subject: x\n\n", extract=True)
    assert error.value.exit_code == 64


def test_message_size_limit():
    raw = b"Subject: big\n\n" + b"y" * 200_000 + b"\n"
    with pytest.raises(SubmissionError) as error:
        build(raw, recipients=["b@example.org"])
    assert error.value.exit_code == 65


def test_long_lines_are_broken_and_headers_folded():
    raw = b"Subject: " + b"s" * 1500 + b"\n\n" + b"b" * 2500 + b"\n"
    message = build(raw, recipients=["b@example.org"]).message
    assert max(len(line) for line in message.split(b"\r\n")) <= 998
    head = headers_of(message)
    assert head[1].startswith(b" ")                    # folded continuation
    assert message.count(b"b") >= 2500


def test_bare_cr_nul_and_mbox_from_line():
    p = build(b"From alice Mon Jan  1 00:00:00 2024\nSubject: a\r\rb\0c\n\nx\r\n", recipients=["b@example.org"])
    assert not p.message.startswith(b"From alice")
    assert b"\0" not in p.message and b"\r\r" not in p.message
    assert b"\r\n" not in p.message.replace(b"\r\n", b"")          # every CR is part of a CRLF
    assert p.message.replace(b"\r\n", b"").count(b"\n") == 0


def test_body_without_headers_gets_a_separator():
    p = build(b"just a line\nanother\n", recipients=["b@example.org"])
    head, body = p.message.split(b"\r\n\r\n", 1)
    assert head.startswith(b"From: ") and body == b"just a line\r\nanother\r\n"


def test_eightbit_and_smtputf8_flags():
    assert build("Subject: é\n\nx\n".encode(), recipients=["b@example.org"]).eightbit
    assert not build(b"x\n", recipients=["b@example.org"]).smtputf8
    assert build(b"x\n", recipients=["jörg@example.org"]).smtputf8


def test_header_line_round_trip_and_validation():
    s = Submission(recipients=["a@b.example"], sender="x@y.example", full_name="N", extract=True, ignore_dots=True)
    assert Submission.from_header_line(s.header_line()) == s
    for bad in (b"", b"garbage", b"[]", b'{"format":"mta-maildrop","version":2}',
                b'{"format":"other","version":1}',
                b'{"format":"mta-maildrop","version":1,"recipients":"x","flags":{}}',
                b'{"format":"mta-maildrop","version":1,"recipients":[1],"flags":{}}',
                b'{"format":"mta-maildrop","version":1,"recipients":[],"flags":{"t":"yes"}}',
                b'{"format":"mta-maildrop","version":1,"recipients":[],"sender":5,"flags":{}}',
                b"\xff\xfe", b"{" * 100000):
        with pytest.raises(SubmissionError):
            Submission.from_header_line(bad)
    with pytest.raises(SubmissionError):
        Submission.from_header_line(b" " * (pickup.MAX_HEADER_LINE + 1))


def test_received_header():
    header = pickup.received_header(USER, HOST, "QID", ["b@example.org"])
    assert header.startswith(b"Received: (from alice@localhost)\r\n\tby mx.test.example (mta, from userid 1000) id QID\r\n\tfor <b@example.org>; ")
    assert header.endswith(b"\r\n")


def test_local_user_from_uid():
    me = LocalUser.from_uid(os.getuid())
    assert me.login == pwd.getpwuid(os.getuid()).pw_name
    assert LocalUser.from_uid(2**31 - 7).login == f"uid{2**31 - 7}"


# --- pickup ------------------------------------------------------------------

def make_config(tmp_path, **kw):
    values = dict(hostname=HOST, domain=DOMAIN, max_message_size=100_000)
    values.update(kw)
    return SimpleNamespace(**values)


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"))
    s.setup()
    return s


@pytest.fixture
def reader(spool, tmp_path):
    config = make_config(tmp_path)
    return Pickup(spool, lambda: config)


def drop(spool, submission: Submission, raw: bytes) -> str:
    return pickup.submit(spool.root, submission, raw)


def maildrop(spool) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.root, "maildrop")))


def corrupt(spool) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.root, "corrupt")))


def test_maildrop_is_a_sticky_drop_box(spool):
    mode = stat.S_IMODE(os.stat(os.path.join(spool.root, "maildrop")).st_mode)
    assert mode == 0o1733


def test_submit_writes_a_complete_file_readable_by_the_daemon(spool):
    old = os.umask(0o077)
    try:
        name = drop(spool, Submission(recipients=["b@example.org"]), b"x\n")
    finally:
        os.umask(old)
    assert pickup.NAME_RE.match(name) and maildrop(spool) == [name]
    path = os.path.join(spool.root, "maildrop", name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    header, _, body = open(path, "rb").read().partition(b"\n")
    assert json.loads(header)["recipients"] == ["b@example.org"] and body == b"x\n"


def test_pickup_queues_and_removes_the_file(spool, reader):
    drop(spool, Submission(recipients=["b@example.org"], sender="s@example.org"), b"Subject: a\n\nhello\n")
    assert reader.scan() == 1
    assert maildrop(spool) == []
    (item,) = spool.summaries()
    entry = spool.find(item["id"])
    envelope = spool.load(entry)
    me = pwd.getpwuid(os.getuid()).pw_name
    assert envelope.submitter == me and envelope.sender == "s@example.org"
    assert [r.address for r in envelope.recipients] == ["b@example.org"]
    message = spool.read_message(entry)
    assert message.startswith(f"Received: (from {me}@localhost)\r\n".encode())
    assert f"id {item['id']}".encode() in message
    assert envelope.size == len(message) - len(message.split(b"Subject")[0])


def test_submitter_comes_from_the_owner_not_the_content(spool, reader):
    s = Submission(recipients=["b@example.org"])
    raw_header = json.loads(s.header_line())
    raw_header["submitter"] = "root"                  # an unknown key a forger might add
    raw_header["uid"] = 0
    path = os.path.join(spool.root, "maildrop", "0" * 20 + "." + "a" * 16)
    with open(path, "wb") as f:
        f.write(json.dumps(raw_header).encode() + b"\nx\n")
    assert reader.scan() == 1
    (item,) = spool.summaries()
    assert spool.load(spool.find(item["id"])).submitter == pwd.getpwuid(os.getuid()).pw_name


def write_raw(spool, name: str, data: bytes) -> str:
    path = os.path.join(spool.root, "maildrop", name)
    with open(path, "wb") as f:
        f.write(data)
    return path


GOOD_NAME = "0" * 20 + "." + "b" * 16


@pytest.mark.parametrize("data", [
    b"",
    b"garbage without newline",
    b"garbage\nx\n",
    b'{"format":"mta-maildrop","version":9}\nx\n',
    b"{" * 2_000_000 + b"\nx\n",                            # huge header line
    b'{"format":"mta-maildrop","version":1,"recipients":["not an address"],"flags":{}}\nx\n',
    b'{"format":"mta-maildrop","version":1,"recipients":[],"flags":{}}\nSubject: none\n\n',
    b'{"format":"mta-maildrop","version":1,"recipients":["b@example.org"],"flags":{}}\n' + b"z" * 300_000,
    b"\xff\xfe\x00\x01" * 1000,
])
def test_hostile_files_go_to_corrupt(spool, reader, data, caplog):
    write_raw(spool, GOOD_NAME, data)
    assert reader.scan() == 0
    assert maildrop(spool) == [] and len(corrupt(spool)) == 1
    assert corrupt(spool)[0].startswith("maildrop.")
    assert spool.summaries() == []
    assert "moved to corrupt/" in caplog.text


def test_symlink_is_not_followed(spool, reader, tmp_path):
    secret = tmp_path / "secret"
    s = Submission(recipients=["attacker@example.org"])
    secret.write_bytes(s.header_line() + b"\nSubject: secret\n\ntop secret\n")
    os.symlink(secret, os.path.join(spool.root, "maildrop", GOOD_NAME))
    assert reader.scan() == 0
    assert spool.summaries() == [] and maildrop(spool) == []
    (moved,) = corrupt(spool)
    assert os.path.islink(os.path.join(spool.root, "corrupt", moved))
    assert secret.exists()


def test_hard_link_is_refused(spool, reader, tmp_path):
    other = tmp_path / "other"
    other.write_bytes(Submission(recipients=["b@example.org"]).header_line() + b"\nx\n")
    os.link(other, os.path.join(spool.root, "maildrop", GOOD_NAME))
    assert reader.scan() == 0 and spool.summaries() == [] and len(corrupt(spool)) == 1


def test_fifo_directory_and_odd_names_do_not_block_or_crash(spool, reader):
    os.mkfifo(os.path.join(spool.root, "maildrop", GOOD_NAME))
    os.mkdir(os.path.join(spool.root, "maildrop", "1" * 20 + "." + "c" * 16))
    write_raw(spool, "evil name\n", b"x")
    assert reader.scan() == 0
    assert maildrop(spool) == [] and len(corrupt(spool)) == 3
    good = drop(spool, Submission(recipients=["b@example.org"]), b"x\n")
    assert reader.scan() == 1 and good not in maildrop(spool)


def test_temp_files_are_left_alone_until_stale(spool, reader):
    path = write_raw(spool, ".tmp-0123456789abcdef", b"partial")
    assert reader.scan() == 0 and os.path.exists(path)
    os.utime(path, (0, 0))
    assert reader.scan() == 0 and not os.path.exists(path)
    assert corrupt(spool) == []


def test_good_file_after_bad_ones_is_still_queued(spool, reader):
    write_raw(spool, "0" * 20 + "." + "0" * 16, b"garbage")
    drop(spool, Submission(recipients=["b@example.org"]), b"x\n")
    assert reader.scan() == 1 and len(spool.summaries()) == 1


def test_spool_write_error_keeps_the_file(spool, reader, monkeypatch):
    drop(spool, Submission(recipients=["b@example.org"]), b"x\n")
    from mta.spool import spool as spool_mod

    def broken(self, envelope):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(spool_mod.IncomingMessage, "commit", broken)
    assert reader.scan() == 0
    assert len(maildrop(spool)) == 1 and corrupt(spool) == []
    monkeypatch.undo()
    assert reader.scan() == 1 and maildrop(spool) == []


def test_crash_after_commit_duplicates_never_loses(spool, reader, monkeypatch):
    """Commit first, unlink second: if unlink never happens the next scan queues it again."""
    drop(spool, Submission(recipients=["b@example.org"]), b"x\n")
    real_unlink = os.unlink
    monkeypatch.setattr(pickup.os, "unlink", lambda p: (_ for _ in ()).throw(OSError(5, "I/O error")))
    assert reader.scan() == 1
    monkeypatch.setattr(pickup.os, "unlink", real_unlink)
    reader._ignored.clear()
    assert reader.scan() == 1
    assert len(spool.summaries()) == 2 and maildrop(spool) == []


def test_pickup_thread_starts_and_stops(spool, tmp_path):
    config = make_config(tmp_path)
    thread = Pickup(spool, lambda: config, interval=0.05)
    drop(spool, Submission(recipients=["b@example.org"]), b"x\n")
    thread.start()
    try:
        import time
        deadline = time.monotonic() + 5
        while maildrop(spool) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        thread.stop()
    assert maildrop(spool) == [] and len(spool.summaries()) == 1


# --- the sendmail command line -------------------------------------------------

@pytest.fixture
def config_file(tmp_path, monkeypatch):
    path = tmp_path / "mta.toml"
    path.write_text(f'hostname = "{HOST}"\ndomain = "{DOMAIN}"\nspool_dir = "{tmp_path / "spool"}"\n'
                    f'data_dir = "{tmp_path / "data"}"\nlog_dir = "{tmp_path / "log"}"\n'
                    f'aliases = "{tmp_path / "aliases"}"\nmax_message_size = 100000\n')
    for key in [k for k in os.environ if k.startswith("MTA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MTA_CONFIG", str(path))
    return path


def run_sendmail(monkeypatch, capsys, args, stdin: bytes | None = b"Subject: t\n\nbody\n", prog="sendmail"):
    if stdin is None:
        monkeypatch.setattr(sys, "stdin", None)
    else:
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(stdin)))
    code = cli.sendmail_main(args, prog=prog)
    out = capsys.readouterr()
    return code, out.out, out.err


def dropped(tmp_path) -> list[tuple[dict, bytes]]:
    directory = tmp_path / "spool" / "maildrop"
    result = []
    for name in sorted(os.listdir(directory)):
        header, _, body = (directory / name).read_bytes().partition(b"\n")
        result.append((json.loads(header), body))
    return result


def test_cli_cron_style_invocation(config_file, tmp_path, monkeypatch, capsys):
    # Debian cron: sendmail -FCronDaemon -i -B8BITMIME -oem root
    code, out, err = run_sendmail(monkeypatch, capsys, ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert (code, out, err) == (0, "", "")
    ((header, body),) = dropped(tmp_path)
    assert header["recipients"] == ["root"] and header["full_name"] == "CronDaemon"
    assert header["flags"] == {"t": False, "i": True} and header["sender"] is None
    assert body == b"Subject: t\n\nbody\n"


def test_cli_php_and_git_style_invocations(config_file, tmp_path, monkeypatch, capsys):
    # PHP mail(): sendmail -t -i; git send-email: sendmail -i -f me@x rcpt...
    assert run_sendmail(monkeypatch, capsys, ["-t", "-i"], b"To: a@example.org\n\nx\n")[0] == 0
    assert run_sendmail(monkeypatch, capsys, ["-i", "-f", "me@example.org", "a@example.org", "b@example.org"])[0] == 0
    assert run_sendmail(monkeypatch, capsys, ["-odi", "-oem", "-om", "-v", "-N", "never", "-oi",
                                              "-fme@example.org", "a@example.org"])[0] == 0
    headers = [h for h, _ in dropped(tmp_path)]
    assert {h["sender"] for h in headers} == {None, "me@example.org"}
    assert any(h["flags"]["t"] for h in headers)


def test_cli_dot_ends_input_without_i(config_file, tmp_path, monkeypatch, capsys):
    assert run_sendmail(monkeypatch, capsys, ["a@example.org"], b"x\n.\nlost\n")[0] == 0
    ((_, body),) = dropped(tmp_path)
    assert body == b"x\n"


@pytest.mark.parametrize("args,stdin,code", [
    (["-Z"], b"x", 64),                                   # unknown flag
    (["bad address@"], b"x", 64),
    (["-f", "bad sender@", "a@example.org"], b"x", 64),
    (["-t"], b"Subject: nobody\n\n", 64),                 # no recipients
    ([], b"x", 64),
    (["-bs"], b"", 64),                                   # SMTP on stdin: not supported
    (["a@example.org"], None, 66),                        # no standard input
    (["a@example.org"], b"Subject: x\n\n" + b"y" * 300_000, 65),
])
def test_cli_exit_codes(config_file, tmp_path, monkeypatch, capsys, args, stdin, code):
    got, out, err = run_sendmail(monkeypatch, capsys, args, stdin)
    assert got == code, err
    assert err.startswith("sendmail: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "spool" / "maildrop").exists() or dropped(tmp_path) == []


def test_cli_tempfail_when_the_spool_cannot_be_written(config_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "spool").write_text("not a directory")
    code, _, err = run_sendmail(monkeypatch, capsys, ["a@example.org"])
    assert code == 75 and "cannot write to the queue" in err


def test_cli_config_error_is_ex_config(config_file, monkeypatch, capsys):
    monkeypatch.setenv("MTA_PORT_RELAY", "abc")
    code, _, err = run_sendmail(monkeypatch, capsys, ["a@example.org"])
    assert code == 78 and "MTA_PORT_RELAY" in err


def test_cli_ignores_missing_tls_files(config_file, monkeypatch, capsys, tmp_path):
    # An ordinary user cannot stat /etc/ssl/private/*.key: sendmail must not care.
    monkeypatch.setenv("MTA_TLS_CERT", "/nonexistent/cert.pem")
    monkeypatch.setenv("MTA_TLS_KEY", "/nonexistent/key.pem")
    assert run_sendmail(monkeypatch, capsys, ["a@example.org"])[0] == 0


def test_cli_internal_error_is_ex_software(config_file, monkeypatch, capsys):
    monkeypatch.setattr(pickup, "submit", lambda *a: 1 / 0)
    code, _, err = run_sendmail(monkeypatch, capsys, ["a@example.org"])
    assert code == 70 and "internal error" in err and "Traceback" not in err


def test_cli_bp_and_mailq_list_the_queue(config_file, tmp_path, monkeypatch, capsys):
    Spool(str(tmp_path / "spool")).setup()
    code, out, _ = run_sendmail(monkeypatch, capsys, ["-bp"], b"")
    assert code == 0 and "Mail queue is empty" in out
    code, out, _ = run_sendmail(monkeypatch, capsys, [], b"", prog="mailq")
    assert code == 0 and "Mail queue is empty" in out


def test_cli_newaliases_validates(config_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "aliases").write_text("postmaster: admin@example.com\n")
    assert run_sendmail(monkeypatch, capsys, [], b"", prog="newaliases")[0] == 0
    assert run_sendmail(monkeypatch, capsys, ["-bi"], b"")[0] == 0
    (tmp_path / "aliases").write_text("postmaster admin\n")
    code, _, err = run_sendmail(monkeypatch, capsys, [], b"", prog="newaliases")
    assert code == 1 and "aliases" in err


def test_mta_sendmail_subcommand_passes_flags_through(config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b"To: a@example.org\n\nx\n")))
    assert cli.main(["sendmail", "-t", "-oi", "-F", "Name"]) == 0
    ((header, _),) = dropped(tmp_path)
    assert header["flags"] == {"t": True, "i": True} and header["full_name"] == "Name"


def test_program_name_dispatch(config_file, tmp_path, monkeypatch, capsys):
    Spool(str(tmp_path / "spool")).setup()
    monkeypatch.setattr(sys, "argv", ["/usr/bin/mailq"])
    assert cli.main() == 0 and "Mail queue is empty" in capsys.readouterr().out


def test_root_does_not_create_the_daemons_spool(config_file, tmp_path, monkeypatch, capsys):
    """With MTA_USER set, a missing maildrop is a temporary failure for root, not
    a reason to create root-owned spool directories the daemon cannot use."""
    monkeypatch.setenv("MTA_USER", "mta")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    code, _, err = run_sendmail(monkeypatch, capsys, ["a@example.org"])
    assert code == 75 and "cannot write to the queue" in err
    assert not (tmp_path / "spool").exists()
