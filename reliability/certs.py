"""Client certificates the demo PKI does not issue: not yet valid, and server-only key usage.

Signed by the demo CA (its key is in WORKDIR/certs/ca.key), so the only thing wrong with each
is the property under test.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def issue_client(
    ca_cert: Path,
    ca_key: Path,
    out_dir: Path,
    stem: str,
    *,
    not_before: datetime,
    not_after: datetime,
    eku: list[x509.ObjectIdentifier],
) -> tuple[Path, Path]:
    issuer = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    issuer_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(issuer_key, rsa.RSAPrivateKey):
        raise ValueError("the demo CA key is not RSA")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xca-gateway reliability"),
            x509.NameAttribute(NameOID.COMMON_NAME, stem),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def not_yet_valid_client(ca_cert: Path, ca_key: Path, out_dir: Path) -> tuple[Path, Path]:
    now = datetime.now(UTC)
    return issue_client(
        ca_cert,
        ca_key,
        out_dir,
        "not-yet-valid-client",
        not_before=now + timedelta(days=30),
        not_after=now + timedelta(days=60),
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )


def server_only_client(ca_cert: Path, ca_key: Path, out_dir: Path) -> tuple[Path, Path]:
    """A valid certificate whose extended key usage is serverAuth only (not clientAuth)."""
    now = datetime.now(UTC)
    return issue_client(
        ca_cert,
        ca_key,
        out_dir,
        "server-only-client",
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
