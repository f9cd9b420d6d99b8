"""TLS for the SMTP listeners: the server SSLContext and the dev certificate.

TLS 1.2 and newer only, Mozilla "intermediate" ciphers for TLS 1.2 (TLS 1.3
suites are OpenSSL's defaults), no compression, no renegotiation. The
context is rebuilt on SIGHUP (`TlsProvider.reload`) so a renewed certificate
is used by new sessions without dropping old ones. With no MTA_TLS_CERT the
development default generates a self-signed certificate once.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import threading

from mta import safeio

log = logging.getLogger("mta.tls")

# Mozilla intermediate (v5.7), ECDHE only: we ship no DH parameters.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert, key)
    return context


def generate_self_signed(cert_path: str, key_path: str, hostname: str) -> None:
    """RSA-2048 self-signed certificate for `hostname`, valid ten years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname or "localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(key_path), mode=0o700, exist_ok=True)
    safeio.atomic_write(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()), mode=0o600)
    safeio.atomic_write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    log.info("generated a self-signed certificate for %s in %s", hostname, cert_path)


def certificate_paths(config) -> tuple[str, str]:
    """The configured pair, or the development default's generated pair."""
    if config.tls_cert:
        return config.tls_cert, config.tls_key
    return os.path.join(config.tls_dir, "cert.pem"), os.path.join(config.tls_dir, "key.pem")


class TlsProvider:
    """Holds the current server context; `reload` swaps it atomically."""

    def __init__(self, config):
        self._lock = threading.Lock()
        self.context: ssl.SSLContext | None = None
        self.reload(config)

    def reload(self, config) -> None:
        cert, key = certificate_paths(config)
        if not config.tls_cert and not (os.path.exists(cert) and os.path.exists(key)):
            generate_self_signed(cert, key, config.hostname)
        context = server_context(cert, key)
        with self._lock:
            self.context = context
