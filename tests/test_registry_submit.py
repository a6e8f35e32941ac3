"""ITI-42 registration rules: metadata checks, relationships and their effects.

Registrations run against a real SQLite registry holding the corpus; every refused
submission must leave the registry unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.test_registry_corpus import (
    APPROVED,
    DEPRECATED,
    PID_A,
    PID_B,
    REPOSITORY,
    U,
    adhoc,
    listed,
    load_corpus,
    names,
    quoted,
    sqlite_registry,
)
from xca_gateway.protocol.namespaces import LCM, RIM
from xca_gateway.registry import LocalRegistry
from xca_gateway.registry.builder import (
    AssociationSpec,
    DocumentEntrySpec,
    FolderSpec,
    SubmissionSetSpec,
    build_submit_objects_request,
    kos_document_entry,
)
from xca_gateway.registry.model import Code
from xca_gateway.registry.submit import SubmissionRejected, parse_submission
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId
from xca_gateway.xds.ebrs import RegistryError


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    opened = asyncio.run(sqlite_registry(tmp_path))
    asyncio.run(load_corpus(opened))
    yield opened
    asyncio.run(opened.close())


_counter = iter(range(1, 1_000_000))


def uid() -> str:
    return f"1.2.826.0.1.3680043.10.5.{next(_counter)}"


def doc(name: str = "Doc", patient: str = PID_A, **kw: object) -> DocumentEntrySpec:
    spec = DocumentEntrySpec(patient, uid(), entry_uuid=name, repository_unique_id=REPOSITORY)
    for key, value in kw.items():
        setattr(spec, key, value)
    return spec


def request(
    documents: list[DocumentEntrySpec] | None = None, patient: str = PID_A, **kw: object
) -> etree._Element:
    return build_submit_objects_request(
        SubmissionSetSpec(patient, uid()),
        documents if documents is not None else [doc()],
        **kw,  # type: ignore[arg-type]
    )


def submit(registry: LocalRegistry, req: etree._Element) -> list[RegistryError]:
    return asyncio.run(registry.submit(req))


def refused(registry: LocalRegistry, req: etree._Element) -> list[str]:
    before = asyncio.run(registry.store.counts())
    errors = submit(registry, req)
    assert errors, "the submission was accepted"
    assert asyncio.run(registry.store.counts()) == before
    return [e.error_code for e in errors]


def status_of(registry: LocalRegistry, *names_: str) -> dict[str, str]:
    result = asyncio.run(
        registry.stored_query(
            adhoc(
                StoredQueryId.GET_DOCUMENTS,
                [("$XDSDocumentEntryEntryUUID", listed(*map(U, names_)))],
            )
        )
    )
    return {
        n: o.get("status", "") for n, o in zip(names(result.objects), result.objects, strict=True)
    }


def test_a_valid_submission_is_registered(registry: LocalRegistry) -> None:
    assert submit(registry, request()) == []


def _edit(mutate: Callable[[etree._Element], None]) -> etree._Element:
    req = request()
    mutate(req)
    return req


def _matches(req: etree._Element, xpath: str) -> list[etree._Element]:
    found = req.xpath(xpath, namespaces={"rim": RIM})
    assert isinstance(found, list)
    return [el for el in found if isinstance(el, etree._Element)]


def _remove(xpath: str) -> Callable[[etree._Element], None]:
    def mutate(req: etree._Element) -> None:
        for el in _matches(req, xpath):
            parent = el.getparent()
            assert parent is not None
            parent.remove(el)

    return mutate


def _set(xpath: str, attribute: str, value: str) -> Callable[[etree._Element], None]:
    def mutate(req: etree._Element) -> None:
        for el in _matches(req, xpath):
            el.set(attribute, value)

    return mutate


def _text(xpath: str, text: str) -> Callable[[etree._Element], None]:
    def mutate(req: etree._Element) -> None:
        for el in _matches(req, xpath):
            el.text = text

    return mutate


EO = "//rim:ExtrinsicObject"


def _scheme(scheme: str) -> str:
    return f"{EO}/rim:Classification[@classificationScheme='{scheme}']"


def _slot(name: str) -> str:
    return f"{EO}/rim:Slot[@name='{name}']"


@pytest.mark.parametrize(
    "mutate",
    [
        _remove(_scheme(ebrim.DE_CLASS_CODE)),
        _remove(_scheme(ebrim.DE_FORMAT_CODE)),
        _remove(_scheme(ebrim.DE_CONFIDENTIALITY_CODE)),
        _remove(f"{_scheme(ebrim.DE_TYPE_CODE)}/rim:Slot"),
        _set(_scheme(ebrim.DE_TYPE_CODE), "nodeRepresentation", ""),
        _remove(f"{EO}/rim:ExternalIdentifier[@identificationScheme='{ebrim.DE_PATIENT_ID}']"),
        _remove(f"{EO}/rim:ExternalIdentifier[@identificationScheme='{ebrim.DE_UNIQUE_ID}']"),
        _set(
            f"{EO}/rim:ExternalIdentifier[@identificationScheme='{ebrim.DE_PATIENT_ID}']",
            "value",
            "nope",
        ),
        _remove(_slot("creationTime")),
        _remove(_slot("hash")),
        _remove(_slot("repositoryUniqueId")),
        _remove(_slot("sourcePatientId")),
        _remove(_slot("languageCode")),
        _text(f"{_slot('creationTime')}/rim:ValueList/rim:Value", "20241301"),
        _text(f"{_slot('repositoryUniqueId')}/rim:ValueList/rim:Value", "not-an-oid"),
        _set(EO, "mimeType", ""),
        _set(EO, "objectType", "urn:uuid:00000000-0000-0000-0000-000000000000"),
        _set(EO, "lid", "urn:uuid:00000000-0000-0000-0000-000000000001"),
        _set(EO, "id", "urn:uuid:not-a-uuid"),
        _remove("//rim:Association"),
        _remove("//rim:Classification[@classificationNode]"),
        _set("//rim:Association", "associationType", "urn:example:Unknown"),
        _set("//rim:Association", "targetObject", "NoSuchSymbol"),
    ],
)
def test_malformed_metadata_is_refused(
    registry: LocalRegistry, mutate: Callable[[etree._Element], None]
) -> None:
    req = request()
    mutate(req)
    codes = refused(registry, req)
    assert set(codes) == {ErrorCode.REGISTRY_METADATA_ERROR}, codes


def test_bad_dtm_and_hash_are_refused(registry: LocalRegistry) -> None:
    assert refused(registry, request([doc(creation_time="2024-01-01")])) == [
        ErrorCode.REGISTRY_METADATA_ERROR
    ]
    assert refused(registry, request([doc(hash="xyz")])) == [ErrorCode.REGISTRY_METADATA_ERROR]
    assert refused(registry, request([doc(size=None, extra_slots=(("size", ("12a",)),))])) == [
        ErrorCode.REGISTRY_METADATA_ERROR
    ]


def test_kos_manifest_must_be_dicom(registry: LocalRegistry) -> None:
    kos = kos_document_entry(
        patient_id=PID_A,
        sop_instance_uid=uid(),
        study_instance_uid=uid(),
        repository_unique_id=REPOSITORY,
    )
    kos.mime_type = "text/xml"
    assert refused(registry, request([kos])) == [ErrorCode.REGISTRY_METADATA_ERROR]


def test_one_patient_per_submission(registry: LocalRegistry) -> None:
    assert refused(registry, request([doc(patient=PID_B)])) == [ErrorCode.PATIENT_ID_DOES_NOT_MATCH]
    folder = FolderSpec(PID_B, uid())
    assert refused(registry, request(folders=[folder])) == [ErrorCode.PATIENT_ID_DOES_NOT_MATCH]
    # An existing DocumentEntry of another patient cannot join this SubmissionSet.
    assert refused(registry, request(references=[U("kos_b")])) == [
        ErrorCode.PATIENT_ID_DOES_NOT_MATCH
    ]


def test_unique_ids(registry: LocalRegistry) -> None:
    twin = doc("Twin")
    twin.unique_id = "1.2.3.4.5.6.7"
    other = doc("Other")
    other.unique_id = "1.2.3.4.5.6.7"
    assert refused(registry, request([twin, other])) == [
        ErrorCode.REGISTRY_DUPLICATE_UNIQUE_ID_IN_MESSAGE
    ]
    existing = doc(hash="0" * 40)
    existing.unique_id = "1.2.826.0.1.3680043.10.2.1"  # kos_ct's, with another hash
    assert refused(registry, request([existing])) == [ErrorCode.NON_IDENTICAL_HASH]
    folder = FolderSpec(PID_A, "1.2.826.0.1.3680043.10.4.1")
    assert refused(registry, request(folders=[folder])) == [
        ErrorCode.DUPLICATE_UNIQUE_ID_IN_REGISTRY
    ]
    taken = doc(U("kos_mr"))
    assert refused(registry, request([taken])) == [ErrorCode.REGISTRY_METADATA_ERROR]


def test_submission_set_needs_a_has_member_per_document(registry: LocalRegistry) -> None:
    req = request([doc("One"), doc("Two")])
    for assoc in req.iter(f"{{{RIM}}}Association"):
        if assoc.get("targetObject") == "Two":
            assoc.getparent().remove(assoc)  # type: ignore[union-attr]
    assert refused(registry, req) == [ErrorCode.REGISTRY_METADATA_ERROR]
    req = request()
    status = req.find(f".//{{{RIM}}}Association/{{{RIM}}}Slot/{{{RIM}}}ValueList/{{{RIM}}}Value")
    assert status is not None
    status.text = "Reference"
    assert refused(registry, req) == [ErrorCode.REGISTRY_METADATA_ERROR]


def test_exactly_one_submission_set(registry: LocalRegistry) -> None:
    req = request()
    second = build_submit_objects_request(SubmissionSetSpec(PID_A, uid(), entry_uuid="Other"), [])
    object_list = req.find(f"{{{RIM}}}RegistryObjectList")
    assert object_list is not None
    for el in second.find(f"{{{RIM}}}RegistryObjectList"):  # type: ignore[union-attr]
        object_list.append(el)
    assert set(refused(registry, req)) == {ErrorCode.REGISTRY_METADATA_ERROR}


def test_not_a_submit_objects_request(registry: LocalRegistry) -> None:
    assert refused(registry, etree.Element(f"{{{LCM}}}RemoveObjectsRequest")) == [
        ErrorCode.REGISTRY_METADATA_ERROR
    ]
    empty = etree.Element(f"{{{LCM}}}SubmitObjectsRequest")
    assert refused(registry, empty) == [ErrorCode.REGISTRY_METADATA_ERROR]
    odd = request()
    etree.SubElement(odd.find(f"{{{RIM}}}RegistryObjectList"), f"{{{RIM}}}Service", id="s")  # type: ignore[arg-type]
    assert refused(registry, odd) == [ErrorCode.REGISTRY_METADATA_ERROR]


def test_limited_metadata_is_refused(registry: LocalRegistry) -> None:
    req = request()
    eo = req.find(f".//{{{RIM}}}ExtrinsicObject")
    assert eo is not None
    etree.SubElement(
        eo,
        f"{{{RIM}}}Classification",
        id="limited",
        classifiedObject="Doc",
        classificationNode=ebrim.DE_LIMITED_METADATA,
    )
    assert refused(registry, req) == [ErrorCode.REGISTRY_METADATA_ERROR]


def test_patient_id_domains(tmp_path: Path) -> None:
    registry = asyncio.run(sqlite_registry(tmp_path, patient_id_domains=["1.2.3"]))
    try:
        assert refused(registry, request()) == [ErrorCode.UNKNOWN_PATIENT_ID]
        pid = "X^^^&1.2.3&ISO"
        assert submit(registry, request([doc(patient=pid)], patient=pid)) == []
    finally:
        asyncio.run(registry.close())


# --------------------------------------------------------------------------- relationships


def test_replacement_deprecates_the_original_and_its_transforms_and_addenda(
    registry: LocalRegistry,
) -> None:
    # report2 has an addendum (APND) in the corpus; give it a transform too.
    xfrm = request(
        [doc("Xfrm")], associations=[AssociationSpec("Xfrm", U("report2"), type=ebrim.XFRM)]
    )
    assert submit(registry, xfrm) == []
    replacement = doc("New")
    new = request(
        [replacement], associations=[AssociationSpec("New", U("report2"), type=ebrim.RPLC)]
    )
    assert submit(registry, new) == []
    assert status_of(registry, "report2", "addendum", "kos_ct", "pdf") == {
        "report2": DEPRECATED,
        "addendum": DEPRECATED,
        "kos_ct": APPROVED,
        "pdf": APPROVED,  # a transform of kos_mr, not of the replaced document
    }
    result = asyncio.run(
        registry.stored_query(
            adhoc(
                StoredQueryId.FIND_DOCUMENTS,
                [
                    ("$XDSDocumentEntryPatientId", quoted(PID_A)),
                    ("$XDSDocumentEntryStatus", listed(DEPRECATED)),
                ],
            )
        )
    )
    assert len(result.objects) == 4  # report, report2, addendum and the transform of report2
    # The replacement joined the folder of the original.
    folders = asyncio.run(
        registry.stored_query(
            adhoc(
                StoredQueryId.GET_FOLDERS_FOR_DOCUMENT,
                [("$XDSDocumentEntryUniqueId", quoted(replacement.unique_id))],
            )
        )
    )
    assert names(folders.objects) == ["folder"]


@pytest.mark.parametrize("kind", [ebrim.RPLC, ebrim.APND, ebrim.XFRM, ebrim.XFRM_RPLC])
def test_relationships_to_a_deprecated_document_are_refused(
    registry: LocalRegistry, kind: str
) -> None:
    req = request([doc("New")], associations=[AssociationSpec("New", U("report"), type=kind)])
    assert refused(registry, req) == [ErrorCode.REGISTRY_DEPRECATED_DOCUMENT_ERROR]


def test_relationships_must_resolve(registry: LocalRegistry) -> None:
    unknown = "urn:uuid:00000000-0000-4000-8000-000000000000"
    req = request([doc("New")], associations=[AssociationSpec("New", unknown, type=ebrim.RPLC)])
    assert refused(registry, req) == [ErrorCode.REGISTRY_METADATA_ERROR]
    other_patient = request(
        [doc("New")], associations=[AssociationSpec("New", U("kos_b"), type=ebrim.APND)]
    )
    assert refused(registry, other_patient) == [ErrorCode.PATIENT_ID_DOES_NOT_MATCH]
    not_a_document = request(
        [doc("New")], associations=[AssociationSpec("New", U("folder"), type=ebrim.RPLC)]
    )
    assert refused(registry, not_a_document) == [ErrorCode.REGISTRY_METADATA_ERROR]
    twice = request(
        [doc("A"), doc("B")],
        associations=[
            AssociationSpec("A", U("kos_ct"), type=ebrim.RPLC),
            AssociationSpec("B", U("kos_ct"), type=ebrim.RPLC),
        ],
    )
    assert refused(registry, twice) == [ErrorCode.REGISTRY_METADATA_ERROR]


def test_signs_may_point_within_the_submission(registry: LocalRegistry) -> None:
    signature = doc(
        "Sig", format_code=Code("http://www.w3.org/2000/09/xmldsig#", "1.3.6.1.4.1.19376.1.2.3")
    )
    req = request(
        [doc("Signed"), signature],
        associations=[AssociationSpec("Sig", "Signed", type=ebrim.SIGNS)],
    )
    assert submit(registry, req) == []


def test_adding_to_an_existing_folder(registry: LocalRegistry) -> None:
    req = request(
        [doc("New")],
        associations=[
            AssociationSpec(U("folder"), "New", entry_uuid="FolderNew"),
            AssociationSpec("SubmissionSet01", "FolderNew", submission_set_status="Original"),
        ],
    )
    assert submit(registry, req) == []
    result = asyncio.run(
        registry.stored_query(
            adhoc(
                StoredQueryId.GET_FOLDER_AND_CONTENTS,
                [("$XDSFolderEntryUUID", quoted(U("folder")))],
            )
        )
    )
    assert sum(1 for o in result.objects if etree.QName(o).localname == "ExtrinsicObject") == 4
    other = request(
        [doc("Other", patient=PID_B)],
        patient=PID_B,
        associations=[AssociationSpec(U("folder"), "Other")],
    )
    assert refused(registry, other) == [ErrorCode.PATIENT_ID_DOES_NOT_MATCH]
    not_a_folder = request([doc("X")], associations=[AssociationSpec(U("kos_ct"), "X")])
    assert refused(registry, not_a_folder) == [ErrorCode.REGISTRY_METADATA_ERROR]


def test_parse_submission_is_pure_and_reports_every_problem() -> None:
    bad = doc("Bad", creation_time=None, hash="zz")
    with pytest.raises(SubmissionRejected) as caught:
        parse_submission(request([bad, doc("Other", hash="yy")]))
    contexts = " | ".join(e.code_context for e in caught.value.errors)
    assert "creationTime is required" in contexts and "Bad" in contexts and "Other" in contexts
    with pytest.raises(SubmissionRejected) as caught:
        parse_submission(request([doc("A"), doc("B", patient=PID_B)]))
    assert [e.error_code for e in caught.value.errors] == [ErrorCode.PATIENT_ID_DOES_NOT_MATCH]
    ok = parse_submission(request([doc("A")]), now="20250102030405")
    assert [o.kind.value for o in ok.objects] == ["SubmissionSet", "DocumentEntry", "Association"]
    assert all(o.uuid.startswith("urn:uuid:") for o in ok.objects)
    assert ok.registered_at == "20250102030405"
