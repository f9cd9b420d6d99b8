"""Minimal live reproducers of what the fuzzers found (issue 9), one per finding.

Each test is the smallest SMTP dialog that shows the bug against the real
daemon, named after the attack or RFC it is about. The property tests in
test_parser_properties.py and the fuzzers in test_session_fuzz.py /
test_faults.py find the same bugs; these say in one screen what is wrong.
"""

from __future__ import annotations

import socket

from conftest import assert_reply


def test_unicode_digit_in_mail_size_param_501_rfc1870(mta):
    """RFC 1870 4: size-value ::= 1*20DIGIT (ASCII). "SIZE=²" passes
    str.isdigit() and int() raises ValueError: the session thread dies with
    a traceback in mta.log and the client gets no reply
    (mta/smtp/esmtp.py parse_mail_params, `value.isdigit()`)."""
    with mta.session() as conn:
        reply = conn.cmd("MAIL FROM:<a@example.org> SIZE=\u00b2")
        assert_reply(reply, 501, "5.5.4")
        assert_reply(conn.cmd("NOOP"), 250)


def test_unicode_digit_in_bdat_size_rfc3030_2(mta):
    """RFC 3030 2: chunk-size ::= 1*DIGIT. "BDAT ²" passes str.isdigit()
    and int() raises ValueError: session thread dies with a traceback
    (mta/smtp/session.py smtp_bdat, `parts[0].isdigit()`)."""
    with mta.session() as conn:
        assert_reply(conn.cmd("MAIL FROM:<a@example.org>"), 250)
        assert_reply(conn.cmd("RCPT TO:<info@example.com>"), 250)
        reply = conn.cmd("BDAT \u00b2 LAST")
        assert reply.code == 501, str(reply)


def test_end_of_data_after_a_1000_octet_line_is_seen_rfc5321_4_1_1_4(shared_mta):
    """RFC 5321 4.1.1.4: CRLF.CRLF ends the data. When a line's CR is the
    1001st octet of a read (a 1000-octet line), read_data gets "...\\r" and
    then "\\n" as two segments, decides the next line does not start a line,
    and misses the end of data: the client waits for a reply that never
    comes (until smtp_timeout), and its next commands are read as message
    text. Expected: 550 5.5.2 (line too long) right after the end.
    (mta/smtp/data.py read_data: `at_line_start = segment[-2:] == b"\\r\\n"`.)"""
    with shared_mta.session() as conn:
        assert_reply(conn.cmd("MAIL FROM:<a@example.org>"), 250)
        assert_reply(conn.cmd("RCPT TO:<info@example.com>"), 250)
        assert_reply(conn.cmd("DATA"), 354)
        conn.send(b"Subject: long line\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n")
        try:
            reply = conn.reply(timeout=5)
        except socket.timeout:
            raise AssertionError("no reply to the end of data: CRLF.CRLF after a 1000-octet line was missed")
        assert_reply(reply, 550, "5.5.2")


def test_ipv6_address_literal_with_zone_index_refused_rfc5321_4_1_3(shared_mta):
    """RFC 5321 4.1.3: IPv6-addr has no zone index; Python's ipaddress
    accepts "::1%anything" since 3.9, so spaces and other characters reach
    an accepted address's domain (mta/address.py check_domain,
    `ipaddress.IPv6Address(literal[5:])`)."""
    with shared_mta.session() as conn:
        reply = conn.cmd('MAIL FROM:<"a"@[IPv6:::1%x y]>')
        assert reply.code == 501 or reply.code == 553, str(reply)
        conn.cmd("RSET")
        assert_reply(conn.cmd("MAIL FROM:<a@example.org>"), 250)
        reply = conn.cmd("RCPT TO:<user@[IPv6:fe80::1%eth0]>")
        assert reply.code in (501, 553), str(reply)


def test_orcpt_and_envid_decoding_to_controls_refused_rfc3461_4(shared_mta):
    """RFC 3461 4.2/4.4: the xtext-decoded ORCPT and ENVID are printable
    US-ASCII. "+0D+0A" decodes to CR LF, which goes into the envelope and
    into mta.log's `orig_to=<...>` (forged log lines) (mta/smtp/esmtp.py
    decode_xtext / parse_rcpt_params / parse_mail_params)."""
    with shared_mta.session() as conn:
        assert_reply(conn.cmd("MAIL FROM:<a@example.org> ENVID=x+0D+0Ay"), 501, "5.5.4")
        conn.cmd("RSET")
        assert_reply(conn.cmd("MAIL FROM:<a@example.org>"), 250)
        reply = conn.cmd("RCPT TO:<info@example.com> ORCPT=rfc822;a+0D+0AX-Forged:+20log+20line")
        assert_reply(reply, 501, "5.5.4")
