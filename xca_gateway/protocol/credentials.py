"""Certificates and keys an operator names: one-line errors that say which file and why.

OpenSSL reports a missing file as ``[Errno 2] No such file or directory`` (without the name)
and a certificate that does not belong to its key as ``[X509: KEY_VALUES_MISMATCH]``. These
helpers load the same files with the same ``ssl`` calls and, when that fails, look at the files
themselves to say what is wrong: missing, unreadable, not PEM, a key that is not the
certificate's, a certificate that has expired or is not valid yet.
"""

from __future__ import annotations

import errno
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class CredentialError(OSError):
    """A certificate, key or trust store file that cannot be used (the message names it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class CertificateFacts:
    path: Path
    subject: str
    not_before: datetime
    not_after: datetime

    def expires_in(self, now: datetime | None = None) -> float:
        return (self.not_after - (now or datetime.now(UTC))).total_seconds()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise CredentialError(f"{what} {path}: is a directory, not a file") from None
    except PermissionError:
        raise CredentialError(
            f"{what} {path}: not readable by this user (uid {os.getuid()}): permission denied"
        ) from None
    except OSError as exc:
        raise CredentialError(f"{what} {path}: cannot be read: {exc.strerror or exc}") from None


def read_certificate(path: Path, what: str = "certificate") -> CertificateFacts:
    data = _read(path, what)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            cert = x509.load_der_x509_certificate(data)
        except ValueError:
            raise CredentialError(f"{what} {path}: not a PEM certificate") from None
    return CertificateFacts(
        path, cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc
    )


def read_certificates(path: Path, what: str = "trust store") -> list[CertificateFacts]:
    """Every certificate of a PEM bundle (a trust store)."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CredentialError(f"{what} {path}: no PEM certificate in it") from None
    return [
        CertificateFacts(
            path, c.subject.rfc4514_string(), c.not_valid_before_utc, c.not_valid_after_utc
        )
        for c in certs
    ]


def check_key_pair(
    certificate: Path,
    private_key: Path,
    *,
    what: str = "certificate",
    now: datetime | None = None,
    check_validity: bool = True,
) -> CertificateFacts:
    """The certificate's facts, or a :class:`CredentialError` saying what is wrong."""
    facts = read_certificate(certificate, what)
    key_data = _read(private_key, "private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CredentialError(
            f"private key {private_key}: encrypted with a passphrase (not supported)"
        ) from None
    except ValueError:
        raise CredentialError(f"private key {private_key}: not a PEM private key") from None
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CredentialError(
            f"{what} {certificate} and private key {private_key} do not match "
            "(the key is not the certificate's)"
        )
    if check_validity:
        moment = now or datetime.now(UTC)
        if moment >= facts.not_after:
            raise CredentialError(
                f"{what} {certificate} expired on {facts.not_after:%Y-%m-%d %H:%M} UTC"
            )
        if moment < facts.not_before:
            raise CredentialError(
                f"{what} {certificate} is not valid before {facts.not_before:%Y-%m-%d %H:%M} UTC"
            )
    return facts


def load_cert_chain(
    ctx: ssl.SSLContext, certificate: Path, private_key: Path | None, *, what: str = "certificate"
) -> None:
    """``ctx.load_cert_chain`` with a one-line error naming the file and the reason."""
    try:
        ctx.load_cert_chain(str(certificate), str(private_key) if private_key else None)
    except (ssl.SSLError, OSError) as exc:
        check_key_pair(certificate, private_key or certificate, what=what, check_validity=False)
        raise CredentialError(f"{what} {certificate}: {_ssl_reason(exc)}") from None


def load_verify_locations(ctx: ssl.SSLContext, trust_store: Path, *, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(trust_store))
    except (ssl.SSLError, OSError) as exc:
        _read(trust_store, what)  # missing or unreadable: say so
        raise CredentialError(f"{what} {trust_store}: {_ssl_reason(exc)}") from None


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno) if exc.errno != errno.ENOENT else "file not found"
    return str(exc)
