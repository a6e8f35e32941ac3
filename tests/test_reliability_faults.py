"""Reliability cases not covered elsewhere (issue 11): the registry database locked or broken,
duplicated WS-Security headers, a slow request body, a peer answering byte by byte or with
garbage, and a full disk under the audit spool.

Real parts throughout: SQLite files held by a second connection, gateways over mutual TLS,
and a peer that is a real TLS server which dribbles its answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.test_initiating import find_documents
from tests.test_registry_corpus import APPROVED, PID_A, adhoc, listed, quoted, sqlite_registry
from tests.test_registry_submit import request
from tests.test_server import ADHOC_QUERY, consumer, fault_of, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit.spool import Spool
from xca_gateway.protocol.namespaces import SOAP12, WSA, Action
from xca_gateway.protocol.peer_client import PeerClient, PeerError
from xca_gateway.protocol.tls import client_context, server_context
from xca_gateway.registry import LocalRegistry
from xca_gateway.registry.sqlite_store import SqliteRegistryStore
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import OutboundConfig, TlsConfig
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId

WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"

# ----------------------------------------------------------------------------- registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    opened = asyncio.run(sqlite_registry(tmp_path))
    assert isinstance(opened, LocalRegistry)
    yield opened
    asyncio.run(opened.close())


def _database(registry: LocalRegistry) -> Path:
    store = registry.store
    assert isinstance(store, SqliteRegistryStore)
    return store.path


def test_a_locked_registry_database_answers_registry_busy(registry: LocalRegistry) -> None:
    store = registry.store
    assert isinstance(store, SqliteRegistryStore)
    store._busy_timeout = 0.2  # the lock below is held far longer
    locker = sqlite3.connect(_database(registry), isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another writer holds the database
        errors = asyncio.run(registry.submit(request()))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert [e.error_code for e in errors] == [ErrorCode.REGISTRY_BUSY]
    # Once the lock is gone the same kind of submission is registered.
    assert asyncio.run(registry.submit(request())) == []


def test_a_destroyed_registry_database_answers_registry_error(registry: LocalRegistry) -> None:
    path = _database(registry)
    for suffix in ("", "-wal", "-shm"):
        target = Path(str(path) + suffix)
        if target.exists():
            with target.open("r+b") as f:  # the same inode, so open connections see it too
                f.write(b"this is not a database" * 512)
    result = asyncio.run(
        registry.stored_query(
            adhoc(
                StoredQueryId.FIND_DOCUMENTS,
                [
                    ("$XDSDocumentEntryPatientId", quoted(PID_A)),
                    ("$XDSDocumentEntryStatus", listed(APPROVED)),
                ],
            )
        )
    )
    assert result.status.endswith(":Failure")
    assert [e.error_code for e in result.errors] in (
        [ErrorCode.REGISTRY_ERROR],
        [ErrorCode.REGISTRY_BUSY],
    )


# ----------------------------------------------------------------------------- SOAP server


def test_duplicated_ws_security_headers_are_refused(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    issuer = {"issuer": "https://idp.test", "certificates": [str(pki.communities["beta"].cert)]}
    gateway = gateway_factory(
        "alpha",
        xua={"enabled": True, "trusted_issuers": [issuer], "audiences": ["https://alpha.test"]},
    )
    body = soap12(Action.ITI38, ADHOC_QUERY).replace(
        b"</s:Header>",
        f'<wsse:Security xmlns:wsse="{WSSE}"/><wsse:Security xmlns:wsse="{WSSE}"/>'.encode()
        + b"</s:Header>",
    )
    with consumer(pki) as client:
        response = client.post(
            gateway.endpoint_urls()["iti38"],
            content=body,
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 400
    code, subcodes, reason = fault_of(response)
    assert code.endswith(":Sender")
    assert any(s.endswith(":InvalidSecurity") for s in subcodes), subcodes
    assert "more than one wsse:Security" in reason


def test_a_slow_request_body_is_cut_off_by_the_body_timeout(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", server={"body_timeout": 1.0})
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    raw = socket.create_connection(("127.0.0.1", gateway.https.port), timeout=30)
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /xca/iti38 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\nContent-Length: 1000\r\n\r\n<"
        )
        # Never send the rest: the server, not our 30 s socket timeout, must end this.
        answer = b""
        for _ in range(100):  # bounded; the answer is one small response at most
            try:
                chunk = tls.recv(4096)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            answer += chunk
    # The server ended the request by itself and closed the connection. (It answers
    # "503 handler timed out" today; 408 would name the cause better.)
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert answer == b"" or (
        head.startswith((b"http/1.1 4", b"http/1.1 5")) and b"connection: close" in head
    ), answer[:200]


# ----------------------------------------------------------------------------- dribbling peer


class DribblingPeer:
    """A TLS server (the peer's certificate) that sends a valid SOAP answer one byte at a
    time with ``gap`` seconds between bytes."""

    def __init__(self, pki: DevPki, gap: float, answer: bytes | None = None) -> None:
        pair = pki.communities["beta"]
        self.answer = answer
        self.context = server_context(TlsConfig(pair.cert, pair.key, pki.ca))
        self.gap = gap
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _answer(self) -> bytes:
        if self.answer is not None:
            return self.answer
        envelope = (
            f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"><s:Header>'
            f"<a:Action>{Action.ITI38_RESPONSE}</a:Action></s:Header><s:Body>"
            '<query:AdhocQueryResponse xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0" '
            'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success">'
            '<rim:RegistryObjectList xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"/>'
            "</query:AdhocQueryResponse></s:Body></s:Envelope>"
        ).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/soap+xml; charset=UTF-8\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(envelope)
            + envelope
        )

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(10)
                    data = b""
                    while b"</s:Envelope>" not in data and b"Envelope>" not in data[-20:]:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    for byte in self._answer():
                        if self.stop.wait(self.gap):
                            return
                        tls.sendall(bytes([byte]))
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=10)


@pytest.mark.parametrize(
    ("gap", "deadline", "answered"), [(0.0005, 30.0, True), (0.05, 1.5, False)]
)
async def test_a_peer_answering_byte_by_byte(
    pki: DevPki, gap: float, deadline: float, answered: bool
) -> None:
    """Within the deadline the dribbled answer is used; over it the call ends at the deadline
    with a timeout, whatever the per-read timeout would allow."""
    peer = DribblingPeer(pki, gap)
    ctx = client_context(pki.ca, pki.communities["alpha"].cert, pki.communities["alpha"].key)
    client = PeerClient(ctx, OutboundConfig(connect_timeout=5, request_timeout=60.0))
    try:
        url = f"https://127.0.0.1:{peer.port}/xca/iti38"
        payload = etree.fromstring(find_documents("P1^^^&1.2.3&ISO"))
        if answered:
            reply = await client.call(url, payload, Action.ITI38, deadline=deadline)
            assert reply.payload.get("status", "").endswith(":Success")
        else:
            with pytest.raises(PeerError) as raised:
                await client.call(url, payload, Action.ITI38, deadline=deadline)
            assert raised.value.kind == "timeout"
    finally:
        await client.aclose()
        await asyncio.to_thread(peer.close)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/soap+xml\r\nContent-Length: 9\r\n\r\n"
        b"\x00\xff<<garb",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>",
        b"\x16\x03\x03 not http at all\r\n\r\n",
    ],
    ids=["binary-as-soap", "html", "not-http"],
)
async def test_a_peer_answering_garbage_is_a_peer_error(pki: DevPki, answer: bytes) -> None:
    peer = DribblingPeer(pki, 0.0, answer)
    ctx = client_context(pki.ca, pki.communities["alpha"].cert, pki.communities["alpha"].key)
    client = PeerClient(ctx, OutboundConfig(connect_timeout=5, request_timeout=30.0))
    try:
        url = f"https://127.0.0.1:{peer.port}/xca/iti38"
        payload = etree.fromstring(find_documents("P1^^^&1.2.3&ISO"))
        with pytest.raises(PeerError) as raised:
            await client.call(url, payload, Action.ITI38, deadline=20.0)
        assert raised.value.kind in ("malformed", "http", "connect")
    finally:
        await client.aclose()
        await asyncio.to_thread(peer.close)


# ----------------------------------------------------------------------------- disk full

_DISK_FULL_CHILD = r"""
import errno, json, os, resource, signal, sys
from pathlib import Path
from xca_gateway.audit.spool import Spool

directory = Path(sys.argv[1])
spool = Spool(directory, ["arr"], segment_bytes=1 << 30)
committed = spool.append([b"before-%d" % i for i in range(10)])
# The kernel now refuses writes past the segment's size + 300 bytes, as a full disk would
# (EFBIG instead of ENOSPC: the same failed write(2) for the spool).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
segment = max(directory.glob("*.seg"))
resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size + 300, resource.RLIM_INFINITY))
failed_errno = None
for i in range(100):
    try:
        committed += spool.append([b"during-%d-" % i + b"x" * 40])
    except OSError as exc:
        failed_errno = exc.errno
        break
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
# Space is back: the spool keeps working after the failure.
committed += spool.append([b"after"])
spool.close()
print(json.dumps({"committed": committed, "errno": failed_errno}))
"""


def test_a_full_disk_fails_the_spool_append_without_corrupting_committed_records(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errno"] is not None  # the write really failed
    reopened = Spool(tmp_path, ["arr"])
    try:
        payloads = [r.payload for r in reopened.reader("arr").read(max_records=1000)]
    finally:
        reopened.close()
    # Every acknowledged append is there, in order, and nothing half-written.
    assert len(payloads) == report["committed"]
    assert payloads[:10] == [b"before-%d" % i for i in range(10)]
    assert payloads[-1] == b"after"
    assert all(p.startswith(b"during-") for p in payloads[10:-1])
