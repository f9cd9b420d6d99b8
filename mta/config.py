"""Configuration: one frozen `Config`, built from defaults < TOML file < MTA_* env.

Owns the list of every configuration key, its type, its built-in development
default and its validation. Nothing else reads the environment or the config
file. A bad value raises `ConfigError` naming the key; callers turn that into
one line on stderr and exit status 2 (INTERFACE.md, "Configuration").

The built-in defaults are the embedded development default: loopback only,
high ports, all state under ./var. The Debian package ships production values
in /etc/mta/mta.toml.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from mta.address import client_ip

DEFAULT_CONFIG_FILE = "/etc/mta/mta.toml"
ENV_PREFIX = "MTA_"
SECRET_KEYS = frozenset({"admin_token"})


class ConfigError(Exception):
    """A configuration value is malformed; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


# --- value parsers: accept the TOML-native type or a string from the env ---

def _parse_str(value: Any) -> str:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value).strip()
    raise ValueError(f"expected a string, got {value!r}")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    if number < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return number


def _parse_port(value: Any) -> int:
    port = _parse_int(value)
    if port > 65535:
        raise ValueError(f"port out of range: {value!r}")
    return port


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ValueError(f"expected true/false, yes/no or 1/0, got {value!r}")


def _parse_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"expected a list of strings, got {value!r}")
            items.extend(item.split(","))
    else:
        raise ValueError(f"expected a comma list or an array of strings, got {value!r}")
    return tuple(item.strip() for item in items if item.strip())


def _parse_ip_list(value: Any) -> tuple[str, ...]:
    addresses = _parse_list(value)
    for address in addresses:
        ipaddress.ip_address(address)  # ValueError names the bad one
    return addresses


def _parse_networks(value: Any) -> tuple[str, ...]:
    networks = _parse_list(value)
    for network in networks:
        ipaddress.ip_network(network, strict=False)
    return networks


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port`, `v6` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad host[:port] {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    port = _parse_port(port_text) if port_text else default_port
    if not host:
        raise ValueError(f"missing host in {text!r}")
    return host, port


def _parse_nameservers(value: Any) -> tuple[str, ...]:
    servers = _parse_list(value)
    for server in servers:
        host, _ = split_host_port(server, 53)
        ipaddress.ip_address(host)
    return servers


def _parse_relayhost(value: Any) -> str:
    text = _parse_str(value)
    if text:
        split_host_port(text, 25)
    return text


def _parse_domain(value: Any) -> str:
    text = _parse_str(value).lower().rstrip(".")
    if text and not all(label and len(label) <= 63 for label in text.split(".")):
        raise ValueError(f"not a domain name: {value!r}")
    return text


def _parse_domains(value: Any) -> tuple[str, ...]:
    return tuple(_parse_domain(item) for item in _parse_list(value))


def _parse_path(value: Any) -> str:
    text = _parse_str(value)
    return os.path.abspath(text) if text else ""


def _parse_existing_file(value: Any) -> str:
    path = _parse_path(value)
    if path and not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    return path


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    doc: str


def _fqdn() -> str:
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    return name.lower().rstrip(".")


KEYS: tuple[Key, ...] = (
    Key("hostname", _parse_domain, None, "name in banner, EHLO and Received (default: system FQDN)"),
    Key("domain", _parse_domain, None, "primary local domain (default: the hostname's domain)"),
    Key("local_domains", _parse_domains, (), "more local domains"),
    Key("listen_address", _parse_ip_list, ("127.0.0.1",), "bind addresses"),
    Key("port_relay", _parse_port, 2525, "inbound MX port (0 disables)"),
    Key("port_submission", _parse_port, 5870, "submission port, STARTTLS + AUTH (0 disables)"),
    Key("port_submissions", _parse_port, 4650, "implicit-TLS submission port (0 disables)"),
    Key("port_admin", _parse_port, 8080, "admin API port (0 disables)"),
    Key("admin_address", _parse_ip_list, ("127.0.0.1",), "admin API bind address"),
    Key("admin_token", _parse_str, "", "admin API bearer token (default: generated)"),
    Key("admin_protect_metrics", _parse_bool, False, "require the admin token on /api/metrics too"),
    Key("single_cpu", _parse_bool, True, "run the daemon's threads on one CPU (fewer GIL hand-offs)"),
    Key("max_message_size", _parse_int, 35_000_000, "bytes, advertised in SIZE"),
    Key("max_recipients", _parse_int, 100, "recipients per transaction"),
    Key("tls_cert", _parse_existing_file, "", "PEM certificate (default: self-signed, generated)"),
    Key("tls_key", _parse_existing_file, "", "PEM private key"),
    Key("tls_required_submission", _parse_bool, True, "AUTH only after TLS on submission"),
    Key("auth_required", _parse_bool, True, "submission needs AUTH"),
    Key("sender_login_check", _parse_bool, True, "authenticated users may only send as their own addresses"),
    Key("mynetworks", _parse_networks, ("127.0.0.0/8", "::1/128"), "clients allowed to relay without AUTH"),
    Key("rate_limit_ip", _parse_int, 100, "messages/hour per client IP"),
    Key("rate_limit_user", _parse_int, 200, "messages/hour per authenticated user"),
    Key("rate_limit_domain", _parse_int, 1000, "messages/hour per sender domain"),
    Key("max_queue_age", _parse_int, 604_800, "seconds before undeliverable mail bounces"),
    Key("delay_warning_time", _parse_int, 14_400, "seconds before a delay DSN (0 disables)"),
    Key("backoff_min", _parse_int, 300, "seconds before the first retry (Postfix minimal_backoff_time)"),
    Key("backoff_max", _parse_int, 4000, "longest wait between retries (Postfix maximal_backoff_time)"),
    Key("smtp_client_timeout", _parse_int, 300, "outbound SMTP reply timeout, RFC 5321 4.5.3.2"),
    Key("delivery_workers", _parse_int, 10, "concurrent outbound deliveries; 0 pauses delivery"),
    Key("relayhost", _parse_relayhost, "", "smarthost host[:port]; [host] skips MX lookup"),
    Key("dns_nameservers", _parse_nameservers, (), "resolvers ip[:port] (default: resolv.conf)"),
    Key("smtp_port", _parse_port, 25, "destination port for outbound SMTP"),
    Key("spool_dir", _parse_path, "var/spool", "the queue"),
    Key("data_dir", _parse_path, "var", "users, policy, keys"),
    Key("log_dir", _parse_path, "var/log", "mta.log and smtp.log"),
    Key("queue_min_free", _parse_int, 52_500_000, "free bytes the spool disk keeps; below, 452 4.3.1"),
    Key("spf_enabled", _parse_bool, True, "check SPF"),
    Key("dkim_enabled", _parse_bool, True, "verify and sign DKIM"),
    Key("dmarc_enabled", _parse_bool, True, "check DMARC"),
    Key("rbl_enabled", _parse_bool, False, "check DNSBLs"),
    Key("greylist_enabled", _parse_bool, False, "greylisting"),
    Key("rbl_zones", _parse_domains, (), "DNSBL zones"),
    Key("greylist_delay", _parse_int, 300, "seconds a greylisted triplet must wait before a retry passes"),
    Key("spf_reject_fail", _parse_bool, True, "reject SPF fail with 550 5.7.23"),
    Key("dmarc_enforce", _parse_bool, True, "reject DMARC p=reject failures"),
    Key("smtp_timeout", _parse_int, 300, "idle seconds before 421"),
    Key("max_connections", _parse_int, 1000, "concurrent SMTP sessions"),
    Key("max_connections_per_ip", _parse_int, 20, "concurrent SMTP sessions per client IP"),
    Key("auth_lockout_failures", _parse_int, 5, "AUTH failures before lockout"),
    Key("auth_lockout_window", _parse_int, 600, "seconds in which failures count"),
    Key("auth_lockout_duration", _parse_int, 900, "seconds a lockout lasts"),
    Key("user", _parse_str, "", "user to drop to when started as root"),
    Key("mailbox_dir", _parse_path, "var/mail", "Maildirs: DIR/<domain>/<user>/"),
    Key("lmtp", _parse_str, "", "LMTP host:port or unix socket for local delivery"),
    Key("aliases", _parse_path, "var/aliases", "aliases file"),
)
KEY_NAMES = frozenset(key.name for key in KEYS)


@dataclass(frozen=True)
class Config:
    hostname: str
    domain: str
    local_domains: tuple[str, ...]
    listen_address: tuple[str, ...]
    port_relay: int
    port_submission: int
    port_submissions: int
    port_admin: int
    admin_address: tuple[str, ...]
    admin_token: str
    admin_protect_metrics: bool
    single_cpu: bool
    max_message_size: int
    max_recipients: int
    tls_cert: str
    tls_key: str
    tls_required_submission: bool
    auth_required: bool
    sender_login_check: bool
    mynetworks: tuple[str, ...]
    rate_limit_ip: int
    rate_limit_user: int
    rate_limit_domain: int
    max_queue_age: int
    delay_warning_time: int
    backoff_min: int
    backoff_max: int
    smtp_client_timeout: int
    delivery_workers: int
    relayhost: str
    dns_nameservers: tuple[str, ...]
    smtp_port: int
    spool_dir: str
    data_dir: str
    log_dir: str
    queue_min_free: int
    spf_enabled: bool
    dkim_enabled: bool
    dmarc_enabled: bool
    rbl_enabled: bool
    greylist_enabled: bool
    rbl_zones: tuple[str, ...]
    greylist_delay: int
    spf_reject_fail: bool
    dmarc_enforce: bool
    smtp_timeout: int
    max_connections: int
    max_connections_per_ip: int
    auth_lockout_failures: int
    auth_lockout_window: int
    auth_lockout_duration: int
    user: str
    mailbox_dir: str
    lmtp: str
    aliases: str
    source: str = ""  # the config file read, if any
    networks: tuple = field(default=(), compare=False)  # parsed mynetworks

    @property
    def all_local_domains(self) -> frozenset[str]:
        return frozenset((self.domain, *self.local_domains))

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.all_local_domains

    def in_mynetworks(self, ip: str) -> bool:
        try:
            address = client_ip(ip)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.data_dir, "tls")

    @property
    def admin_token_file(self) -> str:
        return os.path.join(self.data_dir, "admin.token")

    def shown(self) -> dict[str, Any]:
        """The effective values, secrets masked (`mta config show`)."""
        values = {}
        for key in KEYS:
            value = getattr(self, key.name)
            if key.name in SECRET_KEYS and value:
                value = "********"
            values[key.name] = list(value) if isinstance(value, tuple) else value
        return values


def find_config_file(explicit: str | None, environ: dict[str, str]) -> str | None:
    """--config wins over MTA_CONFIG, which wins over /etc/mta/mta.toml if present."""
    if explicit:
        return explicit
    if environ.get("MTA_CONFIG"):
        return environ["MTA_CONFIG"]
    return DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Sections are allowed but not required: [smtp] port_relay = 25 is port_relay."""
    flat: dict[str, tuple[str, Any]] = {}
    for name, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[name.lower()] = (f"{prefix}{name}", value)
    return flat


def read_file(path: str) -> dict[str, tuple[str, Any]]:
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config", f"no such file: {path}") from None
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("config", f"{path}: not valid TOML: {error}") from None
    return _flatten(table)


def load(path: str | None = None, environ: dict[str, str] | None = None, *,
         check_files: bool = True) -> Config:
    """Build the effective Config; raises ConfigError naming the bad key.

    `check_files=False` skips the existence checks of files the caller will
    not open (sendmail run by any user cannot see the TLS key).
    """
    environ = dict(os.environ if environ is None else environ)
    config_file = find_config_file(path, environ)
    raw: dict[str, tuple[str, Any]] = {}
    if config_file:
        for name, (label, value) in read_file(config_file).items():
            if name not in KEY_NAMES:
                raise ConfigError(label, f"unknown key in {config_file}")
            raw[name] = (label, value)
    for key in KEYS:
        env_name = ENV_PREFIX + key.name.upper()
        if env_name in environ:
            raw[key.name] = (env_name, environ[env_name])

    values: dict[str, Any] = {}
    for key in KEYS:
        if key.name in raw:
            label, value = raw[key.name]
            parse = _parse_path if key.parse is _parse_existing_file and not check_files else key.parse
            try:
                values[key.name] = parse(value)
            except ValueError as error:
                raise ConfigError(label, str(error)) from None
        elif key.default is not None:
            values[key.name] = key.parse(key.default) if isinstance(key.default, str) else key.default

    if not values.get("hostname"):
        values["hostname"] = _fqdn()
    if not values.get("domain"):
        _, dot, rest = values["hostname"].partition(".")
        values["domain"] = rest if dot and rest else "localdomain"
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        missing = "tls_key" if values["tls_cert"] else "tls_cert"
        raise ConfigError(missing, "tls_cert and tls_key must be set together")
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in values["mynetworks"])
    return Config(**values, source=config_file or "", networks=networks)


def replace(config: Config, **changes: Any) -> Config:
    """A copy with some values changed (tests, SIGHUP reload keeps the wiring)."""
    return dataclasses.replace(config, **changes)
