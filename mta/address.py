"""Mailbox and domain parsing for the SMTP envelope (RFC 5321 4.1.2, RFC 6531).

Owns the grammar of reverse-/forward-paths, the size limits of RFC 5321
4.5.3.1 (local part 64, domain 255, path 256 octets), IDNA normalisation of
domains for comparison, and the lookup key used by users and aliases. It
knows nothing about which domains are local: that is policy.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

MAX_LOCAL_PART = 64   # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255      # RFC 5321 4.5.3.1.2
MAX_PATH = 256        # RFC 5321 4.5.3.1.3


class AddressError(ValueError):
    """The text is not a valid path/mailbox; the message says why."""


@functools.lru_cache(maxsize=4096)
def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A client's IP as an address object, IPv4-mapped IPv6 unwrapped.

    Cached: every session checks its client against mynetworks and the
    black/white lists, and parsing is a visible share of the CPU per
    message. Raises ValueError for text that is not an IP address.
    """
    address = ipaddress.ip_address(text)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address


# atext of RFC 5322 3.2.3; RFC 6531 3.3 adds UTF8-non-ascii.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+\Z")
_ATOM_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+\Z")
_LABEL_ASCII = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*(?:[A-Za-z0-9]|[^\x00-\x7f]))?\Z")
_QTEXT_SMTP = re.compile(r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*\Z')
_QTEXT_SMTP_UTF8 = re.compile(r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*\Z')
# RFC 5321 4.1.3 dcontent, less "<" and ">" so the path stays unambiguous.
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x3b\x3d\x3f-\x5a\x5e-\x7e]+\Z")


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def domain_key(domain: str) -> str:
    """Lower-case, A-label form of a domain for comparisons and lookups."""
    domain = domain.rstrip(".").lower()
    if domain.isascii() or domain.startswith("["):
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def check_domain(domain: str, utf8: bool) -> None:
    """RFC 5321 4.1.2 Domain or address-literal; raises AddressError."""
    if not domain:
        raise AddressError("missing domain")
    if _octets(domain) > MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("malformed address literal")
        literal = domain[1:-1]
        try:
            if literal.lower().startswith("ipv6:"):
                if "%" in literal:   # RFC 5321 4.1.3 has no zone index
                    raise ValueError(literal)
                ipaddress.IPv6Address(literal[5:])
            elif ":" in literal:
                if not _GENERAL_LITERAL.match(literal):
                    raise ValueError(literal)
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise AddressError(f"malformed address literal {domain}") from None
        return
    label_re = _LABEL_UTF8 if utf8 else _LABEL_ASCII
    for label in domain.split("."):
        if not label_re.match(label):
            if not utf8 and not label.isascii():
                raise AddressError("non-ASCII domain")
            raise AddressError(f"malformed domain {domain}")


def _check_local(local: str, utf8: bool) -> None:
    if not local:
        raise AddressError("empty local part")
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise AddressError("unterminated quoted local part")
        pattern = _QTEXT_SMTP_UTF8 if utf8 else _QTEXT_SMTP
        if not pattern.match(local[1:-1]):
            raise AddressError("malformed quoted local part")
        return
    atom_re = _ATOM_UTF8 if utf8 else _ATOM_ASCII
    for atom in local.split("."):
        if not atom_re.match(atom):
            if not utf8 and not atom.isascii():
                raise AddressError("non-ASCII local part")
            raise AddressError("malformed local part")


def _split_mailbox(text: str) -> tuple[str, str]:
    """Split at the '@' that follows the local part (quoted parts may hold '@')."""
    if text.startswith('"'):
        index = 1
        while index < len(text):
            char = text[index]
            if char == "\\":
                index += 2
                continue
            if char == '"':
                break
            index += 1
        else:
            raise AddressError("unterminated quoted local part")
        local, rest = text[: index + 1], text[index + 1:]
        if not rest.startswith("@"):
            raise AddressError("missing @domain")
        return local, rest[1:]
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError("missing @domain")
    if "@" in local:
        raise AddressError("more than one @ in address")
    return local, domain


def unquote_local(local: str) -> str:
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


@dataclass(frozen=True)
class Mailbox:
    """local@domain as received; `local` keeps its wire form (maybe quoted)."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        return self.local.isascii() and self.domain.isascii()

    @property
    def unquoted_local(self) -> str:
        return unquote_local(self.local)

    @property
    def key(self) -> str:
        """Case-folded lookup key (users, aliases): postmaster@example.com."""
        return f"{self.unquoted_local.lower()}@{domain_key(self.domain)}"


def parse_mailbox(text: str, *, utf8: bool = True) -> Mailbox:
    local, domain = _split_mailbox(text)
    _check_local(local, utf8)
    check_domain(domain, utf8)
    return Mailbox(local, domain)


def parse_path(text: str, *, utf8: bool = True, allow_null: bool = False,
               allow_postmaster: bool = False) -> Mailbox | None:
    """Parse a reverse-path or forward-path (RFC 5321 4.1.2).

    Returns None for the null path `<>` when allowed. A source route
    (`<@a,@b:user@c>`) is accepted and stripped (RFC 5321 4.1.1.3, C).
    `<Postmaster>` without a domain comes back as Mailbox("Postmaster", "")
    when allowed (RFC 5321 4.5.1). Bare addresses without brackets are
    accepted, as Postfix does.
    """
    if _octets(text) > MAX_PATH:
        raise AddressError("path longer than 256 octets")
    if text.startswith("<"):
        if not text.endswith(">"):
            raise AddressError("missing closing '>'")
        inner = text[1:-1]
    else:
        inner = text
    if inner == "":
        if allow_null and text == "<>":
            return None
        raise AddressError("empty address")
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("malformed source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("malformed source route")
            check_domain(hop[1:], utf8)
    if allow_postmaster and inner.lower() == "postmaster":
        return Mailbox(inner, "")
    if any(char in inner for char in "<>\r\n") or inner.startswith(" ") or inner.endswith(" "):
        if not inner.startswith('"'):
            raise AddressError("invalid character in address")
    return parse_mailbox(inner, utf8=utf8)


def split_path_and_params(argument: str) -> tuple[str, str]:
    """`<a@b> SIZE=10` -> ("<a@b>", "SIZE=10"); respects quoted local parts."""
    argument = argument.lstrip(" ")
    if not argument.startswith("<"):
        path, _, params = argument.partition(" ")
        return path, params.strip(" ")
    if '"' not in argument:   # the usual case: the first '>' ends the path
        end = argument.find(">")
        if end < 0:
            raise AddressError("missing closing '>'")
        return argument[: end + 1], argument[end + 1:].strip(" ")
    return _split_quoted_path(argument)


def _split_quoted_path(argument: str) -> tuple[str, str]:
    """split_path_and_params for a path that may hold a quoted local part."""
    in_quotes = False
    index = 1
    while index < len(argument):
        char = argument[index]
        if char == "\\" and in_quotes:
            index += 2
            continue
        if char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return argument[: index + 1], argument[index + 1:].strip(" ")
        index += 1
    raise AddressError("missing closing '>'")
