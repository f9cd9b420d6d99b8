"""Helpers shared by the hardening tests in tests/fuzz (issue 9).

- `fuzz_settings(n)`: hypothesis settings for a bounded run: `n` examples,
  no deadline (the CI machine is slow and shared), no example database (no
  `.hypothesis/` directory left in the work tree).
- `client_hello()`: the first flight of a real TLS handshake (a ClientHello)
  made with an in-memory SSLObject, to send truncated copies of it.
- `tls_client_context()`: a client context that accepts the daemon's
  self-signed certificate.
- `FakeSMTPServer`: a tiny threaded TCP server on 127.0.0.1 whose behaviour
  is a Python function per connection (silent, closes mid-DATA, garbage,
  broken STARTTLS ...), to stand in for misbehaving remote MTAs.
- `Sink`: Postfix's smtp-sink dumping every message to a directory.
- `wait_for(predicate, timeout)`.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

from hypothesis import HealthCheck, settings


def fuzz_settings(max_examples: int, **extra) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
                    **extra)


def tls_client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def client_hello() -> bytes:
    """The bytes a TLS client sends first (a ClientHello record)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_client_context().wrap_bio(incoming, outgoing, server_hostname="mx.test.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class FakeSMTPServer:
    """A listening socket on `host` (127.0.0.1); `behaviour(conn)` runs per connection.

    `connections` counts accepted connections; `transcripts` keeps what each
    connection received (bytes), for the tests' assertions.
    """

    def __init__(self, behaviour, port: int = 0, host: str = "127.0.0.1"):
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.transcripts: list[bytearray] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            transcript = bytearray()
            self.transcripts.append(transcript)
            self._open.append(conn)
            thread = threading.Thread(target=self._run, args=(conn, transcript), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket, transcript: bytearray) -> None:
        conn.settimeout(30)
        try:
            self.behaviour(FakeConn(conn, transcript, self._stop))
        except (OSError, ssl.SSLError, EOFError):
            pass
        except Exception as error:  # a bug in the fake must show up in the test
            self.errors.append(repr(error))
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        for conn in self._open:
            try:
                conn.close()
            except OSError:
                pass
        self._thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class FakeConn:
    """Line-oriented helpers over one accepted socket."""

    def __init__(self, sock: socket.socket, transcript: bytearray, stop: threading.Event):
        self.sock = sock
        self.transcript = transcript
        self.stop = stop
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.transcript.extend(chunk)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def read_data(self) -> bytes:
        """DATA content up to CRLF.CRLF."""
        lines = []
        while True:
            line = self.readline()
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line)

    def wait_closed(self, timeout: float = 60) -> None:
        """Say nothing; return when the peer closes (or the server stops)."""
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                if not self.sock.recv(65536):
                    return
            except socket.timeout:
                continue


def smtp_dialog(conn: FakeConn, *, ehlo_extra: tuple[str, ...] = (), on_data=None, store=None) -> None:
    """A well-behaved minimal SMTP server on `conn`; `on_data(conn)` may take over at DATA."""
    conn.send(b"220 fake.test ESMTP\r\n")
    while True:
        line = conn.readline()
        verb = line[:4].upper()
        if verb == b"EHLO":
            extra = "".join(f"250-{item}\r\n" for item in ehlo_extra)
            conn.send(f"250-fake.test\r\n{extra}250 8BITMIME\r\n".encode())
        elif verb == b"HELO":
            conn.send(b"250 fake.test\r\n")
        elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            conn.send(b"250 2.0.0 ok\r\n")
        elif verb == b"DATA":
            if on_data is not None:
                on_data(conn)
                return
            conn.send(b"354 go ahead\r\n")
            data = conn.read_data()
            if store is not None:
                store.append(data)
            conn.send(b"250 2.0.0 stored\r\n")
        elif verb == b"QUIT":
            conn.send(b"221 2.0.0 bye\r\n")
            return
        else:
            conn.send(b"502 5.5.2 what?\r\n")


from conftest import wait_for  # noqa: E402,F401  (re-exported for the fuzz tests)
from support.sink import Sink  # noqa: E402,F401  (re-exported for the fuzz tests)


