"""Test helpers shared by tests/unit and tests/e2e: servers on loopback, fixtures."""
