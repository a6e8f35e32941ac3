"""An opted-out patient's documents never leave the community: query, retrieve and RAD-75."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path
from xml.sax.saxutils import escape

import pydicom
from lxml import etree

from tests.test_client import _client
from xca_gateway.dicom_samples import DEFAULT_PATIENTS, generate_study
from xca_gateway.gateway import Gateway
from xca_gateway.importer import import_studies
from xca_gateway.namespaces import RIM, RS, XDSB, XDSI, Action, ResponseStatus
from xca_gateway.pki import DevPki
from xca_gateway.registry import open_registry
from xca_gateway.repository import DocumentRepository

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
