"""DKIM signing keys under MTA_DATA_DIR/dkim/<domain>/<selector>.key.

Owns key generation (RSA-2048, or Ed25519 per RFC 8463) and the DNS TXT
record operators publish (RFC 6376 3.6.1). Keys are written atomically,
mode 0600, and never overwritten.
"""

from __future__ import annotations

import base64
import os
import re

from mta import safeio
from mta.address import AddressError, check_domain, domain_key

_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def key_path(data_dir: str, domain: str, selector: str) -> str:
    return os.path.join(data_dir, "dkim", domain, f"{selector}.key")


def keygen(data_dir: str, domain: str, selector: str, algorithm: str = "rsa") -> str:
    """Write a new key; return the TXT record to publish."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        check_domain(domain, utf8=True)
    except AddressError as error:
        raise ValueError(f"--domain: {error}") from None
    if domain.startswith("["):
        raise ValueError("--domain: must be a domain name")
    domain = domain_key(domain)
    if not _SELECTOR.match(selector):
        raise ValueError(f"--selector: not a valid selector: {selector!r}")
    path = key_path(data_dir, domain, selector)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose another --selector to rotate keys")
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        tag = "ed25519"
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        tag = "rsa"
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    safeio.atomic_write(path, private, mode=0o600)
    value = f"v=DKIM1; k={tag}; p={base64.b64encode(public).decode('ascii')}"
    # TXT strings are at most 255 octets each (RFC 1035 3.3.14): split for zone files.
    chunks = " ".join(f'"{value[i:i + 250]}"' for i in range(0, len(value), 250))
    return f"{selector}._domainkey.{domain}. IN TXT ( {chunks} )"
