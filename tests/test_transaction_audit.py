"""The dispatch of audited exchanges to their transaction (issue 20): every transaction the
gateway serves or calls has a record builder, on the right side, and nothing else is audited
by accident. Pure logic: the auditor is driven with parsed messages and a trail that keeps the
records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from lxml import etree

from xca_gateway.app.transaction_audit import CALLED, SERVED, OutboundCall, TransactionAuditor
from xca_gateway.audit import messages as m
from xca_gateway.protocol.namespaces import QUERY, RIM, RS, XDSB, XDSI, Action
from xca_gateway.registry import RegistryAction
from xca_gateway.transactions import TRANSACTIONS, iti45, iti55

HL7 = "urn:hl7-org:v3"
PEER = "https://beta.xca-gateway.test/xca/iti38"


def _adhoc() -> etree._Element:
    return etree.fromstring(
        f'<q:AdhocQueryRequest xmlns:q="{QUERY}" xmlns:r="{RIM}"><r:AdhocQuery id="urn:uuid:1">'
        '<r:Slot name="$XDSDocumentEntryPatientId"><r:ValueList>'
        "<r:Value>'P1^^^&amp;1.2.3&amp;ISO'</r:Value></r:ValueList></r:Slot>"
        "</r:AdhocQuery></q:AdhocQueryRequest>"
    )


def _documents() -> etree._Element:
    return etree.fromstring(
        f'<x:RetrieveDocumentSetRequest xmlns:x="{XDSB}"><x:DocumentRequest>'
        "<x:RepositoryUniqueId>1.5</x:RepositoryUniqueId>"
        "<x:DocumentUniqueId>1.9.1</x:DocumentUniqueId>"
        "</x:DocumentRequest></x:RetrieveDocumentSetRequest>"
    )


def _instances() -> etree._Element:
    return etree.fromstring(
        f'<i:RetrieveImagingDocumentSetRequest xmlns:i="{XDSI}" xmlns:x="{XDSB}">'
        '<i:StudyRequest studyInstanceUID="1.2.1"><i:SeriesRequest seriesInstanceUID="1.2.1.1">'
        "<x:DocumentRequest><x:RepositoryUniqueId>1.5</x:RepositoryUniqueId>"
        "<x:DocumentUniqueId>1.2.1.1.1</x:DocumentUniqueId></x:DocumentRequest>"
        "</i:SeriesRequest></i:StudyRequest></i:RetrieveImagingDocumentSetRequest>"
    )


def _hl7(interaction: str) -> etree._Element:
    return etree.fromstring(
        f'<h:{interaction} xmlns:h="{HL7}"><h:controlActProcess><h:queryByParameter>'
        '<h:queryId root="1.2" extension="Q1"/></h:queryByParameter>'
        f"</h:controlActProcess></h:{interaction}>"
    )


def _submission() -> etree._Element:
    return etree.fromstring(
        f'<l:SubmitObjectsRequest xmlns:l="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0" '
        f'xmlns:r="{RIM}"><r:RegistryObjectList/></l:SubmitObjectsRequest>'
    )


def _success() -> etree._Element:
    return etree.fromstring(
        f'<rs:RegistryResponse xmlns:rs="{RS}" '
        'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"/>'
    )


REQUESTS = {
    "ITI-18": _adhoc,
    "ITI-38": _adhoc,
    "ITI-39": _documents,
    "ITI-43": _documents,
    "RAD-69": _instances,
    "RAD-75": _instances,
    "ITI-45": lambda: _hl7("PRPA_IN201309UV02"),
    "ITI-55": lambda: _hl7("PRPA_IN201305UV02"),
    "ITI-42": _submission,
}

# (EventID, EventActionCode) of the first record, as served here and as called by us.
SHAPES = {
    "ITI-18": (("110112", "E"), ("110112", "E")),
    "ITI-38": (("110112", "E"), ("110112", "E")),
    "ITI-39": (("110106", "R"), ("110107", "C")),
    "ITI-43": (("110106", "R"), ("110107", "C")),
    "RAD-69": (("110104", "R"), ("110104", "C")),
    "RAD-75": (("110104", "R"), ("110104", "C")),
    "ITI-45": (("110112", "E"), ("110112", "E")),
    "ITI-55": (("110112", "E"), ("110112", "E")),
    "ITI-42": (("110107", "C"), ("110106", "R")),
}

ACTIONS = {
    "ITI-18": Action.ITI18,
    "ITI-38": Action.ITI38,
    "ITI-39": Action.ITI39,
    "ITI-43": Action.ITI43,
    "RAD-69": Action.RAD69,
    "RAD-75": Action.RAD75,
    "ITI-45": iti45.ACTION,
    "ITI-55": iti55.ACTION,
    "ITI-42": RegistryAction.ITI42,
}


@dataclass
class KeptTrail:
    """The part of the audit trail the auditor uses, keeping what it is given."""

    context: m.AuditContext = field(
        default_factory=lambda: m.AuditContext(m.AuditSource("gw"), host="gw.test", process_id="1")
    )
    kept: list[m.AuditMessage] = field(default_factory=list)

    def local_node(self, url: str) -> m.Node:
        return self.context.local_node(url)

    def record(self, message: m.AuditMessage | Iterable[m.AuditMessage]) -> None:
        self.kept.extend([message] if isinstance(message, m.AuditMessage) else message)


@dataclass
class Served:
    """What the auditor reads of a served SOAP request."""

    payload: etree._Element
    path: str
    context: dict[str, Any] = field(default_factory=dict)
    parsed: object = None

    @property
    def endpoint(self) -> Any:
        return type("Endpoint", (), {"path": self.path})()

    @property
    def peer(self) -> Any:
        return type("Peer", (), {"address": "127.0.0.5", "certificate": None})()

    @property
    def envelope(self) -> Any:
        addressing = type("Addressing", (), {"reply_to": None})()
        return type("Envelope", (), {"addressing": addressing})()


def _auditor() -> tuple[TransactionAuditor, KeptTrail]:
    trail = KeptTrail()
    auditor = TransactionAuditor(
        trail,  # type: ignore[arg-type]
        lambda: "https://alpha.xca-gateway.test",
        home_community_id="urn:oid:1.1",
        peer_communities={PEER: "urn:oid:2.2"},
    )
    return auditor, trail


def _shape(message: m.AuditMessage) -> tuple[str, str, str | None]:
    event = message.event
    types = [t.code for t in event.type_codes]
    return event.event_id.code, event.action, types[0] if types else None


def test_every_transaction_served_or_called_has_its_record_builder() -> None:
    served = {t.name for t in TRANSACTIONS} | {"ITI-42", "ITI-45", "ITI-55"}
    assert set(SERVED) == served == set(SHAPES)
    assert set(CALLED) == {ACTIONS[name] for name, (_, out) in SHAPES.items() if out is not None}


@pytest.mark.parametrize("transaction", sorted(SHAPES))
def test_a_served_request_is_audited_by_its_transaction_as_the_serving_side(
    transaction: str,
) -> None:
    auditor, trail = _auditor()
    request = Served(REQUESTS[transaction](), "/xca/x")
    auditor.served(request, transaction, _success())  # type: ignore[arg-type]
    event_id, action = SHAPES[transaction][0]
    assert [_shape(r) for r in trail.kept[:1]] == [(event_id, action, transaction)]


@pytest.mark.parametrize("transaction", sorted(t for t, s in SHAPES.items() if s[1] is not None))
def test_a_call_is_audited_by_its_transaction_as_the_calling_side(transaction: str) -> None:
    auditor, trail = _auditor()
    call = OutboundCall("https://peer.test/x", ACTIONS[transaction], REQUESTS[transaction](), None)
    auditor.called(call)
    out = SHAPES[transaction][1]
    assert out is not None
    assert [_shape(r) for r in trail.kept[:1]] == [(*out, transaction)]


def test_unknown_transactions_and_actions_are_not_audited() -> None:
    auditor, trail = _auditor()
    auditor.served(Served(_adhoc(), "/xca/x"), "ITI-99", _success())  # type: ignore[arg-type]
    auditor.called(OutboundCall(PEER, "urn:example:unknown", _adhoc(), _success()))
    assert trail.kept == []


def _home_detail(message: m.AuditMessage) -> bytes | None:
    (query,) = [o for o in message.objects if o.type_code_role == m.ObjectRole.QUERY]
    return dict(query.details).get(m.DETAIL_XCA_HOME_COMMUNITY_ID)


def test_the_answering_community_is_named_on_cross_gateway_queries_only() -> None:
    auditor, trail = _auditor()
    auditor.called(OutboundCall(PEER, Action.ITI38, _adhoc(), _success()))
    auditor.called(OutboundCall(PEER, Action.ITI18, _adhoc(), _success()))
    auditor.served(Served(_adhoc(), "/xca/iti38"), "ITI-38", _success())  # type: ignore[arg-type]
    assert [_home_detail(r) for r in trail.kept] == [b"urn:oid:2.2", None, b"urn:oid:1.1"]
