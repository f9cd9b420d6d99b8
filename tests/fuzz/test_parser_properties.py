"""Property-based tests of every parser that reads the outside world (issue 9).

Each parser gets arbitrary input (hypothesis) and may only answer with a
result or its documented exception:

    mta.address.parse_path / parse_mailbox / split_path_and_params  -> AddressError
    mta.smtp.esmtp.parse_mail_params / parse_rcpt_params             -> ParamError
    mta.smtp.esmtp.decode_xtext                                      -> ValueError
    mta.smtp.data.read_data                                          -> ClientGone
    mta.smtp.auth.b64decode / decode_plain / decode_text             -> AuthDecodeError
    mta.spool.envelope.Envelope.from_dict                            -> EnvelopeError
    mta.config.load                                                  -> ConfigError
    mta.aliases.parse                                                -> AliasError
    mta.delivery.smtp_client.Connection.read_reply (remote replies)  -> ProtocolError

Anything else escaping a parser is a session thread dying with a traceback
in mta.log (or a delivery attempt failing with one). Beyond "no other
exception", each test checks what the accepted value must satisfy (lengths,
no control characters, round trips), and names the RFC or the attack.

These tests import mta (in-process); the live daemon is fuzzed in
test_session_fuzz.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import string
import tempfile

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from fuzz_support import fuzz_settings
from mta import aliases as aliases_mod
from mta import config as config_mod
from mta.address import (AddressError, Mailbox, _split_quoted_path, domain_key, parse_mailbox, parse_path,
                         split_path_and_params)
from mta.delivery.smtp_client import Connection, ProtocolError
from mta.smtp import auth as sasl
from mta.smtp.data import MAX_LINE, READ_CHUNK, ClientGone, Content, read_data
from mta.smtp.esmtp import ParamError, decode_xtext, encode_xtext, parse_mail_params, parse_rcpt_params
from mta.spool.envelope import Envelope, EnvelopeError, parse_iso
from mta.spool.spool import summary

# --------------------------------------------------------------------------
# strategies

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
# Text as an SMTP session sees it: decoded UTF-8, so no lone surrogates.
any_text = st.text(st.characters(codec="utf-8"), max_size=300)
ascii_text = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=300)

atom = st.text(ATEXT, min_size=1, max_size=20)
dot_atom = st.lists(atom, min_size=1, max_size=4).map(".".join)
utf8_atom = st.text(st.characters(codec="utf-8", min_codepoint=0x80, exclude_categories=("Cs", "Cc", "Zl", "Zp")),
                    min_size=1, max_size=8)
qtext_char = st.sampled_from([chr(c) for c in range(0x20, 0x7f) if chr(c) not in '"\\'])
quoted_content = st.lists(st.one_of(qtext_char, st.sampled_from(['\\"', "\\\\", "\\ ", "\\a"])),
                          max_size=20).map("".join)
quoted_local = quoted_content.map(lambda s: f'"{s}"')
label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
dns_domain = st.lists(label, min_size=1, max_size=4).map(".".join)
idna_label = st.text(st.sampled_from("abcxyzäöüßéñ日本語中文пример"), min_size=1, max_size=10)
idna_domain = st.tuples(st.lists(idna_label, min_size=1, max_size=2), label).map(
    lambda parts: ".".join([*parts[0], parts[1]]))
ipv4_literal = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
ipv6_literal = st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]")
general_literal = st.tuples(st.from_regex(r"[A-Za-z0-9-]*[A-Za-z0-9]", fullmatch=True),
                            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                                  exclude_characters="[\\]"), min_size=1, max_size=20)
                            ).filter(lambda t: t[0].lower() != "ipv6").map(lambda t: f"[{t[0]}:{t[1]}]")
domains = st.one_of(dns_domain, idna_domain, ipv4_literal, ipv6_literal, general_literal)
locals_ = st.one_of(dot_atom, quoted_local, utf8_atom)
mailboxes = st.tuples(locals_, domains).map(lambda t: f"{t[0]}@{t[1]}")

SPECIALS = ["<", ">", "@", ":", ",", '"', "\\", " ", "\t", "\r", "\n", "\0", ".", "[", "]", "%",
            "\x7f", "\x85", "\u2028", "\ufeff", "\u00b2", "+", "="]


@st.composite
def mutated(draw, base):
    """A valid-looking string with a few random insertions, deletions or truncations."""
    text = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["insert", "delete", "truncate", "duplicate"]))
        pos = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:pos] + draw(st.one_of(st.sampled_from(SPECIALS), any_text.map(lambda s: s[:5]))) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1:]
        elif op == "truncate":
            text = text[:pos]
        else:
            text = text[:pos] * 2 + text[pos:]
    return text


paths = st.one_of(
    any_text,
    mailboxes.map(lambda m: f"<{m}>"),
    mutated(mailboxes.map(lambda m: f"<{m}>")),
    st.tuples(st.lists(dns_domain.map(lambda d: "@" + d), min_size=1, max_size=3), mailboxes).map(
        lambda t: f"<{','.join(t[0])}:{t[1]}>"),                          # source routes
    st.sampled_from(["<>", "<Postmaster>", "<postmaster>", "Postmaster", "<>>", "<<>>", "<", ">", ""]),
    st.integers(50, 300).map(lambda n: f"<{'a' * n}@example.com>"),     # around the length limits
    st.integers(240, 260).map(lambda n: f"<a@{'b' * 60}.{'c' * 60}.{'d' * 60}.{'e' * (n - 190)}>"),
)


def octets(text: str) -> int:
    return len(text.encode("utf-8"))


def outside_quotes(text: str) -> str:
    """`text` with the quoted local part (if any) removed."""
    if not text.startswith('"'):
        return text
    index = 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == '"':
            return text[index + 1:]
        index += 1
    return ""


def check_mailbox(mailbox: Mailbox, utf8: bool) -> None:
    """What any accepted mailbox must satisfy (RFC 5321 4.1.2, 4.5.3.1)."""
    text = str(mailbox)
    assert octets(mailbox.local) <= 64, mailbox              # 4.5.3.1.1
    assert octets(mailbox.domain) <= 255, mailbox            # 4.5.3.1.2
    # No controls anywhere (RFC 5321 4.1.2 has none in Mailbox): a CR/LF/NUL in
    # an accepted address ends up in Received:, the envelope, mta.log and the
    # outbound MAIL/RCPT lines (header and log injection).
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in text), f"control character in accepted {text!r}"
    # Outside the quoted local part there is no space, '<' or '>': otherwise the
    # address cannot be written back into "RCPT TO:<...>" unambiguously.
    rest = outside_quotes(text)
    assert not any(c in rest for c in " <>"), f"space or angle bracket outside quotes in accepted {text!r}"
    if not utf8:
        assert text.isascii(), text
    mailbox.key                        # never raises
    domain_key(mailbox.domain)
    mailbox.unquoted_local


# --------------------------------------------------------------------------
# mta.address

@fuzz_settings(400)
@given(text=paths, utf8=st.booleans(), allow_null=st.booleans(), allow_postmaster=st.booleans())
@example(text='<"a"@[IPv6:::1%x y]>', utf8=True, allow_null=False, allow_postmaster=False)
def test_parse_path_total_and_accepted_paths_are_clean_rfc5321_4_1_2(text, utf8, allow_null, allow_postmaster):
    """RFC 5321 4.1.2 / 4.5.3.1: parse_path answers a Mailbox, None (<>) or
    AddressError, and what it accepts is within the limits, free of controls,
    and parses again to the same mailbox (idempotent).

    The @example is a finding: an IPv6 address literal with a zone index
    (`%x y`, RFC 4007 -- not in RFC 5321 4.1.3's IPv6-addr) is accepted, so
    spaces, '>' and, outside SMTP (sendmail, aliases), even CR/LF reach an
    accepted address's domain.
    """
    try:
        mailbox = parse_path(text, utf8=utf8, allow_null=allow_null, allow_postmaster=allow_postmaster)
    except AddressError:
        return
    if mailbox is None:
        assert allow_null and text == "<>"
        return
    assert octets(text) <= 256                               # 4.5.3.1.3
    if not mailbox.domain:
        assert allow_postmaster and mailbox.local.lower() == "postmaster"  # 4.5.1
        return
    check_mailbox(mailbox, utf8)
    again = parse_path(f"<{mailbox}>", utf8=utf8)
    assert again == mailbox


@fuzz_settings(300)
@given(text=st.one_of(any_text, mailboxes, mutated(mailboxes)), utf8=st.booleans())
def test_parse_mailbox_total_rfc5321_4_1_2(text, utf8):
    """parse_mailbox (aliases, sendmail, users): Mailbox or AddressError only."""
    try:
        mailbox = parse_mailbox(text, utf8=utf8)
    except AddressError:
        return
    assert not any(c in mailbox.local + mailbox.domain for c in "\r\n\0"), repr(mailbox)


@fuzz_settings(400)
@given(argument=st.one_of(any_text, st.tuples(paths, any_text).map(" ".join),
                          st.tuples(mutated(paths), st.sampled_from(["", " SIZE=1", " BODY=8BITMIME  ", "  x=y"])
                                    ).map("".join)))
def test_split_path_and_params_total(argument):
    """The MAIL/RCPT argument splitter: (path, params) or AddressError; a
    bracketed path comes back whole, '>' inside a quoted local part included."""
    try:
        path, params = split_path_and_params(argument)
    except AddressError:
        return
    if argument.lstrip(" ").startswith("<"):
        assert path.startswith("<") and path.endswith(">"), (argument, path)
    assert len(path) + len(params) <= len(argument)


@fuzz_settings(400)
@given(body=st.one_of(st.tuples(paths, any_text).map(" ".join), any_text))
def test_split_fast_path_agrees_with_quote_aware_scan(body):
    """Without a '"' the splitter takes the first '>' (a shortcut for the
    per-character scan that understands quoted local parts): same answer."""
    argument = ("<" + body.lstrip(" ")).replace('"', "")
    try:
        fast = split_path_and_params(argument)
    except AddressError:
        fast = "error"
    try:
        scanned = _split_quoted_path(argument)
    except AddressError:
        scanned = "error"
    assert fast == scanned


@fuzz_settings(400)
@given(local=st.one_of(dot_atom, quoted_local), domain=st.one_of(dns_domain, ipv4_literal, ipv6_literal))
def test_valid_ascii_addresses_accepted_rfc5321_4_1_2(local, domain):
    """Dot-atoms, quoted strings and IP literals within the limits are accepted as given."""
    text = f"{local}@{domain}"
    assume(octets(local) <= 64 and octets(text) + 2 <= 256)
    mailbox = parse_path(f"<{text}>", utf8=False)
    assert (mailbox.local, mailbox.domain) == (local, domain)


@fuzz_settings(200)
@given(content=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40))
def test_quoted_local_part_round_trip_rfc5321_4_1_2(content):
    """Quoting any printable ASCII string (quoted-pairs for '"' and '\\') gives
    a quoted local part that parses and unquotes back to the string."""
    quoted = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assume(octets(quoted) <= 64)
    mailbox = parse_path(f"<{quoted}@example.com>", utf8=False)
    assert mailbox.unquoted_local == content


@fuzz_settings(200)
@given(local=utf8_atom, domain=idna_domain)
def test_utf8_addresses_rfc6531_and_idna(local, domain):
    """RFC 6531 3.3: UTF-8 local parts and U-label domains are accepted with
    SMTPUTF8 and refused without; the lookup key of a domain is its A-label
    form (IDNA) and never raises."""
    text = f"<{local}@{domain}>"
    assume(octets(text) <= 256 and octets(local) <= 64)
    mailbox = parse_path(text, utf8=True)
    assert mailbox is not None
    key = domain_key(mailbox.domain)
    assert key == key.lower()
    with pytest.raises(AddressError):
        parse_path(text, utf8=False)


@fuzz_settings(200)
@given(n=st.integers(1, 300))
def test_length_limits_rfc5321_4_5_3_1(n):
    """RFC 5321 4.5.3.1.1-3: local part 64, domain 255, path 256 octets."""
    local = "a" * n
    if n <= 64:
        assert parse_path(f"<{local}@example.com>").local == local
    else:
        with pytest.raises(AddressError):
            parse_path(f"<{local}@example.com>")
    domain = ".".join(["b" * 50] * 6)[:n].strip(".") or "b"
    path = f"<x@{domain}>"
    if octets(path) > 256:
        with pytest.raises(AddressError):
            parse_path(path)
    # multi-byte characters count as octets, not characters (RFC 6531 3.3)
    if n * 2 > 64:
        with pytest.raises(AddressError):
            parse_path(f"<{'é' * n}@example.com>")


@fuzz_settings(200)
@given(ip=st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"IPv6:{a}")))
def test_ip_literals_rfc5321_4_1_3(ip):
    """RFC 5321 4.1.3: [IPv4] and [IPv6:...] literals are accepted."""
    assert parse_path(f"<user@[{ip}]>").domain == f"[{ip}]"


@pytest.mark.parametrize("literal", [
    "[256.1.1.1]", "[1.2.3]", "[1.2.3.4.5]", "[01.2.3.4]", "[IPv6:1::2::3]", "[IPv6:12345::]",
    "[IPv6:::1%eth0]", "[IPv6:fe80::1%25lo]", "[IPv6:::1%x y]", "[1.2.3.4", "1.2.3.4]", "[]",
])
def test_malformed_ip_literals_refused_rfc5321_4_1_3(literal):
    """RFC 5321 4.1.3: malformed literals are refused. IPv6-addr has no zone
    index (RFC 4007 `%zone`); Python's ipaddress accepts one since 3.9, so it
    must be refused explicitly (finding: it is accepted)."""
    with pytest.raises(AddressError):
        parse_path(f"<user@{literal}>")


# --------------------------------------------------------------------------
# mta.smtp.esmtp

NUMBERS = ["0", "10", "99999999999999999999", "999999999999999999999", "-1", "1e3", " 1", "0x10",
           "\u00b2", "\u0663", "\u0661\u0662\u0663", "\uff11", "\u2460"]   # superscript, Arabic-Indic, fullwidth, circled
XTEXTS = ["a", "a+2Bb", "+0D+0A", "a+0D+0Ab", "+00", "+7F", "+C3+BC", "+zz", "a+", "+2b", "x=y", "\u00e9"]
VALUES_BY_KEYWORD = {
    "SIZE": NUMBERS, "BODY": ["7BIT", "8BITMIME", "BINARYMIME", "8bitmime", ""], "SMTPUTF8": [],
    "RET": ["FULL", "HDRS", "full", "X"], "ENVID": XTEXTS, "AUTH": ["<>", *XTEXTS],
    "NOTIFY": ["NEVER", "SUCCESS", "SUCCESS,FAILURE", "DELAY,DELAY", "NEVER,SUCCESS", "", ","],
    "ORCPT": [f"{t};{x}" for t in ("rfc822", "utf-8", "x-y", "", "bad type") for x in XTEXTS] + ["rfc822;", ";a"],
    "X-FOO": ["1"],
}


@st.composite
def one_param(draw):
    keyword = draw(st.sampled_from(sorted(VALUES_BY_KEYWORD)))
    choices = VALUES_BY_KEYWORD[keyword]
    value = draw(st.one_of(st.none(), st.sampled_from(choices) if choices else st.none(),
                           st.text(st.characters(codec="utf-8", exclude_characters=" "), max_size=20)))
    if draw(st.booleans()):
        keyword = keyword.lower()
    return keyword if value is None else f"{keyword}={value}"


param_lists = st.lists(one_param(), max_size=5).map(" ".join)


@fuzz_settings(600)
@given(text=st.one_of(param_lists, any_text, mutated(param_lists)))
@example(text="SIZE=\u00b2")   # finding: "²".isdigit() is True, int("²") raises ValueError
def test_parse_mail_params_total_rfc1870_rfc3461_rfc6152(text):
    """MAIL parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC
    3461 RET/ENVID, RFC 4954 AUTH): MailParams or ParamError, nothing else.
    SIZE is a string of ASCII digits (RFC 1870 4: size-value ::= 1*20DIGIT);
    a decoded ENVID is printable US-ASCII (RFC 3461 4.4)."""
    try:
        params = parse_mail_params(text)
    except ParamError as error:
        assert error.reply.code in (501, 555, 504), error.reply
        return
    if params.size is not None:
        assert isinstance(params.size, int) and params.size >= 0
    if params.envid is not None:
        assert all(0x20 <= ord(c) <= 0x7e for c in params.envid), \
            f"ENVID decodes to non-printable {params.envid!r} (RFC 3461 4.4)"


@fuzz_settings(600)
@given(text=st.one_of(param_lists, any_text, mutated(param_lists)))
@example(text="ORCPT=rfc822;a+0D+0AX-Injected:+20yes")   # finding: CR/LF decoded into the envelope and mta.log
def test_parse_rcpt_params_total_rfc3461_4(text):
    """RCPT parameters (RFC 3461 NOTIFY, ORCPT): RcptParams or ParamError.
    The decoded ORCPT address is printable US-ASCII (RFC 3461 4.2: "MUST
    consist entirely of printable (graphic and white space) characters from
    the US-ASCII repertoire") -- it is logged as orig_to=<...> and written
    into DSNs."""
    try:
        params = parse_rcpt_params(text)
    except ParamError as error:
        assert error.reply.code in (501, 555, 504), error.reply
        return
    if params.notify is not None:
        assert params.notify == ["NEVER"] or set(params.notify) <= {"SUCCESS", "FAILURE", "DELAY"}
    if params.orcpt is not None:
        assert all(0x20 <= ord(c) <= 0x7e for c in params.orcpt), \
            f"ORCPT decodes to non-printable {params.orcpt!r} (RFC 3461 4.2)"


@fuzz_settings(400)
@given(text=st.one_of(any_text, st.from_regex(r"(?:[!-~]|\+[0-9A-Fa-f]{0,3})*", fullmatch=True)))
def test_decode_xtext_total_rfc3461_4(text):
    """decode_xtext: a string or ValueError for anything."""
    try:
        decoded = decode_xtext(text)
    except ValueError:
        return
    assert len(decoded) <= len(text)


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7f for c in text)


@fuzz_settings(400)
@given(text=st.text(st.characters(min_codepoint=0, max_codepoint=0x7f), max_size=100))
def test_xtext_round_trip_ascii_rfc3461_4(text):
    """RFC 3461 4: encode_xtext output is valid xtext and decodes back (US-ASCII);
    decoded control characters (CR/LF forging log and envelope lines) are refused."""
    encoded = encode_xtext(text)
    assert all(0x21 <= ord(c) <= 0x7e and c != "=" for c in encoded)
    if _has_control(text):
        with pytest.raises(ValueError):
            decode_xtext(encoded)
    else:
        assert decode_xtext(encoded) == text


@fuzz_settings(200)
@given(text=st.text(st.characters(codec="utf-8"), max_size=40))
@example(text="\u20ac")   # finding: encode_xtext("€") == "+20AC", which decodes to " AC"
def test_xtext_round_trip_unicode_rfc3461_4_rfc6533(text):
    """xtext encodes octets (RFC 3461 4: "+" followed by two hex digits); a
    non-ASCII ORCPT (after alias expansion of a UTF-8 address) must survive
    encode/decode, e.g. as UTF-8 octets. Finding: code points above 0xFF are
    written as +XXXX, which is not xtext and decodes to something else."""
    encoded = encode_xtext(text)
    if _has_control(text):
        with pytest.raises(ValueError):
            decode_xtext(encoded)
    else:
        assert decode_xtext(encoded) == text


# --------------------------------------------------------------------------
# mta.smtp.data: DATA (RFC 5321 4.1.1.4, 4.5.2) and BDAT (RFC 3030)

def stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2: double a leading dot on every line."""
    return b"".join(b"." + line if line.startswith(b".") else line
                    for line in message.splitlines(keepends=True))


class Recorder:
    def __init__(self):
        self.writes: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


LINE_ENDS = [b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r", b""]
# Pieces that make the interesting cases likely: the end marker and its
# smuggling look-alikes (SEC Consult 2023, CVE-2023-51764), dots, NUL, and
# lines around the 1000-octet limit (so CR and LF can fall on either side of
# a 1001-octet read).
PIECES = st.one_of(
    st.sampled_from([b"\r\n.\r\n", b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b".\r\n", b"..\r\n", b".",
                     b"\r\n", b"\n", b"\r", b"\0", b"Received: x\r\n", b"\r\n\r\n", b"MAIL FROM:<a@b>\r\n"]),
    st.binary(max_size=40),
    st.tuples(st.integers(995, 1003), st.sampled_from(LINE_ENDS)).map(lambda t: b"x" * t[0] + t[1]),
    st.tuples(st.integers(1995, 2004), st.sampled_from(LINE_ENDS)).map(lambda t: b"y" * t[0] + t[1]),
)
streams = st.lists(PIECES, max_size=25).map(b"".join)


def first_end(data: bytes) -> int | None:
    """Offset just after the first CRLF.CRLF (a '.' line at the very start counts)."""
    index = (b"\r\n" + data).find(b"\r\n.\r\n")
    return None if index < 0 else index + 3


# The session reads through a BufferedReader; small buffers put read
# boundaries everywhere, including inside CRLF and inside ".\r\n".
BUFFER_SIZES = st.sampled_from([1, 7, 1000, 1001, 4096, READ_CHUNK])


class LineByLine(io.BufferedReader):
    """A reader whose peek() shows nothing: read_data's block path is never
    taken, so this is the line-at-a-time reference."""

    def peek(self, size: int = 0) -> bytes:
        return b""


@fuzz_settings(800)
@given(data=streams, buffer_size=BUFFER_SIZES)
@example(data=b"x" * 1000 + b"\r\n.\r\nQUIT\r\n", buffer_size=READ_CHUNK)    # finding: CR is octet 1001 of a read
@example(data=b"H: x\r\n\r\nbody\r\n.\r\n", buffer_size=READ_CHUNK)
@example(data=b"H: x\r\n\r\nbody\n.\r\nMAIL FROM:<a@b>\r\n.\r\n", buffer_size=READ_CHUNK)
def test_read_data_ends_exactly_at_first_crlf_dot_crlf_rfc5321_4_1_1_4(data, buffer_size):
    """RFC 5321 4.1.1.4: the message ends at the first CRLF.CRLF and nowhere
    else. read_data returns having consumed exactly up to it, or raises
    ClientGone when there is none; bare-LF/CR look-alikes never end it (SMTP
    smuggling). Finding: when a line's CR is the 1001st octet of a read
    (a line of 1000, 2001, ... octets), the CRLF is split across two reads
    and the real end of data is missed: the server keeps reading the
    client's next commands as message text and the client waits for a reply
    until smtp_timeout."""
    reader = io.BufferedReader(io.BytesIO(data), buffer_size)
    recorder = Recorder()
    content = Content(recorder, 10 ** 9)
    expected = first_end(data)
    try:
        read_data(reader, content)
    except ClientGone:
        assert expected is None, f"missed the end of data at offset {expected}"
        return
    assert reader.tell() == expected, f"ended at {reader.tell()}, the first CRLF.CRLF ends at {expected}"


@fuzz_settings(800)
@given(data=streams, max_size=st.sampled_from([10 ** 9, 100, 5000]), buffer_size=BUFFER_SIZES)
def test_data_content_is_bounded_and_clean_smuggling_defence(data, max_size, buffer_size):
    """Whatever arrives, DATA stores at most one read buffer per write
    (memory per session is bounded, 4.5.3.1.6); if no error was
    recorded, every stored line ends in CRLF with no other CR or LF and no
    NUL (a bare-LF/CR artefact is never stored: Postfix's
    smtpd_forbid_bare_newline, CVE-2023-51764); and the size cap holds."""
    recorder = Recorder()
    content = Content(recorder, max_size)
    try:
        read_data(io.BufferedReader(io.BytesIO(data), buffer_size), content)
    except ClientGone:
        pass
    assert all(len(w) <= max(READ_CHUNK, MAX_LINE + 1) for w in recorder.writes), max(map(len, recorder.writes))
    if content.error is None:
        stored = recorder.data
        assert len(stored) <= max_size
        assert b"\0" not in stored
        if stored:
            assert stored.endswith(b"\r\n")
            for line in stored.split(b"\r\n")[:-1]:
                assert b"\r" not in line and b"\n" not in line, line[:80]
                assert len(line) + 2 <= MAX_LINE


@fuzz_settings(800)
@given(data=streams, buffer_size=BUFFER_SIZES)
@example(data=b"H: x\r\n\r\nok\r\nbare\nx" + b"y" * 1200 + b"\r\n.\r\n", buffer_size=READ_CHUNK)
@example(data=b"H: x\r\n\r\nok\r\n" + b"z" * 998 + b"\r\n.\r\n", buffer_size=READ_CHUNK)   # 1000 octets: fine
@example(data=b"H: x\r\n\r\nok\r\n" + b"z" * 999 + b"\r\n.\r\n", buffer_size=READ_CHUNK)   # 1001: too long
def test_body_blocks_match_line_by_line_reading(data, buffer_size):
    """The body is read in blocks of whole lines for speed; whatever
    arrives, that must store the same octets, stop at the same place, count
    the same size and accept or refuse the same messages as reading one line
    at a time."""
    results = []
    for reader_class in (io.BufferedReader, LineByLine):
        reader = reader_class(io.BytesIO(data), buffer_size)
        recorder = Recorder()
        content = Content(recorder, 10 ** 9)
        try:
            read_data(reader, content)
            end = reader.tell()
        except ClientGone:
            end = None
        results.append((end, content.size, content.error is None,
                        recorder.data if content.error is None else None))
    assert results[0] == results[1]


text_lines = st.lists(
    st.one_of(st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
              st.sampled_from([b".", b"..", b"...", b". ", b".x", b"", b"Received: from x"]),
              st.integers(990, 998).map(lambda n: b"." * (n % 3) + b"z" * (n - n % 3))),
    max_size=30)


@fuzz_settings(400)
@given(lines=text_lines)
def test_dot_unstuffing_inverts_dot_stuffing_rfc5321_4_5_2(lines):
    """RFC 5321 4.5.2: for any valid message, read_data(stuff(m) + ".\\r\\n")
    stores exactly m, whatever leading dots its lines have."""
    message = b"".join(line + b"\r\n" for line in lines)
    recorder = Recorder()
    content = Content(recorder, 10 ** 9)
    reader = io.BufferedReader(io.BytesIO(b"Subject: s\r\n\r\n" + stuff(message) + b".\r\nNEXT"))
    read_data(reader, content)
    assert content.error is None, content.error
    assert recorder.data == b"Subject: s\r\n\r\n" + message
    assert reader.read() == b"NEXT"


@fuzz_settings(400)
@given(lines=text_lines, data=st.data())
def test_bdat_chunking_invariance_rfc3030_2(lines, data):
    """RFC 3030 2: BDAT chunks are octets; where the client cuts them does
    not change what is stored, and no dot-unstuffing happens."""
    message = b"".join(line + b"\r\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=8)))
    recorder = Recorder()
    content = Content(recorder, 10 ** 9)
    previous = 0
    for cut in [*cuts, len(message)]:
        content.chunk(message[previous:cut])
        previous = cut
    content.finish_chunks()
    assert content.error is None, content.error
    assert recorder.data == message
    assert all(len(w) <= MAX_LINE for w in recorder.writes)


@fuzz_settings(500)
@given(chunks=st.lists(streams, max_size=6))
def test_bdat_content_bounded_and_clean(chunks):
    """BDAT with arbitrary octets: Content never raises, stores at most one
    line per write, and stores only CRLF lines when it records no error."""
    recorder = Recorder()
    content = Content(recorder, 10 ** 9)
    for chunk in chunks:
        content.chunk(chunk)
    content.finish_chunks()
    assert all(len(w) <= MAX_LINE + 1 for w in recorder.writes)
    if content.error is None and recorder.data:
        for line in recorder.data.split(b"\r\n")[:-1]:
            assert b"\r" not in line and b"\n" not in line


# --------------------------------------------------------------------------
# mta.smtp.auth (RFC 4954, RFC 4616)

@fuzz_settings(400)
@given(text=st.one_of(any_text, st.binary(max_size=100).map(lambda b: base64.b64encode(b).decode()),
                      mutated(st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()))))
def test_b64decode_total_rfc4954_4(text):
    """RFC 4954 4: the client's response is strict base64 ('=' is the empty
    initial response); anything else is AuthDecodeError (501 5.5.2)."""
    try:
        decoded = sasl.b64decode(text)
    except sasl.AuthDecodeError:
        return
    assert isinstance(decoded, bytes)
    if text != "=":
        assert base64.b64encode(decoded).decode() == text.strip() or decoded == base64.b64decode(text)


@fuzz_settings(300)
@given(data=st.binary(max_size=100))
def test_b64_round_trip_rfc4954_4(data):
    assert sasl.b64decode(base64.b64encode(data).decode()) == data


@fuzz_settings(600)
@given(data=st.one_of(st.binary(max_size=200),
                      st.lists(st.binary(max_size=30), min_size=1, max_size=5).map(b"\0".join)))
def test_decode_plain_total_rfc4616_2(data):
    """RFC 4616 2: [authzid] NUL authcid NUL passwd, UTF-8; anything else is
    AuthDecodeError. Accepted parts have no NUL and rebuild the input."""
    try:
        authzid, authcid, password = sasl.decode_plain(data)
    except sasl.AuthDecodeError:
        return
    assert authcid and password
    assert b"\0".join(p.encode("utf-8") for p in (authzid, authcid, password)) == data


@fuzz_settings(300)
@given(data=st.binary(max_size=100))
def test_decode_text_total_auth_login(data):
    """AUTH LOGIN username/password: UTF-8 without NUL, else AuthDecodeError."""
    try:
        text = sasl.decode_text(data)
    except sasl.AuthDecodeError:
        return
    assert "\0" not in text


# --------------------------------------------------------------------------
# mta.spool.envelope (envelope.json, read back from disk)

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=20)


def valid_envelope_dict() -> dict:
    return Envelope(id="0123456789ABCDEF012345"[:20], sender="a@example.org",
                    recipients=[], arrival="2024-01-02T03:04:05+00:00").to_dict() | {
        "recipients": [{"address": "b@example.com", "orcpt": None, "notify": None, "status": "pending",
                        "attempts": 0, "last_error": None, "dsn_status": None, "remote_mta": None,
                        "finished_at": None, "delay_notified": False}]}


FIELD_NAMES = list(valid_envelope_dict())
RECIPIENT_FIELDS = list(valid_envelope_dict()["recipients"][0])


@st.composite
def damaged_envelopes(draw):
    """A valid envelope dict with a few fields replaced, removed or added."""
    data = valid_envelope_dict()
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "recipient", "delete", "extra"]))
        if where == "top":
            data[draw(st.sampled_from(FIELD_NAMES))] = draw(json_values)
        elif where == "recipient" and isinstance(data.get("recipients"), list) and data["recipients"] \
                and isinstance(data["recipients"][0], dict):
            data["recipients"][0][draw(st.sampled_from(RECIPIENT_FIELDS))] = draw(json_values)
        elif where == "delete":
            data.pop(draw(st.sampled_from(FIELD_NAMES)), None)
        else:
            data[draw(st.text(max_size=8))] = draw(json_values)
    return data


@fuzz_settings(600)
@given(data=st.one_of(json_values, damaged_envelopes()))
def test_envelope_from_dict_total(data):
    """Any JSON value: Envelope.from_dict gives an Envelope or EnvelopeError
    (the spool then quarantines the message to corrupt/), nothing else."""
    try:
        Envelope.from_dict(data)
    except EnvelopeError:
        pass


@fuzz_settings(600)
@given(data=damaged_envelopes())
@example(data=valid_envelope_dict() | {"arrival": 5})
@example(data={**valid_envelope_dict(), "recipients": [{"address": "b@example.com", "status": []}]})
def test_envelope_accepted_is_well_typed_spool_quarantine(data):
    """An envelope from_dict accepts must be usable by every reader (the
    queue listing, the scheduler, the delivery worker): otherwise a damaged
    envelope.json is not quarantined at start-up but crashes each delivery
    attempt and listing with a traceback (ARCHITECTURE.md: unreadable
    envelopes go to corrupt/). Finding: from_dict checks only id, sender
    and that recipients is non-empty."""
    try:
        envelope = Envelope.from_dict(data)
    except EnvelopeError:
        return
    json.dumps(envelope.to_dict())
    parse_iso(envelope.arrival).timestamp()
    if envelope.next_attempt is not None:
        parse_iso(envelope.next_attempt).timestamp()
    assert isinstance(envelope.size, int) and isinstance(envelope.attempts, int)
    for recipient in envelope.recipients:
        assert isinstance(recipient.address, str) and "@" in recipient.address
        assert isinstance(recipient.attempts, int)
        recipient.is_open
    envelope.open_recipients
    s = summary(envelope, "active")
    sorted([s, s], key=lambda item: item["id"])


# --------------------------------------------------------------------------
# mta.config (TOML file and MTA_* environment)

def toml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(toml_scalar(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


config_values = st.one_of(
    st.booleans(), st.integers(-10, 70000), st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from(["", "yes", "No", "1", "0", "on", "abc", "127.0.0.1", "::1", "127.0.0.1:53", "[::1]:53",
                     "127.0.0.0/8", "10.0.0.0/33", "example.com", "a..b", "x" * 70 + ".com", "[host]:25",
                     "[", "host:99999", "/nonexistent/file", "/etc/hostname", "²", "٣", "+5", " 25 ", "-1"]),
    st.lists(st.one_of(st.text(max_size=10), st.integers()), max_size=3),
)
config_keys = st.one_of(st.sampled_from(sorted(config_mod.KEY_NAMES)), st.sampled_from(["unknown_key", "Port_Relay"]))


@st.composite
def toml_documents(draw):
    lines = []
    for key, value in draw(st.dictionaries(config_keys, config_values, max_size=6)).items():
        lines.append(f"{key} = {toml_scalar(value)}")
    if draw(st.booleans()):
        section = draw(st.sampled_from(["smtp", "delivery", "a.b"]))
        lines.insert(draw(st.integers(0, len(lines))), f"[{section}]")
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):
        text = draw(mutated(st.just(text)))
    return text


SAFE_DIRS = {"spool_dir", "data_dir", "log_dir", "mailbox_dir", "aliases"}


@fuzz_settings(400)
@given(document=st.one_of(toml_documents(), st.binary(max_size=200)),
       env=st.dictionaries(config_keys.map(lambda k: "MTA_" + k.upper()),
                           config_values.map(lambda v: v if isinstance(v, str) else toml_scalar(v)), max_size=4))
def test_config_load_total_interface_configuration(document, env):
    """INTERFACE.md "Configuration": any config file and any MTA_* values give
    a Config or a ConfigError naming a key (exit 2, one line), nothing else."""
    env = {k: v for k, v in env.items() if "\0" not in v}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "mta.toml")
        with open(path, "wb") as handle:
            handle.write(document if isinstance(document, bytes) else document.encode("utf-8"))
        try:
            config = config_mod.load(path, env)
        except config_mod.ConfigError as error:
            assert error.key and str(error)
            return
        assert isinstance(config, config_mod.Config)
        for port in (config.port_relay, config.port_submission, config.port_submissions, config.port_admin):
            assert 0 <= port <= 65535
        config.shown()


# --------------------------------------------------------------------------
# mta.aliases

alias_lines = st.one_of(
    any_text.map(lambda s: s.replace("\n", " ")),
    st.tuples(st.one_of(atom, mailboxes, dns_domain.map(lambda d: "@" + d), any_text.map(lambda s: s[:10])),
              st.lists(st.one_of(mailboxes, mutated(mailboxes), atom), max_size=4)).map(
        lambda t: f"{t[0]}: {', '.join(t[1])}"),
    st.sampled_from(["# comment", "", "   continued@example.com", "\tmore", ":", "a:", ": b@c", "a: ,,,"]),
)


@fuzz_settings(150)
@given(lines=st.lists(alias_lines, max_size=12), keys=st.lists(st.one_of(mailboxes, any_text), max_size=5))
def test_aliases_parse_total_aliases_5(lines, keys):
    """aliases(5) format: any file gives a table or AliasError naming the
    line; lookups and expansion of any key never raise and stay bounded."""
    try:
        table = aliases_mod.parse("\n".join(lines), "aliases", frozenset({"example.com"}))
    except aliases_mod.AliasError as error:
        assert str(error).startswith("aliases:")
        return
    for key in keys + [f"{name}@example.com" for name in table.local]:
        table.lookup(key.lower())
        table.owners(key.lower())
        result = table.expand(key.lower())
        assert len(result) <= aliases_mod.MAX_EXPANSION_SIZE + 1


# --------------------------------------------------------------------------
# mta.delivery.smtp_client: replies from remote servers (the outside world too)

class _NoSocket:
    def settimeout(self, timeout):
        pass


reply_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from([b"250 ok\r\n", b"250-a\r\n", b"250\r\n", b"220 x\r\n", b"2\r\n",
                                        b"\xc2\xb2\xc2\xb2\xc2\xb2 hi\r\n", b"\xd9\xa3\xd9\xa3\xd9\xa3 x\r\n",
                                        b"999 x\r\n", b"25O ok\r\n", b"250x\r\n"]),
                       st.binary(max_size=20)), max_size=10).map(b"".join),
)


@fuzz_settings(600)
@given(data=reply_streams)
@example(data="²²² hello\r\n".encode())   # finding: "²²²".isdigit() is True, int() raises ValueError
@example(data=b"999 boom\r\n")              # finding: accepted; at RCPT it bounces with DSN status 9.0.0
def test_remote_reply_parser_total_rfc5321_4_2(data):
    """RFC 5321 4.2: a reply line is 3 ASCII digits (first digit 2-5 in SMTP,
    4.2.1), then SP or '-'. Whatever a remote server sends, read_reply
    returns an SmtpReply whose code and derived RFC 3463 status class (2, 4
    or 5) make sense, or raises ProtocolError; a delivery never dies of a
    ValueError (which costs a traceback in mta.log). Findings: Unicode
    digits ("²²²") raise ValueError; codes like 006 or 999 are accepted and
    give DSN statuses "6.0.0" / "9.0.0" (a 999 at RCPT is a permanent bounce)."""
    connection = Connection(_NoSocket(), io.BytesIO(data), "remote.test", "127.0.0.1", 25)
    try:
        reply = connection.read_reply(1)
    except ProtocolError:
        return
    assert 200 <= reply.code <= 599, f"reply code {reply.code} accepted (RFC 5321 4.2.1)"
    assert reply.dsn()[0] in "245", f"DSN status {reply.dsn()} (RFC 3463 2: class 2, 4 or 5)"
    assert str(reply)


# --------------------------------------------------------------------------
# mta.spool.pickup: the maildrop, where any local user drops files

from mta.spool import pickup  # noqa: E402

header_lines = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"format": st.sampled_from(["mta-maildrop", "x"]), "version": st.sampled_from([1, 1, 2, True]),
                           "sender": st.one_of(st.none(), st.text(max_size=20), json_values),
                           "recipients": st.one_of(st.lists(st.text(max_size=20), max_size=4), json_values),
                           "full_name": st.one_of(st.none(), st.text(max_size=20), json_values),
                           "flags": st.one_of(st.fixed_dictionaries({}, optional={"t": st.booleans(),
                                                                                  "i": json_values}),
                                              json_values)}).map(lambda d: json.dumps(d).encode()),
)


@fuzz_settings(500)
@given(line=header_lines)
def test_maildrop_header_line_total(line):
    """The first line of a maildrop file (written by any local user) gives a
    Submission or SubmissionError (the file goes to corrupt/), nothing else."""
    try:
        submission = pickup.Submission.from_header_line(line)
    except pickup.SubmissionError:
        return
    assert all(isinstance(r, str) for r in submission.recipients)
    assert isinstance(submission.extract, bool) and isinstance(submission.ignore_dots, bool)


address_args = st.one_of(mailboxes, mutated(mailboxes), atom, any_text.map(lambda s: s[:40]),
                         st.sampled_from(["a@b, c@d", "Joe <joe@example.org>", '"x, y" <q@example.org>', "<>",
                                          "", "bob", "a@b\nBcc: x@y", "=?utf-8?q?x?= <e@example.org>"]))
raw_messages = st.one_of(
    st.binary(max_size=400),
    st.tuples(st.lists(st.tuples(st.sampled_from([b"To", b"Cc", b"Bcc", b"Resent-To", b"Resent-Bcc", b"From",
                                                  b"Subject", b"Date", b"Message-ID", b"X-A", b"From ", b" cont"]),
                                 st.one_of(address_args.map(lambda s: s.encode("utf-8", "replace")),
                                           st.binary(max_size=40))),
                       max_size=6),
              st.lists(st.one_of(st.binary(max_size=60), st.sampled_from([b".", b"..", b"x" * 1500, b""])),
                       max_size=8),
              st.sampled_from([b"\n", b"\r\n", b"\r"])).map(
        lambda t: t[2].join([b"%s: %s" % (name, value) for name, value in t[0]] + [b""] + t[1])),
)


@fuzz_settings(400)
@given(recipients=st.lists(address_args, max_size=4), sender=st.one_of(st.none(), address_args),
       full_name=st.one_of(st.none(), st.text(max_size=30)), extract=st.booleans(), ignore_dots=st.booleans(),
       raw=raw_messages)
@example(recipients=["info@example.com"], sender="\u00fc@example.com", full_name=None, extract=False,
         ignore_dots=False, raw=b"Subject: no From header\n\nbody\n")
def test_maildrop_build_message_total_rfc5322(recipients, sender, full_name, extract, ignore_dots, raw):
    """Postfix-cleanup of a local submission: a Prepared message or
    SubmissionError. What is prepared is a valid message (RFC 5322 2.1.1:
    CRLF lines of at most 998 octets, no NUL, no bare CR/LF), without Bcc,
    and its addresses parse as mailboxes (RFC 5321 4.1.2).

    The @example is a finding: an RFC 6531 (UTF-8) sender given with -f and
    a message without From: makes email.utils.formataddr raise
    UnicodeEncodeError ("sendmail: internal error", exit 70)."""
    submission = pickup.Submission(recipients=recipients, sender=sender, full_name=full_name,
                                   extract=extract, ignore_dots=ignore_dots)
    user = pickup.LocalUser(1000, "someone", "Some One")
    try:
        prepared = pickup.build_message(submission, raw, user=user, domain="example.com", hostname="mx.example.com",
                                        max_size=100_000, queue_id="0123456789ABCDEF0123")
    except pickup.SubmissionError:
        return
    message = prepared.message
    assert message.endswith(b"\r\n") and b"\0" not in message
    for line in message.split(b"\r\n")[:-1]:
        assert b"\r" not in line and b"\n" not in line and len(line) <= 998, line[:100]
    head = message.split(b"\r\n\r\n", 1)[0].lower()
    assert not any(line.startswith((b"bcc:", b"resent-bcc:")) for line in head.split(b"\r\n"))
    for address in [*prepared.recipients, *([prepared.sender] if prepared.sender else [])]:
        check_mailbox(parse_mailbox(address), True)
