"""Tests for the development PKI: certificate contents, files, idempotency and real mTLS."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xca_gateway.protocol.tls import CertificateInfo, certificate_info
from xca_gateway.security.dev_pki import (
    CertPair,
    DevPki,
    init_dev_pki,
    issue_client_certificate,
    load_dev_pki,
)

COMMUNITIES = ("alpha", "beta", "gamma-2")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    # Shared read-only PKI: key generation dominates test time, so do it once per module.
    return init_dev_pki(tmp_path_factory.mktemp("pki") / "certs", COMMUNITIES)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def _all_pairs(p: DevPki) -> list[CertPair]:
    return [*p.communities.values(), p.client, p.untrusted_client, p.expired_client]


# --------------------------------------------------------------------------- files


def test_files_and_manifest(pki: DevPki) -> None:
    expected = {
        "ca.pem",
        "ca.key",
        "client.pem",
        "client.key",
        "untrusted-ca.pem",
        "untrusted-client.pem",
        "untrusted-client.key",
        "expired-client.pem",
        "expired-client.key",
        "pki.json",
    } | {f"{n}.{ext}" for n in COMMUNITIES for ext in ("pem", "key")}
    # Exactly these files: no stray temp files from the atomic writes.
    assert {p.name for p in pki.dir.iterdir()} == expected
    assert list(pki.communities) == list(COMMUNITIES)
    assert pki.ca == pki.dir / "ca.pem"
    assert pki.untrusted_ca == pki.dir / "untrusted-ca.pem"
    assert pki.communities["alpha"] == CertPair(pki.dir / "alpha.pem", pki.dir / "alpha.key")

    assert load_dev_pki(pki.dir) == pki

    js = pki.to_json()
    json.dumps(js)  # must be JSON-serialisable as-is
    assert js["ca"] == str(pki.ca) and Path(js["ca"]).is_absolute()
    assert js["communities"]["beta"] == {
        "cert": str(pki.dir / "beta.pem"),
        "key": str(pki.dir / "beta.key"),
    }
    for name in ("client", "untrusted_client", "expired_client"):
        assert Path(js[name]["cert"]).is_absolute() and Path(js[name]["key"]).is_file()


def test_private_keys_are_0600_unencrypted_pkcs8_rsa(pki: DevPki) -> None:
    keys = [pki.dir / "ca.key", *(p.key for p in _all_pairs(pki))]
    for key_path in keys:
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600, key_path
        pem = key_path.read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not "RSA PRIVATE KEY"
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 2048


def test_each_key_matches_its_certificate(pki: DevPki) -> None:
    for pair in _all_pairs(pki):
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
        assert key.public_key() == _cert(pair.cert).public_key()


# --------------------------------------------------------------------------- contents


def test_ca_certificate(pki: DevPki) -> None:
    ca = _cert(pki.ca)
    ca.verify_directly_issued_by(ca)  # self-signed
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    bc = _ext(ca, x509.BasicConstraints)
    assert bc.critical and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca
    ku = _ext(ca, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    _ext(ca, x509.SubjectKeyIdentifier)
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=4 * 365) < lifetime <= timedelta(days=5 * 366)
    assert ca.not_valid_before_utc < datetime.now(UTC)


@pytest.mark.parametrize("name", COMMUNITIES)
def test_community_certificate(pki: DevPki, name: str) -> None:
    ca = _cert(pki.ca)
    cert = _cert(pki.communities[name].cert)
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    unit = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in cn] == [f"{name}.xca-gateway.test"]
    assert [a.value for a in org] == ["xca-gateway development PKI"]
    assert [a.value for a in unit] == [name]

    bc = _ext(cert, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints) and not bc.ca
    ku = _ext(cert, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == [f"{name}.xca-gateway.test", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    ca_ski = _ext(ca, x509.SubjectKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.digest
    _ext(cert, x509.SubjectKeyIdentifier)

    now = datetime.now(UTC)
    assert cert.not_valid_before_utc <= now - timedelta(minutes=1)  # clock-skew allowance
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=730)
    assert cert.not_valid_after_utc > now + timedelta(days=365)


def test_full_path_validation_with_cryptography_verifier(pki: DevPki) -> None:
    # Independent RFC 5280 path building (incl. EKU and time checks), not just one signature.
    store = verification.Store([_cert(pki.ca)])
    builder = verification.PolicyBuilder().store(store)
    for name in COMMUNITIES:
        leaf = _cert(pki.communities[name].cert)
        builder.build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
        builder.build_client_verifier().verify(leaf, [])  # gateways are clients too
    builder.build_client_verifier().verify(_cert(pki.client.cert), [])
    for bad in (pki.untrusted_client, pki.expired_client):
        with pytest.raises(verification.VerificationError):
            builder.build_client_verifier().verify(_cert(bad.cert), [])


def test_consumer_client_certificate(pki: DevPki) -> None:
    cert = _cert(pki.client.cert)
    cert.verify_directly_issued_by(_cert(pki.ca))
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["urn:xca-gateway:client:consumer"]
    assert datetime.now(UTC) < cert.not_valid_after_utc


def test_expired_client_is_expired_but_signed_by_ca(pki: DevPki) -> None:
    cert = _cert(pki.expired_client.cert)
    cert.verify_directly_issued_by(_cert(pki.ca))
    now = datetime.now(UTC)
    assert cert.not_valid_before_utc < cert.not_valid_after_utc < now - timedelta(hours=12)


def test_untrusted_client_is_not_issued_by_ca(pki: DevPki) -> None:
    ca = _cert(pki.ca)
    untrusted_ca = _cert(pki.untrusted_ca)
    cert = _cert(pki.untrusted_client.cert)
    with pytest.raises((ValueError, InvalidSignature)):
        cert.verify_directly_issued_by(ca)
    cert.verify_directly_issued_by(untrusted_ca)
    assert untrusted_ca.public_key() != ca.public_key()
    assert datetime.now(UTC) < cert.not_valid_after_utc  # only the issuer is wrong


# --------------------------------------------------------------------------- certificate_info


def test_certificate_info_pem_and_der(pki: DevPki) -> None:
    cert = _cert(pki.communities["beta"].cert)
    der = cert.public_bytes(serialization.Encoding.DER)
    info = certificate_info(pki.communities["beta"].cert.read_bytes())
    assert info == certificate_info(der)
    assert info == CertificateInfo(
        subject="CN=beta.xca-gateway.test,OU=beta,O=xca-gateway development PKI",
        issuer="CN=xca-gateway development CA,O=xca-gateway development PKI",
        serial_number=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        san_dns=("beta.xca-gateway.test", "localhost"),
        san_ip=("127.0.0.1",),
        san_uri=(),
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
    )
    assert info.not_before.tzinfo is not None


def test_certificate_info_client_and_no_san(pki: DevPki) -> None:
    client = certificate_info(pki.client.cert.read_bytes())
    assert client.san_uri == ("urn:xca-gateway:client:consumer",)
    assert client.san_dns == () and client.san_ip == ()
    ca = certificate_info(pki.ca.read_bytes())  # the CA has no SAN extension
    assert ca.subject == ca.issuer
    assert (ca.san_dns, ca.san_ip, ca.san_uri) == ((), (), ())


@pytest.mark.parametrize("junk", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nxx"])
def test_certificate_info_rejects_garbage(junk: bytes) -> None:
    with pytest.raises(ValueError):
        certificate_info(junk)


# --------------------------------------------------------------------------- init behaviour


@pytest.mark.parametrize(
    "bad",
    ["", "Alpha", "a_b", "a.b", "-a", "a-", "a b", "ä", "x" * 64, "ca", "client", "expired-client"],
)
def test_invalid_community_names_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        init_dev_pki(tmp_path, ["ok", bad])
    assert not (tmp_path / "pki.json").exists()


def test_bare_string_communities_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        init_dev_pki(tmp_path, "alpha")


def test_invalid_ip_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        init_dev_pki(tmp_path, ["a"], ip_addresses=["not-an-ip"])


def test_custom_hostnames_and_ips(tmp_path: Path) -> None:
    p = init_dev_pki(tmp_path, ["a"], hostnames=["gw.example", "localhost"], ip_addresses=["::1"])
    info = certificate_info(p.communities["a"].cert.read_bytes())
    assert info.san_dns == ("a.xca-gateway.test", "gw.example", "localhost")
    assert info.san_ip == ("::1",)


def test_idempotent_reuse(tmp_path: Path) -> None:
    first = init_dev_pki(tmp_path, ["a", "b"])
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # Same or a subset of communities: nothing is reissued.
    assert init_dev_pki(tmp_path, ["b", "a"]) == first
    assert init_dev_pki(tmp_path, ["a"]) == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == snapshot


def test_new_communities_issued_from_existing_ca(tmp_path: Path) -> None:
    first = init_dev_pki(tmp_path, ["a"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "pki.json"}
    second = init_dev_pki(tmp_path, ["a", "b", "c"])
    assert list(second.communities) == ["a", "b", "c"]
    assert second.client == first.client
    # Existing material untouched, so certs already handed out keep working.
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    ca = _cert(second.ca)
    for name in ("b", "c"):
        _cert(second.communities[name].cert).verify_directly_issued_by(ca)
    assert load_dev_pki(tmp_path) == second


def test_force_regenerates_everything(tmp_path: Path) -> None:
    first = init_dev_pki(tmp_path, ["a"])
    old_ca = first.ca.read_bytes()
    old_leaf = first.communities["a"].cert.read_bytes()
    second = init_dev_pki(tmp_path, ["a"], force=True)
    assert second.ca.read_bytes() != old_ca
    assert second.communities["a"].cert.read_bytes() != old_leaf
    _cert(second.communities["a"].cert).verify_directly_issued_by(_cert(second.ca))


def test_load_dev_pki_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dev_pki(tmp_path)
    p = init_dev_pki(tmp_path, ["a"])
    p.communities["a"].key.unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.key"):
        load_dev_pki(tmp_path)
    with pytest.raises(FileNotFoundError, match="force=True"):
        init_dev_pki(tmp_path, ["a"])
    assert len(init_dev_pki(tmp_path, ["a"], force=True).communities) == 1
    (tmp_path / "pki.json").write_text("{not json")
    with pytest.raises(ValueError):
        load_dev_pki(tmp_path)


# --------------------------------------------------------------------------- real mTLS


@dataclass
class _ServerResult:
    peer_der: bytes | None = None
    received: bytes = b""
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _serve_once(ctx: ssl.SSLContext, listener: socket.socket, result: _ServerResult) -> None:
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                result.peer_der = tls.getpeercert(binary_form=True)
                result.received = tls.recv(64)
                tls.sendall(b"pong")
    except BaseException as exc:  # reported to the test thread, never swallowed
        result.error = exc
    finally:
        result.done.set()


@dataclass
class _Exchange:
    server: _ServerResult
    client_error: BaseException | None
    reply: bytes


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    with sock:
        yield sock


def _exchange(
    listener: socket.socket,
    server_pair: CertPair,
    ca: Path,
    client_pair: CertPair | None,
    server_hostname: str = "localhost",
) -> _Exchange:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_pair.cert, server_pair.key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(ca)

    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies server cert + hostname
    client_ctx.load_verify_locations(ca)
    if client_pair is not None:
        client_ctx.load_cert_chain(client_pair.cert, client_pair.key)

    result = _ServerResult()
    thread = threading.Thread(target=_serve_once, args=(server_ctx, listener, result), daemon=True)
    thread.start()
    client_error: BaseException | None = None
    reply = b""
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            # With TLS 1.3 a rejected client cert only surfaces on the first read.
            tls.sendall(b"ping")
            reply = tls.recv(64)
    except (ssl.SSLError, OSError) as exc:
        client_error = exc
    thread.join(timeout=10)
    assert not thread.is_alive(), "TLS server thread hung"
    return _Exchange(result, client_error, reply)


@pytest.mark.timeout(30)
def test_tls_consumer_client_accepted(pki: DevPki, listener: socket.socket) -> None:
    ex = _exchange(listener, pki.communities["alpha"], pki.ca, pki.client)
    assert ex.server.error is None and ex.client_error is None
    assert ex.server.received == b"ping" and ex.reply == b"pong"
    assert ex.server.peer_der is not None
    peer = certificate_info(ex.server.peer_der)
    assert peer.san_uri == ("urn:xca-gateway:client:consumer",)
    assert peer.fingerprint_sha256 == hashlib.sha256(ex.server.peer_der).hexdigest()


@pytest.mark.timeout(30)
def test_tls_gateway_to_gateway_by_ip(pki: DevPki, listener: socket.socket) -> None:
    # Initiating gateway beta presents its community cert as a client; SAN IP matches.
    ex = _exchange(listener, pki.communities["alpha"], pki.ca, pki.communities["beta"], "127.0.0.1")
    assert ex.server.error is None and ex.client_error is None
    assert ex.server.peer_der is not None
    assert certificate_info(ex.server.peer_der).subject.startswith("CN=beta.xca-gateway.test")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("which", "reason"),
    [("untrusted_client", "unable to get local issuer"), ("expired_client", "expired")],
)
def test_tls_bad_client_rejected(
    pki: DevPki, listener: socket.socket, which: str, reason: str
) -> None:
    bad: CertPair = getattr(pki, which)
    ex = _exchange(listener, pki.communities["alpha"], pki.ca, bad)
    assert isinstance(ex.server.error, ssl.SSLError)
    assert reason in str(ex.server.error)
    assert ex.server.received == b""
    assert ex.reply == b"" and ex.client_error is not None


@pytest.mark.timeout(30)
def test_tls_missing_client_cert_rejected(pki: DevPki, listener: socket.socket) -> None:
    ex = _exchange(listener, pki.communities["alpha"], pki.ca, None)
    assert isinstance(ex.server.error, ssl.SSLError)
    assert ex.reply == b""


@pytest.mark.timeout(30)
def test_tls_client_rejects_wrong_hostname(pki: DevPki, listener: socket.socket) -> None:
    ex = _exchange(listener, pki.communities["alpha"], pki.ca, pki.client, "gw.elsewhere.test")
    assert isinstance(ex.client_error, ssl.SSLCertVerificationError)
    assert ex.server.error is not None


def test_an_extra_client_certificate_is_issued_once_from_the_dev_ca(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "pki", ["north"])
    pair = issue_client_certificate(pki, "north-consumer")
    info = certificate_info(pair.cert.read_bytes())
    assert info.subject.startswith("CN=north-consumer,OU=client")
    assert info.san_uri == ("urn:xca-gateway:client:north-consumer",)
    assert info.issuer == certificate_info(pki.ca.read_bytes()).subject
    before = pair.cert.read_bytes()
    assert issue_client_certificate(pki, "north-consumer") == pair
    assert pair.cert.read_bytes() == before  # a restarted demo keeps what it handed out
