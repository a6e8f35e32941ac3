"""Imaging sources against real PACS processes: Orthanc (DICOMweb, C-GET, C-MOVE) and dcmtk's
dcmqrscp (C-GET, C-MOVE), behind a real Responding Imaging Gateway reached through a real
Initiating Imaging Gateway.
"""

from __future__ import annotations

import asyncio
import io
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.conftest import wait_for
from tests.test_imaging_support import (
    EXPLICIT,
    JPEG_LOSSLESS,
    RLE,
    DcmqrscpProcess,
    OrthancProcess,
    c_store,
    dcmqrscp,
    documents_for,
    error_codes,
    free_port,
    install,
    make_big_study,
    make_study,
    orthanc,
    pixel_data,
    post_retrieve,
    releasing_peer_pools,
)
from tests.test_rad69 import _parse_complete, _stream_root_then
from xca_gateway.app.gateway import Gateway
from xca_gateway.imaging.dicomweb import DicomwebSource
from xca_gateway.imaging.dimse import DimseSettings, DimseSource
from xca_gateway.imaging.sources import ImagingSource
from xca_gateway.imaging.transfer_syntax import sniff_transfer_syntax, split_meta
from xca_gateway.initiating.imaging import rad69_handler
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.dicom_samples import SampleStudy
from xca_gateway.transactions.rad75 import rad75_handler

ORTHANC_WEB = "1.3.6.1.4.1.21367.13.71.2.10"
ORTHANC_GET = "1.3.6.1.4.1.21367.13.71.2.11"
ORTHANC_MOVE = "1.3.6.1.4.1.21367.13.71.2.12"
DCMTK_GET = "1.3.6.1.4.1.21367.13.71.2.13"
DCMTK_MOVE = "1.3.6.1.4.1.21367.13.71.2.14"
DEAD_PACS = "1.3.6.1.4.1.21367.13.71.2.15"


@pytest.fixture
def imaging_gateways(
    gateway_factory: Callable[..., Gateway],
) -> Iterator[Callable[..., Gateway]]:
    yield from releasing_peer_pools(gateway_factory)


@dataclass
class Pacs:
    orthanc: OrthancProcess
    dcmqrscp: DcmqrscpProcess
    study: SampleStudy


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    workdir = tmp_path_factory.mktemp("pacs")
    study = make_study(workdir / "study", series=2, instances=2, seed=11)
    with orthanc(workdir / "orthanc") as o, dcmqrscp(workdir / "dcmqrscp") as d:
        o.upload(study.files)
        c_store("127.0.0.1", d.port, d.ae_title, study.files)
        yield Pacs(o, d, study)


def dimse(host_port: int, ae: str, mode: str, move_port: int = 0) -> DimseSource:
    return DimseSource(
        "1.2.3",  # replaced below
        DimseSettings(
            host="127.0.0.1",
            port=host_port,
            called_ae_title=ae,
            calling_ae_title="XCAGW",
            mode=mode,
            move_destination_ae_title="XCAGWMOVE" if mode == "c-move" else None,
            storage_scp_port=move_port,
            acse_timeout=10,
            dimse_timeout=30,
            network_timeout=30,
        ),
    )


def _sources(pacs: Pacs) -> dict[str, ImagingSource]:
    o, d = pacs.orthanc, pacs.dcmqrscp
    sources: dict[str, ImagingSource] = {
        ORTHANC_WEB: DicomwebSource(ORTHANC_WEB, o.dicomweb_url),
        ORTHANC_GET: dimse(o.dicom_port, o.ae_title, "c-get"),
        ORTHANC_MOVE: dimse(o.dicom_port, o.ae_title, "c-move", o.move_scp_port),
        DCMTK_GET: dimse(d.port, d.ae_title, "c-get"),
        DCMTK_MOVE: dimse(d.port, d.ae_title, "c-move", d.move_scp_port),
        DEAD_PACS: dimse(free_port(), "NOBODY", "c-get"),
    }
    for repo, source in sources.items():
        source.repository_unique_id = repo
    return sources


@dataclass
class Chain:
    alpha: Gateway
    beta: Gateway
    sources: dict[str, ImagingSource]

    @property
    def beta_home(self) -> str:
        return self.beta.config.community.home_community_id

    @property
    def url(self) -> str:
        return self.alpha.endpoint_urls()["rad69"]


def build_chain(
    imaging_gateways: Callable[..., Gateway], sources: dict[str, ImagingSource]
) -> Chain:
    alpha = imaging_gateways("alpha")
    beta = imaging_gateways("beta")
    beta_home = beta.config.community.home_community_id
    install(
        beta,
        "rad75",
        Action.RAD75,
        "RAD-75",
        rad75_handler(sources, home_community_id=beta_home, open_timeout=20, abandon_timeout=3),
    )
    install(
        alpha,
        "rad69",
        Action.RAD69,
        "RAD-69",
        rad69_handler(
            {},
            home_community_id=alpha.config.community.home_community_id,
            peers={beta_home: beta.endpoint_urls()["rad75"]},
            peer_client=alpha.peer_client,
            abandon_timeout=3,
        ),
    )
    return Chain(alpha, beta, sources)


@pytest.fixture
def chain(pacs: Pacs, imaging_gateways: Callable[..., Gateway]) -> Iterator[Chain]:
    sources = _sources(pacs)
    for source in sources.values():
        asyncio.run(source.start())  # C-MOVE storage SCPs (threads of their own)
    try:
        yield build_chain(imaging_gateways, sources)
    finally:
        for source in sources.values():
            if isinstance(source, DimseSource):
                asyncio.run(source.stop())


def _dataset_bytes(data: bytes) -> bytes:
    return split_meta(data)[1]


@pytest.mark.parametrize("repo", [ORTHANC_WEB, ORTHANC_GET, ORTHANC_MOVE, DCMTK_GET, DCMTK_MOVE])
def test_instances_arrive_identical_to_what_the_pacs_holds(
    chain: Chain, pacs: Pacs, pki: DevPki, repo: str
) -> None:
    docs = documents_for(pacs.study, repo, chain.beta_home)
    got = post_retrieve(pki, chain.url, Action.RAD69, docs, [EXPLICIT])
    assert got.response.status == ResponseStatus.SUCCESS, got.response.errors
    assert set(got.documents) == {p.stem for p in pacs.study.files}
    for path in pacs.study.files:
        data = got.documents[path.stem]
        original = path.read_bytes()
        if repo == ORTHANC_WEB:
            assert data == original  # WADO-RS as stored: the very file
        else:
            # DIMSE carries no file meta; the dataset itself is byte-identical.
            assert _dataset_bytes(data) == _dataset_bytes(original)
            assert sniff_transfer_syntax(data) == sniff_transfer_syntax(original)


@pytest.mark.parametrize("repo", [ORTHANC_WEB, ORTHANC_GET, DCMTK_GET])
def test_requested_rle_is_delivered_pixel_identical(
    chain: Chain, pacs: Pacs, pki: DevPki, repo: str
) -> None:
    docs = documents_for(pacs.study, repo, chain.beta_home)[:2]
    got = post_retrieve(pki, chain.url, Action.RAD69, docs, [RLE])
    assert got.response.status == ResponseStatus.SUCCESS, got.response.errors
    for doc in docs:
        data = got.documents[doc.document_unique_id]
        assert sniff_transfer_syntax(data) == RLE
        original = next(p for p in pacs.study.files if p.stem == doc.document_unique_id)
        assert pixel_data(data) == pixel_data(original.read_bytes())
        assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == doc.document_unique_id


def test_orthanc_transcodes_to_a_requested_jpeg_lossless(
    chain: Chain, pacs: Pacs, pki: DevPki
) -> None:
    docs = documents_for(pacs.study, ORTHANC_WEB, chain.beta_home)[:1]
    got = post_retrieve(pki, chain.url, Action.RAD69, docs, [JPEG_LOSSLESS])
    assert got.response.status == ResponseStatus.SUCCESS
    data = got.documents[docs[0].document_unique_id]
    assert sniff_transfer_syntax(data) == JPEG_LOSSLESS
    assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == docs[0].document_unique_id


def test_unknown_instances_and_a_dead_pacs_are_reported(
    chain: Chain, pacs: Pacs, pki: DevPki
) -> None:
    docs = documents_for(pacs.study, ORTHANC_GET, chain.beta_home)
    template = docs[0]
    unknown = [
        type(template)(
            template.study_instance_uid,
            template.series_instance_uid,
            repo,
            "1.2.826.0.1.3680043.10.1234.999",
            chain.beta_home,
        )
        for repo in (ORTHANC_WEB, DCMTK_GET)
    ]
    dead = type(template)(
        template.study_instance_uid,
        template.series_instance_uid,
        DEAD_PACS,
        template.document_unique_id,
        chain.beta_home,
    )
    got = post_retrieve(pki, chain.url, Action.RAD69, [*docs, *unknown, dead])
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted(error_codes(got)) == [
        "XDSDocumentUniqueIdError",
        "XDSDocumentUniqueIdError",
        "XDSRepositoryError",
    ]
    dead_error = next(e for e in got.response.errors if e.error_code == "XDSRepositoryError")
    assert DEAD_PACS in dead_error.code_context and "not available" in dead_error.code_context
    assert set(got.documents) == {d.document_unique_id for d in docs}


def test_a_few_instances_of_a_series_are_resolved_one_by_one(
    chain: Chain, pacs: Pacs, pki: DevPki
) -> None:
    """A viewer fetching images one at a time: each is matched by SOPInstanceUID at the
    DICOMweb source instead of listing the whole series, with the same answers."""
    docs = documents_for(pacs.study, ORTHANC_WEB, chain.beta_home)
    for wanted in (docs[:1], docs[1:3]):
        got = post_retrieve(pki, chain.url, Action.RAD69, wanted)
        assert got.response.status == ResponseStatus.SUCCESS
        assert set(got.documents) == {d.document_unique_id for d in wanted}


def test_orthanc_killed_mid_study(
    imaging_gateways: Callable[..., Gateway], tmp_path: Path, pki: DevPki
) -> None:
    files = make_big_study(tmp_path / "big", instances=20, instance_bytes=2 * 1024 * 1024)
    with orthanc(tmp_path / "orthanc") as o:
        o.upload(files)
        source = DicomwebSource(ORTHANC_WEB, o.dicomweb_url)
        chain = build_chain(imaging_gateways, {ORTHANC_WEB: source})
        docs = documents_for(files, ORTHANC_WEB, chain.beta_home)

        def kill() -> None:
            o.process.send_signal(signal.SIGKILL)
            o.process.wait(10)

        received, failure = _stream_root_then(pki, chain.url, docs, kill)
        assert failure is not None  # truncated, not a complete-looking response
        with pytest.raises(mtom.MtomError):
            _parse_complete(received)
        for gateway in (chain.alpha, chain.beta):
            assert wait_for(lambda g=gateway: g.https.active_connections == 0, 15)
        # The source is down now: a new request is answered with the right error.
        got = post_retrieve(pki, chain.url, Action.RAD69, docs[:1])
        assert got.response.status == ResponseStatus.FAILURE
        assert error_codes(got) == ["XDSRepositoryError"]
        assert "not available" in got.response.errors[0].code_context
        assert got.response.errors[0].location == chain.beta_home
