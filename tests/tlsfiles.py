"""
Certificates and PSK files made fresh for each test run, in the directory
layout nbdkit, qemu and libnbd share (C{ca-cert.pem}, C{server-cert.pem},
C{server-key.pem}, C{client-cert.pem}, C{client-key.pem}). Nothing here is
committed: every key is generated on the spot, so none can be reused.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_certificates", "make_psk_file"]

_KeyType = ec.EllipticCurvePrivateKey


def _name(common_name: str, organisation: str = "twisted-nbd tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: _KeyType) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)


def _issue(
    subject: x509.Name,
    key: _KeyType,
    issuer: x509.Name,
    issuer_key: _KeyType,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(
    directory: Path, *, client_cn: str | None = "alice", ca_cn: str = "twisted-nbd test CA"
) -> Path:
    """
    Write a CA, a server certificate for C{localhost}/C{127.0.0.1}, and
    (unless C{client_cn} is C{None}) a client certificate whose subject is
    C{CN=client_cn,O=twisted-nbd tests}, all signed by the CA.

    @return: C{directory}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(ca_cn)
    ca_cert = _issue(ca_name, ca_key, ca_name, ca_key, ca=True)
    (directory / "ca-cert.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(_name("localhost"), server_key, ca_name, ca_key, server=True)
    (directory / "server-cert.pem").write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
    )
    _write_key(directory / "server-key.pem", server_key)
    if client_cn is not None:
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_cert = _issue(_name(client_cn), client_key, ca_name, ca_key)
        (directory / "client-cert.pem").write_bytes(
            client_cert.public_bytes(serialization.Encoding.PEM)
        )
        _write_key(directory / "client-key.pem", client_key)
    return directory


def make_psk_file(path: Path, users: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """
    Write a C{username:hexkey} file (psktool's format) with fresh random
    keys (or C{users}); the keys by user.
    """
    if users is None:
        users = {"alice": os.urandom(32)}
    path.write_text("".join(f"{user}:{key.hex()}\n" for user, key in users.items()))
    os.chmod(path, 0o600)
    return users
