"""``benchmarks/stream_relay.py``, the imaging benchmark's Python floor: a real TLS relay with
the dev PKI's certificates on both sides, moving every byte both ways unread, one connection
not waiting for another, and refusing a caller without a client certificate; with ``--frame``,
a chunked MTOM reply re-framed under the relay's own boundary, every part whole."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xca_gateway.protocol.mtom import (
    Finished,
    MtomWriter,
    MultipartParser,
    OutgoingPart,
    PartData,
    PartStart,
    parse_content_type,
)
from xca_gateway.security.dev_pki import DevPki, init_dev_pki

ROOT = Path(__file__).resolve().parent.parent
REPLY = 6 * 1024 * 1024 + 12345  # several read-ahead buffers, not a multiple of a record


def _reply_for(request: bytes) -> bytes:
    """What the upstream answers: REPLY bytes derived from the request."""
    seed = hashlib.sha256(request).digest()
    blocks = bytearray()
    counter = 0
    while len(blocks) < REPLY:
        blocks += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest() * 64
        counter += 1
    return bytes(blocks[:REPLY])


# The instances of the MTOM reply: sizes around the relay's 256 KiB reads, one that holds a
# near-delimiter, and a DICOM file meta group at the head of each (read for the audit).
_PARTS = {
    f"i{n}@beta": b"\0" * 128 + b"DICM" + bytes([n]) * size
    for n, size in enumerate((1, 300_000, 262_144 - 133, 2_000_000, 17))
}
_PARTS["near@beta"] = b"\r\n--MIMEBoundary_up\r\n" + os.urandom(70_000)


def _mtom_reply() -> bytes:
    """beta's reply: an MTOM multipart body in HTTP chunks of odd sizes."""
    writer = MtomWriter(b"<root/>", boundary="MIMEBoundary_upstream", root_content_id="root@beta")
    for cid, data in _PARTS.items():
        writer.add_part(OutgoingPart(cid, "application/dicom", data))
    body = b"".join(writer.iter_bytes())
    chunks = []
    for start in range(0, len(body), 99_991):
        piece = body[start : start + 99_991]
        chunks.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    head = f"HTTP/1.1 200 OK\r\ncontent-type: {writer.content_type}\r\n"
    head += "transfer-encoding: chunked\r\n\r\n"
    return head.encode() + b"".join(chunks) + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("relay") / "pki", ["alpha", "beta"])


@pytest.fixture(scope="module")
def upstream(pki: DevPki) -> Iterator[tuple[int, list[str]]]:
    """beta: reads a request up to a blank line, answers, closes; requires alpha's certificate
    (what it saw of each caller is recorded)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.communities["beta"].cert, pki.communities["beta"].key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    callers: list[str] = []

    def serve(raw: socket.socket) -> None:
        with raw, context.wrap_socket(raw, server_side=True) as conn:
            subject = dict(x[0] for x in conn.getpeercert()["subject"])  # type: ignore[index,misc]
            callers.append(str(subject.get("commonName")))
            request = b""
            while not request.endswith(b"\r\n\r\n"):
                data = conn.recv(65536)
                if not data:
                    return
                request += data
            conn.sendall(
                _mtom_reply() if request.startswith(b"POST /mtom") else _reply_for(request)
            )
            with contextlib.suppress(OSError):  # the relay may close without close_notify
                conn.unwrap()

    def accept() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], callers
    listener.close()


def _start_relay(
    pki: DevPki, upstream_port: int, work: Path, *args: str
) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    alpha = pki.communities["alpha"]
    ready = work / "ready"
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "stream_relay.py"),
            *("--port", str(port), "--upstream-port", str(upstream_port)),
            *("--cert", str(alpha.cert), "--key", str(alpha.key), "--ca", str(pki.ca)),
            *("--ready", str(ready)),
            *args,
        ],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("relay did not start")
        time.sleep(0.05)
    return process, port


@pytest.fixture(scope="module")
def framing_relay(
    pki: DevPki, upstream: tuple[int, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    process, port = _start_relay(pki, upstream[0], tmp_path_factory.mktemp("frame"), "--frame")
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def relay(
    pki: DevPki, upstream: tuple[int, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    process, port = _start_relay(pki, upstream[0], tmp_path_factory.mktemp("relay-run"))
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _client(pki: DevPki, *, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if certificate:
        context.load_cert_chain(pki.client.cert, pki.client.key)
    context.load_verify_locations(pki.ca)
    return context


def _exchange(pki: DevPki, port: int, request: bytes) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    with _client(pki).wrap_socket(raw, server_hostname="localhost") as conn:
        for start in range(0, len(request), 1000):  # the request in pieces, as TCP may
            conn.sendall(request[start : start + 1000])
        received = bytearray()
        while data := conn.recv(1 << 20):
            received += data
        return bytes(received)


def test_every_byte_both_ways(pki: DevPki, relay: int, upstream: tuple[int, list[str]]) -> None:
    request = b"POST /xca/rad75 HTTP/1.1\r\nx-test: " + b"r" * 300_000 + b"\r\n\r\n"
    assert _exchange(pki, relay, request) == _reply_for(request)
    # beta saw alpha's certificate: the relay stands in alpha's place.
    assert upstream[1][-1].startswith("alpha.")


def test_connections_relayed_side_by_side(pki: DevPki, relay: int) -> None:
    requests = [f"GET /{n} HTTP/1.1\r\n\r\n".encode() for n in range(3)]
    replies: dict[int, bytes] = {}
    threads = [
        threading.Thread(
            target=lambda n=n: replies.__setitem__(n, _exchange(pki, relay, requests[n]))
        )
        for n in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {n: r == _reply_for(requests[n]) for n, r in replies.items()} == {
        0: True,
        1: True,
        2: True,
    }


def test_caller_without_certificate_refused(pki: DevPki, relay: int) -> None:
    raw = socket.create_connection(("127.0.0.1", relay), timeout=30)
    context = _client(pki, certificate=False)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
        conn.recv(1)  # TLS 1.3: the server's refusal arrives after the client's Finished


def test_framing_relay_sends_every_part_whole_under_its_own_boundary(
    pki: DevPki, framing_relay: int
) -> None:
    request = b"POST /mtom HTTP/1.1\r\nhost: beta\r\n\r\n"
    for _ in range(2):  # a second reply on the same connection starts afresh
        raw = _exchange(pki, framing_relay, request)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK"
        fields = dict(line.split(": ", 1) for line in lines[1:])
        assert fields["transfer-encoding"] == "chunked"
        boundary = parse_content_type(fields["content-type"])[1]["boundary"]
        assert boundary != "MIMEBoundary_upstream"
        decoded = bytearray()
        while True:  # the relay's own chunks
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded += body[:size]
            assert body[size : size + 2] == b"\r\n"
            body = body[size + 2 :]
        parts: dict[str | None, bytearray] = {}
        current: bytearray | None = None
        finished = False
        for event in MultipartParser(boundary).feed(bytes(decoded)):
            if isinstance(event, PartStart):
                current = parts.setdefault(event.headers.content_id, bytearray())
            elif isinstance(event, PartData):
                assert current is not None
                current += event.data
            elif isinstance(event, Finished):
                finished = True
        assert finished
        assert parts.pop("root@beta") == b"<root/>"
        assert {cid: bytes(data) for cid, data in parts.items()} == _PARTS
