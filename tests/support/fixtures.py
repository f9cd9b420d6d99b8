"""Pytest fixtures built on tests/support; tests/conftest.py imports them.

- `dns_server`: a running `DNSServer` on 127.0.0.1 with an empty zone
  (every name NXDOMAIN until the test calls `set_zone`); stopped at
  teardown, which also fails the test if the server thread raised. Its
  `address` is the value for MTA_DNS_NAMESERVERS.
"""

from __future__ import annotations

import pytest

from .dnsserver import DNSServer


@pytest.fixture
def dns_server():
    """A real DNS server on loopback (UDP and TCP, one port); see DNSServer."""
    with DNSServer() as server:
        yield server
    assert not server.errors, f"DNSServer thread raised: {server.errors}"
