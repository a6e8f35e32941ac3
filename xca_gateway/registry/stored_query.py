"""ITI-18 Registry Stored Query: parameter parsing, validation and query planning (pure).

A ``query:AdhocQueryRequest`` names a stored query by UUID and passes its parameters as
``rim:Slot`` elements (ITI TF-2 3.18.4.1.2.3). Values use the ebRS/XDS literal syntax:

* strings are single-quoted, a quote inside is doubled: ``'O''Brien'``;
* numbers (timestamps, ``$MetadataLevel``) are bare: ``20240315`` (a quoted timestamp is
  tolerated, as some consumers send one);
* multi-valued parameters are lists ``('a','b')``; a list may also be spread over several
  ``rim:Value`` elements of one slot, which is the same as one list;
* parameters with AND/OR semantics (event codes, confidentiality codes, folder codes,
  referenceIdList) may repeat the *slot*: values within a slot are OR-ed, slots are AND-ed;
* coded values are ``code^^codingScheme``; patient ids are HL7 CX ``id^^^&OID&ISO``;
* DTM time values are ``YYYY[MM[DD[hh[mm[ss]]]]]`` (UTC); a From bound is inclusive, a To
  bound exclusive. Comparing them as strings is exactly the TF's truncation rule: a stored
  value is compared at the precision of the parameter.

Errors (ITI TF-3 Table 4.2.4.1-2): unknown query id XDSUnknownStoredQuery; a required
parameter absent XDSStoredQueryMissingParam; a single-valued parameter with several values,
a repeated slot without AND/OR semantics, or two alternatives given together
XDSStoredQueryParamNumber; a value of the wrong type or syntax XDSRegistryError. Parameters
the query does not define are ignored, as ebRS 3.0 §6.3.2.1 requires, with a Warning so the
consumer knows no filter was applied.

:func:`parse_stored_query` turns the request into a :class:`StoredQuery` or raises
:class:`StoredQueryError` with the IHE error codes; :func:`plan_query` turns a stored query into
a :class:`QueryPlan` of store filters. Neither does I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from xca_gateway.protocol.namespaces import QUERY, RIM, ErrorSeverity
from xca_gateway.registry.model import (
    ASSOCIATION_TYPES,
    DOCUMENT_ENTRY_TYPES,
    STATUSES,
    AssociationFilter,
    Code,
    CodeAttribute,
    CodeCondition,
    Kind,
    ObjectFilter,
    TimeColumn,
    TimeRange,
    ValueAttribute,
    ValueCondition,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId
from xca_gateway.xds.ebrs import RegistryError

ReturnType = Literal["LeafClass", "ObjectRef"]

# Bounds against abuse: a query is small; these are far above any legitimate use.
MAX_SLOTS = 200
MAX_VALUES_PER_PARAMETER = 10_000
MAX_VALUE_LENGTH = 64 * 1024

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DTM = re.compile(r"^\d{4}(\d{2}){0,5}$")


class ParamType(enum.Enum):
    PATIENT_ID = "patient id (HL7 CX, quoted)"
    STRING = "quoted string"
    STRING_LIST = "list of quoted strings"
    CODE_LIST = "list of quoted codes 'code^^scheme'"
    STATUS_LIST = "list of quoted availability status URNs"
    ENTRY_TYPE_LIST = "list of quoted DocumentEntry objectType UUIDs"
    ASSOCIATION_TYPE_LIST = "list of quoted association type URNs"
    AVAILABILITY_LIST = "list of quoted documentAvailability URNs"
    TIME = "DTM timestamp YYYY[MM[DD[hh[mm[ss]]]]]"
    NUMBER = "number"


_LIST_TYPES = frozenset(
    {
        ParamType.STRING_LIST,
        ParamType.CODE_LIST,
        ParamType.STATUS_LIST,
        ParamType.ENTRY_TYPE_LIST,
        ParamType.ASSOCIATION_TYPE_LIST,
        ParamType.AVAILABILITY_LIST,
    }
)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: ParamType
    required: bool = False
    # AND/OR semantics: the slot may repeat (ITI TF-2 3.18.4.1.2.3.5).
    and_or: bool = False


@dataclass(frozen=True)
class QuerySpec:
    id: str
    name: str
    params: tuple[ParamSpec, ...]
    # Groups of parameters of which exactly one must be given.
    one_of: tuple[tuple[str, ...], ...] = ()
    # The patient id parameter of patient-based queries (FindX, GetAll).
    patient_param: str | None = None

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


# ------------------------------------------------------------------------ the 14 stored queries

P = ParamSpec
T = ParamType
DE = "$XDSDocumentEntry"

_METADATA_LEVEL = P("$MetadataLevel", T.NUMBER)
_DE_TYPE = P(f"{DE}Type", T.ENTRY_TYPE_LIST)
_DE_FORMAT = P(f"{DE}FormatCode", T.CODE_LIST)
_DE_CONFIDENTIALITY = P(f"{DE}ConfidentialityCode", T.CODE_LIST, and_or=True)

_DOCUMENT_FILTERS = (
    P(f"{DE}ClassCode", T.CODE_LIST),
    P(f"{DE}TypeCode", T.CODE_LIST),
    P(f"{DE}PracticeSettingCode", T.CODE_LIST),
    P(f"{DE}CreationTimeFrom", T.TIME),
    P(f"{DE}CreationTimeTo", T.TIME),
    P(f"{DE}ServiceStartTimeFrom", T.TIME),
    P(f"{DE}ServiceStartTimeTo", T.TIME),
    P(f"{DE}ServiceStopTimeFrom", T.TIME),
    P(f"{DE}ServiceStopTimeTo", T.TIME),
    P(f"{DE}HealthcareFacilityTypeCode", T.CODE_LIST),
    P(f"{DE}EventCodeList", T.CODE_LIST, and_or=True),
    _DE_CONFIDENTIALITY,
    P(f"{DE}AuthorPerson", T.STRING_LIST),
    _DE_FORMAT,
    P(f"{DE}Status", T.STATUS_LIST, required=True),
    _DE_TYPE,
    P(f"{DE}DocumentAvailability", T.AVAILABILITY_LIST),
    _METADATA_LEVEL,
)

QUERIES: dict[str, QuerySpec] = {
    q.id: q
    for q in (
        QuerySpec(
            StoredQueryId.FIND_DOCUMENTS,
            "FindDocuments",
            (P(f"{DE}PatientId", T.PATIENT_ID, required=True), *_DOCUMENT_FILTERS),
            patient_param=f"{DE}PatientId",
        ),
        QuerySpec(
            StoredQueryId.FIND_DOCUMENTS_BY_REFERENCE_ID,
            "FindDocumentsByReferenceId",
            (
                P(f"{DE}PatientId", T.PATIENT_ID, required=True),
                P(f"{DE}ReferenceIdList", T.STRING_LIST, required=True, and_or=True),
                *_DOCUMENT_FILTERS,
            ),
            patient_param=f"{DE}PatientId",
        ),
        QuerySpec(
            StoredQueryId.FIND_SUBMISSION_SETS,
            "FindSubmissionSets",
            (
                P("$XDSSubmissionSetPatientId", T.PATIENT_ID, required=True),
                P("$XDSSubmissionSetSourceId", T.STRING_LIST),
                P("$XDSSubmissionSetSubmissionTimeFrom", T.TIME),
                P("$XDSSubmissionSetSubmissionTimeTo", T.TIME),
                P("$XDSSubmissionSetAuthorPerson", T.STRING),
                P("$XDSSubmissionSetContentType", T.CODE_LIST),
                P("$XDSSubmissionSetStatus", T.STATUS_LIST, required=True),
                _METADATA_LEVEL,
            ),
            patient_param="$XDSSubmissionSetPatientId",
        ),
        QuerySpec(
            StoredQueryId.FIND_FOLDERS,
            "FindFolders",
            (
                P("$XDSFolderPatientId", T.PATIENT_ID, required=True),
                P("$XDSFolderLastUpdateTimeFrom", T.TIME),
                P("$XDSFolderLastUpdateTimeTo", T.TIME),
                P("$XDSFolderCodeList", T.CODE_LIST, and_or=True),
                P("$XDSFolderStatus", T.STATUS_LIST, required=True),
                _METADATA_LEVEL,
            ),
            patient_param="$XDSFolderPatientId",
        ),
        QuerySpec(
            StoredQueryId.GET_ALL,
            "GetAll",
            (
                P("$patientId", T.PATIENT_ID, required=True),
                P(f"{DE}Status", T.STATUS_LIST, required=True),
                P("$XDSSubmissionSetStatus", T.STATUS_LIST, required=True),
                P("$XDSFolderStatus", T.STATUS_LIST, required=True),
                _DE_FORMAT,
                _DE_CONFIDENTIALITY,
                _DE_TYPE,
                _METADATA_LEVEL,
            ),
            patient_param="$patientId",
        ),
        QuerySpec(
            StoredQueryId.GET_DOCUMENTS,
            "GetDocuments",
            (
                P(f"{DE}EntryUUID", T.STRING_LIST),
                P(f"{DE}UniqueId", T.STRING_LIST),
                P(f"{DE}LogicalID", T.STRING_LIST),
                _METADATA_LEVEL,
            ),
            one_of=((f"{DE}EntryUUID", f"{DE}UniqueId", f"{DE}LogicalID"),),
        ),
        QuerySpec(
            StoredQueryId.GET_FOLDERS,
            "GetFolders",
            (
                P("$XDSFolderEntryUUID", T.STRING_LIST),
                P("$XDSFolderUniqueId", T.STRING_LIST),
                P("$XDSFolderLogicalID", T.STRING_LIST),
                _METADATA_LEVEL,
            ),
            one_of=(("$XDSFolderEntryUUID", "$XDSFolderUniqueId", "$XDSFolderLogicalID"),),
        ),
        QuerySpec(
            StoredQueryId.GET_ASSOCIATIONS,
            "GetAssociations",
            (P("$uuid", T.STRING_LIST, required=True), _METADATA_LEVEL),
        ),
        QuerySpec(
            StoredQueryId.GET_DOCUMENTS_AND_ASSOCIATIONS,
            "GetDocumentsAndAssociations",
            (
                P(f"{DE}EntryUUID", T.STRING_LIST),
                P(f"{DE}UniqueId", T.STRING_LIST),
                _METADATA_LEVEL,
            ),
            one_of=((f"{DE}EntryUUID", f"{DE}UniqueId"),),
        ),
        QuerySpec(
            StoredQueryId.GET_SUBMISSION_SETS,
            "GetSubmissionSets",
            (P("$uuid", T.STRING_LIST, required=True), _METADATA_LEVEL),
        ),
        QuerySpec(
            StoredQueryId.GET_SUBMISSION_SET_AND_CONTENTS,
            "GetSubmissionSetAndContents",
            (
                P("$XDSSubmissionSetEntryUUID", T.STRING),
                P("$XDSSubmissionSetUniqueId", T.STRING),
                _DE_FORMAT,
                _DE_CONFIDENTIALITY,
                _DE_TYPE,
                _METADATA_LEVEL,
            ),
            one_of=(("$XDSSubmissionSetEntryUUID", "$XDSSubmissionSetUniqueId"),),
        ),
        QuerySpec(
            StoredQueryId.GET_FOLDER_AND_CONTENTS,
            "GetFolderAndContents",
            (
                P("$XDSFolderEntryUUID", T.STRING),
                P("$XDSFolderUniqueId", T.STRING),
                _DE_FORMAT,
                _DE_CONFIDENTIALITY,
                _DE_TYPE,
                _METADATA_LEVEL,
            ),
            one_of=(("$XDSFolderEntryUUID", "$XDSFolderUniqueId"),),
        ),
        QuerySpec(
            StoredQueryId.GET_FOLDERS_FOR_DOCUMENT,
            "GetFoldersForDocument",
            (P(f"{DE}EntryUUID", T.STRING), P(f"{DE}UniqueId", T.STRING), _METADATA_LEVEL),
            one_of=((f"{DE}EntryUUID", f"{DE}UniqueId"),),
        ),
        QuerySpec(
            StoredQueryId.GET_RELATED_DOCUMENTS,
            "GetRelatedDocuments",
            (
                P(f"{DE}EntryUUID", T.STRING),
                P(f"{DE}UniqueId", T.STRING),
                P("$AssociationTypes", T.ASSOCIATION_TYPE_LIST, required=True),
                _DE_TYPE,
                _METADATA_LEVEL,
            ),
            one_of=((f"{DE}EntryUUID", f"{DE}UniqueId"),),
        ),
    )
}

PATIENT_BASED_QUERIES = frozenset(q.id for q in QUERIES.values() if q.patient_param)
ID_BASED_QUERIES = frozenset(QUERIES) - PATIENT_BASED_QUERIES


# --------------------------------------------------------------------------- value literals


class ValueSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    """One literal of a slot value: a quoted string or a bare number."""

    text: str
    quoted: bool


def parse_literals(text: str) -> tuple[list[Token], bool]:
    """Parse one rim:Value: a literal, or a parenthesised list of literals.

    Returns the literals and whether they were written as a list.
    """
    s = text.strip()
    if not s:
        raise ValueSyntaxError("empty value")
    if s[0] == "(":
        if s[-1] != ")":
            raise ValueSyntaxError("a list must end with ')'")
        items: list[Token] = []
        pos = 1
        inner_end = len(s) - 1
        while True:
            pos = _skip_space(s, pos, inner_end)
            if pos >= inner_end:
                if items:
                    raise ValueSyntaxError("a list must not end with ','")
                raise ValueSyntaxError("empty list")
            literal, pos = _literal(s, pos, inner_end)
            items.append(literal)
            pos = _skip_space(s, pos, inner_end)
            if pos >= inner_end:
                return items, True
            if s[pos] != ",":
                raise ValueSyntaxError(f"expected ',' or ')' at offset {pos}")
            pos += 1
    literal, pos = _literal(s, 0, len(s))
    if _skip_space(s, pos, len(s)) != len(s):
        raise ValueSyntaxError("unexpected text after the value")
    return [literal], False


def _skip_space(s: str, pos: int, end: int) -> int:
    while pos < end and s[pos] in " \t\r\n":
        pos += 1
    return pos


def _literal(s: str, pos: int, end: int) -> tuple[Token, int]:
    if s[pos] == "'":
        out: list[str] = []
        pos += 1
        while pos < end:
            ch = s[pos]
            if ch == "'":
                if pos + 1 < end and s[pos + 1] == "'":
                    out.append("'")
                    pos += 2
                    continue
                return Token("".join(out), True), pos + 1
            out.append(ch)
            pos += 1
        raise ValueSyntaxError("unterminated quoted string")
    start = pos
    while pos < end and (s[pos].isascii() and (s[pos].isalnum() or s[pos] in "+-.")):
        pos += 1
    if pos == start:
        raise ValueSyntaxError(f"unexpected character {s[pos]!r}; strings must be quoted")
    token = s[start:pos]
    if not re.fullmatch(r"[+-]?\d+", token):
        raise ValueSyntaxError(f"{token!r} is neither a number nor a quoted string")
    return Token(token, False), pos


# ------------------------------------------------------------------------- parsed stored query


@dataclass
class StoredQuery:
    spec: QuerySpec
    return_type: ReturnType
    home: str | None
    # name -> one list of values per slot (AND/OR params may have several slots)
    params: dict[str, list[list[str]]] = field(default_factory=dict)
    warnings: list[RegistryError] = field(default_factory=list)

    @property
    def query_id(self) -> str:
        return self.spec.id

    @property
    def patient_id(self) -> str | None:
        if self.spec.patient_param is None:
            return None
        return self.string(self.spec.patient_param)

    def has(self, name: str) -> bool:
        return name in self.params

    def string(self, name: str) -> str | None:
        groups = self.params.get(name)
        return groups[0][0] if groups else None

    def strings(self, name: str) -> tuple[str, ...] | None:
        groups = self.params.get(name)
        if groups is None:
            return None
        return tuple(v for group in groups for v in group)

    def groups(self, name: str) -> list[list[str]]:
        return self.params.get(name, [])


class StoredQueryError(Exception):
    def __init__(self, errors: Sequence[RegistryError]) -> None:
        super().__init__("; ".join(e.code_context for e in errors))
        self.errors = list(errors)


def _error(code: str, context: str) -> RegistryError:
    return RegistryError(code, context)


def parse_code(text: str) -> Code:
    """``code^^scheme`` (HL7 v2 CE, abbreviated); a bare ``code`` matches any scheme."""
    parts = text.split("^")
    code = parts[0]
    if not code.strip():
        raise ValueSyntaxError(f"{text!r} has no code")
    if len(parts) == 1:
        return Code(code, None)
    if len(parts) != 3 or parts[1] or not parts[2]:
        raise ValueSyntaxError(f"{text!r} is not of the form code^^codingScheme")
    return Code(code, parts[2])


def validate_patient_id(value: str) -> str:
    """HL7 CX as XDS restricts it: ``id^^^&OID&ISO``, nothing else."""
    parts = value.split("^")
    if len(parts) != 4 or not parts[0] or parts[1] or parts[2]:
        raise ValueSyntaxError(f"{value!r} is not an XDS patient id (id^^^&OID&ISO)")
    authority = parts[3].split("&")
    if len(authority) != 3 or authority[0] or authority[2] != "ISO":
        raise ValueSyntaxError(f"{value!r}: the assigning authority must be &OID&ISO")
    if not _OID.match(authority[1]) or len(authority[1]) > 64:
        raise ValueSyntaxError(f"{value!r}: {authority[1]!r} is not an OID")
    if any(c in parts[0] for c in "&~\\|"):
        raise ValueSyntaxError(f"{value!r}: invalid characters in the id")
    return value


def validate_dtm(value: str) -> str:
    if not _DTM.match(value):
        raise ValueSyntaxError(f"{value!r} is not a DTM YYYY[MM[DD[hh[mm[ss]]]]]")
    limits = ((4, 6, 1, 12), (6, 8, 1, 31), (8, 10, 0, 23), (10, 12, 0, 59), (12, 14, 0, 59))
    for start, end, low, high in limits:
        if len(value) >= end and not low <= int(value[start:end]) <= high:
            raise ValueSyntaxError(f"{value!r} is not a valid DTM")
    return value


def _convert(spec: ParamSpec, literals: list[Token], is_list: bool) -> list[str]:
    t = spec.type
    if t in (ParamType.TIME, ParamType.NUMBER):
        if is_list or len(literals) != 1:
            raise ValueSyntaxError(f"{spec.name} takes a single {t.value}")
        text = literals[0].text
        if t is ParamType.TIME:
            return [validate_dtm(text)]
        if not re.fullmatch(r"\d+", text):
            raise ValueSyntaxError(f"{text!r} is not a number")
        return [text]
    if any(not lit.quoted for lit in literals):
        raise ValueSyntaxError(f"{spec.name} takes quoted strings, not bare numbers")
    values = [lit.text for lit in literals]
    for value in values:
        if len(value) > MAX_VALUE_LENGTH:
            raise ValueSyntaxError("value too long")
    if t is ParamType.PATIENT_ID:
        return [validate_patient_id(v) for v in values]
    if t is ParamType.CODE_LIST:
        for v in values:
            parse_code(v)
    allowed: tuple[str, ...] | None = {
        ParamType.STATUS_LIST: STATUSES,
        ParamType.ENTRY_TYPE_LIST: DOCUMENT_ENTRY_TYPES,
        ParamType.ASSOCIATION_TYPE_LIST: ASSOCIATION_TYPES,
        ParamType.AVAILABILITY_LIST: (ebrim.AVAILABILITY_ONLINE, ebrim.AVAILABILITY_OFFLINE),
    }.get(t)
    if allowed is not None:
        for v in values:
            if v not in allowed:
                raise ValueSyntaxError(f"{v!r} is not one of {', '.join(allowed)}")
    if t in (ParamType.STRING_LIST, ParamType.CODE_LIST) and any(not v for v in values):
        raise ValueSyntaxError("empty string in the list")
    return values


def parse_stored_query(request: etree._Element) -> StoredQuery:
    """Parse and validate a query:AdhocQueryRequest; raise :class:`StoredQueryError`."""
    if request.tag != f"{{{QUERY}}}AdhocQueryRequest":
        raise StoredQueryError(
            [_error(ErrorCode.REGISTRY_ERROR, "the request must be a query:AdhocQueryRequest")]
        )
    option = request.find(f"{{{QUERY}}}ResponseOption")
    adhoc = request.find(f"{{{RIM}}}AdhocQuery")
    if adhoc is None:
        raise StoredQueryError([_error(ErrorCode.REGISTRY_ERROR, "rim:AdhocQuery is missing")])
    query_id = (adhoc.get("id") or "").strip()
    spec = QUERIES.get(query_id)
    if spec is None:
        raise StoredQueryError(
            [_error(ErrorCode.UNKNOWN_STORED_QUERY, f"unknown stored query id {query_id!r}")]
        )
    # ebRS default is RegistryObject, which XDS does not define: only LeafClass and ObjectRef.
    return_type = option.get("returnType", "RegistryObject") if option is not None else ""
    if return_type not in ("LeafClass", "ObjectRef"):
        raise StoredQueryError(
            [
                _error(
                    ErrorCode.REGISTRY_ERROR,
                    f"ResponseOption/@returnType must be LeafClass or ObjectRef, "
                    f"not {return_type or 'absent'!r}",
                )
            ]
        )
    home = (adhoc.get("home") or "").strip() or None
    query = StoredQuery(spec, "LeafClass" if return_type == "LeafClass" else "ObjectRef", home)
    errors: list[RegistryError] = []
    slots = adhoc.findall(f"{{{RIM}}}Slot")
    if len(slots) > MAX_SLOTS:
        raise StoredQueryError([_error(ErrorCode.REGISTRY_ERROR, "too many query parameters")])
    for slot in slots:
        name = (slot.get("name") or "").strip()
        param = spec.param(name)
        if param is None:
            # ebRS 3.0 §6.3.2.1: a registry MUST ignore parameters the stored query does not
            # define. Tell the consumer, so it does not believe a filter was applied.
            query.warnings.append(
                RegistryError(
                    ErrorCode.REGISTRY_ERROR,
                    f"parameter {name!r} is not defined for {spec.name} and was ignored",
                    severity=ErrorSeverity.WARNING,
                )
            )
            continue
        if name in query.params and not param.and_or:
            errors.append(
                _error(
                    ErrorCode.STORED_QUERY_PARAM_NUMBER,
                    f"{name} is given in more than one Slot; it takes a single Slot",
                )
            )
            continue
        raw_values = [v.text or "" for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")]
        if not raw_values:
            errors.append(_error(ErrorCode.STORED_QUERY_MISSING_PARAM, f"{name} has no value"))
            continue
        try:
            values = _slot_values(param, raw_values)
        except _ParamNumberError as exc:
            errors.append(_error(ErrorCode.STORED_QUERY_PARAM_NUMBER, f"{name}: {exc}"))
            continue
        except ValueSyntaxError as exc:
            errors.append(
                _error(
                    ErrorCode.REGISTRY_ERROR,
                    f"invalid value for {name} (expected {param.type.value}): {exc}",
                )
            )
            continue
        query.params.setdefault(name, []).append(values)
    for param in spec.params:
        if param.required and param.name not in query.params and not _reported(errors, param):
            errors.append(
                _error(
                    ErrorCode.STORED_QUERY_MISSING_PARAM,
                    f"{spec.name} requires the parameter {param.name}",
                )
            )
    for group in spec.one_of:
        present = [name for name in group if name in query.params]
        if not present and not any(_reported(errors, spec.param(n)) for n in group):
            errors.append(
                _error(
                    ErrorCode.STORED_QUERY_MISSING_PARAM,
                    f"{spec.name} requires one of {', '.join(group)}",
                )
            )
        elif len(present) > 1:
            errors.append(
                _error(
                    ErrorCode.STORED_QUERY_PARAM_NUMBER,
                    f"{spec.name} takes only one of {', '.join(group)}",
                )
            )
    level = query.string("$MetadataLevel")
    if level is not None and level not in ("1", "2"):
        errors.append(_error(ErrorCode.REGISTRY_ERROR, "$MetadataLevel must be 1 or 2"))
    if errors:
        raise StoredQueryError(errors)
    return query


def _reported(errors: list[RegistryError], param: ParamSpec | None) -> bool:
    return param is not None and any(param.name in e.code_context for e in errors)


class _ParamNumberError(ValueError):
    pass


def _slot_values(param: ParamSpec, raw_values: list[str]) -> list[str]:
    single = param.type not in _LIST_TYPES
    if single and len(raw_values) > 1:
        raise _ParamNumberError("takes a single value, several Value elements were given")
    values: list[str] = []
    for raw in raw_values:
        literals, is_list = parse_literals(raw)
        if single:
            if len(literals) > 1:
                raise _ParamNumberError("takes a single value, a list was given")
            if is_list and param.type in (ParamType.TIME, ParamType.NUMBER):
                raise ValueSyntaxError("a list was given")
            # ('x') is tolerated for a single string value.
            values.extend(_convert(param, literals, False))
        else:
            values.extend(_convert(param, literals, is_list))
        if len(values) > MAX_VALUES_PER_PARAMETER:
            raise _ParamNumberError(f"more than {MAX_VALUES_PER_PARAMETER} values")
    return values


# ---------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class FindPlan:
    """FindDocuments, FindDocumentsByReferenceId, FindSubmissionSets, FindFolders."""

    filter: ObjectFilter


@dataclass(frozen=True)
class GetAllPlan:
    documents: ObjectFilter
    submission_sets: ObjectFilter
    folders: ObjectFilter


@dataclass(frozen=True)
class GetObjectsPlan:
    """GetDocuments, GetFolders, GetDocumentsAndAssociations."""

    filter: ObjectFilter
    with_associations: bool = False


@dataclass(frozen=True)
class GetAssociationsPlan:
    filter: AssociationFilter


@dataclass(frozen=True)
class GetSubmissionSetsPlan:
    member_uuids: tuple[str, ...]


@dataclass(frozen=True)
class ContentsPlan:
    """GetSubmissionSetAndContents, GetFolderAndContents: the container, then its members.

    ``documents`` is a template; the executor restricts it to the container's members.
    """

    container: ObjectFilter
    documents: ObjectFilter
    include_folders: bool


@dataclass(frozen=True)
class FoldersForDocumentPlan:
    document: ObjectFilter


@dataclass(frozen=True)
class RelatedDocumentsPlan:
    document: ObjectFilter
    association_types: tuple[str, ...]
    related: ObjectFilter


QueryPlan = (
    FindPlan
    | GetAllPlan
    | GetObjectsPlan
    | GetAssociationsPlan
    | GetSubmissionSetsPlan
    | ContentsPlan
    | FoldersForDocumentPlan
    | RelatedDocumentsPlan
)

_DOCUMENT_CODE_PARAMS = (
    (f"{DE}ClassCode", CodeAttribute.CLASS_CODE),
    (f"{DE}TypeCode", CodeAttribute.TYPE_CODE),
    (f"{DE}PracticeSettingCode", CodeAttribute.PRACTICE_SETTING_CODE),
    (f"{DE}HealthcareFacilityTypeCode", CodeAttribute.HEALTHCARE_FACILITY_TYPE_CODE),
    (f"{DE}EventCodeList", CodeAttribute.EVENT_CODE),
    (f"{DE}ConfidentialityCode", CodeAttribute.CONFIDENTIALITY_CODE),
    (f"{DE}FormatCode", CodeAttribute.FORMAT_CODE),
)
_DOCUMENT_TIME_PARAMS = (
    (f"{DE}CreationTime", TimeColumn.CREATION_TIME),
    (f"{DE}ServiceStartTime", TimeColumn.SERVICE_START_TIME),
    (f"{DE}ServiceStopTime", TimeColumn.SERVICE_STOP_TIME),
)


def _code_conditions(
    query: StoredQuery, params: Sequence[tuple[str, CodeAttribute]]
) -> tuple[CodeCondition, ...]:
    return tuple(
        CodeCondition(attribute, tuple(parse_code(v) for v in group))
        for name, attribute in params
        for group in query.groups(name)
    )


def _time_ranges(
    query: StoredQuery, params: Sequence[tuple[str, TimeColumn]]
) -> tuple[TimeRange, ...]:
    ranges = []
    for prefix, column in params:
        low, high = query.string(f"{prefix}From"), query.string(f"{prefix}To")
        if low is not None or high is not None:
            ranges.append(TimeRange(column, low, high))
    return tuple(ranges)


def _entry_types(query: StoredQuery) -> tuple[str, ...]:
    # On-Demand Documents option: without $XDSDocumentEntryType only stable entries match.
    return query.strings(f"{DE}Type") or (ebrim.DOCUMENT_ENTRY_STABLE,)


def _document_filter(query: StoredQuery, *, patient_param: str | None) -> ObjectFilter:
    values: list[ValueCondition] = []
    authors = query.strings(f"{DE}AuthorPerson")
    if authors:
        values.append(ValueCondition(ValueAttribute.AUTHOR_PERSON, authors, like=True))
    for group in query.groups(f"{DE}ReferenceIdList"):
        values.append(ValueCondition(ValueAttribute.REFERENCE_ID, tuple(group)))
    return ObjectFilter(
        Kind.DOCUMENT_ENTRY,
        patient_id=query.string(patient_param) if patient_param else None,
        statuses=query.strings(f"{DE}Status"),
        object_types=_entry_types(query),
        availability=query.strings(f"{DE}DocumentAvailability"),
        codes=_code_conditions(query, _DOCUMENT_CODE_PARAMS),
        values=tuple(values),
        times=_time_ranges(query, _DOCUMENT_TIME_PARAMS),
    )


def _contents_filter(query: StoredQuery) -> ObjectFilter:
    return ObjectFilter(
        Kind.DOCUMENT_ENTRY,
        object_types=_entry_types(query),
        codes=_code_conditions(
            query,
            (
                (f"{DE}FormatCode", CodeAttribute.FORMAT_CODE),
                (f"{DE}ConfidentialityCode", CodeAttribute.CONFIDENTIALITY_CODE),
            ),
        ),
    )


def _by_id(
    query: StoredQuery, kind: Kind, uuid: str, unique_id: str, lid: str = ""
) -> ObjectFilter:
    return ObjectFilter(
        kind,
        uuids=query.strings(uuid),
        unique_ids=query.strings(unique_id),
        lids=query.strings(lid) if lid else None,
    )


def plan_query(query: StoredQuery) -> QueryPlan:
    qid = query.query_id
    if qid in (StoredQueryId.FIND_DOCUMENTS, StoredQueryId.FIND_DOCUMENTS_BY_REFERENCE_ID):
        return FindPlan(_document_filter(query, patient_param=f"{DE}PatientId"))
    if qid == StoredQueryId.FIND_SUBMISSION_SETS:
        values = []
        author = query.string("$XDSSubmissionSetAuthorPerson")
        if author is not None:
            values.append(ValueCondition(ValueAttribute.AUTHOR_PERSON, (author,), like=True))
        return FindPlan(
            ObjectFilter(
                Kind.SUBMISSION_SET,
                patient_id=query.string("$XDSSubmissionSetPatientId"),
                statuses=query.strings("$XDSSubmissionSetStatus"),
                source_ids=query.strings("$XDSSubmissionSetSourceId"),
                codes=_code_conditions(
                    query, (("$XDSSubmissionSetContentType", CodeAttribute.CONTENT_TYPE_CODE),)
                ),
                values=tuple(values),
                times=_time_ranges(
                    query, (("$XDSSubmissionSetSubmissionTime", TimeColumn.SUBMISSION_TIME),)
                ),
            )
        )
    if qid == StoredQueryId.FIND_FOLDERS:
        return FindPlan(
            ObjectFilter(
                Kind.FOLDER,
                patient_id=query.string("$XDSFolderPatientId"),
                statuses=query.strings("$XDSFolderStatus"),
                codes=_code_conditions(query, (("$XDSFolderCodeList", CodeAttribute.FOLDER_CODE),)),
                times=_time_ranges(
                    query, (("$XDSFolderLastUpdateTime", TimeColumn.LAST_UPDATE_TIME),)
                ),
            )
        )
    if qid == StoredQueryId.GET_ALL:
        patient = query.string("$patientId")
        documents = _contents_filter(query)
        return GetAllPlan(
            documents=ObjectFilter(
                Kind.DOCUMENT_ENTRY,
                patient_id=patient,
                statuses=query.strings(f"{DE}Status"),
                object_types=documents.object_types,
                codes=documents.codes,
            ),
            submission_sets=ObjectFilter(
                Kind.SUBMISSION_SET,
                patient_id=patient,
                statuses=query.strings("$XDSSubmissionSetStatus"),
            ),
            folders=ObjectFilter(
                Kind.FOLDER, patient_id=patient, statuses=query.strings("$XDSFolderStatus")
            ),
        )
    if qid == StoredQueryId.GET_DOCUMENTS:
        return GetObjectsPlan(
            _by_id(query, Kind.DOCUMENT_ENTRY, f"{DE}EntryUUID", f"{DE}UniqueId", f"{DE}LogicalID")
        )
    if qid == StoredQueryId.GET_DOCUMENTS_AND_ASSOCIATIONS:
        return GetObjectsPlan(
            _by_id(query, Kind.DOCUMENT_ENTRY, f"{DE}EntryUUID", f"{DE}UniqueId"),
            with_associations=True,
        )
    if qid == StoredQueryId.GET_FOLDERS:
        return GetObjectsPlan(
            _by_id(
                query,
                Kind.FOLDER,
                "$XDSFolderEntryUUID",
                "$XDSFolderUniqueId",
                "$XDSFolderLogicalID",
            )
        )
    if qid == StoredQueryId.GET_ASSOCIATIONS:
        return GetAssociationsPlan(AssociationFilter(either=query.strings("$uuid")))
    if qid == StoredQueryId.GET_SUBMISSION_SETS:
        return GetSubmissionSetsPlan(query.strings("$uuid") or ())
    if qid == StoredQueryId.GET_SUBMISSION_SET_AND_CONTENTS:
        return ContentsPlan(
            _by_id(
                query,
                Kind.SUBMISSION_SET,
                "$XDSSubmissionSetEntryUUID",
                "$XDSSubmissionSetUniqueId",
            ),
            _contents_filter(query),
            include_folders=True,
        )
    if qid == StoredQueryId.GET_FOLDER_AND_CONTENTS:
        return ContentsPlan(
            _by_id(query, Kind.FOLDER, "$XDSFolderEntryUUID", "$XDSFolderUniqueId"),
            _contents_filter(query),
            include_folders=False,
        )
    if qid == StoredQueryId.GET_FOLDERS_FOR_DOCUMENT:
        return FoldersForDocumentPlan(
            _by_id(query, Kind.DOCUMENT_ENTRY, f"{DE}EntryUUID", f"{DE}UniqueId")
        )
    if qid == StoredQueryId.GET_RELATED_DOCUMENTS:
        return RelatedDocumentsPlan(
            _by_id(query, Kind.DOCUMENT_ENTRY, f"{DE}EntryUUID", f"{DE}UniqueId"),
            query.strings("$AssociationTypes") or (),
            ObjectFilter(Kind.DOCUMENT_ENTRY, object_types=_entry_types(query)),
        )
    raise AssertionError(f"no plan for {qid}")  # pragma: no cover - QUERIES is exhaustive
