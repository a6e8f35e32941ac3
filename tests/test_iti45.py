"""ITI-45 PIXV3 Query: our consumer against our cross-reference-table PIX Manager over real
mutual-TLS gateways, the error cases of ITI TF-2 3.45.4.2.3, and message shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.test_iti55 import attrs, children, in_schema_order, install, tls_of
from tests.test_server import consumer, fault_of, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import SOAP12, WSA
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.soap_service import SoapRequest, SoapResponse
from xca_gateway.protocol.tls import gateway_client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import OutboundConfig
from xca_gateway.transactions import iti45
from xca_gateway.transactions.hl7v3 import HL7, II, Device, Hl7v3Error
from xca_gateway.xds.patient_id import PatientId

AA1 = "1.3.6.1.4.1.21367.13.20.1000"
AA2 = "1.3.6.1.4.1.21367.13.20.2000"
AA3 = "1.3.6.1.4.1.21367.13.20.3000"
MANAGER = "1.3.6.1.4.1.21367.13.99.1"


def h(local: str) -> str:
    return f"{{{HL7}}}{local}"


@pytest.fixture
async def peer_client(pki: DevPki) -> AsyncIterator[PeerClient]:
    client = PeerClient(gateway_client_context(tls_of(pki, "alpha")), OutboundConfig())
    yield client
    await client.aclose()


@pytest.fixture
def manager(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> dict[str, Any]:
    """Community gamma's gateway acting as PIX Manager over its cross-reference table."""
    csv = tmp_path / "mpi.csv"
    csv.write_text(
        "# alice: everywhere; bob: only in 1 and 2; carol: two ids in domain 2 (a duplicate)\n"
        f"A1^^^&{AA1}&ISO,A2^^^&{AA2}&ISO,A3^^^&{AA3}&ISO\n"
        f"B1^^^&{AA1}&ISO,B2^^^&{AA2}&ISO\n"
        f"C1^^^&{AA1}&ISO,C2^^^&{AA2}&ISO,C2b^^^&{AA2}&ISO\n"
        f"D1^^^&{AA1}&ISO\n",
        encoding="utf-8",
    )
    gamma = gateway_factory("gamma", patient_mapping={"xref_csv": str(csv)})
    url = install(gamma, iti45.endpoint(iti45.iti45_handler(gamma.xref, manager_id=MANAGER)))
    return {"gateway": gamma, "url": url}


async def query(peer_client: PeerClient, url: str, patient: PatientId, target: str) -> Any:
    return await iti45.pix_query(
        peer_client, url, patient, target, sender_id="1.3.6.1.4.1.21367.13.70.1", deadline=10
    )


def raw_query(patient: PatientId, *sources: str) -> etree._Element:
    return iti45.build_query(
        patient, sources, sender=Device(II("1.2.3.1")), receiver=Device(II(MANAGER))
    )


def post(pki: DevPki, url: str, payload: etree._Element | str, action: str = iti45.ACTION) -> Any:
    body = payload if isinstance(payload, str) else etree.tostring(payload).decode()
    with consumer(pki) as client:
        return client.post(
            url, content=soap12(action, body), headers={"content-type": "application/soap+xml"}
        )


def response_payload(response: Any) -> etree._Element:
    assert response.status_code == 200, response.text
    root = etree.fromstring(response.content)
    assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}Action") == iti45.RESPONSE_ACTION
    payload = root.find(f"{{{SOAP12}}}Body/{h(iti45.RESPONSE)}")
    assert payload is not None
    return payload


def codes(payload: etree._Element) -> tuple[str, str]:
    ack = payload.find(f"{h('acknowledgement')}/{h('typeCode')}")
    qr = payload.find(f"{h('controlActProcess')}/{h('queryAck')}/{h('queryResponseCode')}")
    assert ack is not None and qr is not None
    return ack.get("code", ""), qr.get("code", "")


def detail(payload: etree._Element) -> tuple[str, str, str]:
    el = payload.find(f"{h('acknowledgement')}/{h('acknowledgementDetail')}")
    assert el is not None
    code = el.find(h("code"))
    assert code is not None
    return code.get("code", ""), code.get("codeSystem", ""), el.findtext(h("location")) or ""


# ---------------------------------------------------------------------------- over mTLS


async def test_pix_query_finds_the_id_in_the_target_domain(
    manager: dict[str, Any], peer_client: PeerClient
) -> None:
    assert await query(peer_client, manager["url"], PatientId("A1", AA1), AA2) == PatientId(
        "A2", AA2
    )
    assert await query(peer_client, manager["url"], PatientId("A2", AA2), AA3) == PatientId(
        "A3", AA3
    )


async def test_known_patient_without_an_id_in_the_domain_is_not_found(
    manager: dict[str, Any], peer_client: PeerClient, pki: DevPki
) -> None:
    assert await query(peer_client, manager["url"], PatientId("B1", AA1), AA3) is None
    payload = response_payload(post(pki, manager["url"], raw_query(PatientId("B1", AA1), AA3)))
    assert codes(payload) == ("AA", "NF")
    assert payload.find(f".//{h('registrationEvent')}") is None


async def test_unknown_patient_is_none_and_answered_ae_204(
    manager: dict[str, Any], peer_client: PeerClient, pki: DevPki
) -> None:
    assert await query(peer_client, manager["url"], PatientId("ZZ", AA1), AA2) is None
    payload = response_payload(post(pki, manager["url"], raw_query(PatientId("ZZ", AA1), AA2)))
    assert codes(payload) == ("AE", "AE")
    assert detail(payload) == (
        "204",
        "2.16.840.1.113883.12.357",
        "/PRPA_IN201309UV02/controlActProcess/queryByParameter/parameterList/"
        "patientIdentifier/value",
    )


async def test_unknown_domain_is_answered_ae_204_at_the_data_source(
    manager: dict[str, Any], pki: DevPki
) -> None:
    payload = response_payload(
        post(pki, manager["url"], raw_query(PatientId("A1", AA1), AA2, "1.2.3.999"))
    )
    assert codes(payload) == ("AE", "AE")
    code, _, location = detail(payload)
    assert code == "204" and location.endswith("/dataSource[2]/value")


async def test_two_ids_in_the_target_domain_are_not_guessed_between(
    manager: dict[str, Any], peer_client: PeerClient, pki: DevPki
) -> None:
    assert await query(peer_client, manager["url"], PatientId("C1", AA1), AA2) is None
    payload = response_payload(post(pki, manager["url"], raw_query(PatientId("C1", AA1), AA2)))
    assert codes(payload) == ("AA", "OK")
    ids = payload.findall(f".//{h('patient')}/{h('id')}")
    assert sorted(i.get("extension", "") for i in ids) == ["C2", "C2b"]


def test_ok_response_lists_the_other_ids_with_the_manager_as_custodian(
    manager: dict[str, Any], pki: DevPki
) -> None:
    request = raw_query(PatientId("A1", AA1))  # no data source: every other domain
    payload = response_payload(post(pki, manager["url"], request))
    assert codes(payload) == ("AA", "OK")
    patient = payload.find(f".//{h('registrationEvent')}/{h('subject1')}/{h('patient')}")
    assert patient is not None
    # The queried id itself is not returned.
    assert [attrs(i) for i in patient.findall(h("id"))] == [
        {"root": AA2, "extension": "A2"},
        {"root": AA3, "extension": "A3"},
    ]
    name = patient.find(f"{h('patientPerson')}/{h('name')}")
    assert name is not None and name.get("nullFlavor") == "NA"
    custodian = payload.find(f".//{h('custodian')}/{h('assignedEntity')}/{h('id')}")
    assert custodian is not None and custodian.get("root") == MANAGER
    sender = payload.find(f"{h('sender')}/{h('device')}/{h('id')}")
    assert sender is not None and sender.get("root") == MANAGER
    target = payload.find(f"{h('acknowledgement')}/{h('targetMessage')}/{h('id')}")
    request_id = request.find(h("id"))
    assert target is not None and request_id is not None
    assert target.get("root") == request_id.get("root")
    echoed = payload.find(f"{h('controlActProcess')}/{h('queryByParameter')}")
    assert echoed is not None


# ---------------------------------------------------------------------------- bad input


def test_missing_patient_identifier_is_a_query_error(manager: dict[str, Any], pki: DevPki) -> None:
    request = raw_query(PatientId("A1", AA1), AA2)
    params = request.find(f".//{h('parameterList')}")
    identifier = request.find(f".//{h('patientIdentifier')}")
    assert params is not None and identifier is not None
    params.remove(identifier)
    payload = response_payload(post(pki, manager["url"], request))
    assert codes(payload) == ("AE", "QE")
    assert detail(payload)[0] == "SYN100"


def test_patient_identifier_without_extension_is_a_query_error(
    manager: dict[str, Any], pki: DevPki
) -> None:
    request = raw_query(PatientId("A1", AA1), AA2)
    value = request.find(f".//{h('patientIdentifier')}/{h('value')}")
    assert value is not None
    del value.attrib["extension"]
    payload = response_payload(post(pki, manager["url"], request))
    assert codes(payload) == ("AE", "QE")
    code, _, location = detail(payload)
    assert code == "SYN102" and location.endswith("patientIdentifier/value")


def test_an_identifier_outside_any_oid_domain_is_unknown(
    manager: dict[str, Any], pki: DevPki
) -> None:
    request = raw_query(PatientId("A1", AA1), AA2)
    value = request.find(f".//{h('patientIdentifier')}/{h('value')}")
    assert value is not None
    value.set("root", "HOSPITAL-A")
    payload = response_payload(post(pki, manager["url"], request))
    assert codes(payload) == ("AE", "AE")
    assert detail(payload)[0] == "204"


def test_a_non_pix_payload_gets_a_sender_fault(manager: dict[str, Any], pki: DevPki) -> None:
    response = post(pki, manager["url"], f'<PRPA_IN201305UV02 xmlns="{HL7}"/>')
    assert response.status_code == 400
    code, _, reason = fault_of(response)
    assert code == "soap:Sender" and "PRPA_IN201309UV02" in reason


async def test_an_error_other_than_unknown_raises_pix_error(
    gateway_factory: Callable[..., Gateway], peer_client: PeerClient
) -> None:
    broken = gateway_factory("beta")

    async def handle(request: SoapRequest) -> SoapResponse:
        payload = iti45.build_response(
            request.payload,
            sender=Device(II(MANAGER)),
            custodian=MANAGER,
            error=Hl7v3Error("database down"),
        )
        return SoapResponse(payload, iti45.RESPONSE_ACTION)

    url = install(broken, iti45.endpoint(handle))
    with pytest.raises(iti45.PixError, match="INTERR: database down"):
        await query(peer_client, url, PatientId("A1", AA1), AA2)


# ---------------------------------------------------------------------------- shapes (sans-IO)

WRAPPER = ["id", "creationTime", "interactionId", "processingCode", "processingModeCode"]
WRAPPER += ["acceptAckCode", "receiver", "sender", "acknowledgement", "controlActProcess"]


def test_query_shape() -> None:
    request = raw_query(PatientId("A1", AA1), AA2, AA3)
    assert request.tag == h(iti45.QUERY) and request.get("ITSVersion") == "XML_1.0"
    assert in_schema_order(children(request), WRAPPER)
    interaction = request.find(h("interactionId"))
    assert interaction is not None and interaction.get("extension") == iti45.QUERY
    control_act = request.find(h("controlActProcess"))
    assert control_act is not None and children(control_act) == ["code", "queryByParameter"]
    trigger = control_act.find(h("code"))
    assert trigger is not None and trigger.get("code") == iti45.QUERY_TRIGGER
    qbp = control_act.find(h("queryByParameter"))
    assert qbp is not None
    assert children(qbp) == ["queryId", "statusCode", "responsePriorityCode", "parameterList"]
    params = qbp.find(h("parameterList"))
    assert params is not None
    assert children(params) == ["dataSource", "dataSource", "patientIdentifier"]
    assert [s.get("root") for s in params.iterfind(f"{h('dataSource')}/{h('value')}")] == [
        AA2,
        AA3,
    ]
    value = params.find(f"{h('patientIdentifier')}/{h('value')}")
    assert value is not None and attrs(value) == {"root": AA1, "extension": "A1"}


def test_response_shape_and_round_trip() -> None:
    request = raw_query(PatientId("A1", AA1), AA2)
    response = iti45.build_response(
        request, sender=Device(II(MANAGER)), custodian=MANAGER, identifiers=[PatientId("A2", AA2)]
    )
    assert in_schema_order(children(response), WRAPPER)
    control_act = response.find(h("controlActProcess"))
    assert control_act is not None
    assert children(control_act) == ["code", "subject", "queryAck", "queryByParameter"]
    event = control_act.find(f"{h('subject')}/{h('registrationEvent')}")
    assert event is not None
    assert children(event) == ["id", "statusCode", "subject1", "custodian"]
    parsed = iti45.parse_response(response)
    assert parsed.acknowledgement.query_response_code == "OK"
    assert parsed.identifiers == (PatientId("A2", AA2),)
    assert iti45.select_identifier(parsed, PatientId("A1", AA1), AA2) == PatientId("A2", AA2)
    assert iti45.select_identifier(parsed, PatientId("A1", AA1), AA3) is None
