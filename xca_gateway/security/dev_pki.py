"""Development PKI for mutually authenticated TLS between XCA-I gateways.

``xca-gateway certs init`` calls :func:`init_dev_pki` to produce a throw-away CA plus one
certificate per community gateway (usable as TLS server *and* client, since gateways both
answer and initiate cross-community queries), a consumer client certificate, and two
deliberately bad client certificates (foreign CA, expired) for negative tests.

ATNA ITI-19 mandates RSA, so all keys are RSA with SHA-256 signatures. Nothing here is fit
for production: private keys are written unencrypted (mode 0600).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertPair", "DevPki", "init_dev_pki", "issue_client_certificate", "load_dev_pki"]

MANIFEST_NAME = "pki.json"
MANIFEST_VERSION = 1
ORGANIZATION = "xca-gateway development PKI"
COMMUNITY_DOMAIN = "xca-gateway.test"

# ITI19-12 recommends at most two years for end-entity certificates.
LEAF_VALIDITY = timedelta(days=730)
CA_VALIDITY = timedelta(days=5 * 365)
# Backdate notBefore so peers with slightly slow clocks accept freshly issued certs.
CLOCK_SKEW = timedelta(minutes=5)

# A community name becomes a DNS label (<name>.xca-gateway.test) and a file stem.
_COMMUNITY_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Stems used by the fixed files; a community with one of these names would overwrite them.
_RESERVED_NAMES = frozenset(
    {"ca", "client", "untrusted-ca", "untrusted-client", "expired-client", "pki"}
)

_CA_CERT = "ca.pem"
_CA_KEY = "ca.key"
_UNTRUSTED_CA_CERT = "untrusted-ca.pem"


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate and its unencrypted PKCS#8 PEM private key."""

    cert: Path
    key: Path

    def to_json(self) -> dict[str, str]:
        return {"cert": str(self.cert.absolute()), "key": str(self.key.absolute())}


@dataclass(frozen=True)
class DevPki:
    """Locations of everything :func:`init_dev_pki` wrote."""

    dir: Path
    ca: Path
    communities: dict[str, CertPair]
    client: CertPair
    untrusted_client: CertPair
    expired_client: CertPair

    @property
    def untrusted_ca(self) -> Path:
        """The foreign CA that issued ``untrusted_client`` (no key is kept for it)."""
        return self.dir / _UNTRUSTED_CA_CERT

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir.absolute()),
            "ca": str(self.ca.absolute()),
            "untrusted_ca": str(self.untrusted_ca.absolute()),
            "communities": {name: pair.to_json() for name, pair in self.communities.items()},
            "client": self.client.to_json(),
            "untrusted_client": self.untrusted_client.to_json(),
            "expired_client": self.expired_client.to_json(),
        }


def validate_community_name(name: str) -> str:
    """Return ``name`` if it is a usable community name, else raise ValueError."""
    if not isinstance(name, str) or not _COMMUNITY_RE.fullmatch(name):
        raise ValueError(
            f"invalid community name {name!r}: use 1-63 lowercase letters, digits and "
            "hyphens, not starting or ending with a hyphen"
        )
    if name in _RESERVED_NAMES:
        raise ValueError(f"invalid community name {name!r}: reserved for a PKI file")
    return name


# --------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey


def _now() -> datetime:
    # Whole seconds: X.509 UTCTime has no fractions, so round-tripped values compare equal.
    return datetime.now(UTC).replace(microsecond=0)


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _new_key(key_size: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def _make_ca(common_name: str, key_size: int, now: datetime) -> _Issuer:
    key = _new_key(key_size)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now - CLOCK_SKEW + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(cert, key)


def _issue_leaf(
    issuer: _Issuer,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    eku: Sequence[x509.ObjectIdentifier],
    key_size: int,
    not_before: datetime,
    not_after: datetime,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key(key_size)
    try:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return cert, key


def _leaf_window(issuer: _Issuer, now: datetime) -> tuple[datetime, datetime]:
    """Validity for a fresh leaf, clamped so it never outlives its CA."""
    not_before = now - CLOCK_SKEW
    not_after = min(not_before + LEAF_VALIDITY, issuer.cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(
            f"CA certificate {issuer.cert.subject.rfc4514_string()} has expired; "
            "regenerate the PKI with force=True"
        )
    return not_before, not_after


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    # Temp file in the same directory so os.replace is an atomic rename; mkstemp creates it
    # 0600, so a private key is never readable by others even for an instant.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey
) -> CertPair:
    pair = CertPair(cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a cert without its key on disk would be useless after an interruption.
    _atomic_write(pair.key, key_pem, 0o600)
    _atomic_write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return pair


def _community_sans(
    name: str,
    hostnames: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> list[x509.GeneralName]:
    # Hostname verification only looks at the SAN, so the CN's FQDN is repeated there.
    dns = list(dict.fromkeys([f"{name}.{COMMUNITY_DOMAIN}", *hostnames]))
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    sans.extend(x509.IPAddress(ip) for ip in ips)
    return sans


def _issue_community(
    directory: Path,
    issuer: _Issuer,
    name: str,
    hostnames: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    key_size: int,
    now: datetime,
) -> CertPair:
    not_before, not_after = _leaf_window(issuer, now)
    cert, key = _issue_leaf(
        issuer,
        _name(f"{name}.{COMMUNITY_DOMAIN}", unit=name),
        _community_sans(name, hostnames, ips),
        # Gateways both serve (responding gateway) and call (initiating gateway) peers.
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        key_size,
        not_before,
        not_after,
    )
    return _write_pair(directory, name, cert, key)


def _issue_client(
    directory: Path,
    issuer: _Issuer,
    stem: str,
    label: str,
    key_size: int,
    not_before: datetime,
    not_after: datetime,
) -> CertPair:
    cert, key = _issue_leaf(
        issuer,
        _name(label, unit="client"),
        [x509.UniformResourceIdentifier(f"urn:xca-gateway:client:{label}")],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        key_size,
        not_before,
        not_after,
    )
    return _write_pair(directory, stem, cert, key)


def _rel(directory: Path, path: Path) -> str:
    # Relative paths keep the manifest valid when the directory is moved or bind-mounted.
    return os.path.relpath(path, directory)


def _write_manifest(
    pki: DevPki, hostnames: Sequence[str], ip_addresses: Sequence[str], created: datetime
) -> None:
    def pair(p: CertPair) -> dict[str, str]:
        return {"cert": _rel(pki.dir, p.cert), "key": _rel(pki.dir, p.key)}

    manifest = {
        "version": MANIFEST_VERSION,
        "created": created.isoformat(),
        "hostnames": list(hostnames),
        "ip_addresses": list(ip_addresses),
        "ca": _rel(pki.dir, pki.ca),
        "ca_key": _CA_KEY,
        "untrusted_ca": _UNTRUSTED_CA_CERT,
        "communities": {name: pair(p) for name, p in pki.communities.items()},
        "client": pair(pki.client),
        "untrusted_client": pair(pki.untrusted_client),
        "expired_client": pair(pki.expired_client),
    }
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    _atomic_write(pki.dir / MANIFEST_NAME, data, 0o644)


def _load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: unsupported PKI manifest (expected version {MANIFEST_VERSION})")
    return manifest


def _load_issuer(directory: Path, manifest: dict[str, Any]) -> _Issuer:
    cert = x509.load_pem_x509_certificate((directory / manifest["ca"]).read_bytes())
    key = serialization.load_pem_private_key(
        (directory / manifest.get("ca_key", _CA_KEY)).read_bytes(), password=None
    )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{directory}: CA key is not an RSA key")
    return _Issuer(cert, key)


def _parse_ips(
    ip_addresses: Sequence[str],
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(ip) for ip in ip_addresses]


def _check_str_sequence(value: Sequence[str], what: str) -> list[str]:
    # A bare str is a Sequence[str]; "a,b" would silently become communities "a", ",", "b".
    if isinstance(value, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single string")
    return list(value)


# --------------------------------------------------------------------------- public API


def load_dev_pki(directory: Path) -> DevPki:
    """Read the ``pki.json`` manifest written by :func:`init_dev_pki`.

    Raises FileNotFoundError if the manifest or any file it names is missing, ValueError if
    the manifest is malformed.
    """
    directory = Path(directory).absolute()
    manifest = _load_manifest(directory)

    def path(rel: Any) -> Path:
        if not isinstance(rel, str):
            raise ValueError(f"{directory / MANIFEST_NAME}: bad path entry {rel!r}")
        return directory / rel

    def pair(entry: Any) -> CertPair:
        if not isinstance(entry, dict):
            raise ValueError(f"{directory / MANIFEST_NAME}: bad cert entry {entry!r}")
        return CertPair(cert=path(entry.get("cert")), key=path(entry.get("key")))

    try:
        communities_raw = manifest["communities"]
        if not isinstance(communities_raw, dict):
            raise ValueError(f"{directory / MANIFEST_NAME}: 'communities' must be an object")
        pki = DevPki(
            dir=directory,
            ca=path(manifest["ca"]),
            communities={validate_community_name(n): pair(e) for n, e in communities_raw.items()},
            client=pair(manifest["client"]),
            untrusted_client=pair(manifest["untrusted_client"]),
            expired_client=pair(manifest["expired_client"]),
        )
    except KeyError as exc:
        raise ValueError(f"{directory / MANIFEST_NAME}: missing key {exc}") from exc

    pairs = [*pki.communities.values(), pki.client, pki.untrusted_client, pki.expired_client]
    files = [pki.ca, pki.untrusted_ca, *(p for cp in pairs for p in (cp.cert, cp.key))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"development PKI in {directory} is incomplete: {missing}")
    return pki


def issue_client_certificate(
    pki: DevPki, label: str, *, key_size: int = 2048, stem: str | None = None
) -> CertPair:
    """A client certificate (clientAuth, URI SAN ``urn:xca-gateway:client:<label>``, subject
    ``CN=<label>,OU=client``) from the development CA, for one more identity: a community's
    local consumer or repository, an audit consumer, a second test caller.

    Idempotent: an existing pair ``<stem>.pem``/``<stem>.key`` (stem defaults to the label) is
    returned as is, so a restarted demo keeps the certificates it handed out.
    """
    label = validate_community_name(label)
    stem = stem or label
    existing = CertPair(pki.dir / f"{stem}.pem", pki.dir / f"{stem}.key")
    if existing.cert.exists() and existing.key.exists():
        return existing
    manifest = _load_manifest(pki.dir)
    issuer = _load_issuer(pki.dir, manifest)
    not_before, not_after = _leaf_window(issuer, _now())
    return _issue_client(pki.dir, issuer, stem, label, key_size, not_before, not_after)


def init_dev_pki(
    directory: Path,
    communities: Sequence[str],
    *,
    hostnames: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    key_size: int = 2048,
    force: bool = False,
) -> DevPki:
    """Create (or extend) the development PKI in ``directory``.

    Without ``force``, an existing PKI (``pki.json``) is reused: communities it lacks are
    issued from the existing CA, the rest is left untouched (so already-distributed certs
    stay valid; pass ``force=True`` to reissue everything, e.g. with new hostnames).
    """
    names = [validate_community_name(n) for n in _check_str_sequence(communities, "communities")]
    names = list(dict.fromkeys(names))
    hostnames = _check_str_sequence(hostnames, "hostnames")
    ip_addresses = _check_str_sequence(ip_addresses, "ip_addresses")
    ips = _parse_ips(ip_addresses)
    if key_size < 2048:
        raise ValueError("key_size must be at least 2048 bits")

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()

    if not force and (directory / MANIFEST_NAME).exists():
        try:
            existing = load_dev_pki(directory)
        except (ValueError, FileNotFoundError) as exc:
            # Never silently replace a CA whose certs may already be deployed elsewhere.
            raise type(exc)(f"{exc}; pass force=True to regenerate the PKI") from exc
        missing = [n for n in names if n not in existing.communities]
        if not missing:
            return existing
        manifest = _load_manifest(directory)
        issuer = _load_issuer(directory, manifest)
        added = {
            n: _issue_community(directory, issuer, n, hostnames, ips, key_size, now)
            for n in missing
        }
        extended = DevPki(
            dir=existing.dir,
            ca=existing.ca,
            communities={**existing.communities, **added},
            client=existing.client,
            untrusted_client=existing.untrusted_client,
            expired_client=existing.expired_client,
        )
        created = datetime.fromisoformat(manifest.get("created", now.isoformat()))
        _write_manifest(
            extended,
            manifest.get("hostnames", hostnames),
            manifest.get("ip_addresses", ip_addresses),
            created,
        )
        return extended

    ca = _make_ca("xca-gateway development CA", key_size, now)
    ca_key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(directory / _CA_KEY, ca_key_pem, 0o600)
    _atomic_write(directory / _CA_CERT, ca.cert.public_bytes(serialization.Encoding.PEM), 0o644)

    community_pairs = {
        n: _issue_community(directory, ca, n, hostnames, ips, key_size, now) for n in names
    }
    not_before, not_after = _leaf_window(ca, now)
    client = _issue_client(directory, ca, "client", "consumer", key_size, not_before, not_after)

    # A structurally identical CA the gateways do not trust: its client must be rejected.
    foreign = _make_ca("xca-gateway untrusted development CA", key_size, now)
    _atomic_write(
        directory / _UNTRUSTED_CA_CERT, foreign.cert.public_bytes(serialization.Encoding.PEM), 0o644
    )
    untrusted = _issue_client(
        directory, foreign, "untrusted-client", "untrusted", key_size, not_before, not_after
    )
    # Signed by the real CA but outside its validity window: must fail on time checks alone.
    expired = _issue_client(
        directory,
        ca,
        "expired-client",
        "expired",
        key_size,
        now - timedelta(days=30),
        now - timedelta(days=1),
    )

    pki = DevPki(
        dir=directory,
        ca=directory / _CA_CERT,
        communities=community_pairs,
        client=client,
        untrusted_client=untrusted,
        expired_client=expired,
    )
    # The manifest is written last: its presence means the PKI is complete.
    _write_manifest(pki, hostnames, ip_addresses, now)
    return pki
