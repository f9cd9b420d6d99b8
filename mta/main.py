"""The composition root: `mta serve` builds every part once and wires them.

Start-up order: configuration, directories, logging, spool recovery,
users/aliases/TLS, listeners (bound while still root), privilege drop,
then delivery and the admin API. The main thread then only waits for
signals: SIGTERM/SIGINT stop (exit 0), SIGHUP reloads configuration,
aliases, users and the TLS certificate without dropping connections.
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

from mta import aliases as aliases_mod
from mta import config as config_mod
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
    from mta import safeio
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


def drop_privileges(config) -> None:
    """Started as root with MTA_USER set: ports are bound, now become that user."""
    if os.geteuid() != 0 or not config.user:
        return
    try:
        account = pwd.getpwnam(config.user)
    except KeyError:
        raise StartupError(f"user: no such system user {config.user!r}", 2) from None
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    log.info("dropped privileges to %s (uid %d)", config.user, account.pw_uid)


def make_local_courier(config):
    from mta.delivery.local import LmtpCourier, MaildirCourier
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
        logs.configure(config.log_dir)
        self.spool = Spool(config.spool_dir, config.queue_min_free)
        queued = self.spool.recover()
        self.users = UserStore(config.data_dir)
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
                                            greylist=self.greylist, psl=PslHolder(), tls=tls)
        try:
            self.listeners = smtp_server.open_listeners(config, self.smtp)
        except OSError as error:
            raise StartupError(str(error.strerror or error)) from None
        drop_privileges(config)
        self.build_delivery()
        log.info("mta started: hostname=%s domains=%s, %d messages queued, listening on %s",
                 config.hostname, ",".join(sorted(config.all_local_domains)), queued,
                 ", ".join(f"{lst.mode}={lst.server_address[0]}:{lst.port}" for lst in self.listeners))

    def build_delivery(self) -> None:
        """Scheduler + worker pool; with MTA_DELIVERY_WORKERS=0 mail just queues."""
        from mta.delivery.scheduler import Scheduler
        config = self.config
        self.scheduler = Scheduler(self.spool)
        self.pool = None
        if config.delivery_workers <= 0:
            log.info("delivery paused (delivery_workers = 0): mail stays queued")
            return
        from mta.delivery.pool import Deliverer, DeliveryPool
        from mta.delivery.smtp_client import SmtpClient
        smtp_client = SmtpClient(config.hostname, self.resolver, port=config.smtp_port,
                                 relayhost=config.relayhost, timeout=config.smtp_client_timeout)
        deliverer = Deliverer(self.smtp, self.scheduler, smtp_client, make_local_courier(config))
        self.pool = DeliveryPool(config.delivery_workers, self.scheduler, deliverer)
        self.spool.add_listener(self.scheduler.notify)

    def start(self) -> None:
        for listener in self.listeners:
            listener.start()
        if self.pool is not None:
            self.pool.start()

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
                    "spool_dir", "data_dir", "log_dir", "user"):
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
        smtp_server.stop(self.listeners, self.smtp)
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
