"""TLS contexts for ATNA Secure Node authentication (ITI-19): mutual TLS, TLS 1.2 floor, BCP195.

Inbound and outbound use the same rules: the peer must present a certificate that chains to the
configured trust store; TLS 1.0/1.1 and non-AEAD suites are refused.
"""

from __future__ import annotations

import _ssl
import contextvars
import ctypes
import logging
import ssl
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from xca_gateway.protocol.credentials import load_cert_chain, load_verify_locations
from xca_gateway.settings import BCP195_CIPHERS, TlsConfig


def _harden(ctx: ssl.SSLContext, minimum_version: str, ciphers: str) -> None:
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if minimum_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(ciphers)
    # No renegotiation (client-initiated renegotiation is a DoS vector), no compression (CRIME).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, cfg.minimum_version, cfg.ciphers)
    load_cert_chain(ctx, cfg.certificate, cfg.private_key, what="[tls] certificate")
    load_verify_locations(ctx, cfg.trust_store, what="[tls] trust_store")
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_crls(ctx, cfg.crl_file)
    enable_certificate_capture(ctx)
    # OpenSSL sends two tickets by default: half the cost for the same resumption.
    ctx.num_tickets = cfg.session_tickets
    if not cfg.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET  # nor TLS 1.2 tickets
    return ctx


def _load_crls(ctx: ssl.SSLContext, crl_file: Path | None) -> None:
    """Check peer certificates against the CRLs of their issuing CA (ATNA node policy).

    Only the leaf is checked: a missing CRL for an intermediate would otherwise refuse every
    peer. A CA whose CRL is absent from the file makes its leaves fail verification, which is
    the safe side when revocation checking was asked for.
    """
    if crl_file is None:
        return
    load_verify_locations(ctx, crl_file, what="[tls] crl_file")
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def client_context(
    trust_store: Path,
    certificate: Path | None = None,
    private_key: Path | None = None,
    *,
    minimum_version: str = "1.2",
    ciphers: str = BCP195_CIPHERS,
    check_hostname: bool = True,
    label: str = "client certificate",
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, minimum_version, ciphers)
    load_verify_locations(ctx, trust_store, what="trust store (CA)")
    if certificate is not None:
        load_cert_chain(ctx, certificate, private_key, what=label)
    # FQDN Validation of Server Certificate option (RFC 6125).
    ctx.check_hostname = check_hostname
    return ctx


def gateway_client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The context the gateway uses to call peers, with its own certificate."""
    ctx = client_context(
        cfg.trust_store,
        cfg.certificate,
        cfg.private_key,
        minimum_version=cfg.minimum_version,
        ciphers=cfg.ciphers,
        label="[tls] certificate",
    )
    _load_crls(ctx, cfg.crl_file)
    return ctx


@dataclass(frozen=True)
class HandshakeFailure:
    """A refused or broken TLS handshake, reported to the application (ATNA Security Alert)."""

    address: str
    port: int
    reason: str
    # OpenSSL's verify message, e.g. "certificate has expired", when the peer's certificate
    # was the problem.
    verify_message: str | None = None
    # The certificate the peer presented (DER), if it got that far: who tried to connect.
    certificate_der: bytes | None = None
    # When it happened (wall time), for the operator page.
    at: float = field(default_factory=time.time, compare=False)

    @property
    def certificate_subject(self) -> str | None:
        if not self.certificate_der:
            return None

        try:
            return certificate_info(self.certificate_der).subject
        except ValueError:
            return None


# --- Capturing the certificate of a refused peer -------------------------------------------
# The ssl module offers no verify callback, so when verification fails the peer's certificate is
# gone with the handshake. OpenSSL's message callback (exposed by CPython as the private
# ``SSLContext._msg_callback``) still sees the Certificate handshake message, decrypted even in
# TLS 1.3; a context variable set by the accepting task ties it to the connection, because
# asyncio creates the SSLObject from within that task's context. Best effort: if a future
# Python drops these hooks, handshakes work exactly as before, only without the certificate.

log = logging.getLogger(__name__)


class HandshakeCapture:
    __slots__ = ("certificate_der",)

    def __init__(self) -> None:
        self.certificate_der: bytes | None = None


HANDSHAKE_CAPTURE: contextvars.ContextVar[HandshakeCapture | None] = contextvars.ContextVar(
    "xca_handshake_capture", default=None
)


class _CapturingSSLObject(ssl.SSLObject):
    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super()._create(*args, **kwargs)  # type: ignore[misc]
        obj._xca_capture = HANDSHAKE_CAPTURE.get()
        return obj


def first_certificate(message: bytes, tls13: bool) -> bytes | None:
    """The leaf certificate (DER) of a TLS Certificate handshake message (RFC 5246 / 8446)."""
    try:
        pos = 4  # handshake type (1) + length (3)
        if tls13:
            pos += 1 + message[4]  # certificate_request_context
        pos += 3  # certificate_list length
        length = int.from_bytes(message[pos : pos + 3], "big")
        der = message[pos + 3 : pos + 3 + length]
        return bytes(der) if length and len(der) == length else None
    except IndexError:
        return None


_CERTIFICATE_MESSAGE = 11  # HandshakeType.certificate (RFC 5246 / RFC 8446)
_HANDSHAKE = 22  # ContentType.handshake


def _on_tls_message(
    conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes
) -> None:
    # Called by OpenSSL for every TLS record of every connection (a study is ~65,000 records
    # per GB), so the common case must cost one comparison.
    if msg_type != _CERTIFICATE_MESSAGE or content_type != _HANDSHAKE or direction != "read":
        return
    capture = getattr(conn, "_xca_capture", None)
    if capture is not None and capture.certificate_der is None:
        capture.certificate_der = first_certificate(data, version == ssl.TLSVersion.TLSv1_3)


def enable_certificate_capture(ctx: ssl.SSLContext) -> None:
    try:
        ctx.sslobject_class = _CapturingSSLObject
        # The C-level setter, not ssl.SSLContext's property: that one wraps the callback in a
        # function turning every record's ints into enums, a measurable cost when relaying.
        super(ssl.SSLContext, ssl.SSLContext)._msg_callback.__set__(  # type: ignore[misc]
            ctx, _on_tls_message
        )
    except (AttributeError, TypeError):  # pragma: no cover - depends on the Python build
        log.info("TLS certificate capture of refused peers is not available on this Python")


# --- OpenSSL calls the ssl module does not expose ------------------------------------------

# CPython's connection object behind SSLSocket and SSLObject (private: looked up, and absent
# means none of this, not a failure).
_NATIVE_SOCKET: type | None = getattr(_ssl, "_SSLSocket", None)


class NativeTls:
    """A few per-connection OpenSSL settings the ssl module lacks, on CPython: read-ahead
    (see ``tls_socket``) and switching the message callback off once a handshake is done.

    The connection's ``SSL *`` is read from CPython's ``_ssl._SSLSocket`` object (its fields
    after the object header: the socket's weak reference, the ``SSL *``, the context), and
    only trusted when the field after it holds the connection's own context object. Any
    mismatch, another build or another Python: :meth:`pointer` is None and the connection
    keeps OpenSSL's defaults.
    """

    _SSL_CTRL_GET_READ_AHEAD = 40
    _SSL_CTRL_SET_READ_AHEAD = 41

    def __init__(self) -> None:
        self.available = False
        try:
            if sys.implementation.name != "cpython" or _NATIVE_SOCKET is None:
                return
            library = ctypes.CDLL(_ssl.__file__)  # its symbols and its libssl's
            self._ctrl = library.SSL_ctrl
            self._ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
            self._ctrl.restype = ctypes.c_long
            self._buffer_len = library.SSL_set_default_read_buffer_len
            self._buffer_len.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
            self._buffer_len.restype = None
            self._has_pending = library.SSL_has_pending
            self._has_pending.argtypes = (ctypes.c_void_p,)
            self._has_pending.restype = ctypes.c_int
            self._msg_callback = library.SSL_set_msg_callback
            self._msg_callback.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
            self._msg_callback.restype = None
            self._head = object.__basicsize__  # PyObject_HEAD
            self._word = ctypes.sizeof(ctypes.c_void_p)
            self.available = _NATIVE_SOCKET.__basicsize__ >= self._head + 3 * self._word
        except (AttributeError, OSError, TypeError):  # pragma: no cover - other builds
            self.available = False

    def pointer(self, connection: ssl.SSLSocket | ssl.SSLObject) -> int | None:
        """The connection's ``SSL *``, or None."""
        native = getattr(connection, "_sslobj", None)
        if not self.available or native is None or type(native) is not _NATIVE_SOCKET:
            return None
        base = id(native) + self._head
        ssl_pointer = ctypes.c_void_p.from_address(base + self._word).value
        context = ctypes.c_void_p.from_address(base + 2 * self._word).value
        if not ssl_pointer or context != id(connection.context):
            return None
        return ssl_pointer

    def read_ahead(self, ssl_pointer: int, buffer_bytes: int) -> None:
        """OpenSSL reads the socket ahead into a buffer of ``buffer_bytes``; before the
        handshake (the buffer is sized when first used)."""
        self._buffer_len(ssl_pointer, buffer_bytes)
        self._ctrl(ssl_pointer, self._SSL_CTRL_SET_READ_AHEAD, 1, None)

    def reading_ahead(self, ssl_pointer: int) -> bool:
        return bool(self._ctrl(ssl_pointer, self._SSL_CTRL_GET_READ_AHEAD, 0, None))

    def has_pending(self, ssl_pointer: int) -> bool:
        """Whether OpenSSL holds received bytes (decrypted or not) no socket event announces."""
        return bool(self._has_pending(ssl_pointer))

    def quiet(self, connection: ssl.SSLSocket | ssl.SSLObject) -> bool:
        """No more message callbacks on this connection (see :func:`enable_certificate_capture`:
        after the handshake there is nothing to capture, and the callback runs per record)."""
        ssl_pointer = self.pointer(connection)
        if ssl_pointer is None:
            return False
        self._msg_callback(ssl_pointer, None)
        return True


NATIVE_TLS = NativeTls()


def describe_handshake_error(exc: BaseException) -> tuple[str, str | None]:
    """Turn a handshake exception into (reason, verify message)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}", exc.verify_message
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        known = {
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client presented no certificate",
            "UNSUPPORTED_PROTOCOL": "protocol version refused (TLS 1.2 is the floor)",
            "NO_SHARED_CIPHER": "no shared cipher suite (BCP195 suites only)",
            "TLSV1_ALERT_UNKNOWN_CA": "peer does not trust our certificate",
            "CERTIFICATE_VERIFY_FAILED": "certificate verification failed",
            "WRONG_VERSION_NUMBER": "not a TLS connection or unsupported version",
            "HTTP_REQUEST": "plain HTTP sent to the TLS port",
        }
        return known.get(reason, reason.lower().replace("_", " ")), None
    if isinstance(exc, TimeoutError):
        return "handshake timed out", None
    if isinstance(exc, ConnectionError | EOFError):
        return "connection closed during handshake", None
    return f"handshake failed: {type(exc).__name__}: {exc}", None


@dataclass(frozen=True)
class CertificateInfo:
    """A printable summary of an X.509 certificate (e.g. a TLS peer's)."""

    subject: str
    issuer: str
    serial_number: int
    not_before: datetime
    not_after: datetime
    san_dns: tuple[str, ...]
    san_ip: tuple[str, ...]
    san_uri: tuple[str, ...]
    fingerprint_sha256: str


def certificate_info(der_or_pem: bytes) -> CertificateInfo:
    """Summarise a certificate given as DER (e.g. ``getpeercert(binary_form=True)``) or PEM.

    Raises ValueError if the bytes are not a parseable certificate.
    """
    data = bytes(der_or_pem)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        return CertificateInfo(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial_number=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            san_dns=dns,
            san_ip=ips,
            san_uri=uris,
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        )
    except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # Peer certificates are untrusted input; normalise parse failures to ValueError.
        raise ValueError(f"unparseable certificate: {exc}") from exc
