"""DKIM (RFC 6376, dkimpy): verify inbound signatures, sign outbound mail.

Verification reports one result per signature for Authentication-Results
(pass, fail, neutral, temperror, permerror). Signing uses the key under
MTA_DATA_DIR/dkim/<domain>/<selector>.key for the From: domain (or a parent
domain holding a key; the newest key wins when there are several), RSA-SHA256
or Ed25519-SHA256 (RFC 8463), relaxed/relaxed, over the usual headers with
From oversigned. Messages over MAX_DKIM_SIZE are neither verified nor signed:
dkimpy needs the whole message in memory.
"""

from __future__ import annotations

import base64
import glob
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("mta.policy")

MAX_DKIM_SIZE = 10_000_000
SIGNED_HEADERS = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to",
                  b"references", b"mime-version", b"content-type", b"content-transfer-encoding", b"from"]


@dataclass(frozen=True)
class DkimResult:
    result: str
    domain: str
    selector: str
    b: str = ""

    def authres(self) -> str:
        if self.result == "none":
            return "dkim=none"
        tag = f" header.b={self.b[:8]}" if self.b else ""
        return f"dkim={self.result} header.d={self.domain} header.s={self.selector}{tag}"


def verify(resolver, message: bytes) -> list[DkimResult]:
    import dkim
    try:
        checker = dkim.DKIM(message, minkey=1024, timeout=5)
        signatures = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    except Exception as error:
        log.info("DKIM: unparseable message: %s", error)
        return [DkimResult("permerror", "", "")]
    if not signatures:
        return [DkimResult("none", "", "")]
    results = []
    for index, raw in enumerate(signatures[:5]):
        tags = _tags(raw)
        domain, selector, b = tags.get("d", ""), tags.get("s", ""), tags.get("b", "").replace(" ", "")
        timeouts = []

        def dnsfunc(name, timeout=5):
            # dkimpy turns a DNS timeout into a plain False; remember it so the
            # result is temperror, not fail (RFC 6376 6.1.2, RFC 8601 2.7.1).
            try:
                return resolver.dkim_dnsfunc(name, timeout)
            except dkim.DnsTimeoutError:
                timeouts.append(name)
                raise

        try:
            ok = checker.verify(idx=index, dnsfunc=dnsfunc)
            outcome = "pass" if ok else ("temperror" if timeouts else "fail")
        except dkim.DnsTimeoutError:
            outcome = "temperror"
        except dkim.ValidationError as error:
            # A body hash mismatch is a signature that does not verify (fail);
            # other validation errors are unusable signatures (permerror),
            # RFC 6376 6.1.3, RFC 8601 2.7.1.
            log.info("DKIM signature %d (d=%s) invalid: %s", index, domain, error)
            outcome = "fail" if "body hash" in str(error).lower() else "permerror"
        except dkim.DKIMException as error:   # no key, malformed key or signature
            log.info("DKIM signature %d (d=%s) unusable: %s", index, domain, error)
            outcome = "permerror"
        except Exception as error:
            log.info("DKIM signature %d (d=%s) error: %s", index, domain, error)
            outcome = "permerror"
        results.append(DkimResult(outcome, domain.lower(), selector, b))
    return results


def _tags(raw: bytes) -> dict[str, str]:
    tags = {}
    for part in raw.decode("ascii", "replace").split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags[name.strip()] = "".join(value.split())
    return tags


def has_keys(data_dir: str) -> bool:
    """Is there any signing key at all (one directory listing)?"""
    try:
        return any(entry.is_dir() for entry in os.scandir(os.path.join(data_dir, "dkim")))
    except OSError:
        return False


def find_key(data_dir: str, domain: str) -> tuple[str, str, str] | None:
    """(signing domain, selector, key path) for `domain` or a parent domain."""
    labels = domain.lower().rstrip(".").split(".")
    for start in range(len(labels) - 1):
        candidate = ".".join(labels[start:])
        keys = glob.glob(os.path.join(data_dir, "dkim", glob.escape(candidate), "*.key"))
        if keys:
            newest = max(keys, key=os.path.getmtime)
            return candidate, os.path.basename(newest)[:-4], newest
    return None


def sign(message: bytes, domain: str, selector: str, key_path: str) -> bytes:
    """The DKIM-Signature header line(s) for `message` (CRLF-terminated)."""
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with open(key_path, "rb") as handle:
        pem = handle.read()
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        private, algorithm = base64.b64encode(raw), b"ed25519-sha256"
    else:
        private, algorithm = pem, b"rsa-sha256"
    signer = dkim.DKIM(message, signature_algorithm=algorithm)
    header = signer.sign(selector.encode("ascii"), domain.encode("ascii"), private,
                         canonicalize=(b"relaxed", b"relaxed"), include_headers=SIGNED_HEADERS)
    return header if header.endswith(b"\r\n") else header.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
