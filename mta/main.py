"""The composition root: `mta serve` builds every part once and wires them.

Start-up order: configuration, directories, logging, CPU placement
(before any thread starts), spool recovery, users/aliases/TLS, listeners
(bound while still root), privilege drop, then delivery and the admin API.
The main thread then only waits for signals: SIGTERM/SIGINT stop (exit 0),
SIGHUP reloads configuration, aliases, users and the TLS certificate
without dropping connections.
Nothing else in mta reads signals or builds shared objects.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import signal
import threading
import time

# Everything is imported here, before the privilege drop: the unprivileged
# user may not be able to read the interpreter's or the venv's files.
from mta import aliases as aliases_mod
from mta import safeio
from mta.admin.deps import DaemonAbuseState
from mta.admin.serve import start_admin
from mta.delivery.local import LmtpCourier, MaildirCourier
from mta.delivery.pool import Deliverer, DeliveryPool
from mta.delivery.scheduler import Scheduler
from mta.delivery.smtp_client import SmtpClient
from mta import config as config_mod
from mta.cpus import CpuPlacement
from mta import logs
from mta.dns import Resolver
from mta.policy.dmarc import PslHolder
from mta.policy.greylist import Greylist
from mta.policy.lists import PolicyStore
from mta.policy.ratelimit import RateLimiter
from mta.smtp import server as smtp_server
from mta.smtp.auth import Lockout
from mta.smtp.tls import TlsProvider
from mta.spool import Spool
from mta.spool.pickup import Pickup
from mta.spool.spool import MAILDROP, STATES
from mta.users import UserStore

log = logging.getLogger("mta.main")

HOUSEKEEPING_INTERVAL = 30.0   # seconds between greylist expiry/persistence


class StartupError(Exception):
    """A problem that stops start-up; `exit_code` 2 for configuration."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def ensure_admin_token(config) -> str:
    """MTA_ADMIN_TOKEN, else the token file, else a new random one written there."""
    if config.admin_token:
        return config.admin_token
    path = config.admin_token_file
    try:
        with open(path, encoding="ascii") as handle:
            token = handle.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    safeio.atomic_write(path, (token + "\n").encode("ascii"), mode=0o600)
    return token


def make_dirs(config) -> None:
    for key in ("spool_dir", "data_dir", "log_dir"):
        path = getattr(config, key)
        try:
            os.makedirs(path, mode=0o750, exist_ok=True)
        except OSError as error:
            raise StartupError(f"{key}: cannot create {path}: {error.strerror}", 2) from None


def load_aliases(config):
    try:
        return aliases_mod.load(config.aliases, config.all_local_domains)
    except aliases_mod.AliasError as error:
        raise StartupError(f"aliases: {error}", 2) from None


def load_tls(config) -> TlsProvider:
    try:
        return TlsProvider(config)
    except (OSError, ValueError) as error:
        key = "tls_cert" if config.tls_cert else "data_dir"
        raise StartupError(f"{key}: cannot load TLS certificate/key: {error}", 2) from None


def give_state_to(config, uid: int, gid: int) -> None:
    """What start-up created as root (state directories, logs, the admin
    token, a generated certificate) is handed to MTA_USER before we become
    it. A fixed list, never a recursive walk: a mistyped data_dir must not
    chown a system directory. Files in maildrop/ keep their owners (the
    owner is the submitting user).
    """
    spool = config.spool_dir
    paths = [spool, *(os.path.join(spool, name) for name in ("tmp", *STATES, "corrupt", MAILDROP, "index.json")),
             config.data_dir, config.admin_token_file, config.tls_dir,
             os.path.join(config.tls_dir, "cert.pem"), os.path.join(config.tls_dir, "key.pem"),
             config.log_dir, os.path.join(config.log_dir, "mta.log"), os.path.join(config.log_dir, "smtp.log")]
    for path in paths:
        try:
            if os.lstat(path).st_uid == 0:
                os.lchown(path, uid, gid)
        except FileNotFoundError:
            continue


def drop_privileges(config) -> None:
    """Started as root with MTA_USER set: ports are bound, now become that user."""
    if os.geteuid() != 0 or not config.user:
        return
    try:
        account = pwd.getpwnam(config.user)
    except KeyError:
        raise StartupError(f"user: no such system user {config.user!r}", 2) from None
    give_state_to(config, account.pw_uid, account.pw_gid)
    # initgroups, not setgroups([]): membership of ssl-cert lets the user
    # re-read the Debian snakeoil key on SIGHUP, as it does under systemd.
    os.initgroups(account.pw_name, account.pw_gid)
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    log.info("dropped privileges to %s (uid %d)", config.user, account.pw_uid)


def make_local_courier(config):
    if config.lmtp:
        return LmtpCourier(config.lmtp, config.hostname)
    return MaildirCourier(config.mailbox_dir)


class Daemon:
    def __init__(self, config):
        self.config = config
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.wake = threading.Event()

    def build(self) -> None:
        config = self.config
        make_dirs(config)
        self.logs = logs.Logs(config.log_dir)
        placement = CpuPlacement()
        if config.single_cpu:
            placement.confine()   # before any thread starts: they inherit it
        self.spool = Spool(config.spool_dir, config.queue_min_free)
        queued = self.spool.recover()
        self.users = UserStore(config.data_dir, spread=placement.spread)
        aliases = load_aliases(config)
        tls = load_tls(config)
        self.admin_token = ensure_admin_token(config)
        lockout = Lockout(config.auth_lockout_failures, config.auth_lockout_window, config.auth_lockout_duration)
        self.policy = PolicyStore(config.data_dir)
        self.resolver = Resolver(config.dns_nameservers)
        self.ratelimiter = RateLimiter()
        self.greylist = Greylist(config.data_dir, config.greylist_delay)
        self.smtp = smtp_server.SmtpContext(config=config, spool=self.spool, users=self.users,
                                            aliases=aliases, lockout=lockout, policy=self.policy,
                                            resolver=self.resolver, ratelimiter=self.ratelimiter,
                                            greylist=self.greylist, psl=PslHolder(), tls=tls,
                                            transcript=self.logs.transcript)
        try:
            self.listeners = smtp_server.open_listeners(config, self.smtp)
        except OSError as error:
            raise StartupError(str(error.strerror or error)) from None
        drop_privileges(config)
        self.build_delivery()
        self.build_admin()
        self.pickup = Pickup(self.spool, lambda: self.config)
        log.info("mta started: hostname=%s domains=%s, %d messages queued, listening on %s",
                 config.hostname, ",".join(sorted(config.all_local_domains)), queued,
                 ", ".join(f"{lst.mode}={lst.server_address[0]}:{lst.port}" for lst in self.listeners))

    def build_delivery(self) -> None:
        """Scheduler + worker pool; with MTA_DELIVERY_WORKERS=0 mail just queues."""
        config = self.config
        self.scheduler = Scheduler(self.spool)
        self.pool = None
        if config.delivery_workers <= 0:
            log.info("delivery paused (delivery_workers = 0): mail stays queued")
            return
        smtp_client = SmtpClient(config.hostname, self.resolver, port=config.smtp_port,
                                 relayhost=config.relayhost, timeout=config.smtp_client_timeout)
        deliverer = Deliverer(self.smtp, self.scheduler, smtp_client, make_local_courier(config))
        self.pool = DeliveryPool(config.delivery_workers, self.scheduler, deliverer)
        self.spool.add_listener(self.scheduler.notify)

    def build_admin(self) -> None:
        """Queue metrics collector and the admin API (Waitress threads; port_admin = 0: none)."""
        paused = self.pool is None
        try:
            self.admin = start_admin(
                config=self.config, config_getter=lambda: self.config, spool=self.spool, users=self.users,
                policy=self.policy, listeners=self.listeners, smtp=self.smtp, token=self.admin_token,
                scheduler=None if paused else self.scheduler, pool=self.pool,
                abuse=DaemonAbuseState(self.ratelimiter, self.greylist, lambda: self.config))
        except OSError as error:
            raise StartupError(str(error.strerror or error)) from None

    def start(self) -> None:
        for listener in self.listeners:
            listener.start()
        if self.pool is not None:
            self.pool.start()
        self.pickup.start()

    def reload(self) -> None:
        """SIGHUP: new configuration, aliases, users, certificate; keep sessions."""
        try:
            config = config_mod.load(self.config.source or None)
            aliases = load_aliases(config)
            self.smtp.tls.reload(config)
        except (config_mod.ConfigError, StartupError, OSError, ValueError) as error:
            log.error("reload failed, keeping the running configuration: %s", error)
            return
        for key in ("listen_address", "port_relay", "port_submission", "port_submissions",
                    "spool_dir", "data_dir", "log_dir", "user", "single_cpu"):
            if getattr(config, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect after a restart", key)
        self.smtp.lockout.configure(config.auth_lockout_failures, config.auth_lockout_window,
                                    config.auth_lockout_duration)
        self.spool.min_free = config.queue_min_free
        self.greylist.delay = config.greylist_delay
        self.smtp.aliases = aliases
        self.smtp.config = config
        self.config = config
        log.info("reloaded configuration%s", f" from {config.source}" if config.source else "")

    def stop(self) -> None:
        log.info("stopping: no new connections, finishing sessions")
        if getattr(self, "admin", None) is not None:
            self.admin.close()
        smtp_server.stop(self.listeners, self.smtp)
        self.pickup.stop()
        if self.pool is not None:
            self.pool.stop()
        log.info("mta stopped")

    def run_forever(self) -> None:
        last_housekeeping = time.monotonic()
        while not self.stop_requested.is_set():
            self.wake.wait(1.0)
            self.wake.clear()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if time.monotonic() - last_housekeeping >= HOUSEKEEPING_INTERVAL:
                last_housekeeping = time.monotonic()
                self.greylist.expire()
                self.greylist.save()
        self.stop()
        self.greylist.save()


def serve(config) -> int:
    daemon = Daemon(config)

    def on_stop(signum, frame):
        daemon.stop_requested.set()
        daemon.wake.set()

    def on_reload(signum, frame):
        daemon.reload_requested.set()
        daemon.wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    daemon.build()
    daemon.start()
    daemon.run_forever()
    return 0
