"""A registry corpus shared by the registry tests, and tests that it registers faithfully.

The corpus is built the way an XDS-I.b Imaging Document Source and a document repository
would submit it: KOS imaging manifests (application/dicom, the KOS formatCode, Study Instance
UID in referenceIdList), reports, a Folder, and document relationships (RPLC, APND, XFRM).
entryUUIDs are fixed (derived from names) so tests can name what they expect.

Patient A after all submissions (``status`` in brackets)::

    SS1 (20240110)  kos_ct [A], kos_mr [A], report [Deprecated by report2], folder (kos_ct,
                    report, + report2 once it replaces report)
    SS2 (20240301)  report2 RPLC report
    SS3 (20240302)  addendum APND report2, pdf XFRM kos_mr
    SS4 (20240303)  ondemand (on-demand DocumentEntry)
Patient B::
    SS5 (20240304)  kos_b
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from lxml import etree

from xca_gateway.protocol.namespaces import QUERY, RIM, ResponseStatus
from xca_gateway.protocol.wsdl import WSDL_DIR
from xca_gateway.registry import LocalRegistry, QueryResult, open_registry, parse_registry_config
from xca_gateway.registry.builder import (
    CONFIDENTIALITY,
    DCM,
    LOINC,
    AssociationSpec,
    DocumentEntrySpec,
    FolderSpec,
    SubmissionSetSpec,
    build_submit_objects_request,
    kos_document_entry,
    study_reference_id,
)
from xca_gateway.registry.model import Code, load_element
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import adhoc_query_response

AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
PID_A = f"A-1^^^&{AUTHORITY}&ISO"
PID_B = f"B-2^^^&{AUTHORITY}&ISO"
PID_UNKNOWN = f"Z-9^^^&{AUTHORITY}&ISO"
REPOSITORY = "1.3.6.1.4.1.21367.13.40.7"
STUDY_CT = "1.2.826.0.1.3680043.10.1.1"
STUDY_MR = "1.2.826.0.1.3680043.10.1.2"
STUDY_B = "1.2.826.0.1.3680043.10.1.3"
ACCESSION = ("ACC-001", AUTHORITY)
APPROVED = ebrim.STATUS_APPROVED
DEPRECATED = ebrim.STATUS_DEPRECATED
KOS_FORMAT = f"{ebrim.KOS_FORMAT_CODE}^^{ebrim.DICOM_UID_REGISTRY}"
TEXT_FORMAT = Code("urn:ihe:rad:TEXT", "1.3.6.1.4.1.19376.1.2.3")
PDF_FORMAT = Code("urn:ihe:rad:PDF", "1.3.6.1.4.1.19376.1.2.3")

_NAMESPACE = uuid.UUID("6f1c7f5e-8a1d-4a57-9d0c-3b7f8f0a4e21")


def U(name: str) -> str:
    """The fixed entryUUID of a corpus object."""
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, name)}"


NAMES = [
    "ss1",
    "ss2",
    "ss3",
    "ss4",
    "ss5",
    "kos_ct",
    "kos_mr",
    "report",
    "report2",
    "addendum",
    "pdf",
    "ondemand",
    "kos_b",
    "folder",
    "folder_kos_ct",
    "folder_report",
]
BY_UUID = {U(n): n for n in NAMES}

UNIQUE_IDS = {
    "kos_ct": "1.2.826.0.1.3680043.10.2.1",
    "kos_mr": "1.2.826.0.1.3680043.10.2.2",
    "report": "1.2.826.0.1.3680043.10.2.3",
    "report2": "1.2.826.0.1.3680043.10.2.4",
    "addendum": "1.2.826.0.1.3680043.10.2.5",
    "pdf": "1.2.826.0.1.3680043.10.2.6",
    "ondemand": "1.2.826.0.1.3680043.10.2.7",
    "kos_b": "1.2.826.0.1.3680043.10.2.8",
    "ss1": "1.2.826.0.1.3680043.10.3.1",
    "ss2": "1.2.826.0.1.3680043.10.3.2",
    "ss3": "1.2.826.0.1.3680043.10.3.3",
    "ss4": "1.2.826.0.1.3680043.10.3.4",
    "ss5": "1.2.826.0.1.3680043.10.3.5",
    "folder": "1.2.826.0.1.3680043.10.4.1",
}


def _ss(name: str, patient: str, time: str, **kw: object) -> SubmissionSetSpec:
    return SubmissionSetSpec(
        patient,
        UNIQUE_IDS[name],
        submission_time=time,
        entry_uuid=U(name),
        **kw,  # type: ignore[arg-type]
    )


def _report(name: str, creation: str, **kw: object) -> DocumentEntrySpec:
    spec = DocumentEntrySpec(
        patient_id=PID_A,
        unique_id=UNIQUE_IDS[name],
        entry_uuid=U(name),
        class_code=Code("REPORTS", "1.3.6.1.4.1.19376.1.2.6.1"),
        type_code=Code("18782-3", LOINC),
        format_code=TEXT_FORMAT,
        creation_time=creation,
        repository_unique_id=REPOSITORY,
        author_persons=("^Jones^Mary",),
        reference_ids=(f"{ACCESSION[0]}^^^&{ACCESSION[1]}&ISO^{ebrim.REFERENCE_ID_ACCESSION}",),
        title=f"Radiology report {name}",
    )
    for key, value in kw.items():
        setattr(spec, key, value)
    return spec


def corpus_submissions() -> list[etree._Element]:
    """The corpus, one SubmitObjectsRequest per submission, in registration order."""
    kos_ct = kos_document_entry(
        patient_id=PID_A,
        sop_instance_uid=UNIQUE_IDS["kos_ct"],
        study_instance_uid=STUDY_CT,
        repository_unique_id=REPOSITORY,
        entry_uuid=U("kos_ct"),
        accession=ACCESSION,
        modality="CT",
        study_time="20240110101500",
        author_persons=("^Smith^John",),
    )
    kos_ct.service_stop_time = "20240110113000"
    kos_mr = kos_document_entry(
        patient_id=PID_A,
        sop_instance_uid=UNIQUE_IDS["kos_mr"],
        study_instance_uid=STUDY_MR,
        repository_unique_id=REPOSITORY,
        entry_uuid=U("kos_mr"),
        modality="MR",
        study_time="20240215093000",
        author_persons=("^O'Brien^Sean",),
        confidentiality_codes=(Code("N", CONFIDENTIALITY), Code("R", CONFIDENTIALITY)),
    )
    kos_mr.event_codes = (Code("MR", DCM), Code("T-A0100", "SRT"))
    report = _report("report", "20231201080000", availability=ebrim.AVAILABILITY_OFFLINE)
    s1 = build_submit_objects_request(
        _ss("ss1", PID_A, "20240110120000", author_persons=("^Who^Doctor",)),
        [kos_ct, kos_mr, report],
        folders=[FolderSpec(PID_A, UNIQUE_IDS["folder"], title="Imaging", entry_uuid=U("folder"))],
        associations=[
            AssociationSpec(U("folder"), U("kos_ct"), entry_uuid=U("folder_kos_ct")),
            AssociationSpec(U("folder"), U("report"), entry_uuid=U("folder_report")),
            AssociationSpec(U("ss1"), U("folder_kos_ct"), submission_set_status="Original"),
            AssociationSpec(U("ss1"), U("folder_report"), submission_set_status="Original"),
        ],
    )
    s2 = build_submit_objects_request(
        _ss("ss2", PID_A, "20240301100000", source_id="1.3.6.1.4.1.21367.13.40.8"),
        [_report("report2", "20240301090000")],
        associations=[AssociationSpec(U("report2"), U("report"), type=ebrim.RPLC)],
    )
    pdf = _report("pdf", "20240302100000", mime_type="application/pdf", format_code=PDF_FORMAT)
    pdf.reference_ids = (study_reference_id(STUDY_MR),)
    s3 = build_submit_objects_request(
        _ss("ss3", PID_A, "20240302120000", content_type_code=Code("11528-7", LOINC)),
        [_report("addendum", "20240302110000", author_persons=("^Smith^John",)), pdf],
        associations=[
            AssociationSpec(U("addendum"), U("report2"), type=ebrim.APND),
            AssociationSpec(U("pdf"), U("kos_mr"), type=ebrim.XFRM),
        ],
    )
    ondemand = _report(
        "ondemand", "", object_type=ebrim.DOCUMENT_ENTRY_ON_DEMAND, creation_time=None
    )
    s4 = build_submit_objects_request(_ss("ss4", PID_A, "20240303120000"), [ondemand])
    kos_b = kos_document_entry(
        patient_id=PID_B,
        sop_instance_uid=UNIQUE_IDS["kos_b"],
        study_instance_uid=STUDY_B,
        repository_unique_id=REPOSITORY,
        entry_uuid=U("kos_b"),
        study_time="20240304080000",
    )
    s5 = build_submit_objects_request(_ss("ss5", PID_B, "20240304120000"), [kos_b])
    return [s1, s2, s3, s4, s5]


# --------------------------------------------------------------------------------- queries


def quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def listed(*values: str) -> str:
    return "(" + ",".join(quoted(v) for v in values) + ")"


SlotsSpec = Sequence[tuple[str, str | Sequence[str]]]


def adhoc(
    query_id: str,
    slots: SlotsSpec = (),
    *,
    return_type: str = "LeafClass",
    home: str | None = None,
) -> etree._Element:
    """An AdhocQueryRequest; each slot is (name, value text or list of Value texts)."""
    request = etree.Element(f"{{{QUERY}}}AdhocQueryRequest", nsmap={"query": QUERY, "rim": RIM})
    etree.SubElement(
        request, f"{{{QUERY}}}ResponseOption", returnType=return_type, returnComposedObjects="true"
    )
    query = etree.SubElement(request, f"{{{RIM}}}AdhocQuery", id=query_id)
    if home is not None:
        query.set("home", home)
    for name, values in slots:
        slot = etree.SubElement(query, f"{{{RIM}}}Slot", name=name)
        value_list = etree.SubElement(slot, f"{{{RIM}}}ValueList")
        for value in [values] if isinstance(values, str) else values:
            etree.SubElement(value_list, f"{{{RIM}}}Value").text = value
    return request


def names(objects: Sequence[etree._Element]) -> list[str]:
    """Corpus names of returned objects (their id if not a corpus object)."""
    return [BY_UUID.get(o.get("id", ""), o.get("id", "")) for o in objects]


def by_name(objects: Sequence[etree._Element]) -> dict[str, etree._Element]:
    return dict(zip(names(objects), objects, strict=True))


_QUERY_SCHEMA: etree.XMLSchema | None = None


def query_schema() -> etree.XMLSchema:
    global _QUERY_SCHEMA
    if _QUERY_SCHEMA is None:
        _QUERY_SCHEMA = etree.XMLSchema(etree.parse(str(WSDL_DIR / "schema/ebRS30/query.xsd")))
    return _QUERY_SCHEMA


def assert_schema_valid(element: etree._Element) -> None:
    schema = query_schema()
    assert schema.validate(element), schema.error_log


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


async def load_corpus(registry: LocalRegistry) -> None:
    for request in corpus_submissions():
        errors = await registry.submit(request)
        assert errors == [], errors


async def sqlite_registry(tmp: Path, **config: object) -> LocalRegistry:
    registry = await open_registry(parse_registry_config(dict(config), tmp, tmp))
    assert isinstance(registry, LocalRegistry)
    return registry


# ----------------------------------------------------------------------------------- tests


@pytest.fixture
def corpus_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    registry: LocalRegistry = run(sqlite_registry(tmp_path))  # type: ignore[assignment]
    run(load_corpus(registry))
    yield registry
    run(registry.close())


def test_the_corpus_registers_every_object(corpus_registry: LocalRegistry) -> None:
    counts = run(corpus_registry.store.counts())
    # 8 DocumentEntries, 5 SubmissionSets, 1 Folder; associations: 8 SS-DE + 1 SS-Folder +
    # 2 Folder-DE + 2 SS-(Folder-DE) + RPLC + APND + XFRM + report2 joining the folder.
    assert counts == {"DocumentEntry": 8, "SubmissionSet": 5, "Folder": 1, "Association": 17}


def _canonical(element: etree._Element) -> bytes:
    element = etree.fromstring(etree.tostring(element))
    for attribute in ("status", "lid", "home"):
        if attribute in element.attrib:
            del element.attrib[attribute]
    # Nested Classifications and ExternalIdentifiers were submitted with symbolic ids.
    for child in element:
        if "id" in child.attrib:
            del child.attrib["id"]
    etree.cleanup_namespaces(element)
    return etree.tostring(element, method="c14n")


def test_leaf_class_returns_exactly_the_registered_metadata(corpus_registry: LocalRegistry) -> None:
    submitted = {
        el.get("id"): el
        for request in corpus_submissions()
        for el in request.iter(f"{{{RIM}}}ExtrinsicObject")
        if el.get("id") != U("kos_b")  # another patient: XDSResultNotSinglePatient
    }
    result: QueryResult = run(  # type: ignore[assignment]
        corpus_registry.stored_query(
            adhoc(
                ebrim.StoredQueryId.GET_DOCUMENTS,
                [("$XDSDocumentEntryEntryUUID", listed(*submitted))],  # type: ignore[arg-type]
            )
        )
    )
    assert result.status == ResponseStatus.SUCCESS, result.errors
    assert len(result.objects) == len(submitted) == 7
    for returned in result.objects:
        original = submitted[returned.get("id")]
        # Registry-managed attributes are set, everything else is as submitted.
        assert returned.get("lid") == returned.get("id")
        assert returned.get("status") in (APPROVED, DEPRECATED)
        assert all(c.get("id", "").startswith("urn:uuid:") for c in returned if c.get("id"))
        assert _canonical(returned) == _canonical(original)


def test_symbolic_ids_get_uuids_and_top_level_classifications_are_nested(tmp_path: Path) -> None:
    registry: LocalRegistry = run(sqlite_registry(tmp_path))  # type: ignore[assignment]
    try:
        spec = kos_document_entry(
            patient_id=PID_A,
            sop_instance_uid="1.2.3.4.5.6",
            study_instance_uid="1.2.3.4.5",
            repository_unique_id=REPOSITORY,
        )
        request = build_submit_objects_request(SubmissionSetSpec(PID_A, "1.2.3.4.9"), [spec])
        # Move the classCode classification to the top level, as some sources send it.
        extrinsic = request.find(f".//{{{RIM}}}ExtrinsicObject")
        assert extrinsic is not None
        class_code = next(
            c
            for c in extrinsic.iterfind(f"{{{RIM}}}Classification")
            if c.get("classificationScheme") == ebrim.DE_CLASS_CODE
        )
        extrinsic.remove(class_code)
        extrinsic.getparent().append(class_code)  # type: ignore[union-attr]
        assert run(registry.submit(request)) == []
        result: QueryResult = run(  # type: ignore[assignment]
            registry.stored_query(
                adhoc(
                    ebrim.StoredQueryId.FIND_DOCUMENTS_BY_REFERENCE_ID,
                    [
                        ("$XDSDocumentEntryPatientId", quoted(PID_A)),
                        ("$XDSDocumentEntryStatus", listed(APPROVED)),
                        (
                            "$XDSDocumentEntryReferenceIdList",
                            listed(study_reference_id("1.2.3.4.5")),
                        ),
                    ],
                )
            )
        )
        assert result.status == ResponseStatus.SUCCESS
        (entry,) = result.objects
        entry_id = entry.get("id", "")
        assert entry_id.startswith("urn:uuid:") and entry_id != "Document01"
        classifications = entry.findall(f"{{{RIM}}}Classification")
        assert ebrim.DE_CLASS_CODE in {c.get("classificationScheme") for c in classifications}
        for child in (*classifications, *entry.findall(f"{{{RIM}}}ExternalIdentifier")):
            assert child.get("id", "").startswith("urn:uuid:")
            assert entry_id in (child.get("classifiedObject"), child.get("registryObject"))
        # ebRIM order: Slot*, Name, Classification*, ExternalIdentifier*
        order = [etree.QName(c).localname for c in entry]
        assert order == sorted(
            order, key=["Slot", "Name", "Description", "Classification", "ExternalIdentifier"].index
        )
        assert load_element(etree.tostring(entry)) is not None
        assert_schema_valid(etree.fromstring(etree.tostring(_response(result))))
    finally:
        run(registry.close())


def _response(result: QueryResult) -> etree._Element:
    return adhoc_query_response(result.status, result.errors, result.objects)
