"""The 14 stored queries against the embedded registry, on SQLite and on PostgreSQL.

Every query runs through :meth:`LocalRegistry.stored_query` (parse, plan, store, answer) over
the corpus of :mod:`tests.test_registry_corpus`; the SOAP side is covered in test_iti18.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from lxml import etree

from tests.postgres import PostgresServer
from tests.test_registry_corpus import (
    ACCESSION,
    APPROVED,
    BY_UUID,
    DEPRECATED,
    KOS_FORMAT,
    PID_A,
    PID_B,
    PID_UNKNOWN,
    STUDY_CT,
    STUDY_MR,
    UNIQUE_IDS,
    SlotsSpec,
    U,
    adhoc,
    assert_schema_valid,
    corpus_submissions,
    listed,
    names,
    quoted,
)
from xca_gateway.protocol.namespaces import RIM, ErrorSeverity, ResponseStatus
from xca_gateway.registry import LocalRegistry, QueryResult, open_registry, parse_registry_config
from xca_gateway.registry.builder import (
    CONFIDENTIALITY,
    LOINC,
    accession_reference_id,
    study_reference_id,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId
from xca_gateway.xds.ebrs import adhoc_query_response

Q = StoredQueryId
DE = "$XDSDocumentEntry"
IMAGES = "IMAGES^^1.3.6.1.4.1.19376.1.2.6.1"
REPORTS = "REPORTS^^1.3.6.1.4.1.19376.1.2.6.1"
STABLE, ON_DEMAND = ebrim.DOCUMENT_ENTRY_STABLE, ebrim.DOCUMENT_ENTRY_ON_DEMAND


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalRegistry]:
    tmp = tmp_path_factory.mktemp("registry")
    database = None
    server: PostgresServer | None = None
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        database = server.create_database()
        url = server.url(database)
    else:
        url = f"sqlite:///{tmp / 'registry.sqlite3'}"

    async def open_and_load() -> LocalRegistry:
        opened = await open_registry(parse_registry_config({"url": url}, tmp, tmp))
        assert isinstance(opened, LocalRegistry)
        for submission in corpus_submissions():
            assert await opened.submit(submission) == []
        return opened

    opened = asyncio.run(open_and_load())
    yield opened
    asyncio.run(opened.close())
    if server is not None and database is not None:
        server.drop_database(database)


def query(
    registry: LocalRegistry,
    query_id: str,
    slots: SlotsSpec,
    *,
    return_type: str = "LeafClass",
) -> QueryResult:
    result = asyncio.run(registry.stored_query(adhoc(query_id, slots, return_type=return_type)))
    # Whatever the outcome, the answer is a schema-valid AdhocQueryResponse.
    response = adhoc_query_response(result.status, result.errors, result.objects)
    assert_schema_valid(etree.fromstring(etree.tostring(response)))
    return result


def found(registry: LocalRegistry, query_id: str, slots: SlotsSpec) -> list[str]:
    result = query(registry, query_id, slots)
    assert result.status == ResponseStatus.SUCCESS, result.errors
    assert not [e for e in result.errors if e.is_error]
    return names(result.objects)


def failure(registry: LocalRegistry, query_id: str, slots: SlotsSpec) -> list[str]:
    result = query(registry, query_id, slots)
    assert result.status == ResponseStatus.FAILURE
    assert result.objects == []
    return [e.error_code for e in result.errors if e.is_error]


def find_documents(
    *extra: tuple[str, str | list[str]], status: tuple[str, ...] = (APPROVED,)
) -> SlotsSpec:
    return [(f"{DE}PatientId", quoted(PID_A)), (f"{DE}Status", listed(*status)), *extra]


APPROVED_A = ["kos_ct", "kos_mr", "report2", "addendum", "pdf"]

# ------------------------------------------------------------------------------ FindDocuments


def test_find_documents_by_patient_and_status(registry: LocalRegistry) -> None:
    assert found(registry, Q.FIND_DOCUMENTS, find_documents()) == APPROVED_A
    assert found(registry, Q.FIND_DOCUMENTS, find_documents(status=(DEPRECATED,))) == ["report"]
    assert found(registry, Q.FIND_DOCUMENTS, find_documents(status=(APPROVED, DEPRECATED))) == [
        "kos_ct",
        "kos_mr",
        "report",
        "report2",
        "addendum",
        "pdf",
    ]
    b = [(f"{DE}PatientId", quoted(PID_B)), (f"{DE}Status", listed(APPROVED))]
    assert found(registry, Q.FIND_DOCUMENTS, b) == ["kos_b"]


def test_find_documents_of_an_unknown_patient_is_an_empty_success(registry: LocalRegistry) -> None:
    slots = [(f"{DE}PatientId", quoted(PID_UNKNOWN)), (f"{DE}Status", listed(APPROVED))]
    assert found(registry, Q.FIND_DOCUMENTS, slots) == []


def test_document_entry_type_defaults_to_stable(registry: LocalRegistry) -> None:
    assert "ondemand" not in found(registry, Q.FIND_DOCUMENTS, find_documents())
    only = find_documents((f"{DE}Type", listed(ON_DEMAND)))
    assert found(registry, Q.FIND_DOCUMENTS, only) == ["ondemand"]
    both = find_documents((f"{DE}Type", listed(STABLE, ON_DEMAND)))
    assert found(registry, Q.FIND_DOCUMENTS, both) == [*APPROVED_A, "ondemand"]


@pytest.mark.parametrize(
    ("slot", "values", "expected"),
    [
        ("ClassCode", [IMAGES], ["kos_ct", "kos_mr"]),
        ("ClassCode", [IMAGES, REPORTS], APPROVED_A),
        ("ClassCode", ["REPORTS"], ["report2", "addendum", "pdf"]),  # any coding scheme
        ("ClassCode", ["IMAGES^^9.9.9"], []),
        ("TypeCode", [f"18782-3^^{LOINC}"], ["report2", "addendum", "pdf"]),
        ("FormatCode", [KOS_FORMAT], ["kos_ct", "kos_mr"]),
        ("FormatCode", ["urn:ihe:rad:PDF^^1.3.6.1.4.1.19376.1.2.3"], ["pdf"]),
        ("HealthcareFacilityTypeCode", ["RADDX^^2.16.840.1.113883.5.10588"], ["kos_ct", "kos_mr"]),
        (
            "PracticeSettingCode",
            ["394802001^^2.16.840.1.113883.6.96"],
            ["report2", "addendum", "pdf"],
        ),
        (
            "EventCodeList",
            ["CT^^1.2.840.10008.2.16.4", "MR^^1.2.840.10008.2.16.4"],
            ["kos_ct", "kos_mr"],
        ),
        ("ConfidentialityCode", [f"R^^{CONFIDENTIALITY}"], ["kos_mr"]),
    ],
)
def test_find_documents_by_codes(
    registry: LocalRegistry, slot: str, values: list[str], expected: list[str]
) -> None:
    assert (
        found(registry, Q.FIND_DOCUMENTS, find_documents((f"{DE}{slot}", listed(*values))))
        == expected
    )


def test_code_lists_may_span_several_value_elements(registry: LocalRegistry) -> None:
    slots = find_documents((f"{DE}ClassCode", [listed(IMAGES), listed(REPORTS)]))
    assert found(registry, Q.FIND_DOCUMENTS, slots) == APPROVED_A


def test_event_and_confidentiality_codes_have_and_or_semantics(registry: LocalRegistry) -> None:
    mr, brain, ct = "MR^^1.2.840.10008.2.16.4", "T-A0100^^SRT", "CT^^1.2.840.10008.2.16.4"
    events = f"{DE}EventCodeList"
    assert found(
        registry, Q.FIND_DOCUMENTS, find_documents((events, listed(mr)), (events, listed(brain)))
    ) == ["kos_mr"]
    assert (
        found(
            registry,
            Q.FIND_DOCUMENTS,
            find_documents((events, listed(ct)), (events, listed(brain))),
        )
        == []
    )
    assert found(registry, Q.FIND_DOCUMENTS, find_documents((events, listed(ct, brain)))) == [
        "kos_ct",
        "kos_mr",
    ]
    conf = f"{DE}ConfidentialityCode"
    n, r = f"N^^{CONFIDENTIALITY}", f"R^^{CONFIDENTIALITY}"
    assert found(
        registry, Q.FIND_DOCUMENTS, find_documents((conf, listed(n)), (conf, listed(r)))
    ) == ["kos_mr"]
    assert found(registry, Q.FIND_DOCUMENTS, find_documents((conf, listed(n, r)))) == APPROVED_A


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ({"CreationTimeFrom": "20240101", "CreationTimeTo": "20240301"}, ["kos_ct", "kos_mr"]),
        # To is exclusive, From inclusive, compared at the precision of the parameter.
        ({"CreationTimeTo": "20240215093000"}, ["kos_ct"]),
        ({"CreationTimeFrom": "20240215093000"}, ["kos_mr", "report2", "addendum", "pdf"]),
        ({"CreationTimeTo": "20240110"}, []),
        ({"CreationTimeTo": "20240111"}, ["kos_ct"]),
        ({"CreationTimeFrom": "202403"}, ["report2", "addendum", "pdf"]),
        ({"CreationTimeFrom": "2024", "CreationTimeTo": "2025"}, APPROVED_A),
        # Entries without the attribute do not match a range on it.
        ({"ServiceStartTimeFrom": "2024"}, ["kos_ct", "kos_mr"]),
        ({"ServiceStartTimeFrom": "202402", "ServiceStartTimeTo": "202403"}, ["kos_mr"]),
        ({"ServiceStopTimeFrom": "20240110113000"}, ["kos_ct"]),
        ({"ServiceStopTimeTo": "20240110113000"}, []),
    ],
)
def test_find_documents_by_time_ranges(
    registry: LocalRegistry, bounds: dict[str, str], expected: list[str]
) -> None:
    slots = find_documents(*((f"{DE}{name}", value) for name, value in bounds.items()))
    assert found(registry, Q.FIND_DOCUMENTS, slots) == expected


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["%Smith%"], ["kos_ct", "addendum"]),
        (["^Jones^Mary"], ["report2", "pdf"]),
        (["%O'Brien%"], ["kos_mr"]),
        (["_Smith%"], ["kos_ct", "addendum"]),
        (["%smith%"], []),  # LIKE is case-sensitive
        (["%Smith%", "%Brien%"], ["kos_ct", "kos_mr", "addendum"]),
        (["Smith"], []),
    ],
)
def test_find_documents_by_author_person(
    registry: LocalRegistry, patterns: list[str], expected: list[str]
) -> None:
    slots = find_documents((f"{DE}AuthorPerson", listed(*patterns)))
    assert found(registry, Q.FIND_DOCUMENTS, slots) == expected


def test_find_documents_by_availability(registry: LocalRegistry) -> None:
    offline = find_documents(
        (f"{DE}DocumentAvailability", listed(ebrim.AVAILABILITY_OFFLINE)),
        status=(APPROVED, DEPRECATED),
    )
    assert found(registry, Q.FIND_DOCUMENTS, offline) == ["report"]
    online = find_documents((f"{DE}DocumentAvailability", listed(ebrim.AVAILABILITY_ONLINE)))
    assert found(registry, Q.FIND_DOCUMENTS, online) == APPROVED_A


def test_find_documents_object_ref(registry: LocalRegistry) -> None:
    result = query(registry, Q.FIND_DOCUMENTS, find_documents(), return_type="ObjectRef")
    assert result.status == ResponseStatus.SUCCESS
    assert [etree.QName(o).localname for o in result.objects] == ["ObjectRef"] * 5
    assert names(result.objects) == APPROVED_A
    assert all(len(o) == 0 and set(o.attrib) == {"id"} for o in result.objects)


# ------------------------------------------------------------------ FindDocumentsByReferenceId


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ([[study_reference_id(STUDY_CT)]], ["kos_ct"]),
        (
            [[study_reference_id(STUDY_CT), study_reference_id(STUDY_MR)]],
            ["kos_ct", "kos_mr", "pdf"],
        ),
        ([[accession_reference_id(*ACCESSION)]], ["kos_ct", "report2", "addendum"]),
        ([[accession_reference_id(*ACCESSION)], [study_reference_id(STUDY_CT)]], ["kos_ct"]),
        ([[study_reference_id(STUDY_MR)], [study_reference_id(STUDY_CT)]], []),
        ([["1.2.3^^^^urn:ihe:iti:xds:2016:studyInstanceUID"]], []),
    ],
)
def test_find_documents_by_reference_id(
    registry: LocalRegistry, groups: list[list[str]], expected: list[str]
) -> None:
    slots = find_documents(*((f"{DE}ReferenceIdList", listed(*g)) for g in groups))
    assert found(registry, Q.FIND_DOCUMENTS_BY_REFERENCE_ID, slots) == expected


def test_find_documents_by_reference_id_needs_the_reference(registry: LocalRegistry) -> None:
    codes = failure(registry, Q.FIND_DOCUMENTS_BY_REFERENCE_ID, find_documents())
    assert codes == [ErrorCode.STORED_QUERY_MISSING_PARAM]


def test_kos_manifests_can_be_found_with_filters_combined(registry: LocalRegistry) -> None:
    slots = find_documents(
        (f"{DE}ReferenceIdList", listed(study_reference_id(STUDY_MR))),
        (f"{DE}FormatCode", listed(KOS_FORMAT)),
        (f"{DE}CreationTimeFrom", "20240201"),
    )
    assert found(registry, Q.FIND_DOCUMENTS_BY_REFERENCE_ID, slots) == ["kos_mr"]


# ------------------------------------------------------------- FindSubmissionSets, FindFolders


def find_submission_sets(*extra: tuple[str, str | list[str]]) -> SlotsSpec:
    return [
        ("$XDSSubmissionSetPatientId", quoted(PID_A)),
        ("$XDSSubmissionSetStatus", listed(APPROVED)),
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], ["ss1", "ss2", "ss3", "ss4"]),
        ([("$XDSSubmissionSetSourceId", listed("1.3.6.1.4.1.21367.13.40.8"))], ["ss2"]),
        ([("$XDSSubmissionSetSubmissionTimeFrom", "20240302")], ["ss3", "ss4"]),
        ([("$XDSSubmissionSetSubmissionTimeTo", "20240301100000")], ["ss1"]),
        ([("$XDSSubmissionSetAuthorPerson", quoted("%Who%"))], ["ss1"]),
        ([("$XDSSubmissionSetContentType", listed(f"11528-7^^{LOINC}"))], ["ss3"]),
    ],
)
def test_find_submission_sets(
    registry: LocalRegistry, extra: list[tuple[str, str]], expected: list[str]
) -> None:
    assert found(registry, Q.FIND_SUBMISSION_SETS, find_submission_sets(*extra)) == expected


def test_find_folders(registry: LocalRegistry) -> None:
    base = [("$XDSFolderPatientId", quoted(PID_A)), ("$XDSFolderStatus", listed(APPROVED))]
    code = ("$XDSFolderCodeList", listed(f"18748-4^^{LOINC}"))
    other = ("$XDSFolderCodeList", listed(f"11528-7^^{LOINC}"))
    assert found(registry, Q.FIND_FOLDERS, base) == ["folder"]
    assert found(registry, Q.FIND_FOLDERS, [*base, code]) == ["folder"]
    assert found(registry, Q.FIND_FOLDERS, [*base, code, other]) == []
    # lastUpdateTime is set by the registry (now), not by the submitter.
    assert found(registry, Q.FIND_FOLDERS, [*base, ("$XDSFolderLastUpdateTimeFrom", "2025")]) == [
        "folder"
    ]
    assert found(registry, Q.FIND_FOLDERS, [*base, ("$XDSFolderLastUpdateTimeTo", "2025")]) == []


def test_folder_last_update_time_moves_when_it_gains_a_member(registry: LocalRegistry) -> None:
    result = query(registry, Q.GET_FOLDERS, [("$XDSFolderEntryUUID", listed(U("folder")))])
    (folder,) = result.objects
    slots = {
        s.get("name"): s.findtext(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
        for s in folder.iterfind(f"{{{RIM}}}Slot")
    }
    assert slots["lastUpdateTime"] is not None and slots["lastUpdateTime"] >= "2025"


# -------------------------------------------------------------------------------------- GetAll


def get_all(*extra: tuple[str, str | list[str]]) -> SlotsSpec:
    return [
        ("$patientId", quoted(PID_A)),
        (f"{DE}Status", listed(APPROVED)),
        ("$XDSSubmissionSetStatus", listed(APPROVED)),
        ("$XDSFolderStatus", listed(APPROVED)),
        *extra,
    ]


def test_get_all(registry: LocalRegistry) -> None:
    result = query(registry, Q.GET_ALL, get_all())
    assert result.status == ResponseStatus.SUCCESS
    got = names(result.objects)
    packages = ["ss1", "folder", "ss2", "ss3", "ss4"]
    assert [n for n in got if n.startswith(("ss", "folder")) and n in packages] == packages
    assert [n for n in got if n in APPROVED_A] == APPROVED_A
    assert "report" not in got and "ondemand" not in got and "kos_b" not in got
    kinds = {etree.QName(o).localname for o in result.objects}
    assert kinds == {"RegistryPackage", "ExtrinsicObject", "Association"}
    associations = [o for o in result.objects if etree.QName(o).localname == "Association"]
    returned = set(got)
    types = {a.get("associationType") for a in associations}
    assert {ebrim.HAS_MEMBER, ebrim.APND, ebrim.XFRM} <= types
    assert ebrim.RPLC not in types  # its target (report) is Deprecated, not returned
    ids = {o.get("id") for o in result.objects}
    for assoc in associations:
        assert assoc.get("sourceObject") in ids and assoc.get("targetObject") in ids
    assert "folder_kos_ct" in returned and "folder_report" not in returned


def test_get_all_filters(registry: LocalRegistry) -> None:
    result = query(registry, Q.GET_ALL, get_all((f"{DE}FormatCode", listed(KOS_FORMAT))))
    docs = [n for n in names(result.objects) if n in APPROVED_A]
    assert docs == ["kos_ct", "kos_mr"]
    conf = f"{DE}ConfidentialityCode"
    result = query(
        registry,
        Q.GET_ALL,
        get_all((conf, listed(f"N^^{CONFIDENTIALITY}")), (conf, listed(f"R^^{CONFIDENTIALITY}"))),
    )
    assert [n for n in names(result.objects) if n in APPROVED_A] == ["kos_mr"]
    result = query(registry, Q.GET_ALL, get_all((f"{DE}Type", listed(ON_DEMAND))))
    assert [n for n in names(result.objects) if n in (*APPROVED_A, "ondemand")] == ["ondemand"]


# ------------------------------------------------------------------------------- id-based Get*


@pytest.mark.parametrize(
    ("slot", "values"),
    [
        ("EntryUUID", [U("kos_ct"), U("report")]),
        ("UniqueId", [UNIQUE_IDS["kos_ct"], UNIQUE_IDS["report"]]),
        ("LogicalID", [U("kos_ct"), U("report")]),
    ],
)
def test_get_documents(registry: LocalRegistry, slot: str, values: list[str]) -> None:
    # Any status: the deprecated report is returned too.
    assert found(registry, Q.GET_DOCUMENTS, [(f"{DE}{slot}", listed(*values))]) == [
        "kos_ct",
        "report",
    ]


def test_get_documents_status_attribute_follows_deprecation(registry: LocalRegistry) -> None:
    result = query(
        registry, Q.GET_DOCUMENTS, [(f"{DE}EntryUUID", listed(U("report"), U("report2")))]
    )
    statuses = {
        n: o.get("status") for n, o in zip(names(result.objects), result.objects, strict=True)
    }
    assert statuses == {"report": DEPRECATED, "report2": APPROVED}


def test_get_documents_of_two_patients_is_refused(registry: LocalRegistry) -> None:
    codes = failure(
        registry, Q.GET_DOCUMENTS, [(f"{DE}EntryUUID", listed(U("kos_ct"), U("kos_b")))]
    )
    assert codes == [ErrorCode.RESULT_NOT_SINGLE_PATIENT]


def test_get_folders(registry: LocalRegistry) -> None:
    assert found(registry, Q.GET_FOLDERS, [("$XDSFolderEntryUUID", listed(U("folder")))]) == [
        "folder"
    ]
    assert found(
        registry, Q.GET_FOLDERS, [("$XDSFolderUniqueId", listed(UNIQUE_IDS["folder"]))]
    ) == ["folder"]
    assert found(registry, Q.GET_FOLDERS, [("$XDSFolderLogicalID", listed(U("folder")))]) == [
        "folder"
    ]
    assert found(registry, Q.GET_FOLDERS, [("$XDSFolderEntryUUID", listed(U("kos_ct")))]) == []


def test_get_associations(registry: LocalRegistry) -> None:
    result = query(registry, Q.GET_ASSOCIATIONS, [("$uuid", listed(U("kos_mr")))])
    pairs = {(BY(o.get("sourceObject")), o.get("associationType")) for o in result.objects}
    assert pairs == {("ss1", ebrim.HAS_MEMBER), ("pdf", ebrim.XFRM)}


def BY(uid: str | None) -> str:
    return BY_UUID.get(uid or "", uid or "")


def test_get_documents_and_associations(registry: LocalRegistry) -> None:
    result = query(
        registry,
        Q.GET_DOCUMENTS_AND_ASSOCIATIONS,
        [(f"{DE}UniqueId", listed(UNIQUE_IDS["kos_mr"]))],
    )
    got = names(result.objects)
    assert got[0] == "kos_mr" and len(got) == 3
    assert {o.get("associationType") for o in result.objects[1:]} == {ebrim.HAS_MEMBER, ebrim.XFRM}


def test_get_submission_sets(registry: LocalRegistry) -> None:
    result = query(registry, Q.GET_SUBMISSION_SETS, [("$uuid", listed(U("kos_ct"), U("report2")))])
    packages = [o for o in result.objects if etree.QName(o).localname == "RegistryPackage"]
    associations = [o for o in result.objects if etree.QName(o).localname == "Association"]
    assert names(packages) == ["ss1", "ss2"] and len(associations) == 2
    members = {(BY(a.get("sourceObject")), BY(a.get("targetObject"))) for a in associations}
    assert members == {("ss1", "kos_ct"), ("ss2", "report2")}


def test_get_submission_set_and_contents(registry: LocalRegistry) -> None:
    slots = [("$XDSSubmissionSetEntryUUID", quoted(U("ss1")))]
    got = found(registry, Q.GET_SUBMISSION_SET_AND_CONTENTS, slots)
    objects = [n for n in got if not n.startswith("urn:uuid:")]
    assert objects == [
        "ss1",
        "folder",
        "kos_ct",
        "kos_mr",
        "report",
        "folder_kos_ct",
        "folder_report",
    ]
    # ... plus the six SubmissionSet HasMember associations.
    assert len(got) == 7 + 6
    by_unique_id = found(
        registry,
        Q.GET_SUBMISSION_SET_AND_CONTENTS,
        [("$XDSSubmissionSetUniqueId", quoted(UNIQUE_IDS["ss1"]))],
    )
    assert by_unique_id == got


def test_get_submission_set_and_contents_filters_documents(registry: LocalRegistry) -> None:
    slots = [
        ("$XDSSubmissionSetEntryUUID", quoted(U("ss1"))),
        (f"{DE}FormatCode", listed(KOS_FORMAT)),
    ]
    got = found(registry, Q.GET_SUBMISSION_SET_AND_CONTENTS, slots)
    objects = [n for n in got if not n.startswith("urn:uuid:")]
    assert objects == ["ss1", "folder", "kos_ct", "kos_mr", "folder_kos_ct"]
    assert len(got) == 5 + 4  # HasMember to folder, kos_ct, kos_mr, folder_kos_ct


def test_get_folder_and_contents(registry: LocalRegistry) -> None:
    got = found(registry, Q.GET_FOLDER_AND_CONTENTS, [("$XDSFolderEntryUUID", quoted(U("folder")))])
    objects = [n for n in got if not n.startswith("urn:uuid:")]
    # report2 joined the folder when it replaced report (the registry made that association).
    assert objects == ["folder", "kos_ct", "report", "folder_kos_ct", "folder_report", "report2"]
    assert len(got) == 7  # + the Folder-report2 HasMember
    kos_only = found(
        registry,
        Q.GET_FOLDER_AND_CONTENTS,
        [
            ("$XDSFolderUniqueId", quoted(UNIQUE_IDS["folder"])),
            (f"{DE}FormatCode", listed(KOS_FORMAT)),
        ],
    )
    assert kos_only == ["folder", "kos_ct", "folder_kos_ct"]


def test_get_folders_for_document(registry: LocalRegistry) -> None:
    assert found(
        registry, Q.GET_FOLDERS_FOR_DOCUMENT, [(f"{DE}EntryUUID", quoted(U("kos_ct")))]
    ) == ["folder"]
    assert found(
        registry, Q.GET_FOLDERS_FOR_DOCUMENT, [(f"{DE}UniqueId", quoted(UNIQUE_IDS["report2"]))]
    ) == ["folder"]
    assert (
        found(registry, Q.GET_FOLDERS_FOR_DOCUMENT, [(f"{DE}EntryUUID", quoted(U("kos_mr")))]) == []
    )


def test_get_related_documents(registry: LocalRegistry) -> None:
    slots = [
        (f"{DE}EntryUUID", quoted(U("report2"))),
        ("$AssociationTypes", listed(ebrim.RPLC, ebrim.APND)),
    ]
    result = query(registry, Q.GET_RELATED_DOCUMENTS, slots)
    documents = [o for o in result.objects if etree.QName(o).localname == "ExtrinsicObject"]
    associations = [o for o in result.objects if etree.QName(o).localname == "Association"]
    assert names(documents) == ["report", "report2", "addendum"]
    assert {a.get("associationType") for a in associations} == {ebrim.RPLC, ebrim.APND}
    assert len(result.objects) == 5
    xfrm = [
        (f"{DE}UniqueId", quoted(UNIQUE_IDS["kos_mr"])),
        ("$AssociationTypes", listed(ebrim.XFRM)),
    ]
    got = found(registry, Q.GET_RELATED_DOCUMENTS, xfrm)
    assert got[:2] == ["kos_mr", "pdf"] and len(got) == 3
    none = [(f"{DE}EntryUUID", quoted(U("kos_ct"))), ("$AssociationTypes", listed(ebrim.RPLC))]
    assert found(registry, Q.GET_RELATED_DOCUMENTS, none) == []


# ----------------------------------------------------------------------------------- errors


def test_unknown_stored_query(registry: LocalRegistry) -> None:
    assert failure(registry, "urn:uuid:00000000-0000-0000-0000-000000000000", []) == [
        ErrorCode.UNKNOWN_STORED_QUERY
    ]


@pytest.mark.parametrize(
    ("query_id", "slots", "code"),
    [
        (
            Q.FIND_DOCUMENTS,
            [(f"{DE}Status", listed(APPROVED))],
            ErrorCode.STORED_QUERY_MISSING_PARAM,
        ),
        (
            Q.FIND_DOCUMENTS,
            [(f"{DE}PatientId", quoted(PID_A))],
            ErrorCode.STORED_QUERY_MISSING_PARAM,
        ),
        (
            Q.FIND_SUBMISSION_SETS,
            [("$XDSSubmissionSetStatus", listed(APPROVED))],
            ErrorCode.STORED_QUERY_MISSING_PARAM,
        ),
        (
            Q.FIND_FOLDERS,
            [("$XDSFolderPatientId", quoted(PID_A))],
            ErrorCode.STORED_QUERY_MISSING_PARAM,
        ),
        (Q.GET_ALL, get_all()[:-1], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_DOCUMENTS, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_FOLDERS, [("$MetadataLevel", "1")], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_ASSOCIATIONS, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_DOCUMENTS_AND_ASSOCIATIONS, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_SUBMISSION_SETS, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_SUBMISSION_SET_AND_CONTENTS, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_FOLDER_AND_CONTENTS, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (Q.GET_FOLDERS_FOR_DOCUMENT, [], ErrorCode.STORED_QUERY_MISSING_PARAM),
        (
            Q.GET_RELATED_DOCUMENTS,
            [(f"{DE}EntryUUID", quoted(U("kos_ct")))],
            ErrorCode.STORED_QUERY_MISSING_PARAM,
        ),
        # Duplicate slots of a parameter without AND/OR semantics, and lists for single values.
        (
            Q.FIND_DOCUMENTS,
            [
                *find_documents(),
                (f"{DE}ClassCode", listed(IMAGES)),
                (f"{DE}ClassCode", listed(IMAGES)),
            ],
            ErrorCode.STORED_QUERY_PARAM_NUMBER,
        ),
        (
            Q.FIND_DOCUMENTS,
            [(f"{DE}PatientId", listed(PID_A, PID_B)), (f"{DE}Status", listed(APPROVED))],
            ErrorCode.STORED_QUERY_PARAM_NUMBER,
        ),
        (
            Q.FIND_DOCUMENTS,
            [(f"{DE}PatientId", [quoted(PID_A), quoted(PID_B)]), (f"{DE}Status", listed(APPROVED))],
            ErrorCode.STORED_QUERY_PARAM_NUMBER,
        ),
        (
            Q.GET_DOCUMENTS,
            [(f"{DE}EntryUUID", listed(U("kos_ct"))), (f"{DE}UniqueId", listed("1.2"))],
            ErrorCode.STORED_QUERY_PARAM_NUMBER,
        ),
        (
            Q.GET_SUBMISSION_SET_AND_CONTENTS,
            [("$XDSSubmissionSetEntryUUID", listed(U("ss1"), U("ss2")))],
            ErrorCode.STORED_QUERY_PARAM_NUMBER,
        ),
        # Parameter type errors.
        (
            Q.FIND_DOCUMENTS,
            find_documents((f"{DE}CreationTimeFrom", "'2024x'")),
            ErrorCode.REGISTRY_ERROR,
        ),
        (
            Q.FIND_DOCUMENTS,
            find_documents((f"{DE}CreationTimeFrom", "20241301")),
            ErrorCode.REGISTRY_ERROR,
        ),
        (
            Q.FIND_DOCUMENTS,
            find_documents((f"{DE}CreationTimeFrom", "yesterday")),
            ErrorCode.REGISTRY_ERROR,
        ),
        (
            Q.FIND_DOCUMENTS,
            [(f"{DE}PatientId", quoted(PID_A)), (f"{DE}Status", APPROVED)],
            ErrorCode.REGISTRY_ERROR,
        ),
        (
            Q.FIND_DOCUMENTS,
            [(f"{DE}PatientId", quoted(PID_A)), (f"{DE}Status", listed("Approved"))],
            ErrorCode.REGISTRY_ERROR,
        ),
        (
            Q.FIND_DOCUMENTS,
            [(f"{DE}PatientId", quoted("A-1")), (f"{DE}Status", listed(APPROVED))],
            ErrorCode.REGISTRY_ERROR,
        ),
        (
            Q.FIND_DOCUMENTS,
            find_documents((f"{DE}ClassCode", listed("a^b^c^d"))),
            ErrorCode.REGISTRY_ERROR,
        ),
        (Q.FIND_DOCUMENTS, find_documents((f"{DE}ClassCode", "('x^^y'")), ErrorCode.REGISTRY_ERROR),
        (
            Q.FIND_DOCUMENTS,
            find_documents((f"{DE}Type", listed("urn:uuid:1"))),
            ErrorCode.REGISTRY_ERROR,
        ),
        (Q.FIND_DOCUMENTS, find_documents(("$MetadataLevel", "3")), ErrorCode.REGISTRY_ERROR),
        (
            Q.GET_RELATED_DOCUMENTS,
            [(f"{DE}EntryUUID", quoted(U("kos_ct"))), ("$AssociationTypes", listed("RPLC"))],
            ErrorCode.REGISTRY_ERROR,
        ),
    ],
)
def test_parameter_errors(
    registry: LocalRegistry, query_id: str, slots: SlotsSpec, code: str
) -> None:
    assert failure(registry, query_id, slots) == [code]


def test_unknown_parameters_are_ignored_with_a_warning(registry: LocalRegistry) -> None:
    result = query(
        registry, Q.FIND_DOCUMENTS, find_documents(("$XDSDocumentEntryTitle", listed("x")))
    )
    assert result.status == ResponseStatus.SUCCESS
    assert names(result.objects) == APPROVED_A
    (warning,) = result.errors
    assert (
        warning.severity == ErrorSeverity.WARNING
        and "$XDSDocumentEntryTitle" in warning.code_context
    )


def test_return_type_must_be_leaf_class_or_object_ref(registry: LocalRegistry) -> None:
    result = query(registry, Q.FIND_DOCUMENTS, find_documents(), return_type="RegistryObject")
    assert result.status == ResponseStatus.FAILURE
    assert [e.error_code for e in result.errors] == [ErrorCode.REGISTRY_ERROR]


def test_too_many_results(registry: LocalRegistry) -> None:
    small = LocalRegistry(registry.store, max_results=4)
    for query_id, slots in (
        (Q.FIND_DOCUMENTS, find_documents()),
        (Q.GET_ALL, get_all()),
        (Q.GET_SUBMISSION_SET_AND_CONTENTS, [("$XDSSubmissionSetEntryUUID", quoted(U("ss1")))]),
    ):
        result = asyncio.run(small.stored_query(adhoc(query_id, slots)))
        assert result.status == ResponseStatus.FAILURE and result.objects == []
        assert [e.error_code for e in result.errors] == [ErrorCode.TOO_MANY_RESULTS]
    exact = LocalRegistry(registry.store, max_results=5)
    assert (
        len(asyncio.run(exact.stored_query(adhoc(Q.FIND_DOCUMENTS, find_documents()))).objects) == 5
    )


@pytest.mark.parametrize(
    "slots",
    [
        find_documents((f"{DE}ClassCode", listed("x') OR 1=1 --"))),
        find_documents((f"{DE}AuthorPerson", listed("%' OR '1'='1"))),
        find_documents((f"{DE}ReferenceIdList", listed("'); DROP TABLE registry_object; --"))),
        [(f"{DE}UniqueId", listed("1' OR '1'='1", "1); DELETE FROM object_code; --"))],
    ],
)
def test_sql_looking_values_are_just_values(registry: LocalRegistry, slots: SlotsSpec) -> None:
    before = asyncio.run(registry.store.counts())
    query_id = Q.GET_DOCUMENTS if slots[0][0].endswith("UniqueId") else Q.FIND_DOCUMENTS
    if any(name.endswith("ReferenceIdList") for name, _ in slots):
        query_id = Q.FIND_DOCUMENTS_BY_REFERENCE_ID
    assert found(registry, query_id, slots) == []
    assert asyncio.run(registry.store.counts()) == before


def test_sql_looking_patient_id_is_a_parameter_error(registry: LocalRegistry) -> None:
    slots = [(f"{DE}PatientId", quoted("x' OR '1'='1")), (f"{DE}Status", listed(APPROVED))]
    assert failure(registry, Q.FIND_DOCUMENTS, slots) == [ErrorCode.REGISTRY_ERROR]


# ---------------------------------------------------------------------- many values, one query


def test_a_thousand_author_patterns_are_answered(registry: LocalRegistry) -> None:
    # 1,000 $XDSDocumentEntryAuthorPerson values made SQLite refuse the statement ("Expression
    # tree is too large") and the consumer got "internal registry error".
    nobody = [f"%Nobody {i}%" for i in range(998)]
    slots = find_documents((f"{DE}AuthorPerson", listed(*nobody, "%Smith%", "%Brien%")))
    assert found(registry, Q.FIND_DOCUMENTS, slots) == ["kos_ct", "kos_mr", "addendum"]
    assert (
        found(registry, Q.FIND_DOCUMENTS, find_documents((f"{DE}AuthorPerson", listed(*nobody))))
        == []
    )


def test_a_thousand_codes_with_and_without_scheme_are_answered(registry: LocalRegistry) -> None:
    codes = [f"NONE{i}^^1.2.3.{i}" for i in range(900)] + [f"NONE{i}" for i in range(98)]
    slots = find_documents((f"{DE}ClassCode", listed(*codes, IMAGES, "REPORTS")))
    assert found(registry, Q.FIND_DOCUMENTS, slots) == APPROVED_A
    slots = find_documents((f"{DE}ClassCode", listed(*codes, IMAGES)))
    assert found(registry, Q.FIND_DOCUMENTS, slots) == ["kos_ct", "kos_mr"]
    # The scheme still counts: the right code in the wrong scheme does not match.
    slots = find_documents((f"{DE}ClassCode", listed(*codes, "IMAGES^^9.9.9")))
    assert found(registry, Q.FIND_DOCUMENTS, slots) == []


def test_a_thousand_reference_ids_and_entry_uuids_are_answered(registry: LocalRegistry) -> None:
    references = [f"1.2.3.{i}^^^^urn:ihe:iti:xds:2016:studyInstanceUID" for i in range(999)]
    slots = find_documents(
        (f"{DE}ReferenceIdList", listed(*references, study_reference_id(STUDY_CT)))
    )
    assert found(registry, Q.FIND_DOCUMENTS_BY_REFERENCE_ID, slots) == ["kos_ct"]
    uuids = [f"urn:uuid:00000000-0000-4000-8000-{i:012d}" for i in range(999)]
    slots = [(f"{DE}EntryUUID", listed(*uuids, U("kos_ct")))]
    assert found(registry, Q.GET_DOCUMENTS, slots) == ["kos_ct"]
