"""An opted-out patient's documents never leave the community: query, retrieve and RAD-75."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import pydicom
import pytest
from lxml import etree

from tests.audit_inbox import AuditInbox
from tests.conftest import make_config, wait_for
from tests.test_client import _client
from tests.test_consent import _cli
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit.validate import schema_errors
from xca_gateway.protocol.namespaces import RIM, RS, XDSB, XDSI, Action, ResponseStatus
from xca_gateway.registry import open_registry
from xca_gateway.repository import DocumentRepository
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.security.operators import write_operator_token_file
from xca_gateway.settings import ConfigError
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, generate_study
from xca_gateway.tools.import_manifests import import_studies

AUTHORITY = "1.3.6.1.4.1.21367.13.20.2000"
REPOSITORY = "1.3.6.1.4.1.21367.13.80.2"
SOURCE = "1.3.6.1.4.1.21367.13.81.2"


def find_documents(patient: str) -> etree._Element:
    return etree.fromstring(
        f"""<query:AdhocQueryRequest xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
        xmlns:rim="{RIM}">
        <query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>
        <rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d">
        <rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>
        <rim:Value>'{escape(patient)}'</rim:Value></rim:ValueList></rim:Slot>
        <rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList>
        <rim:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value>
        </rim:ValueList></rim:Slot></rim:AdhocQuery></query:AdhocQueryRequest>"""
    )


async def test_opted_out_patient_documents_never_leave(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    data = tmp_path / "beta"
    studies = [
        generate_study(
            data / "images",
            patient=DEFAULT_PATIENTS[i],
            patient_id=f"C02-200{i + 1}",
            issuer_oid=AUTHORITY,
            modality="CT",
            body_part="HEAD",
            study_date=date(2024, 1, 1 + i),
            institution="South",
            accession_number=f"SOU{i}",
            uid_root="1.2.826.0.1.3680043.10.543",
            series_count=1,
            instances_per_series=2,
            seed=i,
        )
        for i in range(2)
    ]
    beta = gateway_factory(
        "beta",
        storage={"data_dir": str(data)},
        repository={"repository_unique_id": REPOSITORY, "manifest": {"imaging_source_id": SOURCE}},
        imaging={"sources": [{"repository_unique_id": SOURCE, "kind": "filesystem"}]},
        consent={"enabled": True, "default_mode": "opt-out"},
    )
    registry = await open_registry(beta.config.registry)
    try:
        report = await import_studies(
            [data / "images"],
            repository=DocumentRepository(data / "repository", REPOSITORY),
            registry=registry,
            community=beta.config.community,
            progress=False,
            options=beta.config.repository.manifest,
        )
    finally:
        await registry.close()
    assert len(report.with_status("registered")) == 2
    withheld, shared = (f"{st.patient_id}^^^&{AUTHORITY}&ISO" for st in studies)
    assert beta.consent is not None
    client = _client(pki)
    url = beta.endpoint_urls()
    try:
        # Before the opt-out the manifest is found; remember what to ask for afterwards.
        reply = await client.call(url["iti38"], find_documents(withheld), Action.ITI38)
        [entry] = list(reply.payload.iter(f"{{{RIM}}}ExtrinsicObject"))
        unique_id = next(
            e.get("value", "")
            for e in entry.iter(f"{{{RIM}}}ExternalIdentifier")
            if e.get("identificationScheme") == "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
        )

        beta.consent.store.set(withheld, "opt-out")

        # Query: nothing of the patient, and a policy error instead.
        reply = await client.call(url["iti38"], find_documents(withheld), Action.ITI38)
        assert not list(reply.payload.iter(f"{{{RIM}}}ExtrinsicObject"))
        assert reply.payload.get("status") == ResponseStatus.FAILURE
        codes = [e.get("errorCode") for e in reply.payload.iter(f"{{{RS}}}RegistryError")]
        assert codes == ["LocalPolicyRestrictionError"]
        # ...while another patient of the community is still shared.
        reply = await client.call(url["iti38"], find_documents(shared), Action.ITI38)
        assert len(list(reply.payload.iter(f"{{{RIM}}}ExtrinsicObject"))) == 1

        # ITI-39 of the manifest: refused, no document.
        retrieve = etree.fromstring(
            f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"><xdsb:DocumentRequest>'
            f"<xdsb:HomeCommunityId>{beta.config.community.home_community_id}</xdsb:HomeCommunityId>"
            f"<xdsb:RepositoryUniqueId>{REPOSITORY}</xdsb:RepositoryUniqueId>"
            f"<xdsb:DocumentUniqueId>{unique_id}</xdsb:DocumentUniqueId>"
            "</xdsb:DocumentRequest></xdsb:RetrieveDocumentSetRequest>"
        )
        reply = await client.call(url["iti39"], retrieve, Action.ITI39, use_mtom=True)
        assert not reply.attachments
        assert not list(reply.payload.iter(f"{{{XDSB}}}DocumentResponse"))
        codes = [e.get("errorCode") for e in reply.payload.iter(f"{{{RS}}}RegistryError")]
        assert codes == ["XDSDocumentUniqueIdError"]

        # RAD-75 of the study's instances: refused, no instance leaves.
        study = studies[0]
        docs = "".join(
            f"<xdsi:DocumentRequest><xdsb:HomeCommunityId>"
            f"{beta.config.community.home_community_id}</xdsb:HomeCommunityId>"
            f"<xdsb:RepositoryUniqueId>{SOURCE}</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>"
            f"{pydicom.dcmread(f).SOPInstanceUID}</xdsb:DocumentUniqueId></xdsi:DocumentRequest>"
            for f in study.files
        )
        imaging = etree.fromstring(
            f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI}" xmlns:xdsb="{XDSB}">'
            f'<xdsi:StudyRequest studyInstanceUID="{study.study_instance_uid}">'
            f'<xdsi:SeriesRequest seriesInstanceUID="{study.series_instance_uids[0]}">{docs}'
            "</xdsi:SeriesRequest></xdsi:StudyRequest><xdsi:TransferSyntaxUIDList>"
            "<xdsi:TransferSyntaxUID>1.2.840.10008.1.2.1</xdsi:TransferSyntaxUID>"
            "</xdsi:TransferSyntaxUIDList></xdsi:RetrieveImagingDocumentSetRequest>"
        )
        reply = await client.call(url["rad75"], imaging, Action.RAD75, use_mtom=True)
        assert not reply.attachments
        codes = [e.get("errorCode") for e in reply.payload.iter(f"{{{RS}}}RegistryError")]
        assert codes and set(codes) == {"XDSDocumentUniqueIdError"}
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------- the admin API


PATIENT = f"C02-2001^^^&{AUTHORITY}&ISO"


def _consent_url(patient: str = PATIENT) -> str:
    return "/consent/patients/" + urllib.parse.quote(patient, safe="")


def _requestor(record: Any) -> Any:
    return next(p for p in record.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true")


def _first(record: Any, path: str) -> Any:
    found = record.find(path)
    assert found is not None, path
    return found


def _details(record: Any) -> dict[str, str]:
    return {
        str(d.get("type")): base64.b64decode(d.get("value") or "").decode()
        for d in record.iter("ParticipantObjectDetail")
    }


def test_consent_admin_api_is_authenticated_host_checked_and_audited(
    gateway_factory: Callable[..., Gateway], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Over a real gateway's admin port: the operator's changes (by HTTP and by the CLI with
    --api) are each one Patient Record (110110) audit record naming the operator, the patient and
    old → new; a request without a valid token, or with a foreign Host (DNS rebinding), changes
    nothing and is one Security Alert."""
    inbox = AuditInbox()
    try:
        operators = tmp_path / "operators"
        token = write_operator_token_file(operators, "ops-anna")
        gateway = gateway_factory(
            "beta",
            consent={
                "enabled": True,
                "default_mode": "opt-out",
                "admin_token_file": str(operators),
            },
            audit={
                "audit_source_id": "beta-consent",
                "destinations": [
                    {"name": "inbox", "transport": "udp", "host": "127.0.0.1", "port": inbox.port}
                ],
            },
        )
        assert gateway.consent is not None
        port = gateway.admin.port
        auth = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=gateway.admin_url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200  # probes need no token
            assert client.put(_consent_url(), json={"mode": "opt-out"}, headers=auth).is_success
            assert client.put(_consent_url(), json={"mode": "opt-in"}, headers=auth).is_success
            refused_before = gateway.guard.refused
            anonymous = client.put(_consent_url(), json={"mode": "opt-out"})
            rebound = client.put(
                _consent_url(),
                json={"mode": "opt-out"},
                headers={**auth, "host": f"rebind.example:{port}"},
            )
            assert (anonymous.status_code, rebound.status_code) == (401, 403)
            assert gateway.guard.refused == refused_before + 2
            assert [r.mode for r in gateway.consent.store.rules_for(PATIENT)] == ["opt-in"]

        # The CLI makes its changes through the API with the operator's token.
        config = tmp_path / "cli.toml"
        config.write_text(
            f'[storage]\ndata_dir = "{tmp_path / "cli-data"}"\n\n'
            f'[admin]\nhost = "127.0.0.1"\nport = {port}\n\n'
            f'[consent]\nenabled = true\nadmin_token_file = "{operators}"\n'
        )
        cli = ["consent", "revoke", "--config", str(config), "--patient", PATIENT, "--api"]
        assert _cli(cli) == 0
        assert "1 rule(s) revoked (by ops-anna)" in capsys.readouterr().out
        assert _cli([*cli, "--operator", "nobody"]) == 2
        assert "no operator nobody" in capsys.readouterr().err
        assert gateway.consent.store.rules_for(PATIENT) == []
        history = gateway.consent.store.history(PATIENT)
        assert [(e["action"], e["actor"]) for e in history] == [
            ("set", "ops-anna"),
            ("set", "ops-anna"),
            ("revoke", "ops-anna"),
        ]

        # The last change's record is in: every earlier record is too.
        assert wait_for(
            lambda: any(
                _first(r, "EventIdentification").get("EventActionCode") == "D"
                for r in inbox.with_event("110110")
            ),
            timeout=15,
        )
        changes = inbox.with_event("110110")
        actions = [_first(r, "EventIdentification").get("EventActionCode") for r in changes]
        assert actions == ["C", "U", "D"]
        for record, (old, new) in zip(
            changes, [("none", "opt-out"), ("opt-out", "opt-in"), ("opt-in", "none")], strict=True
        ):
            assert not schema_errors(record), schema_errors(record)
            assert _requestor(record).get("UserID") == "ops-anna"
            [patient] = record.iter("ParticipantObjectIdentification")
            assert patient.get("ParticipantObjectID") == PATIENT
            details = _details(record)
            assert (details["PreviousMode"], details["NewMode"]) == (old, new)
        alerts = [
            r
            for r in inbox.with_event("110113")
            if "/consent/"
            in str(_first(r, "ParticipantObjectIdentification").get("ParticipantObjectID"))
        ]
        assert len(alerts) == 2  # one per refused request
        descriptions = [
            str(_first(r, "EventIdentification/EventOutcomeDescription").text) for r in alerts
        ]
        assert any("no operator token" in d for d in descriptions)
        assert any("Host header 'rebind.example" in d for d in descriptions)
        for alert in alerts:
            assert _requestor(alert).get("UserID") == "127.0.0.1"
            assert not schema_errors(alert)
    finally:
        inbox.close()


def test_a_gateway_refuses_to_start_with_a_token_file_others_can_read(
    pki: DevPki, tmp_path: Path
) -> None:
    operators = tmp_path / "operators"
    write_operator_token_file(operators, "ops-anna")
    operators.chmod(0o644)
    config = make_config(
        pki, tmp_path, "beta", consent={"enabled": True, "admin_token_file": str(operators)}
    )
    with pytest.raises(ConfigError, match="readable by others"):
        Gateway(config)
