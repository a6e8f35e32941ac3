"""The Initiating Gateway validates an ITI-18 once and fails fast (issue 17, items 4 and 5).

Two real gateways on loopback mTLS, each auditing to its own UDP audit inbox: alpha's
Initiating Gateway (with its own registry as the local community) and beta, a peer answering
ITI-38 from its registry. The consumer is a zeep client built from the IHE ``iti18.wsdl``.
An invalid query is answered by alpha with the registry's own error codes, located at alpha's
homeCommunityId, and beta never receives (so never audits) an ITI-38 for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from lxml import etree

from tests.audit_inbox import AuditInbox
from tests.conftest import wait_for
from tests.test_iti42 import QueryClient, errors_of, objects_of
from tests.test_registry_corpus import adhoc, listed, quoted
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import ErrorSeverity, ResponseStatus
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.xds.ebrim import STATUS_APPROVED, ErrorCode, StoredQueryId

DE = "$XDSDocumentEntry"
PATIENT = "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"  # alpha's patient identifier domain


@dataclass
class Pair:
    alpha: Gateway
    beta: Gateway
    alpha_audit: AuditInbox
    beta_audit: AuditInbox
    client: QueryClient

    @property
    def alpha_home(self) -> str:
        return self.alpha.config.community.home_community_id

    @property
    def beta_home(self) -> str:
        return self.beta.config.community.home_community_id


def _audit(inbox: AuditInbox, source: str) -> dict[str, Any]:
    return {
        "audit_source_id": source,
        "destinations": [
            {"name": "arr", "transport": "udp", "host": "127.0.0.1", "port": inbox.port}
        ],
    }


def _queries(inbox: AuditInbox, transaction: str) -> list[etree._Element]:
    """Query audit records (110112) of ``transaction`` (e.g. "ITI-38")."""
    return [
        r
        for r in inbox.with_event("110112")
        if (t := r.find("EventIdentification/EventTypeCode")) is not None
        and t.get("csd-code") == transaction
    ]


@pytest.fixture
def pair(gateway_factory: Callable[..., Gateway], pki: DevPki) -> Iterator[Pair]:
    alpha_audit, beta_audit = AuditInbox(), AuditInbox()
    try:
        beta = gateway_factory("beta", audit=_audit(beta_audit, "gw-beta"))
        alpha = gateway_factory(
            "alpha",
            audit=_audit(alpha_audit, "gw-alpha"),
            peers=[
                {
                    "name": "beta",
                    "home_community_id": beta.config.community.home_community_id,
                    "iti38": beta.endpoint_urls()["iti38"],
                }
            ],
        )
        client = QueryClient(pki, "iti18", alpha.endpoint_urls()["iti18"])
        yield Pair(alpha, beta, alpha_audit, beta_audit, client)
    finally:
        alpha_audit.close()
        beta_audit.close()


STATUS = (f"{DE}Status", listed(STATUS_APPROVED))

INVALID = {
    # Unquoted patient id: the registry refuses the value syntax (XDSRegistryError).
    "unquoted-patient-id": (
        [(f"{DE}PatientId", PATIENT), STATUS],
        ErrorCode.REGISTRY_ERROR,
        f"{DE}PatientId",
    ),
    "missing-status": (
        [(f"{DE}PatientId", quoted(PATIENT))],
        ErrorCode.STORED_QUERY_MISSING_PARAM,
        f"{DE}Status",
    ),
    "two-patient-ids": (
        [(f"{DE}PatientId", [quoted(PATIENT), quoted(PATIENT)]), STATUS],
        ErrorCode.STORED_QUERY_PARAM_NUMBER,
        f"{DE}PatientId",
    ),
    "bad-status-value": (
        [(f"{DE}PatientId", quoted(PATIENT)), (f"{DE}Status", listed("Approved"))],
        ErrorCode.REGISTRY_ERROR,
        f"{DE}Status",
    ),
    "bad-time": (
        [(f"{DE}PatientId", quoted(PATIENT)), STATUS, (f"{DE}CreationTimeFrom", "2024-01-01")],
        ErrorCode.REGISTRY_ERROR,
        f"{DE}CreationTimeFrom",
    ),
    "foreign-patient-domain": (
        [(f"{DE}PatientId", quoted("P1^^^&1.2.3.4.5&ISO")), STATUS],
        ErrorCode.UNKNOWN_PATIENT_ID,
        "1.2.3.4.5",
    ),
}


def test_invalid_queries_fail_fast_at_the_initiating_gateway(pair: Pair) -> None:
    for name, (slots, code, mentioned) in INVALID.items():
        payload = pair.client.query(adhoc(StoredQueryId.FIND_DOCUMENTS, slots))
        assert payload.get("status") == ResponseStatus.FAILURE, name
        assert objects_of(payload) == [], name
        (error,) = errors_of(payload)  # one answer, not one per community
        assert error.get("errorCode") == code, (name, error.attrib)
        assert mentioned in (error.get("codeContext") or ""), (name, error.attrib)
        # Found by our community before any peer was asked (item 5: located).
        assert error.get("location") == pair.alpha_home, name
    # alpha audited each ITI-18 it answered ...
    assert wait_for(lambda: len(_queries(pair.alpha_audit, "ITI-18")) == len(INVALID), 30)
    # ... and neither side has any ITI-38: beta never received one.
    assert _queries(pair.alpha_audit, "ITI-38") == []
    assert _queries(pair.beta_audit, "ITI-38") == []

    # The same path with a valid query does reach beta (so the silence above means something).
    valid = pair.client.query(
        adhoc(StoredQueryId.FIND_DOCUMENTS, [(f"{DE}PatientId", quoted(PATIENT)), STATUS])
    )
    assert valid.get("status") == ResponseStatus.SUCCESS, [e.attrib for e in errors_of(valid)]
    # Both sides' records travel independently (UDP inboxes): wait for each.
    assert wait_for(lambda: len(_queries(pair.beta_audit, "ITI-38")) == 1, 30)
    assert wait_for(lambda: len(_queries(pair.alpha_audit, "ITI-38")) == 1, 30)


def test_errors_of_every_community_carry_its_location(pair: Pair) -> None:
    # An undefined parameter is ignored with a Warning by every registry that runs the query:
    # alpha's own (the local community) and beta's (through ITI-38).
    slots = [(f"{DE}PatientId", quoted(PATIENT)), STATUS, ("$NotAParameter", "'1'")]
    payload = pair.client.query(adhoc(StoredQueryId.FIND_DOCUMENTS, slots))
    assert payload.get("status") == ResponseStatus.SUCCESS
    warnings = errors_of(payload)
    assert {w.get("severity") for w in warnings} == {ErrorSeverity.WARNING}
    assert all("$NotAParameter" in (w.get("codeContext") or "") for w in warnings)
    assert sorted(w.get("location") or "" for w in warnings) == sorted(
        [pair.alpha_home, pair.beta_home]
    )
