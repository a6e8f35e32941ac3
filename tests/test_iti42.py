"""ITI-42 Register Document Set-b through the running gateway, with a zeep client built from
the IHE ``iti42.wsdl`` over mutual TLS.

Also home of the helpers the ITI-18/ITI-38 tests share: a gateway with the registry's
handlers installed (:class:`RegistryNode`) and zeep clients for the registry transactions.
zeep cannot build or read ebRIM's substitution-group content (RegistryObjectList members), so
the ITI-42 client swaps in the prepared SubmitObjectsRequest in an egress plugin, and query
answers are read raw; envelope, addressing and action still come from the WSDL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import zeep.plugins
import zeep.transports
from lxml import etree

from tests.conftest import GatewayThread, make_config
from tests.test_registry_corpus import (
    PID_A,
    PID_B,
    REPOSITORY,
    U,
    adhoc,
    assert_schema_valid,
    corpus_submissions,
    listed,
    names,
    quoted,
)
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import RIM, RS, SOAP12, Action, ResponseStatus
from xca_gateway.protocol.soap_service import Operation, SoapEndpoint
from xca_gateway.protocol.wsdl import BINDINGS, WSDL_DIR, wsdl_path
from xca_gateway.registry import Registry, RegistryAction, open_registry, parse_registry_config
from xca_gateway.registry.builder import (
    DocumentEntrySpec,
    SubmissionSetSpec,
    build_submit_objects_request,
    kos_document_entry,
)
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.transactions.iti18 import registry_stored_query_handler
from xca_gateway.transactions.iti38 import iti38_handler
from xca_gateway.transactions.iti42 import iti42_handler
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId

T = TypeVar("T")

# zeep is untyped; its clients are used as Any.
Client: Any = zeep.Client
HistoryPlugin: Any = zeep.plugins.HistoryPlugin
Transport: Any = zeep.transports.Transport

REGISTRY_ITI18 = "/registry/iti18"
REGISTRY_ITI42 = "/registry/iti42"
ITI42_BINDING = "{urn:ihe:iti:xds-b:2007}DocumentRegistry_Binding_Soap12"

_RS_SCHEMA: etree.XMLSchema | None = None


def rs_schema() -> etree.XMLSchema:
    global _RS_SCHEMA
    if _RS_SCHEMA is None:
        _RS_SCHEMA = etree.XMLSchema(etree.parse(str(WSDL_DIR / "schema/ebRS30/rs.xsd")))
    return _RS_SCHEMA


class RegistryNode:
    """A running gateway whose registry handlers are installed the way the lead wires them:
    ITI-38 at /xca/iti38, ITI-18 at /ig/iti18 and /registry/iti18, ITI-42 at /registry/iti42."""

    def __init__(
        self,
        pki: DevPki,
        tmp: Path,
        name: str = "alpha",
        registry: dict[str, Any] | None = None,
        unknown_patient: str = "empty",
    ) -> None:
        self.thread = GatewayThread(make_config(pki, tmp, name))
        self.gateway: Gateway = self.thread.__enter__()
        self.home = self.gateway.config.community.home_community_id
        try:
            config = parse_registry_config(registry or {}, tmp, tmp / f"{name}-data")
            self.registry: Registry = self.run(
                open_registry(config, peer_client=self.gateway.peer_client)
            )
            self.install(unknown_patient)
        except BaseException:
            self.thread.__exit__(None, None, None)
            raise

    def install(self, unknown_patient: str) -> None:
        gateway, registry, home = self.gateway, self.registry, self.home
        query = registry_stored_query_handler(registry, home_community_id=home)
        gateway.endpoints["iti18"].add(Operation(Action.ITI18, "ITI-18", query))
        gateway.endpoints["iti38"].add(
            Operation(
                Action.ITI38,
                "ITI-38",
                iti38_handler(registry, home_community_id=home, unknown_patient=unknown_patient),
            )
        )
        local = SoapEndpoint(REGISTRY_ITI18, "registry-iti18", {})
        local.add(Operation(Action.ITI18, "ITI-18", query))
        register = SoapEndpoint(REGISTRY_ITI42, "registry-iti42", {})
        register.add(Operation(RegistryAction.ITI42, "ITI-42", iti42_handler(registry)))
        gateway.soap.endpoints[REGISTRY_ITI18] = local
        gateway.soap.endpoints[REGISTRY_ITI42] = register

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run on the gateway's loop (the peer client belongs to it)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.thread.loop).result(60)

    def url(self, path: str) -> str:
        return self.gateway.base_url + path

    def close(self) -> None:
        try:
            self.run(self.registry.close())
        finally:
            self.thread.__exit__(None, None, None)


def session(pki: DevPki) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would replace our CA
    s.cert = (str(pki.client.cert), str(pki.client.key))
    s.verify = str(pki.ca)
    # No idle keep-alive connections left for the gateway to wait on when it stops.
    s.headers["Connection"] = "close"
    return s


class _SwapBody(zeep.plugins.Plugin):
    """Send the prepared payload in place of zeep's rendering of the operation's input."""

    def __init__(self) -> None:
        self.payload: etree._Element | None = None

    def egress(self, envelope: Any, http_headers: Any, operation: Any, binding_options: Any) -> Any:
        if self.payload is not None:
            body = envelope.find(f"{{{SOAP12}}}Body")
            body.replace(body[0], self.payload)
        return envelope, http_headers


class Iti42Client:
    def __init__(self, pki: DevPki, url: str) -> None:
        self.swap = _SwapBody()
        self.history = HistoryPlugin()
        client = Client(
            str(WSDL_DIR / "iti42.wsdl"),
            transport=Transport(session=session(pki)),
            plugins=[self.swap, self.history],
        )
        self.operation = getattr(
            client.create_service(ITI42_BINDING, url), "DocumentRegistry_RegisterDocumentSet-b"
        )

    def register(self, request: etree._Element) -> Any:
        """Register; return zeep's RegistryResponse (the raw answer is schema-checked)."""
        self.swap.payload = request
        result = self.operation(RegistryObjectList={})
        envelope = self.history.last_received["envelope"]
        payload = envelope.find(f"{{{SOAP12}}}Body/{{{RS}}}RegistryResponse")
        assert payload is not None
        schema = rs_schema()
        assert schema.validate(payload), schema.error_log
        return result


def error_codes(result: Any) -> list[str]:
    if result.RegistryErrorList is None:
        return []
    return [e.errorCode for e in result.RegistryErrorList.RegistryError]


class QueryClient:
    """ITI-18 or ITI-38 from the IHE WSDL; answers are returned as checked lxml payloads."""

    def __init__(self, pki: DevPki, key: str, url: str) -> None:
        self.client = Client(str(wsdl_path(key)), transport=Transport(session=session(pki)))
        service = self.client.create_service(BINDINGS[key][1], url)
        self.operation = getattr(
            service,
            "RespondingGateway_CrossGatewayQuery"
            if key == "iti38"
            else "DocumentRegistry_RegistryStoredQuery",
        )

    @staticmethod
    def arguments(request: etree._Element) -> dict[str, Any]:
        """zeep keyword arguments for the AdhocQueryRequest built by tests.adhoc()."""
        option = request.find("{urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0}ResponseOption")
        query = request.find(f"{{{RIM}}}AdhocQuery")
        assert option is not None and query is not None
        slots = [
            {
                "name": slot.get("name"),
                "ValueList": {
                    "_value_1": [
                        {"Value": v.text}
                        for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
                    ]
                },
            }
            for slot in query.iterfind(f"{{{RIM}}}Slot")
        ]
        adhoc_query: dict[str, Any] = {"id": query.get("id"), "Slot": slots}
        if query.get("home"):
            adhoc_query["home"] = query.get("home")
        return {
            "ResponseOption": {
                "returnType": option.get("returnType"),
                "returnComposedObjects": True,
            },
            "AdhocQuery": adhoc_query,
        }

    def query(self, request: etree._Element) -> etree._Element:
        """Send; return the schema-valid query:AdhocQueryResponse."""
        with self.client.settings(raw_response=True):
            response = self.operation(**self.arguments(request))
        assert response.status_code == 200, response.text[:500]
        envelope = etree.fromstring(response.content)
        payload = envelope.find(f"{{{SOAP12}}}Body")[0]  # type: ignore[index]
        assert_schema_valid(payload)
        return payload

    def query_parsed(self, request: etree._Element) -> Any:
        """Send and let zeep read the answer (possible when it holds no registry objects)."""
        return self.operation(**self.arguments(request))


def objects_of(payload: etree._Element) -> list[etree._Element]:
    object_list = payload.find(f"{{{RIM}}}RegistryObjectList")
    return list(object_list) if object_list is not None else []


def errors_of(payload: etree._Element) -> list[etree._Element]:
    return payload.findall(f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError")


# ----------------------------------------------------------------------------------- tests


@pytest.fixture
def node(pki: DevPki, tmp_path: Path) -> Iterator[RegistryNode]:
    started = RegistryNode(pki, tmp_path)
    yield started
    started.close()


def counts(node: RegistryNode) -> dict[str, int]:
    counted: dict[str, int] = node.run(node.registry.store.counts())  # type: ignore[attr-defined]
    return counted


def test_register_the_corpus_and_query_it_back(node: RegistryNode, pki: DevPki) -> None:
    client = Iti42Client(pki, node.url(REGISTRY_ITI42))
    for request in corpus_submissions():
        result = client.register(request)
        assert result.status == ResponseStatus.SUCCESS, error_codes(result)
        assert result.RegistryErrorList is None
    assert counts(node)["DocumentEntry"] == 8
    payload = QueryClient(pki, "iti18", node.url(REGISTRY_ITI18)).query(
        adhoc(
            StoredQueryId.FIND_DOCUMENTS,
            [
                ("$XDSDocumentEntryPatientId", quoted(PID_A)),
                (
                    "$XDSDocumentEntryStatus",
                    listed("urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"),
                ),
            ],
        )
    )
    assert names(objects_of(payload)) == ["kos_ct", "kos_mr", "report2", "addendum", "pdf"]


def test_a_kos_manifest_with_symbolic_ids(node: RegistryNode, pki: DevPki) -> None:
    manifest = kos_document_entry(
        patient_id=PID_B,
        sop_instance_uid="1.2.826.0.1.3680043.10.11.1",
        study_instance_uid="1.2.826.0.1.3680043.10.11",
        repository_unique_id=REPOSITORY,
        accession=("ACC-9", "1.3.6.1.4.1.21367.13.20.1000"),
    )
    request = build_submit_objects_request(
        SubmissionSetSpec(PID_B, "1.2.826.0.1.3680043.10.12"), [manifest]
    )
    result = Iti42Client(pki, node.url(REGISTRY_ITI42)).register(request)
    assert result.status == ResponseStatus.SUCCESS
    assert counts(node) == {"DocumentEntry": 1, "SubmissionSet": 1, "Folder": 0, "Association": 1}


def _broken(kind: str) -> etree._Element:
    spec = DocumentEntrySpec(PID_A, "1.2.826.0.1.3680043.10.13.1", repository_unique_id=REPOSITORY)
    if kind == "patient":
        spec.patient_id = PID_B
    request = build_submit_objects_request(
        SubmissionSetSpec(PID_A, "1.2.826.0.1.3680043.10.13.2"), [spec]
    )
    eo = request.find(f".//{{{RIM}}}ExtrinsicObject")
    assert eo is not None
    if kind == "mime":
        del eo.attrib["mimeType"]
    elif kind == "sql":
        for ei in eo.iterfind(f"{{{RIM}}}ExternalIdentifier"):
            if ei.get("value") == PID_A:
                ei.set("value", "x'); DROP TABLE registry_object; --")
    elif kind == "replace-unknown":
        assoc = etree.SubElement(
            request[0],
            f"{{{RIM}}}Association",
            id="r",
            associationType="urn:ihe:iti:2007:AssociationType:RPLC",
            sourceObject="Document01",
            targetObject="urn:uuid:00000000-0000-4000-8000-000000000000",
        )
        assert assoc is not None
    return request


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("mime", ErrorCode.REGISTRY_METADATA_ERROR),
        ("patient", ErrorCode.PATIENT_ID_DOES_NOT_MATCH),
        ("sql", ErrorCode.REGISTRY_METADATA_ERROR),
        ("replace-unknown", ErrorCode.REGISTRY_METADATA_ERROR),
    ],
)
def test_bad_submissions_are_refused_and_change_nothing(
    node: RegistryNode, pki: DevPki, kind: str, code: str
) -> None:
    client = Iti42Client(pki, node.url(REGISTRY_ITI42))
    assert client.register(corpus_submissions()[0]).status == ResponseStatus.SUCCESS
    before = counts(node)
    result = client.register(_broken(kind))
    assert result.status == ResponseStatus.FAILURE
    assert code in error_codes(result)
    assert all(e.severity.endswith(":Error") for e in result.RegistryErrorList.RegistryError)
    assert counts(node) == before


def test_duplicate_registration_is_refused(node: RegistryNode, pki: DevPki) -> None:
    client = Iti42Client(pki, node.url(REGISTRY_ITI42))
    assert client.register(corpus_submissions()[0]).status == ResponseStatus.SUCCESS
    before = counts(node)
    result = client.register(corpus_submissions()[0])
    assert result.status == ResponseStatus.FAILURE
    assert set(error_codes(result)) >= {
        ErrorCode.REGISTRY_METADATA_ERROR,
        ErrorCode.DUPLICATE_UNIQUE_ID_IN_REGISTRY,
    }
    assert counts(node) == before


def test_a_payload_that_is_not_a_submission_gets_a_registry_response(
    node: RegistryNode, pki: DevPki
) -> None:
    client = Iti42Client(pki, node.url(REGISTRY_ITI42))
    result = client.register(adhoc(StoredQueryId.GET_DOCUMENTS, [("$uuid", listed(U("x")))]))
    assert result.status == ResponseStatus.FAILURE
    assert error_codes(result) == [ErrorCode.REGISTRY_METADATA_ERROR]
