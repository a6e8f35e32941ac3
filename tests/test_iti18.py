"""ITI-18 Registry Stored Query over mTLS, with zeep clients from the IHE ``iti18.wsdl``.

All 14 stored queries, each with both return types and with a negative case; every answer is
validated against the ebRS query schema. The registry is filled through ITI-42.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lxml import etree

from tests.test_iti42 import (
    REGISTRY_ITI18,
    REGISTRY_ITI42,
    Iti42Client,
    QueryClient,
    RegistryNode,
    errors_of,
    objects_of,
)
from tests.test_registry_corpus import (
    APPROVED,
    KOS_FORMAT,
    PID_A,
    UNIQUE_IDS,
    U,
    adhoc,
    corpus_submissions,
    listed,
    names,
    quoted,
)
from xca_gateway.protocol.namespaces import RIM, Action, ResponseStatus
from xca_gateway.protocol.soap_service import Operation, SoapEndpoint
from xca_gateway.registry import LocalRegistry
from xca_gateway.registry.builder import study_reference_id
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.transactions.iti18 import registry_stored_query_handler
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId

Q = StoredQueryId
DE = "$XDSDocumentEntry"
SMALL = "/registry/iti18-small"


@pytest.fixture(scope="module")
def node(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryNode]:
    started = RegistryNode(pki, tmp_path_factory.mktemp("iti18"))
    try:
        client = Iti42Client(pki, started.url(REGISTRY_ITI42))
        for request in corpus_submissions():
            assert client.register(request).status == ResponseStatus.SUCCESS
        # The same store behind a registry with a small result limit.
        assert isinstance(started.registry, LocalRegistry)
        small = LocalRegistry(started.registry.store, max_results=3)
        endpoint = SoapEndpoint(SMALL, "small", {}, door="registry-query")
        endpoint.add(
            Operation(
                Action.ITI18,
                "ITI-18",
                registry_stored_query_handler(small, home_community_id=started.home),
            )
        )
        started.gateway.soap.endpoints[SMALL] = endpoint
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def client(node: RegistryNode, pki: DevPki) -> QueryClient:
    return QueryClient(pki, "iti18", node.url(REGISTRY_ITI18))


Slots = list[tuple[str, str | list[str]]]
APPROVED_ONLY = listed(APPROVED)

POSITIVE: list[tuple[str, Slots, list[str]]] = [
    (
        Q.FIND_DOCUMENTS,
        [
            (f"{DE}PatientId", quoted(PID_A)),
            (f"{DE}Status", APPROVED_ONLY),
            (f"{DE}FormatCode", listed(KOS_FORMAT)),
        ],
        ["kos_ct", "kos_mr"],
    ),
    (
        Q.FIND_DOCUMENTS_BY_REFERENCE_ID,
        [
            (f"{DE}PatientId", quoted(PID_A)),
            (f"{DE}Status", APPROVED_ONLY),
            (f"{DE}ReferenceIdList", listed(study_reference_id("1.2.826.0.1.3680043.10.1.1"))),
        ],
        ["kos_ct"],
    ),
    (
        Q.FIND_SUBMISSION_SETS,
        [
            ("$XDSSubmissionSetPatientId", quoted(PID_A)),
            ("$XDSSubmissionSetStatus", APPROVED_ONLY),
            ("$XDSSubmissionSetSubmissionTimeFrom", "20240302"),
        ],
        ["ss3", "ss4"],
    ),
    (
        Q.FIND_FOLDERS,
        [("$XDSFolderPatientId", quoted(PID_A)), ("$XDSFolderStatus", APPROVED_ONLY)],
        ["folder"],
    ),
    (
        Q.GET_ALL,
        [
            ("$patientId", quoted(PID_A)),
            (f"{DE}Status", APPROVED_ONLY),
            ("$XDSSubmissionSetStatus", APPROVED_ONLY),
            ("$XDSFolderStatus", APPROVED_ONLY),
            (f"{DE}FormatCode", listed("urn:ihe:rad:PDF^^1.3.6.1.4.1.19376.1.2.3")),
        ],
        # pdf, the packages, pdf's SubmissionSet membership and the XFRM (its target kos_mr is
        # filtered out, so not that one) ... only associations between returned objects.
        ["ss1", "folder", "ss2", "ss3", "pdf", "*", "ss4"],
    ),
    (Q.GET_DOCUMENTS, [(f"{DE}UniqueId", listed(UNIQUE_IDS["report"]))], ["report"]),
    (Q.GET_FOLDERS, [("$XDSFolderEntryUUID", listed(U("folder")))], ["folder"]),
    (Q.GET_ASSOCIATIONS, [("$uuid", listed(U("pdf")))], ["*", "*"]),
    (Q.GET_DOCUMENTS_AND_ASSOCIATIONS, [(f"{DE}EntryUUID", listed(U("pdf")))], ["pdf", "*", "*"]),
    (Q.GET_SUBMISSION_SETS, [("$uuid", listed(U("report2")))], ["ss2", "*"]),
    (
        Q.GET_SUBMISSION_SET_AND_CONTENTS,
        [("$XDSSubmissionSetUniqueId", quoted(UNIQUE_IDS["ss2"]))],
        ["ss2", "report2", "*"],
    ),
    (
        Q.GET_FOLDER_AND_CONTENTS,
        [("$XDSFolderEntryUUID", quoted(U("folder"))), (f"{DE}FormatCode", listed(KOS_FORMAT))],
        ["folder", "kos_ct", "folder_kos_ct"],
    ),
    (Q.GET_FOLDERS_FOR_DOCUMENT, [(f"{DE}EntryUUID", quoted(U("report")))], ["folder"]),
    (
        Q.GET_RELATED_DOCUMENTS,
        [
            (f"{DE}EntryUUID", quoted(U("kos_mr"))),
            ("$AssociationTypes", listed(ebrim.XFRM, ebrim.RPLC)),
        ],
        ["kos_mr", "pdf", "*"],
    ),
]


def _shape(objects: list[etree._Element]) -> list[str]:
    """Corpus names, with '*' for objects the corpus does not name (generated ids)."""
    return [n if not n.startswith("urn:uuid:") else "*" for n in names(objects)]


@pytest.mark.parametrize(
    ("query_id", "slots", "expected"), POSITIVE, ids=[p[0][-12:] for p in POSITIVE]
)
def test_stored_query_leaf_class(
    client: QueryClient, node: RegistryNode, query_id: str, slots: Slots, expected: list[str]
) -> None:
    payload = client.query(adhoc(query_id, slots))
    assert payload.get("status") == ResponseStatus.SUCCESS
    assert errors_of(payload) == []
    objects = objects_of(payload)
    got = _shape(objects)
    if query_id == Q.GET_ALL:
        assert [n for n in got if n != "*"] == [n for n in expected if n != "*"]
        assert got.count("*") >= 1
    else:
        assert got == expected
    tags = {etree.QName(o).localname for o in objects}
    assert tags <= {"ExtrinsicObject", "RegistryPackage", "Association"}
    # Full metadata, our community as home.
    assert all(o.get("home") == node.home and o.get("status") for o in objects)
    assert all(len(o) > 0 for o in objects if etree.QName(o).localname != "Association")


@pytest.mark.parametrize(
    ("query_id", "slots", "expected"), POSITIVE, ids=[p[0][-12:] for p in POSITIVE]
)
def test_stored_query_object_ref(
    client: QueryClient, node: RegistryNode, query_id: str, slots: Slots, expected: list[str]
) -> None:
    leaf = objects_of(client.query(adhoc(query_id, slots)))
    payload = client.query(adhoc(query_id, slots, return_type="ObjectRef"))
    assert payload.get("status") == ResponseStatus.SUCCESS
    refs = objects_of(payload)
    assert {etree.QName(r).localname for r in refs} == {"ObjectRef"}
    assert [r.get("id") for r in refs] == [o.get("id") for o in leaf]
    assert all(r.get("home") == node.home and len(r) == 0 for r in refs)


NEGATIVE: list[tuple[str, Slots, str]] = [
    (Q.FIND_DOCUMENTS, [(f"{DE}Status", APPROVED_ONLY)], ErrorCode.STORED_QUERY_MISSING_PARAM),
    (
        Q.FIND_DOCUMENTS_BY_REFERENCE_ID,
        [(f"{DE}PatientId", quoted(PID_A)), (f"{DE}Status", APPROVED_ONLY)],
        ErrorCode.STORED_QUERY_MISSING_PARAM,
    ),
    (
        Q.FIND_SUBMISSION_SETS,
        [
            ("$XDSSubmissionSetPatientId", quoted(PID_A)),
            ("$XDSSubmissionSetStatus", APPROVED_ONLY),
            ("$XDSSubmissionSetSubmissionTimeFrom", "'then'"),
        ],
        ErrorCode.REGISTRY_ERROR,
    ),
    (
        Q.FIND_FOLDERS,
        [
            ("$XDSFolderPatientId", quoted(PID_A)),
            ("$XDSFolderStatus", APPROVED_ONLY),
            ("$XDSFolderStatus", APPROVED_ONLY),
        ],
        ErrorCode.STORED_QUERY_PARAM_NUMBER,
    ),
    (
        Q.GET_ALL,
        [("$patientId", quoted(PID_A)), (f"{DE}Status", APPROVED_ONLY)],
        ErrorCode.STORED_QUERY_MISSING_PARAM,
    ),
    (
        Q.GET_DOCUMENTS,
        [(f"{DE}EntryUUID", listed(U("kos_ct"), U("kos_b")))],
        ErrorCode.RESULT_NOT_SINGLE_PATIENT,
    ),
    (
        Q.GET_FOLDERS,
        [("$XDSFolderEntryUUID", listed(U("folder"))), ("$XDSFolderUniqueId", listed("1.2"))],
        ErrorCode.STORED_QUERY_PARAM_NUMBER,
    ),
    (Q.GET_ASSOCIATIONS, [("$uuid", U("kos_ct"))], ErrorCode.REGISTRY_ERROR),
    (Q.GET_DOCUMENTS_AND_ASSOCIATIONS, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
    (Q.GET_SUBMISSION_SETS, [("$uuid", "('a'")], ErrorCode.REGISTRY_ERROR),
    (
        Q.GET_SUBMISSION_SET_AND_CONTENTS,
        [("$XDSSubmissionSetEntryUUID", [quoted(U("ss1")), quoted(U("ss2"))])],
        ErrorCode.STORED_QUERY_PARAM_NUMBER,
    ),
    (
        Q.GET_FOLDER_AND_CONTENTS,
        [("$XDSFolderEntryUUID", quoted(U("folder"))), (f"{DE}Type", listed("stable"))],
        ErrorCode.REGISTRY_ERROR,
    ),
    (Q.GET_FOLDERS_FOR_DOCUMENT, [("$MetadataLevel", "1")], ErrorCode.STORED_QUERY_MISSING_PARAM),
    (
        Q.GET_RELATED_DOCUMENTS,
        [(f"{DE}EntryUUID", quoted(U("kos_mr")))],
        ErrorCode.STORED_QUERY_MISSING_PARAM,
    ),
    ("urn:uuid:deadbeef-0000-0000-0000-000000000000", [], ErrorCode.UNKNOWN_STORED_QUERY),
]


@pytest.mark.parametrize(
    ("query_id", "slots", "code"), NEGATIVE, ids=[n[0][-12:] for n in NEGATIVE]
)
def test_stored_query_errors(client: QueryClient, query_id: str, slots: Slots, code: str) -> None:
    for return_type in ("LeafClass", "ObjectRef"):
        payload = client.query(adhoc(query_id, slots, return_type=return_type))
        assert payload.get("status") == ResponseStatus.FAILURE
        assert objects_of(payload) == []
        assert {e.get("errorCode") for e in errors_of(payload)} == {code}
    # zeep reads an answer without registry objects itself.
    parsed = client.query_parsed(adhoc(query_id, slots))
    assert parsed.status == ResponseStatus.FAILURE
    assert {e.errorCode for e in parsed.RegistryErrorList.RegistryError} == {code}


def test_too_many_results(node: RegistryNode, pki: DevPki) -> None:
    small = QueryClient(pki, "iti18", node.url(SMALL))
    slots: Slots = [(f"{DE}PatientId", quoted(PID_A)), (f"{DE}Status", APPROVED_ONLY)]
    payload = small.query(adhoc(Q.FIND_DOCUMENTS, slots))
    assert payload.get("status") == ResponseStatus.FAILURE
    assert [e.get("errorCode") for e in errors_of(payload)] == [ErrorCode.TOO_MANY_RESULTS]
    assert objects_of(payload) == []
    narrow = [*slots, (f"{DE}FormatCode", listed(KOS_FORMAT))]
    assert len(objects_of(small.query(adhoc(Q.FIND_DOCUMENTS, narrow)))) == 2


def test_unknown_parameter_is_a_warning(client: QueryClient) -> None:
    slots: Slots = [
        (f"{DE}PatientId", quoted(PID_A)),
        (f"{DE}Status", APPROVED_ONLY),
        ("$Bogus", "'1'"),
    ]
    payload = client.query(adhoc(Q.FIND_DOCUMENTS, slots))
    assert payload.get("status") == ResponseStatus.SUCCESS
    (warning,) = errors_of(payload)
    assert warning.get("severity") == "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"
    assert len(objects_of(payload)) == 5


def test_the_initiating_side_path_serves_the_same_registry(node: RegistryNode, pki: DevPki) -> None:
    # Until the Initiating Gateway takes /ig/iti18 over, it answers from the local registry.
    ig = QueryClient(pki, "iti18", node.gateway.endpoint_urls()["iti18"])
    payload = ig.query(adhoc(Q.GET_FOLDERS, [("$XDSFolderUniqueId", listed(UNIQUE_IDS["folder"]))]))
    (folder,) = objects_of(payload)
    assert folder.find(f"{{{RIM}}}Name") is not None
