"""The files the Debian package installs (packaging/, debian/, setup.py).

The production mta.toml must pass `mta config check` (with the state
directories moved to temporary ones) and carry the production column of
INTERFACE.md; the systemd unit keeps its hardening; setup.py installs every
subpackage. The package itself is built and tested by `make deb-test`
(debian/tests, autopkgtest).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGING = ROOT / "packaging"
SNAKEOIL = ("/etc/ssl/certs/ssl-cert-snakeoil.pem", "/etc/ssl/private/ssl-cert-snakeoil.key")

PRODUCTION = {  # INTERFACE.md, "Configuration", production column
    "listen_address": ["0.0.0.0", "::"], "port_relay": 25, "port_submission": 587,
    "port_submissions": 465, "port_admin": 8080, "admin_address": ["127.0.0.1"],
    "max_message_size": 35000000, "max_recipients": 100,
    "tls_cert": SNAKEOIL[0], "tls_key": SNAKEOIL[1],
    "tls_required_submission": True, "auth_required": True,
    "mynetworks": ["127.0.0.0/8", "::1/128"], "rate_limit_ip": 100, "rate_limit_user": 200,
    "rate_limit_domain": 1000, "max_queue_age": 604800, "delivery_workers": 10,
    "relayhost": "", "dns_nameservers": [], "smtp_port": 25,
    "spool_dir": "/var/spool/mta", "data_dir": "/var/lib/mta", "log_dir": "/var/log/mta",
    "spf_enabled": True, "dkim_enabled": True, "dmarc_enabled": True, "rbl_enabled": False,
    "greylist_enabled": False, "rbl_zones": [], "smtp_timeout": 300, "max_connections": 1000,
    "max_connections_per_ip": 20, "auth_lockout_failures": 5, "auth_lockout_window": 600,
    "auth_lockout_duration": 900, "user": "mta", "spf_reject_fail": True, "dmarc_enforce": True,
    "mailbox_dir": "/var/mail/vhosts", "lmtp": "", "aliases": "/etc/mta/aliases",
}


def test_production_config_has_the_production_values():
    values = tomllib.loads((PACKAGING / "mta.toml").read_text())
    for key, expected in PRODUCTION.items():
        assert values.get(key) == expected, key
    assert values["admin_token"] == ""            # the token is in data_dir/admin.token
    assert "hostname" not in values and "domain" not in values   # system FQDN by default


def test_every_key_has_a_comment_above_it():
    lines = (PACKAGING / "mta.toml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"[a-z_]+ = ", line):
            assert lines[number - 1].startswith("#"), f"no comment above {line!r}"


def check_config(tmp_path, extra_env: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTA_")}
    env.update({"PYTHONPATH": str(ROOT), "MTA_SPOOL_DIR": str(tmp_path / "spool"),
                "MTA_DATA_DIR": str(tmp_path / "lib"), "MTA_LOG_DIR": str(tmp_path / "log"),
                "MTA_MAILBOX_DIR": str(tmp_path / "mail"), "MTA_ALIASES": str(PACKAGING / "aliases"),
                # no `mta` system user here: do not switch to it
                "MTA_USER": ""})
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "mta", "config", "check", "--config", str(PACKAGING / "mta.toml")],
                          env=env, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))


@pytest.mark.skipif(not all(os.path.isfile(p) for p in SNAKEOIL),
                    reason="no snakeoil certificate (Debian package ssl-cert)")
def test_production_config_passes_config_check(tmp_path):
    p = check_config(tmp_path, {})
    assert p.returncode == 0, p.stderr
    assert "configuration ok" in p.stdout


def test_production_config_passes_with_another_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    p = check_config(tmp_path, {"MTA_TLS_CERT": str(cert), "MTA_TLS_KEY": str(key)})
    assert p.returncode == 0, p.stderr


def test_shipped_aliases_parse():
    from mta import aliases
    aliases.load(str(PACKAGING / "aliases"), frozenset({"example.com"}))


def test_systemd_unit_hardening():
    unit = (PACKAGING / "mta.service").read_text()
    for line in ("Type=simple", "ExecStart=/usr/bin/mta serve --config /etc/mta/mta.toml",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=mta", "Group=mta",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
                 "Restart=on-failure", "WantedBy=multi-user.target"):
        assert f"\n{line}\n" in unit, line
    rw = re.search(r"^ReadWritePaths=(.*)$", unit, re.M).group(1).split()
    assert {"/var/spool/mta", "/var/lib/mta", "/var/log/mta"} <= set(rw)
    assert "/var/mail/vhosts" in {p.lstrip("-") for p in rw}


def test_logrotate():
    text = (PACKAGING / "logrotate").read_text()
    assert "/var/log/mta/*.log {" in text
    for word in ("weekly", "rotate 12", "compress", "delaycompress", "missingok", "notifempty",
                 "create 0640 mta adm"):
        assert re.search(rf"^\s+{word}$", text, re.M), word
    assert "postrotate" not in text                       # WatchedFileHandler reopens by itself


def test_setup_installs_every_subpackage():
    from setuptools import find_namespace_packages
    found = set(find_namespace_packages(where=str(ROOT), include=["mta", "mta.*"], exclude=["*.__pycache__"]))
    on_disk = {str(d.relative_to(ROOT)).replace("/", ".") for d in (ROOT / "mta").rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))}
    assert on_disk | {"mta"} <= found
    assert "find_namespace_packages" in (ROOT / "setup.py").read_text()


def test_debian_control():
    control = (ROOT / "debian" / "control").read_text()
    assert "debhelper-compat (= 13)" in control and "dh-python" in control
    for field in ("Provides: mail-transport-agent", "Conflicts: mail-transport-agent",
                  "Replaces: mail-transport-agent", "Architecture: all"):
        assert field in control
    for dep in ("python3-dnspython", "python3-cryptography", "python3-falcon", "python3-waitress",
                "python3-prometheus-client", "python3-bcrypt", "python3-dkim", "python3-spf",
                "ssl-cert", "adduser"):
        assert re.search(rf"^\s+{re.escape(dep)},?$", control, re.M), dep
    links = (ROOT / "debian" / "mta.links").read_text()
    for target in ("usr/sbin/sendmail", "usr/lib/sendmail", "usr/bin/mailq", "usr/sbin/newaliases"):
        assert f"usr/bin/mta {target}\n" in links
