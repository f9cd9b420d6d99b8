"""Postfix's smtp-sink as a remote SMTP server for tests, dumping each
message into its own file (`-d`), so tests can see exactly what arrived."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class Sink:
    """smtp-sink on 127.0.0.1:port dumping each message into its own file in `dir`."""

    def __init__(self, port: int, *options: str):
        self.port = port
        # smtp-sink drops to nobody when run as root: the dump directory must be world-usable.
        self.dir = Path(tempfile.mkdtemp(prefix=f"mta-fuzz-sink-{port}-"))
        os.chmod(self.dir, 0o777)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(["smtp-sink", *user, *options, "-d", f"{self.dir}/msg.",
                                      f"127.0.0.1:{port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"smtp-sink did not start: {self.proc.stderr.read()}")

    def messages(self) -> list[bytes]:
        out = []
        for path in sorted(self.dir.iterdir()):
            try:
                out.append(path.read_bytes())
            except OSError:
                continue
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def received(self, text: bytes):
        """A predicate for polling: the dumped message containing `text`
        (dumps are written while the message arrives, so match on content)."""
        return lambda: next((m for m in self.messages() if text in m), None)
