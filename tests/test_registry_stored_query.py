"""Stored query parameter parsing, validation and planning: pure functions, no store."""

from __future__ import annotations

import pytest

from tests.test_registry_corpus import APPROVED, PID_A, adhoc, listed, quoted
from xca_gateway.protocol.namespaces import QUERY, ErrorSeverity
from xca_gateway.registry.model import (
    Code,
    CodeAttribute,
    CodeCondition,
    Kind,
    TimeColumn,
    TimeRange,
    ValueAttribute,
    ValueCondition,
)
from xca_gateway.registry.stored_query import (
    ID_BASED_QUERIES,
    PATIENT_BASED_QUERIES,
    QUERIES,
    ContentsPlan,
    FindPlan,
    GetAllPlan,
    RelatedDocumentsPlan,
    StoredQueryError,
    Token,
    ValueSyntaxError,
    parse_code,
    parse_literals,
    parse_stored_query,
    plan_query,
    validate_dtm,
    validate_patient_id,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId

DE = "$XDSDocumentEntry"


def test_all_fourteen_stored_queries_are_defined() -> None:
    ids = {v for k, v in vars(StoredQueryId).items() if not k.startswith("_")}
    assert set(QUERIES) == ids and len(ids) == 14
    assert len(PATIENT_BASED_QUERIES) == 5
    assert ids - PATIENT_BASED_QUERIES == ID_BASED_QUERIES


@pytest.mark.parametrize(
    ("text", "tokens", "is_list"),
    [
        ("'abc'", [Token("abc", True)], False),
        ("  'O''Brien' ", [Token("O'Brien", True)], False),
        ("20240101", [Token("20240101", False)], False),
        ("('a', 'b' ,'c')", [Token("a", True), Token("b", True), Token("c", True)], True),
        ("('a,b')", [Token("a,b", True)], True),
        ("('')", [Token("", True)], True),
        ("('x'')--')", [Token("x')--", True)], True),
        ("(1, 2)", [Token("1", False), Token("2", False)], True),
    ],
)
def test_value_literals(text: str, tokens: list[Token], is_list: bool) -> None:
    assert parse_literals(text) == (tokens, is_list)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "'abc", "('a'", "('a',)", "()", "('a' 'b')", "'a' x", "('a'); DROP TABLE x"],
)
def test_malformed_literals(text: str) -> None:
    with pytest.raises(ValueSyntaxError):
        parse_literals(text)


def test_codes() -> None:
    assert parse_code("CT^^1.2.840.10008.2.16.4") == Code("CT", "1.2.840.10008.2.16.4")
    assert parse_code("CT") == Code("CT", None)
    for bad in ("^^x", "CT^x^y", "CT^^", "a^b^c^d"):
        with pytest.raises(ValueSyntaxError):
            parse_code(bad)


def test_dtm_and_patient_ids() -> None:
    for good in ("2024", "202402", "20240229", "2024022923", "202402292359", "20240229235959"):
        assert validate_dtm(good) == good
    for bad in ("202", "20241", "20241301", "20240132", "2024010124", "20240101126", "2024-01-01"):
        with pytest.raises(ValueSyntaxError):
            validate_dtm(bad)
    assert validate_patient_id(PID_A) == PID_A
    for bad in (
        "A-1",
        "A-1^^^1.2.3",
        "A-1^^^&1.2.3",
        "A-1^^^&1.2.3&L",
        "^^^&1.2.3&ISO",
        "A-1^^^&x.y&ISO",
        "A-1^^^&1.2.3&ISO^PI",
        "A&1^^^&1.2.3&ISO",
    ):
        with pytest.raises(ValueSyntaxError):
            validate_patient_id(bad)


def test_all_problems_of_a_request_are_reported_together() -> None:
    request = adhoc(
        StoredQueryId.FIND_DOCUMENTS,
        [(f"{DE}CreationTimeFrom", "soon"), (f"{DE}ClassCode", "'x'"), (f"{DE}ClassCode", "'y'")],
    )
    with pytest.raises(StoredQueryError) as caught:
        parse_stored_query(request)
    codes = sorted(e.error_code for e in caught.value.errors)
    assert codes == sorted(
        [
            ErrorCode.REGISTRY_ERROR,  # CreationTimeFrom
            ErrorCode.STORED_QUERY_PARAM_NUMBER,  # ClassCode twice
            ErrorCode.STORED_QUERY_MISSING_PARAM,  # PatientId
            ErrorCode.STORED_QUERY_MISSING_PARAM,  # Status
        ]
    )


def test_unknown_parameters_become_warnings() -> None:
    query = parse_stored_query(
        adhoc(
            StoredQueryId.FIND_DOCUMENTS,
            [
                (f"{DE}PatientId", quoted(PID_A)),
                (f"{DE}Status", listed(APPROVED)),
                ("$XDSDocumentEntryClassCodeScheme", listed("x")),
                ("noDollar", "'1'"),
            ],
        )
    )
    assert [w.severity for w in query.warnings] == [ErrorSeverity.WARNING] * 2


def test_plan_of_find_documents() -> None:
    query = parse_stored_query(
        adhoc(
            StoredQueryId.FIND_DOCUMENTS,
            [
                (f"{DE}PatientId", quoted(PID_A)),
                (f"{DE}Status", listed(APPROVED)),
                (f"{DE}EventCodeList", listed("CT^^DCM", "MR^^DCM")),
                (f"{DE}EventCodeList", listed("T-A0100^^SRT")),
                (f"{DE}ClassCode", [listed("A^^s"), listed("B")]),
                (f"{DE}CreationTimeFrom", "2024"),
                (f"{DE}ServiceStopTimeTo", "'20250101'"),
                (f"{DE}AuthorPerson", listed("%Smith%")),
            ],
        )
    )
    plan = plan_query(query)
    assert isinstance(plan, FindPlan)
    f = plan.filter
    assert f.kind is Kind.DOCUMENT_ENTRY and f.patient_id == PID_A
    assert f.statuses == (APPROVED,)
    assert f.object_types == (ebrim.DOCUMENT_ENTRY_STABLE,)
    assert f.codes == (
        CodeCondition(CodeAttribute.CLASS_CODE, (Code("A", "s"), Code("B", None))),
        CodeCondition(CodeAttribute.EVENT_CODE, (Code("CT", "DCM"), Code("MR", "DCM"))),
        CodeCondition(CodeAttribute.EVENT_CODE, (Code("T-A0100", "SRT"),)),
    )
    assert f.times == (
        TimeRange(TimeColumn.CREATION_TIME, "2024", None),
        TimeRange(TimeColumn.SERVICE_STOP_TIME, None, "20250101"),
    )
    assert f.values == (ValueCondition(ValueAttribute.AUTHOR_PERSON, ("%Smith%",), like=True),)


def test_plans_of_composite_queries() -> None:
    get_all = plan_query(
        parse_stored_query(
            adhoc(
                StoredQueryId.GET_ALL,
                [
                    ("$patientId", quoted(PID_A)),
                    (f"{DE}Status", listed(APPROVED)),
                    ("$XDSSubmissionSetStatus", listed(APPROVED)),
                    ("$XDSFolderStatus", listed(APPROVED)),
                    (f"{DE}Type", listed(ebrim.DOCUMENT_ENTRY_ON_DEMAND)),
                ],
            )
        )
    )
    assert isinstance(get_all, GetAllPlan)
    assert get_all.documents.object_types == (ebrim.DOCUMENT_ENTRY_ON_DEMAND,)
    assert get_all.folders.kind is Kind.FOLDER and get_all.folders.patient_id == PID_A
    contents = plan_query(
        parse_stored_query(
            adhoc(StoredQueryId.GET_FOLDER_AND_CONTENTS, [("$XDSFolderUniqueId", "('1.2.3')")])
        )
    )
    assert isinstance(contents, ContentsPlan) and not contents.include_folders
    assert contents.container.unique_ids == ("1.2.3",) and contents.container.uuids is None
    related = plan_query(
        parse_stored_query(
            adhoc(
                StoredQueryId.GET_RELATED_DOCUMENTS,
                [(f"{DE}EntryUUID", "'urn:uuid:x'"), ("$AssociationTypes", listed(ebrim.RPLC))],
            )
        )
    )
    assert isinstance(related, RelatedDocumentsPlan)
    assert related.association_types == (ebrim.RPLC,)


def test_request_shape_errors() -> None:
    from lxml import etree

    with pytest.raises(StoredQueryError) as caught:
        parse_stored_query(etree.Element(f"{{{QUERY}}}SomethingElse"))
    assert caught.value.errors[0].error_code == ErrorCode.REGISTRY_ERROR
    with pytest.raises(StoredQueryError) as caught:
        parse_stored_query(etree.Element(f"{{{QUERY}}}AdhocQueryRequest"))
    assert caught.value.errors[0].error_code == ErrorCode.REGISTRY_ERROR
    many = adhoc(StoredQueryId.GET_DOCUMENTS, [(f"$p{i}", "'x'") for i in range(300)])
    with pytest.raises(StoredQueryError):
        parse_stored_query(many)
