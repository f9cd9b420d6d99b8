"""Serving the admin API: Waitress in its own thread inside the daemon.

Owns the admin listening sockets and the Waitress server. `start_admin`
(called once by `mta.main.Daemon.build`) registers the queue metrics
collector, binds every MTA_ADMIN_ADDRESS on MTA_PORT_ADMIN (0 disables the
API) and starts serving; a bind error raises OSError with one line naming
port_admin, which stops start-up. `AdminServer.close` stops accepting,
lets Waitress's worker threads finish their requests, then closes.

Threading: one thread runs Waitress's event loop (accept, read, write);
`THREADS` worker threads run the Falcon app. The loop is stopped from its
own thread through Waitress's trigger, so no socket is closed under it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading

import waitress
from waitress import wasyncore
from waitress.server import BaseWSGIServer

from mta import metrics
from mta.admin.app import create_app
from mta.admin.deps import AdminDeps, NoAbuseState
from mta.admin.service import QueueSnapshot

log = logging.getLogger("mta.admin")

THREADS = 4
MAX_WAITRESS_BODY = 1024 * 1024   # beyond this Waitress itself answers 413 (plain text)


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "0.0.0.0,::" binds both families side by side.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"port_admin: cannot listen on {address} port {port}: "
                                   f"{error.strerror or error}") from None
    return sock


class AdminServer:
    """The bound admin API; `start()` serves in a daemon thread, `close()` stops."""

    def __init__(self, app, addresses, port: int, threads: int = THREADS):
        sockets = []
        try:
            for address in addresses:
                sockets.append(_bind(address, port))
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        self._map: dict = {}
        self._server = waitress.create_server(
            app, map=self._map, sockets=sockets, threads=threads, ident="mta",
            asyncore_use_poll=True,               # select() fails past fd 1023; SMTP may use many
            max_request_body_size=MAX_WAITRESS_BODY, channel_timeout=60, connection_limit=100)
        self._trigger = next(obj.trigger for obj in self._map.values() if isinstance(obj, BaseWSGIServer))
        self._dispatcher = self._server.task_dispatcher
        self.addresses = [sock.getsockname()[:2] for sock in sockets]
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="admin-api", daemon=True)
        self._thread.start()
        log.info("admin API listening on %s",
                 ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.addresses))

    def _run(self) -> None:
        try:
            self._server.run()
        except Exception:
            if not self._closing:
                log.exception("admin API server stopped unexpectedly")

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, let running requests finish, then close connections.

        Waitress's worker threads wake the loop by writing to the trigger
        pipe after every request; closing that pipe while one may still run
        would make the write fail (EBADF) or, once the fd number is reused,
        land in some other file. So the workers are stopped first and the
        trigger is only taken off the map (its two fds die with the process).
        """
        if self._closing:
            return
        self._closing = True
        self._in_loop(self._close_listeners)
        self._dispatcher.shutdown(timeout=timeout)
        self._in_loop(self._close_connections)
        if self._thread is not None:
            self._thread.join(timeout)

    def _in_loop(self, thunk) -> None:
        """Run `thunk` in the loop's own thread, so no socket is closed under it."""
        if self._thread is not None and self._thread.is_alive():
            self._trigger.pull_trigger(thunk)
        else:
            thunk()

    def _close_listeners(self) -> None:
        for obj in list(self._map.values()):
            if isinstance(obj, BaseWSGIServer):
                wasyncore.dispatcher.close(obj)   # BaseWSGIServer.close would close the trigger too

    def _close_connections(self) -> None:
        for obj in list(self._map.values()):
            if obj is self._trigger:
                obj.del_channel()                 # the loop ends once the map is empty
            else:
                try:
                    obj.close()
                except OSError:
                    pass


def start_admin(*, config, spool, users, policy, listeners=(), smtp=None, scheduler=None, pool=None,
                token: str, config_getter=None, abuse=None) -> AdminServer | None:
    """Register the queue collector, then bind and start the API (None when port_admin = 0).

    `scheduler`/`pool` are None when delivery is paused (delivery_workers = 0);
    `config_getter` returns the current Config (it changes on SIGHUP).
    """
    snapshot = QueueSnapshot(spool)
    metrics.register_queue_collector(metrics.QueueCollector(snapshot.get))
    if not config.port_admin:
        log.info("admin API disabled (port_admin = 0)")
        return None
    deps = AdminDeps(spool=spool, users=users, policy=policy, config=config_getter or (lambda: config),
                     token=token, listeners=tuple(listeners), smtp=smtp, scheduler=scheduler, pool=pool,
                     snapshot=snapshot, abuse=abuse or NoAbuseState())
    server = AdminServer(create_app(deps), config.admin_address, config.port_admin)
    server.start()
    return server
