"""ITI-81 Retrieve ATNA Audit Event: FHIR R4 AuditEvent search over the stored records (sans-IO).

The DICOM audit message maps to AuditEvent element by element as IHE RESTful ATNA and IPF's
translation do: EventID -> ``type``, EventTypeCode -> ``subtype``, ActiveParticipant ->
``agent``, AuditSourceIdentification -> ``source``, ParticipantObjectIdentification -> ``entity``
(details keep their base64 values). Code systems get their FHIR URIs (DCM,
``urn:ihe:event-type-code``
for IHE transactions, the HL7 terminology code systems for the integer codes).

A record that could not be parsed still is an AuditEvent: type ``unparsed`` from our own code
system, the sender as agent and observer, and its flags as an extension. Every AuditEvent links
to its raw message (``AuditEvent/{id}/$raw``).

Search parameters (IPF ``Iti81ResourceProvider``): ``date`` (required, with ge/gt/le/lt/eq/sa/eb
prefixes), ``address``, ``agent`` / ``agent-name`` / ``user``, ``patient.identifier``, ``entity``,
``entity-type``, ``entity-role``, ``source``, ``type``, ``subtype``, ``outcome``, ``altid``, and
``_count`` / ``_offset`` / ``_sort``, ``_summary=count`` and ``_total=accurate`` (exact totals;
ordinary searches give a total only up to an estimate cap). Comma-separated values are OR,
repeated parameters AND.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from xca_gateway.arr.parse import AuditRecord, Code, Entity, Participant, patient_key
from xca_gateway.arr.store import Clause, EventFilter

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
IHE_SYSTEM = "urn:ihe:event-type-code"
SECURITY_SOURCE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
LIFECYCLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle"
ARR_SYSTEM = "urn:xca-gateway:arr"
EXT_RAW = "urn:xca-gateway:arr:raw-message"
EXT_FLAGS = "urn:xca-gateway:arr:flags"
EXT_SENDER = "urn:xca-gateway:arr:syslog-sender"
# Who sent it as verified (certificate subject, udp:<address>, local); the flag
# audit-source-unbound says its AuditSourceID is not one that sender may report as.
EXT_AUTHENTICATED_SENDER = "urn:xca-gateway:arr:authenticated-sender"

FHIR_JSON = "application/fhir+json"

_SYSTEMS = {
    "DCM": DCM_SYSTEM,
    "IHE Transactions": IHE_SYSTEM,
    "IHE": IHE_SYSTEM,
}

DEFAULT_COUNT = 100
MAX_COUNT = 1000
COUNT_CAP = 10000


class FhirError(Exception):
    """A search the server refuses; becomes an OperationOutcome with ``status``."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


# --------------------------------------------------------------------------- mapping


def _instant(value: datetime) -> str:
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _coding(code: Code, system: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    uri = system or _SYSTEMS.get(code.system or "")
    if uri is None and code.system and ":" in code.system and " " not in code.system:
        uri = code.system  # already a URI (urn:oid:..., http://...)
    if uri:
        out["system"] = uri
    out["code"] = code.code
    if code.display:
        out["display"] = code.display
    return out


def _concept(codes: Iterable[Code], system: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(c, system) for c in codes]}


def _int_coding(system: str, value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    return {"system": system, "code": value}


def _detail(entity_detail: Any) -> dict[str, Any]:
    value: bytes = entity_detail.value
    try:
        text = value.decode("utf-8")
        printable = text.isprintable()
    except UnicodeDecodeError:
        printable = False
    out: dict[str, Any] = {"type": entity_detail.type or "unknown"}
    if printable and text:
        out["valueString"] = text
    else:
        out["valueBase64Binary"] = base64.b64encode(value).decode("ascii")
    return out


def _agent(p: Participant) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "who": {"identifier": {"value": p.user_id}, "display": p.user_id},
        "requestor": bool(p.user_is_requestor),
    }
    if p.roles:
        agent["type"] = _concept(p.roles[:1], DCM_SYSTEM if p.roles[0].system == "DCM" else None)
        if len(p.roles) > 1:
            agent["role"] = [_concept([r]) for r in p.roles[1:]]
    if p.alternative_user_id:
        agent["altId"] = p.alternative_user_id
    if p.user_name:
        agent["name"] = p.user_name
    if p.media_type is not None:
        agent["media"] = _coding(p.media_type)
    if p.network_access_point_id:
        network: dict[str, Any] = {"address": p.network_access_point_id}
        if p.network_access_point_type in ("1", "2", "3", "4", "5"):
            network["type"] = p.network_access_point_type
        agent["network"] = network
    return agent


def _what(entity: Entity) -> dict[str, Any]:
    identifier: dict[str, Any] = {"value": entity.object_id}
    if entity.is_patient:
        ident, _, oid = patient_key(entity.object_id).partition("|")
        if oid:
            identifier = {"system": f"urn:oid:{oid}", "value": ident}
    if entity.id_type is not None:
        identifier["type"] = _concept([entity.id_type])
    return {"identifier": identifier}


def _entity(entity: Entity) -> dict[str, Any]:
    out: dict[str, Any] = {"what": _what(entity)}
    for key, system, value in (
        ("type", ENTITY_TYPE_SYSTEM, entity.type_code),
        ("role", OBJECT_ROLE_SYSTEM, entity.role),
        ("lifecycle", LIFECYCLE_SYSTEM, entity.lifecycle),
    ):
        coding = _int_coding(system, value)
        if coding is not None:
            out[key] = coding
    if entity.sensitivity:
        out["securityLabel"] = [{"code": entity.sensitivity}]
    if entity.name:
        out["name"] = entity.name
    if entity.query is not None:
        out["query"] = base64.b64encode(entity.query).decode("ascii")
    if entity.details:
        out["detail"] = [_detail(d) for d in entity.details]
    return out


def audit_event(record: AuditRecord, base_url: str) -> dict[str, Any]:
    """The FHIR R4 AuditEvent of one stored record."""
    rid = str(record.record_id)
    resource: dict[str, Any] = {"resourceType": "AuditEvent", "id": rid}
    extensions: list[dict[str, Any]] = [
        {"url": EXT_RAW, "valueUrl": f"{base_url}/AuditEvent/{rid}/$raw"},
        {"url": EXT_SENDER, "valueString": f"{record.transport}:{record.sender}"},
    ]
    if record.sender_identity:
        extensions.append({"url": EXT_AUTHENTICATED_SENDER, "valueString": record.sender_identity})
    if record.flags:
        extensions.append({"url": EXT_FLAGS, "valueString": ",".join(record.flags)})
    resource["extension"] = extensions
    if record.event_id is not None:
        resource["type"] = _coding(record.event_id)
    else:
        resource["type"] = {
            "system": ARR_SYSTEM,
            "code": "unparsed",
            "display": "Audit message not understood (stored verbatim)",
        }
    if record.event_types:
        resource["subtype"] = [_coding(c) for c in record.event_types]
    if record.action:
        resource["action"] = record.action
    resource["recorded"] = _instant(record.event_time)
    if record.outcome is not None:
        resource["outcome"] = str(record.outcome)
    description = record.outcome_description or record.problem
    if description:
        resource["outcomeDesc"] = description
    if record.purposes_of_use:
        resource["purposeOfEvent"] = [_concept([c]) for c in record.purposes_of_use]
    agents = [_agent(p) for p in record.participants]
    if not agents:
        agents = [
            {
                "who": {"display": record.sender},
                "requestor": False,
                "network": {"address": record.sender, "type": "2"},
            }
        ]
    resource["agent"] = agents
    if record.audit_sources:
        src = record.audit_sources[0]
        source: dict[str, Any] = {
            "observer": {"identifier": {"value": src.source_id}, "display": src.source_id}
        }
        if src.enterprise_site_id:
            source["site"] = src.enterprise_site_id
        if src.types:
            source["type"] = [_coding(t, SECURITY_SOURCE_SYSTEM) for t in src.types]
    else:
        source = {"observer": {"display": record.sender}}
    resource["source"] = source
    if record.entities:
        resource["entity"] = [_entity(e) for e in record.entities]
    return resource


# --------------------------------------------------------------------------- search parameters


@dataclass(frozen=True)
class SearchRequest:
    filter: EventFilter
    count: int = DEFAULT_COUNT
    offset: int = 0
    newest_first: bool = True
    # The query as received (paging links repeat it).
    params: tuple[tuple[str, str], ...] = ()
    # _summary=count: the number of matches only, exact (FHIR R4 search 3.1.1.5.8).
    summary_count: bool = False
    # _total=accurate: an exact total even past the estimate cap of ordinary searches.
    total_accurate: bool = False


_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


def _date_range(value: str) -> tuple[datetime, datetime]:
    """The instant range a FHIR date/dateTime value covers at its precision."""
    text = value.strip().replace(" ", "+")  # a "+" of a zone decoded as a space
    try:
        if len(text) == 4:
            low = datetime(int(text), 1, 1, tzinfo=UTC)
            high = datetime(int(text) + 1, 1, 1, tzinfo=UTC)
        elif len(text) == 7:
            year, month = int(text[:4]), int(text[5:7])
            low = datetime(year, month, 1, tzinfo=UTC)
            high = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        elif len(text) == 10:
            low = datetime.fromisoformat(text).replace(tzinfo=UTC)
            high = low + timedelta(days=1)
        else:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            low = parsed.astimezone(UTC)
            # Seconds precision covers the whole second.
            high = low + (timedelta(seconds=1) if "." not in text else timedelta(microseconds=1))
    except ValueError:
        raise FhirError(400, "invalid", f"invalid date parameter value {value!r}") from None
    return low, high - timedelta(microseconds=1)


def _apply_date(flt: EventFilter, value: str) -> EventFilter:
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    body = value[2:] if value[:2] in _PREFIXES else value
    low, high = _date_range(body)
    since, until = flt.since, flt.until

    def later(a: datetime | None, b: datetime) -> datetime:
        return b if a is None or b > a else a

    def earlier(a: datetime | None, b: datetime) -> datetime:
        return b if a is None or b < a else a

    one = timedelta(microseconds=1)
    if prefix == "eq":
        since, until = later(since, low), earlier(until, high)
    elif prefix == "ge":
        since = later(since, low)
    elif prefix in ("gt", "sa"):
        since = later(since, high + one)
    elif prefix == "le":
        until = earlier(until, high)
    elif prefix in ("lt", "eb"):
        until = earlier(until, low - one)
    else:
        raise FhirError(400, "not-supported", f"date prefix {prefix!r} is not supported")
    return replace(flt, since=since, until=until)


def _token_code(value: str) -> str:
    """The code of a token ``[system|]code``."""
    return value.rsplit("|", 1)[-1] if "|" in value else value


def _clause(value: str, transform: Any = None) -> Clause:
    parts = [v for v in value.split(",") if v != ""]
    if not parts:
        raise FhirError(400, "invalid", "empty search parameter value")
    return tuple(transform(p) if transform else p for p in parts)


def _reference_id(value: str) -> str:
    """``Type/id`` or an identifier ``system|value`` -> the id or value to match."""
    if "|" in value:
        return value.rsplit("|", 1)[-1]
    return value


_IGNORED = frozenset({"_format", "_pretty", "_elements"})


def parse_search(query: str, *, strict: bool = False) -> SearchRequest:
    """ITI-81 search parameters -> an :class:`EventFilter` (raises :class:`FhirError`)."""
    params = parse_qsl(query, keep_blank_values=True)
    flt = EventFilter()
    count, offset, newest_first = DEFAULT_COUNT, 0, True
    summary_count = total_accurate = False
    has_date = False
    adds: dict[str, list[Clause]] = {}
    outcomes: list[tuple[int, ...]] = []
    for name, value in params:
        if name == "date":
            flt = _apply_date(flt, value)
            has_date = True
        elif name == "_count":
            if not value.isdigit():
                raise FhirError(400, "invalid", "_count must be a non-negative integer")
            count = min(int(value), MAX_COUNT)
        elif name == "_offset":
            if not value.isdigit():
                raise FhirError(400, "invalid", "_offset must be a non-negative integer")
            offset = int(value)
        elif name == "_summary":
            # count is the one summary that changes an AuditEvent search; the others
            # (true/text/data/false) are served as full resources, which they permit.
            if value not in ("count", "true", "text", "data", "false"):
                raise FhirError(400, "invalid", f"unknown _summary {value!r}")
            summary_count = value == "count"
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise FhirError(400, "invalid", "_total must be none, estimate or accurate")
            total_accurate = value == "accurate"
        elif name == "_sort":
            if value not in ("date", "-date", "_lastUpdated", "-_lastUpdated"):
                raise FhirError(400, "not-supported", f"cannot sort by {value!r}")
            newest_first = value.startswith("-")
        elif name == "patient.identifier" or name == "patient":
            # CX, system|value or a bare value (any assigning authority).
            adds.setdefault("patients", []).append(_clause(value, patient_key))
        elif name in ("agent", "agent-name", "user", "agent.identifier"):
            adds.setdefault("users", []).append(_clause(value, _reference_id))
        elif name == "address":
            adds.setdefault("addresses", []).append(_clause(value))
        elif name in ("entity", "entity.identifier"):
            adds.setdefault("entities", []).append(_clause(value, _reference_id))
        elif name == "entity-type":
            adds.setdefault("entity_types", []).append(_clause(value, _token_code))
        elif name == "entity-role":
            adds.setdefault("entity_roles", []).append(_clause(value, _token_code))
        elif name == "source":
            adds.setdefault("sources", []).append(_clause(value, _reference_id))
        elif name == "type":
            adds.setdefault("event_codes", []).append(_clause(value, _token_code))
        elif name == "subtype":
            adds.setdefault("subtypes", []).append(_clause(value, _token_code))
        elif name == "altid":
            adds.setdefault("altids", []).append(_clause(value, _token_code))
        elif name == "outcome":
            codes = _clause(value, _token_code)
            if not all(c in ("0", "4", "8", "12") for c in codes):
                raise FhirError(400, "invalid", "outcome must be 0, 4, 8 or 12")
            outcomes.append(tuple(int(c) for c in codes))
        elif name in _IGNORED:
            if name == "_format" and value and "json" not in value:
                raise FhirError(406, "not-supported", "only JSON (application/fhir+json)")
        elif strict:
            raise FhirError(400, "not-supported", f"unknown search parameter {name!r}")
    if not has_date:
        raise FhirError(400, "required", "ITI-81 requires the date search parameter")
    fields: dict[str, Any] = {k: tuple(v) for k, v in adds.items()}
    if outcomes:
        fields["outcomes"] = tuple(outcomes)
    flt = replace(flt, **fields)
    return SearchRequest(
        flt, count, offset, newest_first, tuple(params), summary_count, total_accurate
    )


def _link(base_url: str, params: Sequence[tuple[str, str]], offset: int, count: int) -> str:
    kept = [(k, v) for k, v in params if k not in ("_offset", "_count")]
    kept += [("_count", str(count)), ("_offset", str(offset))]
    return f"{base_url}/AuditEvent?" + urlencode(kept, quote_via=quote)


def search_bundle(
    request: SearchRequest,
    records: Sequence[AuditRecord],
    *,
    base_url: str,
    total: int | None,
    has_more: bool,
) -> dict[str, Any]:
    """A ``searchset`` Bundle with self/next/previous links (offset paging)."""
    links = [
        {"relation": "self", "url": _link(base_url, request.params, request.offset, request.count)}
    ]
    if has_more:
        links.append(
            {
                "relation": "next",
                "url": _link(
                    base_url, request.params, request.offset + request.count, request.count
                ),
            }
        )
    if request.offset > 0:
        links.append(
            {
                "relation": "previous",
                "url": _link(
                    base_url,
                    request.params,
                    max(0, request.offset - request.count),
                    request.count,
                ),
            }
        )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _instant(datetime.now(UTC))},
        "type": "searchset",
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    bundle["entry"] = [
        {
            "fullUrl": f"{base_url}/AuditEvent/{r.record_id}",
            "resource": audit_event(r, base_url),
            "search": {"mode": "match"},
        }
        for r in records
    ]
    return bundle


def capability_statement(base_url: str) -> dict[str, Any]:
    params = [
        ("date", "date"),
        ("address", "string"),
        ("agent", "reference"),
        ("agent-name", "string"),
        ("patient.identifier", "token"),
        ("entity", "reference"),
        ("entity-type", "token"),
        ("entity-role", "token"),
        ("source", "reference"),
        ("type", "token"),
        ("subtype", "token"),
        ("outcome", "token"),
        ("altid", "token"),
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _instant(datetime.now(UTC))[:10],
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "implementation": {"description": "xca-gateway Audit Record Repository", "url": base_url},
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": "AuditEvent",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [{"name": n, "type": t} for n, t in params],
                    }
                ],
            }
        ],
    }
