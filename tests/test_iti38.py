"""ITI-38 Cross Gateway Query, responding side, over mTLS with zeep clients from iti38.wsdl.

homeCommunityId rules, ``home`` on every returned object, ``location`` on every error, the
unknown-patient policy, and the responding side answering from a remote registry (ITI-18 to
another gateway's registry endpoint) or from PostgreSQL.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests import test_registry_submit
from tests.postgres import PostgresServer
from tests.test_iti18 import POSITIVE, Slots
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
    PID_A,
    PID_B,
    PID_UNKNOWN,
    U,
    adhoc,
    corpus_submissions,
    listed,
    names,
    quoted,
)
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.protocol.soap_service import Operation, SoapEndpoint
from xca_gateway.registry.stored_query import ID_BASED_QUERIES
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.transactions.iti38 import check_cross_gateway_query, iti38_handler
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId

Q = StoredQueryId
DE = "$XDSDocumentEntry"
STRICT = "/xca/iti38-strict"
FIND_A: Slots = [(f"{DE}PatientId", quoted(PID_A)), (f"{DE}Status", listed(APPROVED))]
APPROVED_A = ["kos_ct", "kos_mr", "report2", "addendum", "pdf"]


def register_corpus(node: RegistryNode, pki: DevPki) -> None:
    client = Iti42Client(pki, node.url(REGISTRY_ITI42))
    for request in corpus_submissions():
        result = client.register(request)
        assert result.status == ResponseStatus.SUCCESS, result.RegistryErrorList


@pytest.fixture(scope="module")
def alpha(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryNode]:
    node = RegistryNode(pki, tmp_path_factory.mktemp("iti38"), "alpha")
    try:
        register_corpus(node, pki)
        strict = SoapEndpoint(STRICT, "strict", {}, door="xca")
        strict.add(
            Operation(
                Action.ITI38,
                "ITI-38",
                iti38_handler(node.registry, home_community_id=node.home, unknown_patient="error"),
            )
        )
        node.gateway.soap.endpoints[STRICT] = strict
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def client(alpha: RegistryNode, pki: DevPki) -> QueryClient:
    return QueryClient(pki, "iti38", alpha.gateway.endpoint_urls()["iti38"])


def codes(payload: etree._Element) -> list[str]:
    return [e.get("errorCode", "") for e in errors_of(payload)]


def test_find_documents_objects_carry_our_home(client: QueryClient, alpha: RegistryNode) -> None:
    for home in (None, alpha.home):
        payload = client.query(adhoc(Q.FIND_DOCUMENTS, FIND_A, home=home))
        assert payload.get("status") == ResponseStatus.SUCCESS
        objects = objects_of(payload)
        assert names(objects) == APPROVED_A
        assert {o.get("home") for o in objects} == {alpha.home}


def test_another_community_is_unknown_here(client: QueryClient, alpha: RegistryNode) -> None:
    payload = client.query(adhoc(Q.FIND_DOCUMENTS, FIND_A, home="urn:oid:1.2.3.4.5.6"))
    assert payload.get("status") == ResponseStatus.FAILURE
    assert codes(payload) == [ErrorCode.UNKNOWN_COMMUNITY]
    assert errors_of(payload)[0].get("location") == alpha.home
    assert objects_of(payload) == []


@pytest.mark.parametrize("query_id", sorted(ID_BASED_QUERIES))
def test_id_based_queries_need_the_home_community_id(
    client: QueryClient, alpha: RegistryNode, query_id: str
) -> None:
    slots = next(s for q, s, _ in POSITIVE if q == query_id)
    payload = client.query(adhoc(query_id, slots))
    assert codes(payload) == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert errors_of(payload)[0].get("location") == alpha.home
    parsed = client.query_parsed(adhoc(query_id, slots))
    assert parsed.status == ResponseStatus.FAILURE
    assert parsed.RegistryErrorList.RegistryError[0].location == alpha.home


@pytest.mark.parametrize(
    ("query_id", "slots", "expected"), POSITIVE, ids=[p[0][-12:] for p in POSITIVE]
)
@pytest.mark.parametrize("return_type", ["LeafClass", "ObjectRef"])
def test_every_stored_query_across_the_gateway(
    client: QueryClient,
    alpha: RegistryNode,
    query_id: str,
    slots: Slots,
    expected: list[str],
    return_type: str,
) -> None:
    payload = client.query(adhoc(query_id, slots, home=alpha.home, return_type=return_type))
    assert payload.get("status") == ResponseStatus.SUCCESS, codes(payload)
    objects = objects_of(payload)
    assert len(objects) == len(expected) or query_id == Q.GET_ALL
    assert objects and all(o.get("home") == alpha.home for o in objects)
    if return_type == "ObjectRef":
        assert {etree.QName(o).localname for o in objects} == {"ObjectRef"}


def test_find_queries_without_a_patient_id(client: QueryClient, alpha: RegistryNode) -> None:
    for query_id, status in (
        (Q.FIND_DOCUMENTS, f"{DE}Status"),
        (Q.FIND_SUBMISSION_SETS, "$XDSSubmissionSetStatus"),
        (Q.FIND_FOLDERS, "$XDSFolderStatus"),
    ):
        payload = client.query(adhoc(query_id, [(status, listed(APPROVED))]))
        assert codes(payload) == [ErrorCode.STORED_QUERY_MISSING_PARAM]
        assert errors_of(payload)[0].get("location") == alpha.home


def test_unknown_patient_policy(alpha: RegistryNode, client: QueryClient, pki: DevPki) -> None:
    unknown: Slots = [(f"{DE}PatientId", quoted(PID_UNKNOWN)), (f"{DE}Status", listed(APPROVED))]
    payload = client.query(adhoc(Q.FIND_DOCUMENTS, unknown))
    assert payload.get("status") == ResponseStatus.SUCCESS and objects_of(payload) == []
    strict = QueryClient(pki, "iti38", alpha.url(STRICT))
    payload = strict.query(adhoc(Q.FIND_DOCUMENTS, unknown))
    assert codes(payload) == [ErrorCode.UNKNOWN_PATIENT_ID]
    assert errors_of(payload)[0].get("location") == alpha.home
    # A known patient with nothing matching is still an empty Success.
    nothing = [*FIND_A, (f"{DE}CreationTimeFrom", "2099")]
    payload = strict.query(adhoc(Q.FIND_DOCUMENTS, nothing))
    assert payload.get("status") == ResponseStatus.SUCCESS and objects_of(payload) == []


def test_the_home_rules_are_pure() -> None:
    home = "urn:oid:1.2.3"
    assert check_cross_gateway_query(adhoc(Q.FIND_DOCUMENTS, FIND_A), home) is None
    error = check_cross_gateway_query(adhoc(Q.GET_DOCUMENTS, [], home="urn:oid:9"), home)
    assert error is not None and error.error_code == ErrorCode.UNKNOWN_COMMUNITY
    error = check_cross_gateway_query(adhoc(Q.GET_DOCUMENTS, []), home)
    assert error is not None and error.error_code == ErrorCode.MISSING_HOME_COMMUNITY_ID
    assert check_cross_gateway_query(adhoc(Q.GET_DOCUMENTS, [], home=home), home) is None


# --------------------------------------------------------------------------- remote registry


def test_responding_side_on_a_remote_registry(
    alpha: RegistryNode, pki: DevPki, tmp_path: Path
) -> None:
    beta = RegistryNode(
        pki,
        tmp_path,
        "beta",
        registry={
            "remote_iti18": alpha.url(REGISTRY_ITI18),
            "remote_iti42": alpha.url(REGISTRY_ITI42),
            "remote_timeout": 10.0,
        },
    )
    try:
        client = QueryClient(pki, "iti38", beta.gateway.endpoint_urls()["iti38"])
        payload = client.query(adhoc(Q.FIND_DOCUMENTS, FIND_A))
        assert payload.get("status") == ResponseStatus.SUCCESS
        objects = objects_of(payload)
        assert names(objects) == APPROVED_A
        assert {o.get("home") for o in objects} == {beta.home}
        # The remote registry's errors come through, located at this gateway.
        payload = client.query(adhoc(Q.GET_DOCUMENTS, [(f"{DE}EntryUUID", "('x'")], home=beta.home))
        assert codes(payload) == [ErrorCode.REGISTRY_ERROR]
        assert errors_of(payload)[0].get("location") == beta.home
        # Registrations are forwarded (ITI-42) to the remote registry.

        forwarded = Iti42Client(pki, beta.url(REGISTRY_ITI42)).register(
            test_registry_submit.request(
                [test_registry_submit.doc("Fwd", patient=PID_B)], patient=PID_B
            )
        )
        assert forwarded.status == ResponseStatus.SUCCESS
    finally:
        beta.close()


def test_remote_registry_down_is_a_registry_error(pki: DevPki, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gamma = RegistryNode(
        pki,
        tmp_path,
        "gamma",
        registry={"remote_iti18": f"https://127.0.0.1:{port}/registry/iti18"},
    )
    try:
        client = QueryClient(pki, "iti38", gamma.gateway.endpoint_urls()["iti38"])
        payload = client.query(adhoc(Q.FIND_DOCUMENTS, FIND_A))
        assert payload.get("status") == ResponseStatus.FAILURE
        assert codes(payload) == [ErrorCode.REGISTRY_ERROR]
        assert errors_of(payload)[0].get("location") == gamma.home
        refused = Iti42Client(pki, gamma.url(REGISTRY_ITI42)).register(corpus_submissions()[0])
        assert refused.status == ResponseStatus.FAILURE
    finally:
        gamma.close()


def test_responding_side_on_postgresql(
    postgres_server: PostgresServer,
    pki: DevPki,
    tmp_path: Path,
) -> None:
    database = postgres_server.create_database()
    node = RegistryNode(pki, tmp_path, "beta", registry={"url": postgres_server.url(database)})
    try:
        register_corpus(node, pki)
        client = QueryClient(pki, "iti38", node.gateway.endpoint_urls()["iti38"])
        payload = client.query(
            adhoc(
                Q.GET_FOLDERS_FOR_DOCUMENT,
                [(f"{DE}EntryUUID", quoted(U("report2")))],
                home=node.home,
            )
        )
        assert names(objects_of(payload)) == ["folder"]
        payload = client.query(adhoc(Q.FIND_DOCUMENTS, FIND_A))
        assert names(objects_of(payload)) == APPROVED_A
    finally:
        node.close()
        postgres_server.drop_database(database)
