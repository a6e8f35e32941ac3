"""Readable stored queries for people: options → ITI-18/ITI-38 request, response → rows (sans-IO).

``xca-gateway query`` is the command line of this module. A person names a stored query
(``FindDocuments``), a patient (a bare id is completed with the community's assigning
authority), codes (``--class 18726-0``: a bare code gets the usual coding scheme) and dates
(``--from 2024-01-01 --to 2024-03-31``, both inclusive); :func:`build_query_request` turns them
into the ``query:AdhocQueryRequest`` the registry's parser expects (ITI TF-2 3.18.4.1.2.3:
quoted strings, parenthesised lists, ``code^^scheme``, bare DTM numbers), choosing for each
option the parameter the chosen query defines. :func:`rows_from_response` reads an
``AdhocQueryResponse`` back into one :class:`Row` per registry object, which
:func:`format_table` and :func:`rows_json` render.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from lxml import etree

from xca_gateway.protocol.namespaces import QUERY, RIM
from xca_gateway.registry.stored_query import QUERIES, ParamType, QuerySpec
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import StoredQueryId
from xca_gateway.xds.ebrs import RegistryError, parse_registry_errors
from xca_gateway.xds.metadata import DCM_SYSTEM, LOINC
from xca_gateway.xds.patient_id import PatientId, parse_patient_id

DE = "$XDSDocumentEntry"

STATUSES = {
    "approved": ebrim.STATUS_APPROVED,
    "deprecated": ebrim.STATUS_DEPRECATED,
    "submitted": ebrim.STATUS_SUBMITTED,
}
ASSOCIATION_TYPES = {
    "rplc": ebrim.RPLC,
    "xfrm": ebrim.XFRM,
    "apnd": ebrim.APND,
    "xfrm_rplc": ebrim.XFRM_RPLC,
    "signs": ebrim.SIGNS,
    "hasmember": ebrim.HAS_MEMBER,
    "isSnapshotOf": ebrim.IS_SNAPSHOT_OF,
}
# Readable format codes: what a person types for the usual XDS-I.b and XDS formats.
FORMAT_ALIASES = {
    "kos": f"{ebrim.KOS_FORMAT_CODE}^^{ebrim.DICOM_UID_REGISTRY}",
    "pdf": "urn:ihe:iti:xds-sd:pdf:2008^^1.3.6.1.4.1.19376.1.2.3",
    "text": "urn:ihe:iti:xds-sd:text:2008^^1.3.6.1.4.1.19376.1.2.3",
}

# The query names people type, in the order `--help` lists them.
QUERY_NAMES: dict[str, QuerySpec] = {spec.name: spec for spec in QUERIES.values()}


class QueryOptionError(ValueError):
    """An option that cannot become a valid stored query (said in the CLI's words)."""


def query_spec(name: str) -> QuerySpec:
    """``FindDocuments``, ``finddocuments``, ``find-documents`` or the query's UUID."""
    if name in QUERIES:
        return QUERIES[name]
    wanted = name.replace("-", "").replace("_", "").lower()
    for spec in QUERY_NAMES.values():
        if spec.name.lower() == wanted:
            return spec
    raise QueryOptionError(
        f"unknown stored query {name!r}; one of: {', '.join(sorted(QUERY_NAMES))}"
    )


def complete_patient_id(value: str, assigning_authority: str | None) -> PatientId:
    """A full CX id as given, or a bare id completed with the community's assigning authority."""
    text = value.strip()
    if "^" in text:
        return parse_patient_id(text)
    if not assigning_authority:
        raise QueryOptionError(
            f"--patient {value!r} has no assigning authority: give ID^^^&OID&ISO, or "
            "--endpoints/--community (or --assigning-authority) to complete a bare id"
        )
    return parse_patient_id(f"{text}^^^&{assigning_authority}&ISO")


def coded(value: str, default_scheme: str) -> str:
    """``code^^scheme`` as given, or a bare code in ``default_scheme``."""
    text = value.strip()
    if not text:
        raise QueryOptionError("an empty code")
    return text if "^^" in text else f"{text}^^{default_scheme}"


def format_code(value: str) -> str:
    alias = FORMAT_ALIASES.get(value.strip().lower())
    if alias:
        return alias
    # A DICOM UID (KOS and other DICOM SOP classes) is coded in the DICOM UID registry.
    scheme = (
        ebrim.DICOM_UID_REGISTRY
        if value.startswith("1.2.840.10008.")
        else (
            "1.3.6.1.4.1.19376.1.2.3"  # IHE format codes
        )
    )
    return coded(value, scheme)


_DATE = re.compile(
    r"^(\d{4})(?:-?(\d{2})(?:-?(\d{2})(?:[T ]?(\d{2})(?::?(\d{2})(?::?(\d{2}))?)?)?)?)?$"
)


def dtm(value: str, *, upper_inclusive: bool = False) -> str:
    """A date as a DTM parameter. As an upper bound, inclusive at the precision given: the TF's
    To parameters are exclusive (ITI TF-2 3.18.4.1.2.3.6), so ``--to 2024-03-15`` is sent as
    ``20240316`` and a study of that day is found."""
    match = _DATE.match(value.strip())
    if not match:
        raise QueryOptionError(f"not a date: {value!r} (YYYY[-MM[-DD[THH[:MM[:SS]]]]])")
    parts = [p for p in match.groups() if p is not None]
    digits = "".join(parts)
    try:
        datetime.strptime(digits, "%Y%m%d%H%M%S"[: 2 * len(parts)])
    except ValueError:
        raise QueryOptionError(f"not a valid date: {value!r}") from None
    if not upper_inclusive:
        return digits
    if len(parts) == 1:
        return str(int(digits) + 1)
    if len(parts) == 2:
        year, month = int(parts[0]), int(parts[1])
        return f"{year + month // 12:04d}{month % 12 + 1:02d}"
    fmt = "%Y%m%d%H%M%S"[: 2 * len(parts)]
    step = {3: timedelta(days=1), 4: timedelta(hours=1), 5: timedelta(minutes=1)}.get(
        len(parts), timedelta(seconds=1)
    )
    return (datetime.strptime(digits, fmt) + step).strftime(fmt)


@dataclass(frozen=True)
class QueryOptions:
    """What a person asked for, in their words (see ``xca-gateway query --help``)."""

    query: str = "FindDocuments"
    patient: PatientId | None = None
    class_codes: tuple[str, ...] = ()
    type_codes: tuple[str, ...] = ()
    format_codes: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    statuses: tuple[str, ...] = ("approved",)
    uuids: tuple[str, ...] = ()
    unique_ids: tuple[str, ...] = ()
    study_instance_uids: tuple[str, ...] = ()
    association_types: tuple[str, ...] = ()
    home: str | None = None
    object_ref: bool = False


# Which parameter each option fills, by query: the first name the query defines.
_OPTION_PARAMETERS: dict[str, tuple[str, ...]] = {
    "--class": (f"{DE}ClassCode",),
    "--type": (f"{DE}TypeCode",),
    "--format": (f"{DE}FormatCode",),
    "--modality": (f"{DE}EventCodeList",),
    "--from": (
        f"{DE}ServiceStartTimeFrom",
        "$XDSSubmissionSetSubmissionTimeFrom",
        "$XDSFolderLastUpdateTimeFrom",
    ),
    "--to": (
        f"{DE}ServiceStartTimeTo",
        "$XDSSubmissionSetSubmissionTimeTo",
        "$XDSFolderLastUpdateTimeTo",
    ),
    "--uuid": (f"{DE}EntryUUID", "$XDSSubmissionSetEntryUUID", "$XDSFolderEntryUUID", "$uuid"),
    "--unique-id": (f"{DE}UniqueId", "$XDSSubmissionSetUniqueId", "$XDSFolderUniqueId"),
    "--study": (f"{DE}ReferenceIdList",),
    "--association-type": ("$AssociationTypes",),
}


def _literal(values: Sequence[str], kind: ParamType) -> str:
    if kind is ParamType.TIME:
        return values[0]
    if kind in (ParamType.STRING, ParamType.PATIENT_ID):
        return "'" + values[0].replace("'", "''") + "'"
    return "(" + ",".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


def query_parameters(options: QueryOptions) -> tuple[QuerySpec, dict[str, list[str]]]:
    """The stored query and its parameters (name → literal values, one per slot)."""
    spec = query_spec(options.query)
    if options.study_instance_uids and spec.id == StoredQueryId.FIND_DOCUMENTS:
        # A study is found by its manifest's referenceIdList (ITI TF-3 4.2.3.2.28).
        spec = QUERIES[StoredQueryId.FIND_DOCUMENTS_BY_REFERENCE_ID]
    given: dict[str, list[str]] = {
        "--class": [coded(c, LOINC) for c in options.class_codes],
        "--type": [coded(c, LOINC) for c in options.type_codes],
        "--format": [format_code(c) for c in options.format_codes],
        "--modality": [coded(m.upper(), DCM_SYSTEM) for m in options.modalities],
        "--from": [dtm(options.date_from)] if options.date_from else [],
        "--to": [dtm(options.date_to, upper_inclusive=True)] if options.date_to else [],
        "--uuid": list(options.uuids),
        "--unique-id": list(options.unique_ids),
        "--study": [
            f"{uid}^^^^{ebrim.REFERENCE_ID_STUDY_INSTANCE_UID}"
            for uid in options.study_instance_uids
        ],
        "--association-type": [
            ASSOCIATION_TYPES.get(t.lower(), t) for t in options.association_types
        ],
    }
    params: dict[str, list[str]] = {}
    for option, values in given.items():
        if not values:
            continue
        name = next((n for n in _OPTION_PARAMETERS[option] if spec.param(n)), None)
        if name is None:
            raise QueryOptionError(f"{option} is not a parameter of {spec.name}")
        param = spec.param(name)
        assert param is not None
        if param.type in (ParamType.STRING, ParamType.TIME) and len(values) > 1:
            raise QueryOptionError(f"{spec.name} takes one {option}")
        params[name] = [_literal(values, param.type)]
    if spec.patient_param is not None:
        if options.patient is None:
            raise QueryOptionError(f"{spec.name} needs --patient")
        params[spec.patient_param] = [options.patient.quoted]
    elif options.patient is not None:
        raise QueryOptionError(f"{spec.name} takes no --patient (it selects by id)")
    unknown = [s for s in options.statuses if s.lower() not in (*STATUSES, "all")]
    if unknown:
        raise QueryOptionError(f"--status {unknown[0]!r}: one of approved, deprecated, all")
    wanted = {s.lower() for s in options.statuses}
    statuses = list(STATUSES.values()) if "all" in wanted else [STATUSES[s] for s in wanted]
    for param in spec.params:
        if param.type is ParamType.STATUS_LIST and param.name not in params:
            params[param.name] = [_literal(sorted(statuses), param.type)]
    if spec.id == StoredQueryId.GET_RELATED_DOCUMENTS and "$AssociationTypes" not in params:
        params["$AssociationTypes"] = [
            _literal(
                [ebrim.RPLC, ebrim.XFRM, ebrim.APND, ebrim.XFRM_RPLC, ebrim.SIGNS],
                ParamType.ASSOCIATION_TYPE_LIST,
            )
        ]
    missing = [p.name for p in spec.params if p.required and p.name not in params]
    if missing:
        options_for = {n: o for o, names in _OPTION_PARAMETERS.items() for n in names}
        raise QueryOptionError(
            f"{spec.name} needs " + ", ".join(options_for.get(m, m) for m in missing)
        )
    for group in spec.one_of:
        if sum(1 for name in group if name in params) != 1:
            raise QueryOptionError(f"{spec.name} needs exactly one of --uuid or --unique-id")
    return spec, params


def build_query_request(options: QueryOptions) -> etree._Element:
    """The ``query:AdhocQueryRequest`` of ITI-18 / ITI-38 for ``options``."""
    spec, params = query_parameters(options)
    root = etree.Element(f"{{{QUERY}}}AdhocQueryRequest", nsmap={"query": QUERY, "rim": RIM})
    etree.SubElement(root, f"{{{QUERY}}}ResponseOption").attrib.update(
        {
            "returnType": "ObjectRef" if options.object_ref else "LeafClass",
            "returnComposedObjects": "true",
        }
    )
    adhoc = etree.SubElement(root, f"{{{RIM}}}AdhocQuery")
    adhoc.set("id", spec.id)
    if options.home:
        adhoc.set("home", options.home)
    for name, values in params.items():
        for value in values:
            slot = etree.SubElement(adhoc, f"{{{RIM}}}Slot")
            slot.set("name", name)
            etree.SubElement(
                etree.SubElement(slot, f"{{{RIM}}}ValueList"), f"{{{RIM}}}Value"
            ).text = value
    return root


# ------------------------------------------------------------------------------ the answer


@dataclass(frozen=True)
class Row:
    """One registry object of an answer, as a person reads it."""

    kind: str  # DocumentEntry, SubmissionSet, Folder, Association, ObjectRef
    community: str  # homeCommunityId
    entry_uuid: str
    title: str = ""
    type: str = ""
    date: str = ""  # DTM as stored
    size: int | None = None
    unique_id: str = ""
    repository_unique_id: str = ""
    mime_type: str = ""
    format_code: str = ""
    patient_id: str = ""
    status: str = ""
    study_instance_uids: tuple[str, ...] = ()
    source: str = ""  # associations
    target: str = ""

    @property
    def is_kos(self) -> bool:
        return self.format_code.split("^^")[0] == ebrim.KOS_FORMAT_CODE


@dataclass
class QueryAnswer:
    status: str
    rows: list[Row] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)


def _slot(obj: etree._Element, name: str) -> list[str]:
    return [
        (v.text or "").strip()
        for slot in obj.iterfind(f"{{{RIM}}}Slot")
        if slot.get("name") == name
        for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
    ]


def _name(obj: etree._Element) -> str:
    string = obj.find(f"{{{RIM}}}Name/{{{RIM}}}LocalizedString")
    return string.get("value", "") if string is not None else ""


def _external_id(obj: etree._Element, scheme: str) -> str:
    return next(
        (
            e.get("value", "")
            for e in obj.iterfind(f"{{{RIM}}}ExternalIdentifier")
            if e.get("identificationScheme") == scheme
        ),
        "",
    )


def _classification(obj: etree._Element, scheme: str) -> tuple[str, str, str]:
    """(code, scheme, display name) of the object's classification in ``scheme``."""
    for c in obj.iterfind(f"{{{RIM}}}Classification"):
        if c.get("classificationScheme") == scheme:
            coding = next(iter(_slot(c, ebrim.SLOT_CODING_SCHEME)), "")
            return c.get("nodeRepresentation", ""), coding, _name(c)
    return "", "", ""


def _short_status(value: str) -> str:
    return value.rsplit(":", 1)[-1] if value else ""


def _row(obj: etree._Element, nodes: dict[str, str]) -> Row | None:
    local = etree.QName(obj).localname
    home = obj.get("home", "")
    uuid = obj.get("id", "")
    if local == "ObjectRef":
        return Row("ObjectRef", home, uuid)
    if local == "ExtrinsicObject":
        code, _, display = _classification(obj, ebrim.DE_TYPE_CODE)
        fmt, fmt_scheme, _ = _classification(obj, ebrim.DE_FORMAT_CODE)
        size = next(iter(_slot(obj, ebrim.SLOT_SIZE)), "")
        start = next(iter(_slot(obj, ebrim.SLOT_SERVICE_START_TIME)), "")
        return Row(
            "DocumentEntry",
            home,
            uuid,
            title=_name(obj),
            type=display or code,
            date=start or next(iter(_slot(obj, ebrim.SLOT_CREATION_TIME)), ""),
            size=int(size) if size.isdigit() else None,
            unique_id=_external_id(obj, ebrim.DE_UNIQUE_ID),
            repository_unique_id=next(iter(_slot(obj, ebrim.SLOT_REPOSITORY_UNIQUE_ID)), ""),
            mime_type=obj.get("mimeType", ""),
            format_code=f"{fmt}^^{fmt_scheme}" if fmt else "",
            patient_id=_external_id(obj, ebrim.DE_PATIENT_ID),
            status=_short_status(obj.get("status", "")),
            study_instance_uids=tuple(
                ref.split("^")[0]
                for ref in _slot(obj, ebrim.SLOT_REFERENCE_ID_LIST)
                if ref.endswith(ebrim.REFERENCE_ID_STUDY_INSTANCE_UID)
            ),
        )
    if local == "RegistryPackage":
        folder = nodes.get(uuid) == ebrim.FOLDER_NODE or bool(
            _external_id(obj, ebrim.FOLDER_UNIQUE_ID)
        )
        if folder:
            return Row(
                "Folder",
                home,
                uuid,
                title=_name(obj),
                date=next(iter(_slot(obj, ebrim.SLOT_LAST_UPDATE_TIME)), ""),
                unique_id=_external_id(obj, ebrim.FOLDER_UNIQUE_ID),
                patient_id=_external_id(obj, ebrim.FOLDER_PATIENT_ID),
                status=_short_status(obj.get("status", "")),
            )
        code, _, display = _classification(obj, ebrim.SS_CONTENT_TYPE_CODE)
        return Row(
            "SubmissionSet",
            home,
            uuid,
            title=_name(obj),
            type=display or code,
            date=next(iter(_slot(obj, ebrim.SLOT_SUBMISSION_TIME)), ""),
            unique_id=_external_id(obj, ebrim.SS_UNIQUE_ID),
            patient_id=_external_id(obj, ebrim.SS_PATIENT_ID),
            status=_short_status(obj.get("status", "")),
        )
    if local == "Association":
        return Row(
            "Association",
            home,
            uuid,
            type=obj.get("associationType", "").rsplit(":", 1)[-1],
            source=obj.get("sourceObject", ""),
            target=obj.get("targetObject", ""),
            status=_short_status(obj.get("status", "")),
        )
    return None  # a free-standing Classification: folded into its package above


def rows_from_response(payload: etree._Element) -> QueryAnswer:
    """The rows, status and errors of a ``query:AdhocQueryResponse``."""
    if payload.tag != f"{{{QUERY}}}AdhocQueryResponse":
        raise ValueError(f"expected AdhocQueryResponse, got {etree.QName(payload).localname}")
    objects = payload.find(f"{{{RIM}}}RegistryObjectList")
    children = list(objects.iterchildren("{*}*")) if objects is not None else []
    # SubmissionSets and Folders are told apart by a sibling Classification (ITI TF-3 4.2.1.2).
    nodes = {
        c.get("classifiedObject", ""): c.get("classificationNode", "")
        for c in children
        if etree.QName(c).localname == "Classification" and c.get("classificationNode")
    }
    rows = [row for child in children if (row := _row(child, nodes)) is not None]
    return QueryAnswer(
        _short_status(payload.get("status", "")), rows, parse_registry_errors(payload)
    )


# ------------------------------------------------------------------------------ rendering


def readable_date(value: str) -> str:
    """``20240315103000`` → ``2024-03-15 10:30``."""
    digits = value.strip()
    if not digits.isdigit() or len(digits) < 4:
        return digits
    text = digits[:4]
    if len(digits) >= 6:
        text += "-" + digits[4:6]
    if len(digits) >= 8:
        text += "-" + digits[6:8]
    if len(digits) >= 12:
        text += f" {digits[8:10]}:{digits[10:12]}"
    return text


def readable_size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)  # pragma: no cover


TABLE_COLUMNS = ("community", "title", "type", "date", "size", "study")


def table_rows(rows: Sequence[Row], names: dict[str, str] | None = None) -> list[list[str]]:
    names = names or {}
    out = []
    for row in rows:
        title = row.title
        if row.kind == "Association":
            title = f"{row.source} -> {row.target}"
        elif row.kind == "ObjectRef":
            title = row.entry_uuid
        elif row.kind != "DocumentEntry":
            title = f"[{row.kind}] {title}".strip()
        out.append(
            [
                names.get(row.community, row.community),
                title,
                row.type,
                readable_date(row.date),
                readable_size(row.size),
                ",".join(row.study_instance_uids) if row.is_kos else "",
            ]
        )
    return out


def format_table(rows: Sequence[Row], names: dict[str, str] | None = None) -> str:
    """A plain-text table (community, title, type, date, size, study UID of KOS manifests)."""
    body = table_rows(rows, names)
    header = [c.upper() for c in TABLE_COLUMNS]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    # The study column is last and may be long; do not pad it.
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
        for line in [header, *body]
    ]
    return "\n".join(lines) + "\n"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def rows_json(answer: QueryAnswer, names: dict[str, str] | None = None) -> dict[str, Any]:
    """The answer as JSON: status, one object per row (empty fields left out), errors."""
    names = names or {}
    objects = []
    for row in answer.rows:
        item: dict[str, Any] = (
            {"communityName": names.get(row.community)} if row.community in names else {}
        )
        for key, value in asdict(row).items():
            if value not in ("", None, ()):
                item[_camel(key)] = list(value) if isinstance(value, tuple) else value
        objects.append(item)
    return {
        "status": answer.status,
        "objects": objects,
        "errors": [
            {
                "errorCode": e.error_code,
                "codeContext": e.code_context,
                "location": e.location,
                "severity": e.severity.rsplit(":", 1)[-1],
            }
            for e in answer.errors
        ],
    }
