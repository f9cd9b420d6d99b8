"""ESMTP parameters of MAIL and RCPT: parsing and validation.

MAIL: SIZE (RFC 1870), BODY (RFC 6152; BINARYMIME is not offered),
SMTPUTF8 (RFC 6531), RET and ENVID (RFC 3461 4.3, 4.4), AUTH (RFC 4954 5).
RCPT: NOTIFY and ORCPT (RFC 3461 4.1, 4.2). Each parser returns plain
values or raises `ParamError` carrying the reply to send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mta import replies
from mta.replies import Reply

MAX_ENVID = 100   # RFC 3461 4.4
MAX_ORCPT = 500   # RFC 3461 4.2
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


class ParamError(Exception):
    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


def _bad(detail: str) -> ParamError:
    return ParamError(replies.BAD_PARAMETER.fmt(detail=detail))


def _unsupported(detail: str) -> ParamError:
    return ParamError(replies.BAD_MAIL_PARAMETER.fmt(detail=detail))


def decode_xtext(text: str) -> str:
    """RFC 3461 4: xtext, `+XX` hex escapes of octets; the octets are UTF-8.

    Control characters are refused: ENVID and ORCPT end up in envelopes,
    logs and DSNs, where a CR or LF could forge lines.
    """
    if not _XTEXT.match(text):
        raise ValueError("malformed xtext")
    octets = re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("ascii"))
    try:
        decoded = octets.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("xtext is not UTF-8") from None
    if any(ord(char) < 32 or ord(char) == 127 for char in decoded):
        raise ValueError("control character in xtext")
    return decoded


def encode_xtext(text: str) -> str:
    """The inverse of decode_xtext: UTF-8 octets, unsafe ones as +XX."""
    return "".join(chr(octet) if 33 <= octet <= 126 and octet not in b"+=" else f"+{octet:02X}"
                   for octet in text.encode("utf-8"))


def split_params(text: str) -> dict[str, str | None]:
    """`SIZE=10 BODY=8BITMIME` -> {"SIZE": "10", "BODY": "8BITMIME"} (RFC 5321 4.1.2)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.match(keyword):
            raise _bad(f"bad parameter syntax {item!r}")
        keyword = keyword.upper()
        if keyword in params:
            raise _bad(f"duplicate parameter {keyword}")
        if equals and not value:
            raise _bad(f"empty value for {keyword}")
        params[keyword] = value if equals else None
    return params


@dataclass
class MailParams:
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None


@dataclass
class RcptParams:
    notify: list[str] | None = None
    orcpt: str | None = None


def parse_mail_params(text: str) -> MailParams:
    result = MailParams()
    for keyword, value in split_params(text).items():
        if keyword == "SIZE":
            if value is None or not re.fullmatch(r"[0-9]{1,20}", value):
                raise _bad("SIZE requires a number (RFC 1870)")
            result.size = int(value)
        elif keyword == "BODY":
            upper = (value or "").upper()
            if upper not in ("7BIT", "8BITMIME"):   # BINARYMIME is not offered
                raise _bad(f"bad BODY keyword {value!r} (RFC 6152)")
            result.body = upper
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise _bad("SMTPUTF8 takes no value (RFC 6531 3.4)")
            result.smtputf8 = True
        elif keyword == "RET":
            upper = (value or "").upper()
            if upper not in ("FULL", "HDRS"):
                raise _bad("RET must be FULL or HDRS (RFC 3461 4.3)")
            result.ret = upper
        elif keyword == "ENVID":
            try:
                envid = decode_xtext(value or "")
            except ValueError:
                raise _bad("ENVID must be xtext (RFC 3461 4.4)") from None
            if not envid.isascii():
                raise _bad("ENVID must be printable US-ASCII (RFC 3461 4.4)")
            if not envid or len(value or "") > MAX_ENVID:
                raise _bad("ENVID must be 1 to 100 characters (RFC 3461 4.4)")
            result.envid = envid
        elif keyword == "AUTH":
            if value is None:
                raise _bad("AUTH requires a value (RFC 4954 5)")
            if value != "<>":
                try:
                    decode_xtext(value)
                except ValueError:
                    raise _bad("AUTH must be xtext (RFC 4954 5)") from None
            result.auth = value
        else:
            raise _unsupported(f"unsupported parameter {keyword}")
    return result


def parse_rcpt_params(text: str) -> RcptParams:
    result = RcptParams()
    for keyword, value in split_params(text).items():
        if keyword == "NOTIFY":
            items = [item.upper() for item in (value or "").split(",")]
            allowed = {"SUCCESS", "FAILURE", "DELAY"}
            if items == ["NEVER"]:
                result.notify = ["NEVER"]
            elif items and all(item in allowed for item in items) and len(set(items)) == len(items):
                result.notify = items
            else:
                raise _bad("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY (RFC 3461 4.1)")
        elif keyword == "ORCPT":
            addr_type, semicolon, xtext = (value or "").partition(";")
            if not semicolon or not _ADDR_TYPE.match(addr_type) or not xtext or len(value or "") > MAX_ORCPT:
                raise _bad("ORCPT must be addr-type;xtext (RFC 3461 4.2)")
            try:
                decoded = decode_xtext(xtext)
            except ValueError:
                raise _bad("ORCPT must be addr-type;xtext (RFC 3461 4.2)") from None
            if not decoded.isascii():   # RFC 6533 utf-8-addr-xtext is ASCII too
                raise _bad("ORCPT must be printable US-ASCII (RFC 3461 4.2)")
            result.orcpt = f"{addr_type.lower()};{decoded}"
        else:
            raise _unsupported(f"unsupported parameter {keyword}")
    return result
