"""SIGKILL of a gateway in the middle of a study retrieve: the consumer never sees a complete
response, and the restarted gateway serves the same study again from the same data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.test_server import soap12
from xca_gateway.protocol.namespaces import XDSB, XDSI, Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.demo import DemoCommunity, community_config_toml
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, generate_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(config: Path, admin: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xca_gateway",
            "--log-level",
            "error",
            "serve",
            "--config",
            str(config),
        ]
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    pytest.fail("gateway did not start")


def test_sigkill_during_a_retrieve(pki: DevPki, tmp_path: Path) -> None:
    community = DemoCommunity(0, "alpha")
    data = tmp_path / "data"
    study = generate_study(
        data / "images",
        patient=DEFAULT_PATIENTS[0],
        patient_id="C01-1001",
        issuer_oid=community.assigning_authority,
        modality="CT",
        body_part="HEAD",
        study_date=date(2024, 1, 1),
        institution="North",
        accession_number="NOR1",
        uid_root="1.2.826.0.1.3680043.10.543",
        series_count=1,
        instances_per_series=40,
        rows=512,
        columns=512,
        seed=3,
    )
    https, admin = _free_port(), _free_port()
    config = tmp_path / "gateway.toml"
    text = community_config_toml(
        community,
        certs_dir=str(pki.dir),
        data_dir=str(data),
        https_port=https,
        admin_port=admin,
        peers=[],
    )
    config.write_text(text.replace(f"{pki.dir}/north.", f"{pki.dir}/alpha."))
    docs = "".join(
        f"<xdsi:DocumentRequest><xdsb:RepositoryUniqueId>{community.imaging_source_id}"
        f"</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>{pydicom.dcmread(f).SOPInstanceUID}"
        "</xdsb:DocumentUniqueId></xdsi:DocumentRequest>"
        for f in study.files
    )
    body = soap12(
        Action.RAD69,
        f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI}" xmlns:xdsb="{XDSB}">'
        f'<xdsi:StudyRequest studyInstanceUID="{study.study_instance_uid}">'
        f'<xdsi:SeriesRequest seriesInstanceUID="{study.series_instance_uids[0]}">{docs}'
        "</xdsi:SeriesRequest></xdsi:StudyRequest><xdsi:TransferSyntaxUIDList>"
        "<xdsi:TransferSyntaxUID>1.2.840.10008.1.2.1</xdsi:TransferSyntaxUID>"
        "</xdsi:TransferSyntaxUIDList></xdsi:RetrieveImagingDocumentSetRequest>",
    )
    total = sum(os.path.getsize(f) for f in study.files)
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    url = f"https://127.0.0.1:{https}/ig/rad69"
    headers = {"content-type": "application/soap+xml"}

    process = _start(config, admin)
    received = 0
    try:
        with (
            httpx.Client(verify=ctx, timeout=30) as client,
            pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
            client.stream("POST", url, content=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_raw(64 * 1024):
                received += len(chunk)
                if received > 1024 * 1024 and process.poll() is None:
                    process.send_signal(signal.SIGKILL)
        assert received < total  # the kill really happened mid-study
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)

    # Restarted on the same data, the gateway serves the whole study.
    process = _start(config, admin)
    try:
        with httpx.Client(verify=ctx, timeout=60) as client:
            response = client.post(url, content=body, headers=headers)
        assert response.status_code == 200
        assert len(response.content) > total
    finally:
        process.terminate()
        process.wait(10)
