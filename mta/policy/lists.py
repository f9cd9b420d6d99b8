"""Black and white lists: `MTA_DATA_DIR/policy.json`, by IP/CIDR, sender, domain.

Owns the policy file (versioned JSON, written atomically under a file lock
so the daemon, the admin API and `mta` can all change it) and the matching:
IPv4 and IPv6 addresses and networks (an IPv4-mapped IPv6 client matches
IPv4 entries), full sender addresses (case-insensitive) and sender domains
(a domain entry also matches its subdomains, like Postfix's
parent_domain_matches_subdomains). A whitelisted client or sender wins over
a blacklist entry. The file is re-read when its mtime changes, so changes
take effect on the next SMTP command.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading

from mta import safeio
from mta.address import AddressError, check_domain, client_ip, domain_key, parse_mailbox

log = logging.getLogger("mta.policy")

POLICY_FILE = "policy.json"
VERSION = 1
LISTS = ("blacklist", "whitelist")
FIELDS = ("ip", "sender", "domain")
BLACK, WHITE = "blacklist", "whitelist"


class PolicyError(ValueError):
    """A malformed list entry."""


class EntryExists(PolicyError):
    pass


class NoSuchEntry(PolicyError):
    pass


def normalize(field: str, value: str) -> str:
    if field not in FIELDS:
        raise PolicyError(f"unknown list type {field!r} (ip, sender or domain)")
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{field} must be a non-empty string")
    value = value.strip()
    if field == "ip":
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise PolicyError(f"not an IP address or CIDR network: {value!r}") from None
        if network.version == 6 and network.network_address.ipv4_mapped and network.prefixlen >= 96:
            network = ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
        single = network.num_addresses == 1
        return str(network.network_address) if single else str(network)
    if field == "sender":
        try:
            return parse_mailbox(value.strip("<>")).key
        except AddressError as error:
            raise PolicyError(f"not an address: {value!r} ({error})") from None
    try:
        check_domain(value.lower().rstrip("."), utf8=True)
    except AddressError as error:
        raise PolicyError(f"not a domain: {value!r} ({error})") from None
    return domain_key(value)


class PolicyStore:
    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, POLICY_FILE)
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._data = self._empty()
        self._networks: dict[str, list] = {}

    @staticmethod
    def _empty() -> dict:
        return {name: {field: [] for field in FIELDS} for name in LISTS}

    def _load(self) -> dict:
        """The lists, re-read when the file changes. A damaged file keeps the
        last good lists in force and is logged once (never a failed session)."""
        signature = self._signature()
        if signature is None:
            if self._mtime is not None:
                self._data, self._mtime, self._networks = self._empty(), None, {}
            return self._data
        if signature != self._mtime:
            self._mtime = signature
            try:
                data, networks = self._parse(safeio.read_json(self.path))
            except (OSError, ValueError, UnicodeDecodeError) as error:
                log.error("%s is damaged, keeping the previous lists: %s", self.path, error)
                return self._data
            self._data, self._networks = data, networks
        return self._data

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _refresh(self) -> None:
        """Per SMTP command: stat outside the lock (a stat hands the GIL over,
        and every session would queue on the lock behind it); reload under
        the lock only when the file changed."""
        if self._signature() != self._mtime:
            with self._lock:
                self._load()

    def _parse(self, raw) -> tuple[dict, dict]:
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise PolicyError("unknown format or version")
        data = self._empty()
        for name in LISTS:
            table = raw.get(name, {})
            if not isinstance(table, dict):
                raise PolicyError(f"{name} is not an object")
            for field in FIELDS:
                values = table.get(field, [])
                if not isinstance(values, list):
                    raise PolicyError(f"{name}.{field} is not a list")
                data[name][field] = [v for v in values if isinstance(v, str)]
        networks = {}
        for name in LISTS:
            networks[name] = []
            for value in data[name]["ip"]:
                try:
                    networks[name].append(ipaddress.ip_network(value, strict=False))
                except ValueError:
                    log.error("%s: ignoring bad %s entry %r", self.path, name, value)
        return data, networks

    def snapshot(self) -> dict:
        with self._lock:
            data = self._load()
            return {name: {field: list(values) for field, values in data[name].items()} for name in LISTS}

    def entries(self, name: str, field: str) -> list[str]:
        self._check(name, field)
        return self.snapshot()[name][field]

    def _check(self, name: str, field: str) -> None:
        if name not in LISTS:
            raise PolicyError(f"unknown list {name!r}")
        if field not in FIELDS:
            raise PolicyError(f"unknown list type {field!r} (ip, sender or domain)")

    def _change(self, name: str, field: str, value: str, add: bool) -> str:
        self._check(name, field)
        value = normalize(field, value)
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        with self._lock, safeio.FileLock(self.path):
            self._mtime = None   # re-read under the file lock
            data = self._load()
            values = list(data[name][field])
            if add:
                if value in values:
                    raise EntryExists(f"{value} is already on the {name}")
                values.append(value)
            else:
                if value not in values:
                    raise NoSuchEntry(f"{value} is not on the {name}")
                values.remove(value)
            new = {n: {f: list(v) for f, v in data[n].items()} for n in LISTS}
            new[name][field] = values
            safeio.write_json(self.path, {"version": VERSION, **new}, mode=0o640)
            self._mtime = None
        return value

    def add(self, name: str, field: str, value: str) -> str:
        return self._change(name, field, value, True)

    def remove(self, name: str, field: str, value: str) -> str:
        return self._change(name, field, value, False)

    # --- matching (per SMTP command: cheap when the file is unchanged) ---

    def statuses(self, ip: str, sender: str) -> tuple[str | None, str | None]:
        """(client's list, sender's list) for one MAIL, after one stat.
        `sender` is an address key (lower-case); "" (null sender) matches nothing."""
        self._refresh()
        return self._client_status(ip), self._sender_status(sender)

    def client_status(self, ip: str) -> str | None:
        self._refresh()
        return self._client_status(ip)

    def _client_status(self, ip: str) -> str | None:
        try:
            address = client_ip(ip)
        except ValueError:
            return None
        networks = self._networks
        for name in (WHITE, BLACK):
            if any(address.version == net.version and address in net for net in networks.get(name, ())):
                return name
        return None

    def _sender_status(self, sender: str) -> str | None:
        if not sender:
            return None
        domain = sender.rpartition("@")[2]
        data = self._data
        for name in (WHITE, BLACK):
            if sender in data[name]["sender"]:
                return name
            for entry in data[name]["domain"]:
                if domain == entry or domain.endswith("." + entry):
                    return name
        return None
