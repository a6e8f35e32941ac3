"""RAD-69 end to end: consumer -> initiating gateway -> responding gateway -> sources.

All hops are real gateways on loopback mTLS. Community alpha is the consumer's (Initiating
Imaging Gateway with a local filesystem source); beta is the peer (Responding Imaging Gateway
with a filesystem source and an XDS-I.b source reached by RAD-69, played by gateway gamma).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import make_config, wait_for
from tests.test_imaging_support import (
    EXPLICIT,
    documents_for,
    error_codes,
    install,
    make_big_study,
    make_study,
    post_retrieve,
    read_retrieve_reply,
    releasing_peer_pools,
    retrieve_body,
)
from tests.test_server import consumer, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.imaging.filesystem import FilesystemSource
from xca_gateway.imaging.rad69_source import Rad69Source
from xca_gateway.imaging.request import (
    DocumentRequest,
    InvalidImagingRequest,
    RetrieveImagingDocumentSetRequest,
)
from xca_gateway.imaging.retrieve import ImagingRetrieval
from xca_gateway.imaging.sources import PlannedInstance, Retrieval
from xca_gateway.initiating.imaging import InitiatingImagingGateway
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.protocol.tls import server_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.transactions.rad69 import imaging_document_source_handler
from xca_gateway.transactions.rad75 import rad75_handler

ALPHA_REPO = "1.3.6.1.4.1.21367.13.71.1.1"
BETA_FS_REPO = "1.3.6.1.4.1.21367.13.71.2.1"
BETA_RAD69_REPO = "1.3.6.1.4.1.21367.13.71.2.2"
# Short, so that responses whose consumer vanished release their sources quickly in tests.
ABANDON = 3.0
T = TypeVar("T")


@pytest.fixture
def imaging_gateways(
    gateway_factory: Callable[..., Gateway],
) -> Iterator[Callable[..., Gateway]]:
    yield from releasing_peer_pools(gateway_factory)


@dataclass
class Federation:
    alpha: Gateway
    beta: Gateway
    gamma: Gateway
    alpha_images: Path
    beta_images: Path
    gamma_images: Path

    @property
    def alpha_home(self) -> str:
        return self.alpha.config.community.home_community_id

    @property
    def beta_home(self) -> str:
        return self.beta.config.community.home_community_id

    @property
    def rad69_url(self) -> str:
        return self.alpha.endpoint_urls()["rad69"]


def build_federation(
    imaging_gateways: Callable[..., Gateway],
    tmp_path: Path,
    extra_peers: dict[str, str] | None = None,
) -> Federation:
    alpha = imaging_gateways("alpha")
    beta = imaging_gateways("beta")
    gamma = imaging_gateways("gamma")
    alpha_images, beta_images, gamma_images = (tmp_path / n for n in ("ai", "bi", "gi"))
    beta_home = beta.config.community.home_community_id
    # gamma plays beta's XDS-I.b Imaging Document Source.
    install(
        gamma,
        "rad69",
        Action.RAD69,
        "RAD-69",
        imaging_document_source_handler(
            {BETA_RAD69_REPO: FilesystemSource(BETA_RAD69_REPO, gamma_images)},
            home_community_id=beta_home,
            abandon_timeout=ABANDON,
        ),
    )
    beta_sources = {
        BETA_FS_REPO: FilesystemSource(BETA_FS_REPO, beta_images),
        BETA_RAD69_REPO: Rad69Source(
            BETA_RAD69_REPO,
            gamma.endpoint_urls()["rad69"],
            peer_client=beta.peer_client,
            home_community_id=beta_home,
        ),
    }
    install(
        beta,
        "rad75",
        Action.RAD75,
        "RAD-75",
        rad75_handler(beta_sources, home_community_id=beta_home, abandon_timeout=ABANDON),
    )
    peers = {beta_home: beta.endpoint_urls()["rad75"], **(extra_peers or {})}
    # alpha's Initiating Imaging Gateway: /ig/rad69 and gateway.imaging.retrieve (in-process).
    alpha.imaging.initiating = InitiatingImagingGateway(
        {ALPHA_REPO: FilesystemSource(ALPHA_REPO, alpha_images)},
        home_community_id=alpha.config.community.home_community_id,
        peers=peers,
        peer_client=alpha.peer_client,
        abandon_timeout=ABANDON,
    )
    install(alpha, "rad69", Action.RAD69, "RAD-69", alpha.imaging.initiating.handle)
    return Federation(alpha, beta, gamma, alpha_images, beta_images, gamma_images)


@pytest.fixture
def federation(imaging_gateways: Callable[..., Gateway], tmp_path: Path) -> Federation:
    return build_federation(imaging_gateways, tmp_path)


def test_request_spanning_communities_and_sources_is_split_and_merged(
    federation: Federation, pki: DevPki
) -> None:
    f = federation
    local = make_study(f.alpha_images, instances=2, seed=1)
    remote_fs = make_study(f.beta_images, series=2, instances=2, seed=2)
    remote_rad69 = make_study(f.gamma_images, instances=3, seed=3)
    docs = [
        *documents_for(local, ALPHA_REPO),  # no HomeCommunityId: local (RAD69-002)
        *documents_for(remote_fs, BETA_FS_REPO, f.beta_home),
        *documents_for(remote_rad69, BETA_RAD69_REPO, f.beta_home),
    ]
    got = post_retrieve(pki, f.rad69_url, Action.RAD69, docs)
    assert got.response.status == ResponseStatus.SUCCESS, got.response.errors
    expected = {p.stem: p.read_bytes() for s in (local, remote_fs, remote_rad69) for p in s.files}
    assert got.documents == expected  # byte-identical to what each source holds
    homes = {d.document_unique_id: d.home_community_id for d in got.response.documents}
    assert {homes[p.stem] for p in local.files} == {f.alpha_home}
    assert {homes[p.stem] for p in remote_fs.files + remote_rad69.files} == {f.beta_home}


def test_errors_from_every_hop_are_merged(federation: Federation, pki: DevPki) -> None:
    f = federation
    remote = make_study(f.gamma_images, instances=2, seed=4)
    docs = documents_for(remote, BETA_RAD69_REPO, f.beta_home)
    template = docs[0]

    def doc(uid: str, repo: str, home: str | None) -> DocumentRequest:
        return DocumentRequest(
            template.study_instance_uid, template.series_instance_uid, repo, uid, home
        )

    unknown_community = "urn:oid:1.3.6.1.4.1.21367.13.70.99"
    got = post_retrieve(
        pki,
        f.rad69_url,
        Action.RAD69,
        [
            *docs,
            doc("1.2.3.4.1", BETA_RAD69_REPO, f.beta_home),  # unknown at gamma
            doc("1.2.3.4.2", "1.2.3.999", f.beta_home),  # unknown repository at beta
            doc("1.2.3.4.3", ALPHA_REPO, unknown_community),  # no such peer
            doc("1.2.3.4.4", "1.2.3.998", None),  # unknown local repository
        ],
    )
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    assert set(got.documents) == {d.document_unique_id for d in docs}
    errors = {e.error_code: e for e in got.response.errors}
    assert sorted(error_codes(got)) == [
        "XDSDocumentUniqueIdError",
        "XDSUnknownCommunity",
        "XDSUnknownRepositoryId",
        "XDSUnknownRepositoryId",
    ]
    assert errors["XDSUnknownCommunity"].location == unknown_community
    # Errors relayed from beta carry beta's homeCommunityId (RAD75-004).
    assert errors["XDSDocumentUniqueIdError"].location == f.beta_home
    located = {e.location for e in got.response.errors if e.error_code == "XDSUnknownRepositoryId"}
    assert located == {f.beta_home, "1.2.3.998"}


def test_bad_identifiers_are_answered_per_instance_and_partial_success_spans_communities(
    federation: Federation, pki: DevPki
) -> None:
    f = federation
    local = documents_for(make_study(f.alpha_images, instances=2, seed=31), ALPHA_REPO)
    remote_study = make_study(f.beta_images, instances=2, seed=32)
    remote = documents_for(remote_study, BETA_FS_REPO, f.beta_home)
    template = remote[0]
    # A real SOP Instance UID with ".999" appended, longer than a DICOM UID may be.
    too_long = (template.document_unique_id + ".999" * 20)[:70]
    rejected = [
        dataclasses.replace(template, document_unique_id=too_long),  # for beta
        dataclasses.replace(template, study_instance_uid="", document_unique_id="1.2.3.4.1"),
        dataclasses.replace(local[0], document_unique_id=""),  # for alpha's own source
    ]
    not_at_beta = dataclasses.replace(template, document_unique_id="1.2.3.4.2")
    got = post_retrieve(pki, f.rad69_url, Action.RAD69, [*local, *remote, *rejected, not_at_beta])
    # Not a fault: every good instance of both communities comes back, byte for byte.
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    expected = {d.document_unique_id for d in (*local, *remote)}
    assert set(got.documents) == expected
    for path in remote_study.files:
        assert got.documents[path.stem] == path.read_bytes()
    located = sorted((e.error_code, e.location or "") for e in got.response.errors)
    # The bad identifiers are answered by alpha (never sent to beta); beta reports its own.
    assert located == sorted(
        [("XDSDocumentUniqueIdError", f.alpha_home)] * 3
        + [("XDSDocumentUniqueIdError", f.beta_home)]
    )
    contexts = " ".join(e.code_context for e in got.response.errors)
    assert too_long in contexts and "studyInstanceUID is empty" in contexts
    assert "DocumentUniqueId is empty" in contexts and "1.2.3.4.2" in contexts

    # A community none of whose instances can be returned does not fail the others either.
    got = post_retrieve(pki, f.rad69_url, Action.RAD69, [*local, not_at_beta])
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    assert set(got.documents) == {d.document_unique_id for d in local}
    assert [(e.error_code, e.location) for e in got.response.errors] == [
        ("XDSDocumentUniqueIdError", f.beta_home)
    ]


def test_unreachable_community_is_reported_and_others_still_answer(
    imaging_gateways: Callable[..., Gateway], tmp_path: Path, pki: DevPki
) -> None:
    dead = "urn:oid:1.3.6.1.4.1.21367.13.70.77"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    f = build_federation(imaging_gateways, tmp_path, {dead: f"https://127.0.0.1:{port}/xca/rad75"})
    local = make_study(f.alpha_images, instances=1, seed=5)
    unreachable = DocumentRequest("1.2.3", "1.2.3.4", "1.2.3.5", "1.2.3.6", dead)
    got = post_retrieve(
        pki, f.rad69_url, Action.RAD69, [*documents_for(local, ALPHA_REPO), unreachable]
    )
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    assert error_codes(got) == ["XDSUnavailableCommunity"]
    assert got.response.errors[0].location == dead
    assert set(got.documents) == {p.stem for p in local.files}


def on_loop(gateway: Gateway, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on the gateway's own event loop (where its sources live)."""
    loop = gateway.https._server.get_loop() if gateway.https._server else None
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)


def test_in_process_retrieve_takes_the_endpoints_path(federation: Federation) -> None:
    f = federation
    local = make_study(f.alpha_images, instances=2, seed=21)
    remote = make_study(f.beta_images, instances=2, seed=22)
    elsewhere = "urn:oid:1.3.6.1.4.1.21367.13.70.98"
    stray = DocumentRequest("1.2.3", "1.2.3.4", ALPHA_REPO, "1.2.3.4.5", elsewhere)
    request = RetrieveImagingDocumentSetRequest(
        (
            *documents_for(local, ALPHA_REPO),
            *documents_for(remote, BETA_FS_REPO, f.beta_home),
            stray,
        ),
        (EXPLICIT,),
    )

    async def retrieve() -> tuple[ImagingRetrieval, dict[str, bytes]]:
        retrieval = await f.alpha.imaging.retrieve(request)
        try:
            got = {uid: await retrieval.read(i) for i, uid in enumerate(retrieval.uids)}
            assert retrieval.closed  # the last instance read released every route
            return retrieval, got
        finally:
            await retrieval.aclose()

    retrieval, got = on_loop(f.alpha, retrieve())
    assert got == {p.stem: p.read_bytes() for s in (local, remote) for p in s.files}
    homes = {i.document.document_unique_id: i.home_community_id for i in retrieval.instances}
    assert {homes[p.stem] for p in local.files} == {f.alpha_home}
    assert {homes[p.stem] for p in remote.files} == {f.beta_home}
    assert retrieval.status == ResponseStatus.PARTIAL_SUCCESS
    assert retrieval.missing == ["1.2.3.4.5"]
    assert [(e.error_code, e.location) for e in retrieval.errors] == [
        ("XDSUnknownCommunity", elsewhere)
    ]

    # Instances left unread are released by aclose(), not by the abandon watchdog.
    async def unread() -> None:
        retrieval = await f.alpha.imaging.retrieve(request)
        assert len(retrieval.uids) == 4
        await retrieval.read(0)
        assert not retrieval.closed
        await retrieval.aclose()
        assert retrieval.closed

    on_loop(f.alpha, unread())
    assert not _open_fds_under(f.alpha_images), _open_fds_under(f.alpha_images)
    assert wait_for(lambda: not _open_fds_under(f.beta_images), 15), _open_fds_under(f.beta_images)

    # What the endpoint would refuse as a Sender fault is refused in-process too ...
    for bad in (
        RetrieveImagingDocumentSetRequest((), (EXPLICIT,)),
        RetrieveImagingDocumentSetRequest((stray,), ()),
    ):
        with pytest.raises(InvalidImagingRequest):
            on_loop(f.alpha, f.alpha.imaging.retrieve(bad))

    # ... and what it answers per DocumentRequest is answered the same way.
    async def bad_uid() -> ImagingRetrieval:
        retrieval = await f.alpha.imaging.retrieve(
            RetrieveImagingDocumentSetRequest(
                (dataclasses.replace(stray, document_unique_id="1.2.x"),), (EXPLICIT,)
            )
        )
        await retrieval.aclose()
        return retrieval

    refused = on_loop(f.alpha, bad_uid())
    assert refused.status == ResponseStatus.FAILURE
    assert refused.missing == ["1.2.x"]
    assert [(e.error_code, e.location) for e in refused.errors] == [
        ("XDSDocumentUniqueIdError", f.alpha_home)
    ]


def _stream_root_then(
    pki: DevPki, url: str, docs: list[DocumentRequest], after_root: Callable[[], None]
) -> tuple[bytes, Exception | None]:
    """Start a retrieve, wait until the root part is in, run ``after_root``, read the rest."""
    writer = mtom.MtomWriter(
        soap12(Action.RAD69, retrieve_body(docs, [EXPLICIT])), action=Action.RAD69
    )
    received = bytearray()
    failure: Exception | None = None
    with (
        consumer(pki) as client,
        client.stream(
            "POST",
            url,
            content=b"".join(writer.iter_bytes()),
            headers={"content-type": writer.content_type},
            timeout=60,
        ) as response,
    ):
        assert response.status_code == 200
        chunks = response.iter_raw(16 * 1024)
        for chunk in chunks:
            received += chunk
            if b"</soap:Envelope>" in received or b"Envelope>" in received:
                break
        after_root()
        try:
            for chunk in chunks:
                received += chunk
        except (httpx.HTTPError, OSError) as exc:
            failure = exc
        boundary = mtom.parse_content_type(response.headers["content-type"])[1]["boundary"]
    complete = received.rstrip().endswith(f"--{boundary}--".encode())
    return bytes(received), failure if failure or not complete else None


def test_source_failing_mid_study_aborts_the_response_and_gateways_keep_serving(
    federation: Federation, pki: DevPki
) -> None:
    f = federation
    # ~40 MB: more than the socket buffers along the chain can hold, so the response is
    # still being produced when the source fails.
    files = make_big_study(f.gamma_images, instances=20, instance_bytes=2 * 1024 * 1024)
    docs = documents_for(files, BETA_RAD69_REPO, f.beta_home)

    def source_dies() -> None:
        for path in files:
            path.unlink()

    received, failure = _stream_root_then(pki, f.rad69_url, docs, source_dies)
    # The consumer cannot mistake it for a complete response...
    assert failure is not None
    with pytest.raises(mtom.MtomError):
        _parse_complete(received)
    # ...and every hop closed its connections and still serves.
    for gateway in (f.alpha, f.beta, f.gamma):
        assert wait_for(lambda g=gateway: g.https.active_connections == 0, 10)
    small = make_study(f.gamma_images, instances=1, seed=9)
    got = post_retrieve(
        pki, f.rad69_url, Action.RAD69, documents_for(small, BETA_RAD69_REPO, f.beta_home)
    )
    assert got.documents == {p.stem: p.read_bytes() for p in small.files}


def _parse_complete(received: bytes) -> None:
    head = received.split(b"\r\n", 1)[0]
    assert head.startswith(b"--")
    reader = mtom.MtomRequestReader(
        f'multipart/related; type="application/xop+xml"; boundary="{head[2:].decode()}"',
        max_root_bytes=1 << 20,
        max_part_bytes=1 << 30,
        max_total_bytes=1 << 31,
        max_parts=1000,
    )
    reader.feed(received)
    reader.close().close()


def _open_fds_under(folder: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                found.append(target)
    return found


def test_consumer_disconnecting_mid_stream_releases_everything(
    federation: Federation, pki: DevPki
) -> None:
    f = federation
    files = make_big_study(f.beta_images, instances=16, instance_bytes=2 * 1024 * 1024)
    docs = documents_for(files, BETA_FS_REPO, f.beta_home)
    writer = mtom.MtomWriter(
        soap12(Action.RAD69, retrieve_body(docs, [EXPLICIT])), action=Action.RAD69
    )
    with (
        consumer(pki) as client,
        client.stream(
            "POST",
            f.rad69_url,
            content=b"".join(writer.iter_bytes()),
            headers={"content-type": writer.content_type},
            timeout=60,
        ) as response,
    ):
        first = next(response.iter_raw(64 * 1024))
        assert first.startswith(b"--")
        # leave without reading the rest: the connection is closed under the gateway
    for gateway in (f.alpha, f.beta):
        assert wait_for(lambda g=gateway: g.https.active_connections == 0, 15)
    assert wait_for(lambda: not _open_fds_under(f.beta_images), 15), _open_fds_under(f.beta_images)
    got = post_retrieve(pki, f.rad69_url, Action.RAD69, docs[:2])
    assert got.documents == {p.stem: p.read_bytes() for p in files[:2]}


# ----------------------------------------------------------------------- hostile peer


@contextlib.contextmanager
def fake_peer(pki: DevPki, tmp_path: Path, reply: Callable[[bytes], bytes]) -> Iterator[str]:
    """A TLS server with gamma's certificate that answers every request with ``reply``."""

    context: ssl.SSLContext = server_context(make_config(pki, tmp_path, "gamma").tls)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(10)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                    while len(body) < length:
                        body += conn.recv(65536)
                    conn.sendall(reply(body))
            except (OSError, ssl.SSLError, StopIteration):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}/xca/rad75"
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def _http(content_type: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


def test_malformed_mtom_from_a_peer_is_an_unavailable_community(
    imaging_gateways: Callable[..., Gateway], tmp_path: Path, pki: DevPki
) -> None:
    bad = "urn:oid:1.3.6.1.4.1.21367.13.70.66"
    garbage = _http(
        'multipart/related; type="application/xop+xml"; boundary="b1"',
        b"--b1\r\nContent-Type: application/xop+xml\r\n\r\n<not xml",  # no close delimiter
    )
    with fake_peer(pki, tmp_path, lambda _body: garbage) as url:
        f = build_federation(imaging_gateways, tmp_path, {bad: url})
        local = make_study(f.alpha_images, instances=1, seed=6)
        hostile = DocumentRequest("1.2.3", "1.2.3.4", "1.2.3.5", "1.2.3.6", bad)
        got = post_retrieve(
            pki, f.rad69_url, Action.RAD69, [*documents_for(local, ALPHA_REPO), hostile]
        )
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    assert error_codes(got) == ["XDSUnavailableCommunity"]
    assert "MTOM" in got.response.errors[0].code_context
    assert set(got.documents) == {p.stem for p in local.files}


def test_peer_reply_truncated_inside_a_part_is_never_passed_on_as_complete(
    imaging_gateways: Callable[..., Gateway], tmp_path: Path, pki: DevPki
) -> None:
    bad = "urn:oid:1.3.6.1.4.1.21367.13.70.65"
    root = (
        b'<?xml version="1.0"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope">'
        b"<s:Body><x:RetrieveDocumentSetResponse xmlns:x='urn:ihe:iti:xds-b:2007' "
        b"xmlns:rs='urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0' "
        b"xmlns:xop='http://www.w3.org/2004/08/xop/include'>"
        b"<rs:RegistryResponse status="
        b"'urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success'/>"
        b"<x:DocumentResponse><x:RepositoryUniqueId>1.2.3.5</x:RepositoryUniqueId>"
        b"<x:DocumentUniqueId>1.2.3.6</x:DocumentUniqueId><x:mimeType>application/dicom</x:mimeType>"
        b"<x:Document><xop:Include href='cid:d1@peer'/></x:Document></x:DocumentResponse>"
        b"</x:RetrieveDocumentSetResponse></s:Body></s:Envelope>"
    )
    truncated = _http(
        'multipart/related; type="application/xop+xml"; boundary="b1"; start="<r@peer>"',
        b"--b1\r\nContent-Type: application/xop+xml\r\nContent-ID: <r@peer>\r\n\r\n"
        + root
        + b"\r\n--b1\r\nContent-Type: application/dicom\r\nContent-ID: <d1@peer>\r\n\r\n"
        + b"DICM" * 1000,  # the peer stops here
    )
    with fake_peer(pki, tmp_path, lambda _body: truncated) as url:
        f = build_federation(imaging_gateways, tmp_path, {bad: url})
        doc = DocumentRequest("1.2.3", "1.2.3.4", "1.2.3.5", "1.2.3.6", bad)
        writer = mtom.MtomWriter(
            soap12(Action.RAD69, retrieve_body([doc], [EXPLICIT])), action=Action.RAD69
        )
        with consumer(pki) as client:
            try:
                response = client.post(
                    f.rad69_url,
                    content=b"".join(writer.iter_bytes()),
                    headers={"content-type": writer.content_type},
                )
            except httpx.HTTPError:
                response = None
        if response is not None:  # whatever arrived must not parse as a complete message
            with pytest.raises(mtom.MtomError):
                read_retrieve_reply(200, response.headers["content-type"], response.content)
        assert wait_for(lambda: f.alpha.https.active_connections == 0, 10)


class CountingSource(FilesystemSource):
    """A filesystem source that counts the bytes read from it (to observe back-pressure)."""

    pulled = 0

    async def open(self, request: Any) -> Retrieval:
        retrieval = await super().open(request)
        inner = retrieval.stream
        source = self

        async def counted(instance: PlannedInstance) -> AsyncIterator[bytes]:
            async for chunk in inner(instance):
                source.pulled += len(chunk)
                yield chunk

        retrieval.stream = counted  # type: ignore[method-assign]
        return retrieval


def test_slow_consumer_slows_the_source_read(
    imaging_gateways: Callable[..., Gateway], tmp_path: Path, pki: DevPki
) -> None:
    gateway = imaging_gateways("beta")
    source = CountingSource(BETA_FS_REPO, tmp_path / "images")
    home = gateway.config.community.home_community_id
    install(
        gateway,
        "rad75",
        Action.RAD75,
        "RAD-75",
        rad75_handler({BETA_FS_REPO: source}, home_community_id=home),
    )
    files = make_big_study(tmp_path / "images", instances=32, instance_bytes=2 * 1024 * 1024)
    total = sum(p.stat().st_size for p in files)
    docs = documents_for(files, BETA_FS_REPO, home)
    writer = mtom.MtomWriter(
        soap12(Action.RAD75, retrieve_body(docs, [EXPLICIT])), action=Action.RAD75
    )
    body = bytearray()
    with (
        consumer(pki) as client,
        client.stream(
            "POST",
            gateway.endpoint_urls()["rad75"],
            content=b"".join(writer.iter_bytes()),
            headers={"content-type": writer.content_type},
            timeout=60,
        ) as response,
    ):
        chunks = response.iter_raw(64 * 1024)
        body += next(chunks)
        time.sleep(1.0)  # the consumer stalls; the gateway must not read the study meanwhile
        stalled_at = source.pulled
        for chunk in chunks:
            body += chunk
        content_type = response.headers["content-type"]
    assert stalled_at < total // 2, (stalled_at, total)
    got = read_retrieve_reply(200, content_type, bytes(body))
    assert got.documents == {p.stem: p.read_bytes() for p in files}
    assert source.pulled == total
