"""The `mta` command line: serve, queue, user, dkim, config, sendmail, --version.

Every command loads the same configuration as the daemon (so it finds the
same spool and data directory) and acts through the same code the daemon
uses (`mta.spool`, `mta.users`), which makes it safe while the daemon runs.
Run as root with MTA_USER set (the Debian package), the operator commands
act as that user, so the files they write stay the daemon's.
Exit codes: 0 success, 1 operation failed, 2 usage or configuration error
with one line naming the key or argument; never a traceback for bad input.

`sendmail` (also reached as /usr/sbin/sendmail, mailq and newaliases, by
the name the program is called under) speaks the Sendmail command line and
exits with sysexits(3) codes instead; see `sendmail_main`.
"""

from __future__ import annotations

import argparse
import getopt
import getpass
import json
import logging
import logging.handlers
import os
import sys

from mta import __version__
from mta import config as config_mod

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="configuration file (default: $MTA_CONFIG, then /etc/mta/mta.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mta", description="mta mail transfer agent")
    parser.add_argument("--version", action="version", version=f"mta {__version__}")
    _config_option(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    _config_option(serve)

    queue = commands.add_parser("queue", help="inspect and manage the queue (mailq, postsuper)")
    _config_option(queue)
    queue_commands = queue.add_subparsers(dest="queue_command", metavar="ACTION", parser_class=_Parser)
    queue_commands.required = True
    listing = queue_commands.add_parser("list", help="list queued messages")
    listing.add_argument("--status", choices=["active", "deferred", "hold", "bounce"])
    listing.add_argument("--json", action="store_true")
    show = queue_commands.add_parser("show", help="print a queued message")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print the envelope")
    for action, text in (("delete", "remove a message"), ("hold", "put a message on hold"),
                         ("release", "release a held message"), ("retry", "retry a message now")):
        sub = queue_commands.add_parser(action, help=text)
        sub.add_argument("id")
        _config_option(sub)
    for sub in (listing, show):
        _config_option(sub)
    flush = queue_commands.add_parser("flush", help="retry all deferred mail now")
    _config_option(flush)
    stats = queue_commands.add_parser("stats", help="counts by status, bytes, oldest age")
    stats.add_argument("--json", action="store_true")
    _config_option(stats)

    user = commands.add_parser("user", help="manage SMTP AUTH users")
    _config_option(user)
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", parser_class=_Parser)
    user_commands.required = True
    for action, text in (("add", "add a user"), ("del", "delete a user"), ("passwd", "change a password")):
        sub = user_commands.add_parser(action, help=text)
        sub.add_argument("name", help="full address, e.g. alice@example.com")
        _config_option(sub)
    user_list = user_commands.add_parser("list", help="list users")
    user_list.add_argument("--json", action="store_true")
    _config_option(user_list)

    dkim = commands.add_parser("dkim", help="DKIM keys")
    _config_option(dkim)
    dkim_commands = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", parser_class=_Parser)
    dkim_commands.required = True
    keygen = dkim_commands.add_parser("keygen", help="create a signing key, print the DNS record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", default="mta")
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    _config_option(keygen)

    cfg = commands.add_parser("config", help="check or show the effective configuration")
    _config_option(cfg)
    cfg_commands = cfg.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    cfg_commands.required = True
    for action in ("check", "show"):
        _config_option(cfg_commands.add_parser(action))

    # Sendmail's own flags (-t, -oi, -f...) are not argparse's: pass them through.
    sendmail = commands.add_parser("sendmail", add_help=False, prefix_chars="+",
                                   help="Sendmail-compatible injection (-t, -i, -f, -F, -bp; also /usr/sbin/sendmail)")
    sendmail.add_argument("arguments", nargs=argparse.REMAINDER, help="sendmail flags and recipients")
    return parser


def load_config(args) -> config_mod.Config:
    try:
        return config_mod.load(getattr(args, "config", None))
    except config_mod.ConfigError as error:
        raise CliError(f"configuration error: {error}", EXIT_USAGE) from None


def _become_daemon_user(config) -> None:
    """Root with MTA_USER set: act as that user, so users.json, keys, logs and
    the queue index written here stay readable and writable by the daemon."""
    if os.geteuid() != 0 or not config.user:
        return
    from mta.main import StartupError, drop_privileges
    try:
        drop_privileges(config)
    except StartupError as error:
        raise CliError(str(error), error.exit_code) from None
    os.umask(0o027)  # as mta.service's UMask: logs and state are not world-readable


def _cli_logging(config) -> None:
    """Operator actions are recorded in mta.log when it is writable."""
    from mta.logs import configure_cli
    configure_cli(config.log_dir)


# --- queue ---

def _spool(config):
    from mta.spool import Spool
    if not os.path.isdir(config.spool_dir):
        raise CliError(f"spool_dir: no queue at {config.spool_dir} (has the daemon run?)")
    return Spool(config.spool_dir, config.queue_min_free)


def cmd_queue(args, config) -> int:
    from mta.spool import NoSuchMessage, SpoolError
    spool = _spool(config)
    action = args.queue_command
    try:
        if action == "list":
            items = spool.summaries()
            if args.status:
                items = [item for item in items if item["status"] == args.status]
            if args.json:
                print(json.dumps(items, indent=1, ensure_ascii=False))
            else:
                print_mailq(items)
        elif action == "show":
            entry = spool.find(args.id)
            if entry is None:
                raise NoSuchMessage(f"{args.id}: no such message in the queue")
            if args.json:
                data = spool.load(entry).to_dict()
                data["status"] = entry.status
                print(json.dumps(data, indent=1, ensure_ascii=False))
            else:
                sys.stdout.flush()
                sys.stdout.buffer.write(spool.read_message(entry).replace(b"\r\n", b"\n"))
        elif action == "stats":
            stats = spool.stats()
            if args.json:
                print(json.dumps(stats, indent=1))
            else:
                for status, count in stats["by_status"].items():
                    print(f"{status:10} {count}")
                print(f"{'bytes':10} {stats['bytes']}")
                print(f"{'oldest':10} {stats['oldest_age_seconds']}s")
        elif action == "flush":
            print(f"{spool.flush()} deferred messages scheduled for delivery now")
        else:
            getattr(spool, action)(args.id)
            print(f"{args.id}: {action} done")
    except NoSuchMessage as error:
        raise CliError(str(error), EXIT_USAGE) from None
    except SpoolError as error:
        raise CliError(str(error)) from None
    return EXIT_OK


def print_mailq(items: list[dict]) -> None:
    """Postfix mailq layout: '*' marks active, '!' held."""
    if not items:
        print("Mail queue is empty")
        return
    print(f"{'-Queue ID-':<22} {'--Size--':>8} {'----Arrival Time----':<25} -Sender/Recipient-------")
    marks = {"active": "*", "hold": "!"}
    total = 0
    for item in items:
        total += item["size"]
        mark = marks.get(item["status"], " ")
        print(f"{item['id'] + mark:<22} {item['size']:>8} {item['arrival']:<25} {item['sender'] or 'MAILER-DAEMON'}")
        for recipient in item["recipients"]:
            if recipient["last_error"] and recipient["status"] != "delivered":
                print(f"{'':57}({recipient['last_error'][:200]})")
            if recipient["status"] not in ("delivered",):
                print(f"{'':57}{recipient['address']}")
        print()
    print(f"-- {max(1, total // 1024)} Kbytes in {len(items)} Request{'s' if len(items) != 1 else ''}.")


# --- users ---

def read_password(prompt: str = "Password: ") -> str:
    """On a terminal, prompt twice; otherwise one line from stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        second = getpass.getpass("Again: ")
        if first != second:
            raise CliError("passwords do not match", EXIT_USAGE)
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def cmd_user(args, config) -> int:
    from mta.users import NoSuchUser, UserError, UserExists, UserStore
    store = UserStore(config.data_dir)
    action = args.user_command
    try:
        if action == "list":
            users = store.list()
            if args.json:
                print(json.dumps(users, indent=1))
            else:
                for user in users:
                    print(user["username"])
        elif action == "add":
            print(f"added {store.add(args.name, read_password())}")
        elif action == "passwd":
            from mta.users import normalize_username
            if not store.exists(normalize_username(args.name)):
                raise NoSuchUser(f"no such user {args.name}")
            print(f"changed password of {store.set_password(args.name, read_password())}")
        elif action == "del":
            print(f"deleted {store.delete(args.name)}")
    except UserExists as error:
        raise CliError(str(error)) from None
    except NoSuchUser as error:
        raise CliError(str(error), EXIT_USAGE) from None
    except UserError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    except OSError as error:
        raise CliError(f"data_dir: cannot write users file: {error.strerror}") from None
    return EXIT_OK


# --- dkim ---

def cmd_dkim(args, config) -> int:
    from mta.policy import dkim_keys
    try:
        record = dkim_keys.keygen(config.data_dir, args.domain, args.selector, args.algorithm)
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    except FileExistsError as error:
        raise CliError(str(error)) from None
    print(record)
    return EXIT_OK


# --- config ---

def cmd_config(args, config) -> int:
    if args.config_command == "check":
        print(f"configuration ok{' (' + config.source + ')' if config.source else ' (built-in defaults)'}")
    else:
        for name, value in config.shown().items():
            print(f"{name} = {json.dumps(value, ensure_ascii=False)}")
    return EXIT_OK


def cmd_serve(args, config) -> int:
    from mta.main import StartupError, serve
    try:
        return serve(config)
    except StartupError as error:
        raise CliError(str(error), error.exit_code) from None


# --- sendmail, mailq, newaliases ---

# sysexits(3)
EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_SOFTWARE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 0, 64, 65, 66, 70, 75, 77, 78
# Postfix sendmail(1)'s getopt string: every flag it knows is accepted here.
SENDMAIL_OPTIONS = "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:q:r:tvx"
SENDMAIL_USAGE = "usage: sendmail [-t] [-i] [-f sender] [-F name] [-bp] [recipient ...]"
SENDMAIL_PROGRAMS = ("sendmail", "mailq", "newaliases")


def sendmail_main(argv: list[str] | None = None, prog: str = "sendmail", config_path: str | None = None) -> int:
    """The Sendmail-compatible entry point: injection (-t, -i/-oi, -f, -F,
    recipients), -bp (mailq), -bi/-I (newaliases), -q (flush).

    Used by cron, PHP mail() and git send-email, run by any local user:
    the message goes into the maildrop (mta.spool.pickup) and waits there
    when the daemon is down. Flags that only tune Sendmail's own behaviour
    (-odi, -oem, -om, -v, -B 8BITMIME, -N ..., -o...) are accepted and
    ignored. Exit codes are sysexits(3): 64 bad flags or addresses, 65 bad
    message (too big), 66 no input, 75 the queue cannot be written (try
    again), 77 no permission, 78 configuration error, 70 internal error.
    """
    if argv is None:
        argv = sys.argv[1:]
    try:
        return _sendmail(list(argv), prog, config_path)
    except CliError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    except BrokenPipeError:
        return EX_OK
    except Exception as error:  # never a traceback: sysexits says "internal error"
        print(f"{prog}: internal error: {error.__class__.__name__}: {error}", file=sys.stderr)
        return EX_SOFTWARE


def _sendmail(argv: list[str], prog: str, config_path: str | None) -> int:
    from mta.spool import pickup
    mode = {"mailq": "p", "newaliases": "i"}.get(prog, "m")
    submission = pickup.Submission()
    # `-q` alone means "run the queue now"; getopt wants an argument for -q.
    argv = ["-q0" if argument == "-q" else argument for argument in argv]
    try:
        options, arguments = getopt.gnu_getopt(argv, SENDMAIL_OPTIONS, ["config="])
    except getopt.GetoptError as error:
        raise CliError(f"{error}; {SENDMAIL_USAGE}", EX_USAGE) from None
    for flag, value in options:
        if flag == "-t":
            submission.extract = True
        elif flag == "-i" or (flag == "-o" and value == "i"):
            submission.ignore_dots = True
        elif flag in ("-f", "-r"):
            submission.sender = value
        elif flag == "-F":
            submission.full_name = value
        elif flag == "-b":
            mode = value
        elif flag == "-I":
            mode = "i"
        elif flag == "-q":
            mode = "q"
        elif flag in ("-C", "--config"):
            config_path = value
        # anything else (-odi, -oem, -om, -v, -B, -N, -R, -V, -X, -L, -h, -O, -U, ...) is a no-op
    try:
        config = config_mod.load(config_path, check_files=False)
    except config_mod.ConfigError as error:
        raise CliError(f"configuration error: {error}", EX_CONFIG) from None

    if mode == "p":
        _become_daemon_user(config)
        spool = _spool(config)
        try:
            items = spool.summaries()
        except PermissionError:
            raise CliError("cannot read the queue: permission denied (run mailq as root or as "
                           f"{config.user or 'the daemon user'})", EX_NOPERM) from None
        print_mailq(items)
        return EX_OK
    if mode == "q":
        _become_daemon_user(config)
        _spool(config).flush()
        return EX_OK
    if mode == "i":
        # Aliases are read as text (at start and on SIGHUP): nothing to build, only to check.
        from mta import aliases as aliases_mod
        try:
            aliases_mod.load(config.aliases, config.all_local_domains)
        except aliases_mod.AliasError as error:
            raise CliError(str(error), EXIT_FAILED) from None
        return EX_OK
    if mode != "m":
        raise CliError(f"-b{mode}: mode not supported; {SENDMAIL_USAGE}", EX_USAGE)

    submission.recipients = arguments
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise CliError("no standard input to read the message from", EX_NOINPUT)
    try:
        raw = pickup.read_input(stream, config.max_message_size * 2 + pickup.MAX_LINE, submission.ignore_dots)
        # Check now, so the caller hears of a bad address from the exit code;
        # the daemon checks again when it picks the file up.
        pickup.build_message(submission, raw, user=pickup.LocalUser.from_uid(os.getuid()),
                             domain=config.domain, hostname=config.hostname,
                             max_size=config.max_message_size, queue_id="0" * 20)
    except pickup.SubmissionError as error:
        raise CliError(str(error), error.exit_code) from None
    except OSError as error:
        raise CliError(f"cannot read standard input: {error.strerror or error}", EX_NOINPUT) from None
    directory = pickup.maildrop_path(config.spool_dir)
    try:
        if not os.path.isdir(directory) and _may_create_spool(config):
            from mta.spool import Spool  # first use without a daemon (development)
            Spool(config.spool_dir, config.queue_min_free).setup()
        pickup.submit(config.spool_dir, submission, raw)
    except OSError as error:
        raise CliError(f"cannot write to the queue ({directory}): {error.strerror or error}", EX_TEMPFAIL) from None
    return EX_OK


def _may_create_spool(config) -> bool:
    """Only the spool's owner creates it; root never does when the daemon runs
    as MTA_USER (root-owned directories would lock the daemon out)."""
    if os.geteuid() == 0 and config.user:
        return False
    try:
        return os.stat(config.spool_dir).st_uid == os.geteuid()
    except FileNotFoundError:
        return True


HANDLERS = {"serve": cmd_serve, "queue": cmd_queue, "user": cmd_user, "dkim": cmd_dkim, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    if argv is None and os.path.basename(sys.argv[0]) in SENDMAIL_PROGRAMS:
        # /usr/sbin/sendmail, /usr/bin/mailq, /usr/sbin/newaliases are links to mta.
        return sendmail_main(sys.argv[1:], prog=os.path.basename(sys.argv[0]))
    args = build_parser().parse_args(argv)
    if args.command == "sendmail":
        return sendmail_main(args.arguments, config_path=getattr(args, "config", None))
    try:
        config = load_config(args)
        if args.command != "serve":
            _become_daemon_user(config)
            _cli_logging(config)
        return HANDLERS[args.command](args, config)
    except CliError as error:
        print(f"mta: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
