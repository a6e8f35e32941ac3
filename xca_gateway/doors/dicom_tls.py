"""DICOM TLS (PS3.15 Annex B) for pynetdicom listeners, and who a DIMSE association is.

pynetdicom's server wraps each accepted socket with ``ssl_context.wrap_socket`` in its accept
loop: the handshake runs there, so one client that connects and never speaks would stop every
other association, and a refused handshake vanishes without a word. :class:`TlsAssociationServer`
wraps without the handshake and runs it in the connection's own thread, under a deadline, and
reports a refusal (address, reason, the certificate presented) like the HTTPS listeners do, so
that it reaches the audit trail as a Security Alert.

:func:`association_identity` turns what TLS verified and the A-ASSOCIATE-RQ's calling AE title
into the :class:`~xca_gateway.security.callers.Identity` the door guard decides on.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from xca_gateway.protocol.http_server import PeerInfo, peer_certificate, source_of
from xca_gateway.protocol.tls import HandshakeCapture, HandshakeFailure, describe_handshake_error
from xca_gateway.security.callers import Identity
from xca_gateway.security.guard import identity_from_peer

log = logging.getLogger(__name__)

__all__ = ["TlsAssociationServer", "association_identity", "peer_info"]


class TlsAssociationServer(ThreadedAssociationServer):
    """A pynetdicom association server whose TLS handshakes run in the connection threads.

    ``handshake_timeout`` bounds each handshake; ``on_handshake_failure`` hears every refused
    one (called from the connection's thread).
    """

    handshake_timeout: float = 10.0
    on_handshake_failure: Callable[[HandshakeFailure], None] | None = None
    # Admission at accept, before TLS (one thread per connection): at most this many
    # connections, this many per source address, and the ClientHello must start within
    # hello_timeout seconds. pynetdicom's own maximum_associations applies after negotiation.
    max_connections: int = 64
    max_connections_per_source: int = 16
    hello_timeout: float = 5.0
    on_refused: Callable[[str, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Connections accepted whose association has not started yet, by source.
        self._admitting: dict[str, int] = {}
        self._admission = threading.Lock()
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Called in the accept thread for every connection: refused (closed at once) when the
        listener or the source has all the connections it may have."""
        source = source_of(str(client_address[0]))
        with self._admission:
            running = [str(a.requestor.address) for a in self.active_associations]
            total = len(running) + sum(self._admitting.values())
            mine = self._admitting.get(source, 0) + sum(
                1 for address in running if source_of(address) == source
            )
            if total >= self.max_connections:
                reason = "max_connections"
            elif mine >= self.max_connections_per_source:
                reason = "max_connections_per_source"
            else:
                self._admitting[source] = self._admitting.get(source, 0) + 1
                return True
        log.warning("DICOM connection from %s refused (%s)", client_address[0], reason)
        if self.on_refused is not None:
            with contextlib.suppress(Exception):
                self.on_refused("dimse", reason)
        return False

    def shutdown(self) -> None:
        """Stop serving and close the listening socket. (The AE's own ``start_server`` list of
        servers does not hold this one: the door starts it itself.)"""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
                return
            super().process_request_thread(request, client_address)
        finally:
            # From here the association's own thread counts (active_associations).
            source = source_of(str(client_address[0]))
            with self._admission:
                left = self._admitting.get(source, 0) - 1
                if left > 0:
                    self._admitting[source] = left
                else:
                    self._admitting.pop(source, None)

    def _handshake(self, sock: ssl.SSLSocket, client_address: Any) -> bool:
        address, port = str(client_address[0]), int(client_address[1])
        # xca_gateway.protocol.tls's message callback keeps the certificate a refused peer
        # presented.
        capture = HandshakeCapture()
        sock._xca_capture = capture  # type: ignore[attr-defined]
        try:
            # The ClientHello must start soon: a socket that never speaks is not given the
            # whole handshake deadline (select: wrap_socket did not read anything yet).
            readable, _, _ = select.select([sock], [], [], self.hello_timeout)
            if not readable:
                raise TimeoutError(f"no TLS ClientHello within {self.hello_timeout:g} s")
            sock.settimeout(self.handshake_timeout)
            sock.do_handshake()
            sock.settimeout(None)  # pynetdicom's own timeouts apply from here
            return True
        except (TimeoutError, ssl.SSLError, OSError, EOFError) as exc:
            reason, verify_message = describe_handshake_error(exc)
            failure = HandshakeFailure(
                address, port, reason, verify_message, capture.certificate_der
            )
            log.warning(
                "DICOM TLS handshake from %s:%s refused: %s (certificate: %s)",
                address,
                port,
                reason,
                failure.certificate_subject or "none",
            )
            if self.on_handshake_failure is not None:
                try:
                    self.on_handshake_failure(failure)
                except Exception:
                    log.exception("handshake failure callback failed")
            self.shutdown_request(sock)
            return False


def peer_info(sock: socket.socket | None, address: str, port: int) -> PeerInfo:
    """The TCP peer, and the certificate it proved to hold when ``sock`` is TLS."""
    if not isinstance(sock, ssl.SSLSocket):
        return PeerInfo(address=address, port=port)
    cipher = sock.cipher()
    return PeerInfo(
        address=address,
        port=port,
        certificate=peer_certificate(sock),
        tls_version=sock.version(),
        cipher=cipher[0] if cipher else None,
    )


def association_identity(assoc: Any) -> Identity:
    """Who requests ``assoc`` (a pynetdicom acceptor, at EVT_REQUESTED): the verified
    certificate (DICOM TLS) or the address, with the calling AE title of its A-ASSOCIATE-RQ."""
    requestor = assoc.requestor
    calling = str(getattr(requestor.primitive, "calling_ae_title", "") or "").strip()
    dul_socket = getattr(assoc.dul, "socket", None)
    sock = getattr(dul_socket, "socket", None)
    peer = peer_info(sock, str(requestor.address or ""), int(requestor.port or 0))
    return identity_from_peer(peer, ae_title=calling)
