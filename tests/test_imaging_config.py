"""[imaging] configuration and the wiring helper, end to end on real gateways."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_imaging_support import documents_for, make_study, post_retrieve
from xca_gateway.app.gateway import Gateway, install_imaging
from xca_gateway.imaging import parse_imaging_config
from xca_gateway.imaging.dicomweb import DicomwebSource
from xca_gateway.imaging.dimse import DimseSource
from xca_gateway.imaging.filesystem import FilesystemSource
from xca_gateway.imaging.rad69_source import Rad69Source
from xca_gateway.imaging.service import ImagingService
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import ConfigError

ALL_KINDS: dict[str, Any] = {
    "open_timeout": 5,
    "abandon_timeout": 90,
    "sources": [
        {"repository_unique_id": "1.2.3.1", "kind": "filesystem"},
        {
            "repository_unique_id": "1.2.3.2",
            "kind": "dimse",
            "host": "127.0.0.1",
            "port": 4242,
            "called_ae_title": "ORTHANC",
            "mode": "c-move",
            "move_destination_ae_title": "XCAGW",
            "storage_scp_port": 11112,
        },
        {
            "repository_unique_id": "1.2.3.3",
            "kind": "dicomweb",
            "base_url": "https://vna.example.org/dicom-web",
            "ca_file": "ca.pem",
            "headers": {"authorization": "Bearer x"},
        },
        {"repository_unique_id": "1.2.3.4", "kind": "rad69", "url": "https://ids.example/rad69"},
    ],
}


def test_every_kind_parses_and_builds(tmp_path: Path) -> None:
    config = parse_imaging_config(ALL_KINDS, tmp_path / "etc", tmp_path / "data")
    assert config.open_timeout == 5.0 and config.abandon_timeout == 90.0
    fs, dimse, web, rad69 = config.sources
    assert fs.settings["path"] == tmp_path / "data" / "images"  # the demo's layout
    assert web.settings["ca_file"] == (tmp_path / "etc" / "ca.pem").resolve()
    sources = ImagingService(config).sources
    assert isinstance(sources["1.2.3.1"], FilesystemSource)
    assert isinstance(sources["1.2.3.2"], DimseSource)
    assert sources["1.2.3.2"].settings.mode == "c-move"  # type: ignore[attr-defined]
    assert isinstance(sources["1.2.3.3"], DicomwebSource)
    assert isinstance(sources["1.2.3.4"], Rad69Source)
    assert dimse.kind == "dimse" and rad69.kind == "rad69"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "ftp"}, "kind must be one of"),
        ({"repository_unique_id": "not-an-oid"}, "is not an OID"),
        ({"colour": "blue"}, "unknown key"),
        ({"kind": "dimse"}, "needs called_ae_title, host, port"),
        ({"kind": "rad69", "url": "http://plain.example/rad69"}, "https"),
        (
            {"kind": "dimse", "host": "h", "port": 1, "called_ae_title": "A\\B"},
            "not a DICOM AE title",
        ),
        (
            {"kind": "dimse", "host": "h", "port": 1, "called_ae_title": "A", "mode": "c-move"},
            "move_destination_ae_title",
        ),
    ],
)
def test_invalid_sources_are_refused(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    entry = {"repository_unique_id": "1.2.3.1", "kind": "filesystem", **change}
    with pytest.raises(ConfigError, match=message):
        parse_imaging_config({"sources": [entry]}, tmp_path, tmp_path)


def test_duplicate_sources_and_unknown_keys(tmp_path: Path) -> None:
    entry = {"repository_unique_id": "1.2.3.1", "kind": "filesystem"}
    with pytest.raises(ConfigError, match="duplicate"):
        parse_imaging_config({"sources": [entry, entry]}, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_imaging_config({"sorces": []}, tmp_path, tmp_path)


def test_install_imaging_wires_both_sides(
    gateway_factory: Callable[..., Gateway], tmp_path: Path, pki: DevPki
) -> None:
    beta_home = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
    beta = gateway_factory("beta")
    beta_images = tmp_path / "beta" / "images"  # <data_dir>/images of beta
    repo = "1.3.6.1.4.1.21367.13.71.2.1"
    config = parse_imaging_config(
        {"sources": [{"repository_unique_id": repo, "kind": "filesystem"}]},
        tmp_path,
        beta.config.storage.data_dir,
    )
    service = install_imaging(beta, config)
    asyncio.run(service.start())
    alpha = gateway_factory(
        "alpha",
        peers=[
            {
                "name": "beta",
                "home_community_id": beta_home,
                "rad75": beta.endpoint_urls()["rad75"],
            }
        ],
    )
    install_imaging(alpha, parse_imaging_config({}, tmp_path, alpha.config.storage.data_dir))
    study = make_study(beta_images, instances=2)
    got = post_retrieve(
        pki, alpha.endpoint_urls()["rad69"], Action.RAD69, documents_for(study, repo, beta_home)
    )
    assert got.response.status == ResponseStatus.SUCCESS
    assert got.documents == {p.stem: p.read_bytes() for p in study.files}
    asyncio.run(service.stop())
