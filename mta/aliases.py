"""The aliases file (`MTA_ALIASES`): parsing, lookup and expansion.

Format (one entry per line, `#` comments, continuation lines start with
white space, as in Postfix's aliases(5)):

    postmaster: root@example.com            every local domain
    info@example.com: alice@example.com, bob@example.org
    @example.net: catchall@example.com      catch-all for one domain

Lookup order for `user@domain`: the exact address, then the bare local
part (for local domains), then the domain catch-all. The table is
immutable; SIGHUP builds a new one (`load`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mta.address import AddressError, parse_mailbox

log = logging.getLogger("mta.aliases")

MAX_EXPANSION_DEPTH = 10
MAX_EXPANSION_SIZE = 1000


class AliasError(ValueError):
    pass


@dataclass(frozen=True)
class Aliases:
    exact: dict[str, tuple[str, ...]] = field(default_factory=dict)     # user@domain
    local: dict[str, tuple[str, ...]] = field(default_factory=dict)     # user (any local domain)
    catchall: dict[str, tuple[str, ...]] = field(default_factory=dict)  # domain
    path: str = ""
    local_domains: frozenset[str] = frozenset()

    def lookup(self, key: str) -> tuple[str, ...] | None:
        """Targets for a lower-cased address key, or None when not aliased.

        Bare local-part and catch-all entries apply to local domains only.
        """
        if key in self.exact:
            return self.exact[key]
        local_part, _, domain = key.rpartition("@")
        if domain not in self.local_domains:
            return None
        if local_part in self.local:
            return self.local[local_part]
        return self.catchall.get(domain)

    def owners(self, key: str) -> set[str]:
        """Addresses whose expansion reaches `key` (who may send as them)."""
        found = set()
        for table, label in ((self.exact, "{}"), (self.local, "{}@*")):
            for name, targets in table.items():
                if key in targets:
                    found.add(label.format(name))
        return found

    def expand(self, key: str) -> list[str]:
        """Recursive expansion of an address to final addresses.

        An alias that lists itself is delivered to its own mailbox (as in
        Postfix); cycles and runaway fan-out are cut.
        """
        result: list[str] = []
        seen: set[str] = set()

        def visit(address: str, depth: int) -> None:
            if address in seen or len(result) >= MAX_EXPANSION_SIZE:
                return
            seen.add(address)
            targets = self.lookup(address) if depth < MAX_EXPANSION_DEPTH else None
            if targets is None:
                result.append(address)
                return
            for target in targets:
                if target == address:
                    result.append(address)
                else:
                    visit(target, depth + 1)

        visit(key, 0)
        return result


def _normalize_target(text: str) -> str:
    try:
        return parse_mailbox(text.strip().strip("<>")).key
    except AddressError as error:
        raise AliasError(f"bad target {text.strip()!r}: {error}") from None


def parse(text: str, path: str = "", local_domains: frozenset[str] = frozenset()) -> Aliases:
    exact: dict[str, tuple[str, ...]] = {}
    local: dict[str, tuple[str, ...]] = {}
    catchall: dict[str, tuple[str, ...]] = {}
    logical: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
        else:
            logical.append((number, line))
    for number, line in logical:
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise AliasError(f"{path}:{number}: expected 'name: target, ...'")
        try:
            targets = tuple(_normalize_target(t) for t in value.split(",") if t.strip())
        except AliasError as error:
            raise AliasError(f"{path}:{number}: {error}") from None
        if not targets:
            raise AliasError(f"{path}:{number}: no targets for {name}")
        if name.startswith("@"):
            catchall[name[1:]] = targets
        elif "@" in name:
            try:
                exact[parse_mailbox(name).key] = targets
            except AddressError as error:
                raise AliasError(f"{path}:{number}: bad alias {name!r}: {error}") from None
        else:
            local[name] = targets
    return Aliases(exact, local, catchall, path, frozenset(local_domains))


def load(path: str, local_domains: frozenset[str] = frozenset()) -> Aliases:
    """Read the aliases file; a missing file is an empty table."""
    if not path:
        return Aliases(local_domains=frozenset(local_domains))
    try:
        with open(path, encoding="utf-8") as handle:
            return parse(handle.read(), path, local_domains)
    except FileNotFoundError:
        return Aliases(path=path, local_domains=frozenset(local_domains))
    except (OSError, UnicodeDecodeError) as error:
        raise AliasError(f"{path}: {error}") from None
