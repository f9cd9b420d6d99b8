"""SMTP listeners: `socketserver.ThreadingTCPServer`, one thread per session.

Three listener modes share one session implementation (`mta.smtp.session`):

    relay        port 25: mail for local domains from anyone, relaying only
                 for MTA_MYNETWORKS; STARTTLS offered, AUTH never
    submission   port 587 (RFC 6409): STARTTLS, then AUTH, then mail
    submissions  port 465 (RFC 8314): TLS from the first byte, then AUTH

Threading model: the listener's own thread only accepts; every connection
gets a thread running a `Session` (threads are reused: `SessionThreads`).
Shared objects reach sessions through `SmtpContext` (wired once in
`mta.main`). Connection caps are checked by `ConnectionTracker` before the
greeting (421 4.7.0). On shutdown the listeners stop accepting, idle
sessions are woken and told 421, and sessions still inside a transaction
get a grace period before being cut.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import _thread
import threading
import time
from dataclasses import dataclass, field

from mta import replies
from mta.replies import Reply
from mta.smtp.session import Session, set_kernel_timeout

log = logging.getLogger("mta.smtp")

LISTEN_BACKLOG = 4096  # smtp-source opens connections in bursts; don't drop SYNs


class ConnectionTracker:
    """Counts sessions overall and per client IP (MTA_MAX_CONNECTIONS*)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def open(self, ip: str, config) -> Reply | None:
        with self._lock:
            if config.max_connections and self.total >= config.max_connections:
                return replies.TOO_MANY_CONNECTIONS
            count = self.per_ip.get(ip, 0)
            # Applies to every client, mynetworks included (INTERFACE.md); 0 = no cap.
            if config.max_connections_per_ip and count >= config.max_connections_per_ip:
                return replies.TOO_MANY_CONNECTIONS_FROM_IP
            self.total += 1
            self.per_ip[ip] = count + 1
        return None

    def close(self, ip: str) -> None:
        with self._lock:
            self.total -= 1
            remaining = self.per_ip.get(ip, 1) - 1
            if remaining > 0:
                self.per_ip[ip] = remaining
            else:
                self.per_ip.pop(ip, None)


class SessionThreads:
    """Threads that run sessions, parked for reuse when a session ends.

    A new thread per connection costs a dozen system calls (stack mmap,
    clone, signal masks, exit), each one a GIL hand-off, and clients like
    Postfix and smtp-source open one connection per message. Up to `keep`
    finished threads wait for the next connection instead; beyond that they
    exit, so a burst of 2,000 sessions does not leave 2,000 idle threads.
    """

    def __init__(self, keep: int = 64):
        self._keep = keep
        self._parked: list[tuple] = []   # (wake lock, hand-over slot) per idle thread
        self._lock = threading.Lock()

    def start(self, target, args: tuple) -> None:
        with self._lock:
            parked = self._parked.pop() if self._parked else None
        if parked is None:
            _thread.start_new_thread(self._run, (target, args))
        else:
            wake, slot = parked
            slot.append((target, args))
            wake.release()

    def _run(self, target, args: tuple) -> None:
        wake = _thread.allocate_lock()
        wake.acquire()
        slot: list = []
        while True:
            target(*args)
            target = args = None        # the finished session's socket and objects
            with self._lock:
                if len(self._parked) >= self._keep:
                    return
                self._parked.append((wake, slot))
            wake.acquire()
            target, args = slot.pop()


@dataclass
class SmtpContext:
    """What sessions share. `config` and `aliases` are swapped on SIGHUP."""

    config: object
    spool: object
    users: object
    aliases: object
    lockout: object
    policy: object
    resolver: object = None
    ratelimiter: object = None
    greylist: object = None
    psl: object = None
    tls: object = None
    transcript: object = None        # mta.logs.Transcript (smtp.log)
    tracker: ConnectionTracker = field(default_factory=ConnectionTracker)
    threads: SessionThreads = field(default_factory=SessionThreads)
    stopping: threading.Event = field(default_factory=threading.Event)
    sessions: set = field(default_factory=set)
    sessions_lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        session = Session(self.request, self.client_address, self.server)
        context = self.server.context
        with context.sessions_lock:
            context.sessions.add(session)
        try:
            session.run()
        finally:
            with context.sessions_lock:
                context.sessions.discard(session)


class Listener(socketserver.ThreadingTCPServer):
    allow_reuse_address = True       # restart right after a crash binds at once
    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: str, port: int, mode: str, context: SmtpContext):
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        self.mode = mode
        self.context = context
        super().__init__((address, port), _Handler, bind_and_activate=False)
        try:
            if self.address_family == socket.AF_INET6:
                # "0.0.0.0,::" binds both families side by side.
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.server_bind()
            self.server_activate()
            # Inherited by every accepted socket: two system calls fewer per
            # session (Session.run re-applies it only after a SIGHUP change).
            self.kernel_timeout = context.config.smtp_timeout or 0
            set_kernel_timeout(self.socket, self.kernel_timeout)
            self._family, self._type = int(self.socket.family), int(self.socket.type)
        except BaseException:
            self.server_close()
            raise
        self.thread: threading.Thread | None = None

    def process_request(self, request, client_address) -> None:
        """Hand the connection to a session thread without waiting for it.

        threading.Thread.start() blocks the accept loop until the new thread
        has run, which costs up to a GIL switch interval per connection
        under load (smtp-source opens one connection per message). The
        session registry in SmtpContext, not threading, tracks sessions.
        """
        self.context.threads.start(self.process_request_thread, (request, client_address))

    def get_request(self):
        """accept(2) without socket.accept's per-call enum conversions of the
        listener's family and type (a quarter of the accept loop's CPU
        under yappi)."""
        fd, address = self.socket._accept()
        return socket.socket(self._family, self._type, 0, fileno=fd), address

    def shutdown_request(self, request) -> None:
        # The session closed its socket already (after a TLS close_notify
        # where there was one); socketserver's shutdown(2) would only fail.
        request.close()

    def handle_error(self, request, client_address) -> None:
        # A session bug must cost one log line, never a traceback to the client.
        log.exception("internal error in session with %s", client_address[0])

    def start(self) -> None:
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                       name=f"listener-{self.mode}-{self.server_address[1]}", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]


def open_listeners(config, context: SmtpContext) -> list[Listener]:
    """Bind every configured listener; raises OSError naming the address."""
    listeners = []
    ports = (("relay", config.port_relay), ("submission", config.port_submission),
             ("submissions", config.port_submissions))
    try:
        for mode, port in ports:
            if not port:
                continue
            for address in config.listen_address:
                try:
                    listeners.append(Listener(address, port, mode, context))
                except OSError as error:
                    raise OSError(error.errno, f"cannot listen on {address} port {port} ({mode}): {error.strerror}") from None
    except BaseException:
        for listener in listeners:
            listener.server_close()
        raise
    return listeners


def stop(listeners: list[Listener], context: SmtpContext, grace: float = 10.0) -> None:
    """Stop accepting, tell idle sessions 421, give busy ones `grace` seconds."""
    context.stopping.set()
    # shutdown() waits for serve_forever's next poll: do all listeners at once.
    stoppers = [threading.Thread(target=listener.shutdown) for listener in listeners]
    for stopper in stoppers:
        stopper.start()
    for stopper, listener in zip(stoppers, listeners):
        stopper.join()
        listener.server_close()
    deadline = time.monotonic() + grace
    while True:
        with context.sessions_lock:
            sessions = list(context.sessions)
        if not sessions:
            return
        for session in sessions:
            if session.idle or time.monotonic() >= deadline:
                session.interrupt()
        if time.monotonic() >= deadline + 2:
            log.warning("%d sessions did not end in time", len(sessions))
            return
        time.sleep(0.05)
