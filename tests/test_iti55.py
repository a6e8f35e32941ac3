"""ITI-55 XCPD: our initiating side against our responding side over real mutual-TLS gateways,
error answers, and the shape of the HL7 v3 messages."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.test_server import consumer, fault_of, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.patients.directory import Address, Demographics, PatientDirectory, PatientRecord
from xca_gateway.protocol.namespaces import QUERY, SOAP12, WSA
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.soap_service import Handler, SoapEndpoint, SoapRequest, SoapResponse
from xca_gateway.protocol.tls import gateway_client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import OutboundConfig, TlsConfig
from xca_gateway.transactions import iti55
from xca_gateway.transactions.hl7v3 import HL7, II, XSI, Device, Hl7v3Error
from xca_gateway.xds.patient_id import PatientId

ALPHA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.1"
ALPHA_AA = "1.3.6.1.4.1.21367.13.20.1000"
BETA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
BETA_AA = "1.3.6.1.4.1.21367.13.20.2000"

ALICE = Demographics(family="Lindqvist", given="Alice", birth_date="19620314", gender="F")
CAROL = Demographics(family="Berg", given="Carol", birth_date="19880527", gender="F")
DAVE = Demographics(family="Johansen", given="Dave", birth_date="19490830", gender="M")


def h(local: str) -> str:
    return f"{{{HL7}}}{local}"


def children(el: etree._Element) -> list[str]:
    return [etree.QName(c).localname for c in el if isinstance(c.tag, str)]


def attrs(el: etree._Element) -> dict[str, str]:
    return {str(k): str(v) for k, v in el.attrib.items()}


def in_schema_order(names: list[str], sequence: list[str]) -> bool:
    """``names`` (repeats allowed) follow the order of the XSD ``sequence``."""
    positions = [sequence.index(n) for n in names]
    return positions == sorted(positions)


def install(gateway: Gateway, endpoint: SoapEndpoint) -> str:
    """Serve ``endpoint`` on a running gateway; returns its URL."""
    gateway.endpoints[endpoint.name] = endpoint
    gateway.soap.endpoints[endpoint.path] = endpoint
    return gateway.base_url + endpoint.path


def tls_of(pki: DevPki, name: str) -> TlsConfig:
    pair = pki.communities[name]
    return TlsConfig(certificate=pair.cert, private_key=pair.key, trust_store=pki.ca)


@pytest.fixture
async def peer_client(pki: DevPki) -> AsyncIterator[PeerClient]:
    """The alpha community's outbound mTLS client."""
    client = PeerClient(gateway_client_context(tls_of(pki, "alpha")), OutboundConfig())
    yield client
    await client.aclose()


@pytest.fixture
def responder(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Community beta answering XCPD from its patient directory (learning into its xref)."""
    beta = gateway_factory("beta")
    directory = PatientDirectory(tmp_path / "beta-patients.sqlite3")
    directory.register(PatientId("C02-2001", BETA_AA), ALICE)
    # Two records that look like the same person (a duplicate): never a single answer.
    directory.register(PatientId("C02-2003", BETA_AA), CAROL)
    directory.register(PatientId("C02-2099", BETA_AA), CAROL)
    directory.register(
        PatientId("C02-2004", BETA_AA),
        Demographics(family="Johansen", given="Dave", birth_date="19490830"),
    )
    handler = iti55.iti55_handler(
        directory, home_community_id=BETA_HOME, assigning_authority=BETA_AA, xref=beta.xref
    )
    url = install(beta, iti55.endpoint(handler))
    yield {"gateway": beta, "url": url, "directory": directory}
    directory.close()


async def ask(
    peer_client: PeerClient, url: str, demographics: Demographics, **kw: Any
) -> PatientId | None:
    return await iti55.discover(
        peer_client,
        url,
        demographics,
        home_community_id=ALPHA_HOME,
        assigning_authority=ALPHA_AA,
        peer_home_community_id=BETA_HOME,
        peer_authority=BETA_AA,
        peer_name="beta",
        deadline=10,
        **kw,
    )


def raw_query(demographics: Demographics = ALICE, **kw: Any) -> etree._Element:
    return iti55.build_query(
        demographics,
        sender=Device(II("1.3.6.1.4.1.21367.13.70.1"), organization="1.3.6.1.4.1.21367.13.70.1"),
        receiver=Device(II("1.3.6.1.4.1.21367.13.70.2"), organization="1.3.6.1.4.1.21367.13.70.2"),
        community_authority=ALPHA_AA,
        **kw,
    )


def post(pki: DevPki, url: str, payload: etree._Element | str, action: str = iti55.ACTION) -> Any:
    body = payload if isinstance(payload, str) else etree.tostring(payload).decode()
    with consumer(pki) as client:
        return client.post(
            url, content=soap12(action, body), headers={"content-type": "application/soap+xml"}
        )


def response_payload(response: Any) -> etree._Element:
    assert response.status_code == 200, response.text
    root = etree.fromstring(response.content)
    action = root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}Action")
    assert action == iti55.RESPONSE_ACTION
    payload = root.find(f"{{{SOAP12}}}Body/{h(iti55.RESPONSE)}")
    assert payload is not None
    return payload


def codes(payload: etree._Element) -> tuple[str, str]:
    ack = payload.find(f"{h('acknowledgement')}/{h('typeCode')}")
    qr = payload.find(f"{h('controlActProcess')}/{h('queryAck')}/{h('queryResponseCode')}")
    assert ack is not None and qr is not None
    return ack.get("code", ""), qr.get("code", "")


# ---------------------------------------------------------------------------- over mTLS


async def test_single_match_gives_the_peer_id_and_the_peer_records_ours(
    responder: dict[str, Any], peer_client: PeerClient
) -> None:
    local = PatientId("C01-1001", ALPHA_AA)
    # Names differ in case and diacritics from the peer's record: still the same person.
    query = Demographics(family="LINDQVÍST", given="alice", birth_date="19620314", gender="F")
    found = await ask(peer_client, responder["url"], query, patient_id=local)
    assert found == PatientId("C02-2001", BETA_AA)
    # "Query and feed": beta now knows alpha's id for the patient...
    beta: Gateway = responder["gateway"]
    assert beta.xref.lookup(found, ALPHA_AA) == local
    # ...so alpha's id alone finds the patient next time, without demographics.
    again = await ask(peer_client, responder["url"], Demographics(identifiers=(local,)))
    assert again == found


async def test_unknown_patient_is_not_found(
    responder: dict[str, Any], peer_client: PeerClient
) -> None:
    nobody = Demographics(family="Nobody", given="Nemo", birth_date="20000101", gender="M")
    assert await ask(peer_client, responder["url"], nobody) is None


async def test_two_candidates_are_no_answer(
    responder: dict[str, Any], peer_client: PeerClient, pki: DevPki
) -> None:
    assert await ask(peer_client, responder["url"], CAROL) is None
    payload = response_payload(post(pki, responder["url"], raw_query(CAROL)))
    assert codes(payload) == ("AA", "NF")
    assert payload.find(f".//{h('registrationEvent')}") is None


async def test_a_near_match_without_gender_asks_for_the_gender(
    responder: dict[str, Any], peer_client: PeerClient, pki: DevPki
) -> None:
    no_gender = Demographics(family="Lindqvist", given="Alice", birth_date="19620314")
    assert await ask(peer_client, responder["url"], no_gender) is None
    payload = response_payload(post(pki, responder["url"], raw_query(no_gender)))
    assert codes(payload) == ("AA", "NF")
    management = payload.find(
        f"{h('controlActProcess')}/{h('reasonOf')}/{h('detectedIssueEvent')}"
        f"/{h('mitigatedBy')}/{h('detectedIssueManagement')}/{h('code')}"
    )
    assert management is not None
    assert management.get("code") == iti55.GENDER_REQUESTED
    assert management.get("codeSystem") == iti55.MORE_ATTRIBUTES_CODE_SYSTEM


async def test_a_record_without_gender_is_not_matched_on_demographics(
    responder: dict[str, Any], peer_client: PeerClient
) -> None:
    assert await ask(peer_client, responder["url"], DAVE) is None
    # But the peer's own identifier is an exact-identifier match.
    found = await ask(
        peer_client, responder["url"], Demographics(identifiers=(PatientId("C02-2004", BETA_AA),))
    )
    assert found == PatientId("C02-2004", BETA_AA)


async def test_ok_response_carries_patient_custodian_and_echoed_query(
    responder: dict[str, Any], pki: DevPki
) -> None:
    query = raw_query(ALICE, query_id=II("1.2.3.4", "q-77"))
    payload = response_payload(post(pki, responder["url"], query))
    assert codes(payload) == ("AA", "OK")
    assert payload.get("ITSVersion") == "XML_1.0"
    interaction = payload.find(h("interactionId"))
    assert interaction is not None and interaction.get("extension") == iti55.RESPONSE
    # The acknowledgement names our message, the receiver is our sending device.
    target = payload.find(f"{h('acknowledgement')}/{h('targetMessage')}/{h('id')}")
    request_id = query.find(h("id"))
    assert target is not None and request_id is not None
    assert target.get("root") == request_id.get("root")
    receiver_org = payload.find(
        f"{h('receiver')}/{h('device')}/{h('asAgent')}/{h('representedOrganization')}/{h('id')}"
    )
    assert receiver_org is not None and receiver_org.get("root") == "1.3.6.1.4.1.21367.13.70.1"
    sender_org = payload.find(
        f"{h('sender')}/{h('device')}/{h('asAgent')}/{h('representedOrganization')}/{h('id')}"
    )
    assert sender_org is not None and attrs(sender_org) == {"root": BETA_HOME[8:]}
    events = payload.findall(f"{h('controlActProcess')}/{h('subject')}/{h('registrationEvent')}")
    assert len(events) == 1
    patient = events[0].find(f"{h('subject1')}/{h('patient')}")
    assert patient is not None
    ids = patient.findall(h("id"))
    assert [attrs(i) for i in ids] == [{"root": BETA_AA, "extension": "C02-2001"}]
    status = patient.find(h("statusCode"))
    assert status is not None and status.get("code") == "active"
    person = patient.find(h("patientPerson"))
    assert person is not None
    assert person.findtext(f"{h('name')}/{h('family')}") == "Lindqvist"
    entity = events[0].find(f"{h('custodian')}/{h('assignedEntity')}")
    assert entity is not None
    entity_id = entity.find(h("id"))
    assert entity_id is not None and attrs(entity_id) == {"root": BETA_HOME[8:]}
    hdl = entity.find(h("code"))
    assert hdl is not None and hdl.get("code") == "NotHealthDataLocator"
    assert hdl.get("codeSystem") == iti55.HEALTH_DATA_LOCATOR_CODE_SYSTEM
    score = patient.find(f"{h('subjectOf1')}/{h('queryMatchObservation')}/{h('value')}")
    assert score is not None and score.get(f"{{{XSI}}}type") == "INT"
    query_ack = payload.find(f"{h('controlActProcess')}/{h('queryAck')}/{h('queryId')}")
    assert query_ack is not None and attrs(query_ack) == {
        "root": "1.2.3.4",
        "extension": "q-77",
    }
    echoed = payload.find(f"{h('controlActProcess')}/{h('queryByParameter')}")
    assert echoed is not None
    assert echoed.find(f"{h('parameterList')}/{h('livingSubjectName')}") is not None


# ---------------------------------------------------------------------------- bad input


def test_query_without_name_and_birth_time_is_a_query_error(
    responder: dict[str, Any], pki: DevPki
) -> None:
    query = raw_query()
    params = query.find(f".//{h('parameterList')}")
    assert params is not None
    for local in ("livingSubjectBirthTime", "livingSubjectId"):
        for el in params.findall(h(local)):
            params.remove(el)
    payload = response_payload(post(pki, responder["url"], query))
    assert codes(payload) == ("AE", "QE")
    detail = payload.find(f"{h('acknowledgement')}/{h('acknowledgementDetail')}")
    assert detail is not None
    code = detail.find(h("code"))
    assert code is not None and code.get("code") == "SYN100"
    assert detail.findtext(h("location")) == (
        "/PRPA_IN201305UV02/controlActProcess/queryByParameter/parameterList"
    )
    status = payload.find(f"{h('controlActProcess')}/{h('queryAck')}/{h('statusCode')}")
    assert status is not None and status.get("code") == "aborted"
    assert payload.find(f".//{h('registrationEvent')}") is None


def test_query_with_a_bad_birth_time_is_a_query_error(
    responder: dict[str, Any], pki: DevPki
) -> None:
    query = raw_query()
    birth = query.find(f".//{h('livingSubjectBirthTime')}/{h('value')}")
    assert birth is not None
    birth.set("value", "14.03.1962")
    payload = response_payload(post(pki, responder["url"], query))
    assert codes(payload) == ("AE", "QE")
    location = payload.findtext(
        f"{h('acknowledgement')}/{h('acknowledgementDetail')}/{h('location')}"
    )
    assert location is not None and location.endswith("livingSubjectBirthTime/value")


def test_query_without_query_by_parameter_is_answered_not_faulted(
    responder: dict[str, Any], pki: DevPki
) -> None:
    query = raw_query()
    control_act = query.find(h("controlActProcess"))
    assert control_act is not None
    query.remove(control_act)
    payload = response_payload(post(pki, responder["url"], query))
    assert codes(payload) == ("AE", "QE")


def test_deferred_processing_is_refused(responder: dict[str, Any], pki: DevPki) -> None:
    query = raw_query()
    priority = query.find(f".//{h('responsePriorityCode')}")
    assert priority is not None
    priority.set("code", "D")
    payload = response_payload(post(pki, responder["url"], query))
    assert codes(payload) == ("AE", "AE")
    code = payload.find(f"{h('acknowledgement')}/{h('acknowledgementDetail')}/{h('code')}")
    assert code is not None and code.get("code") == "NS250"
    # The deferred-response action itself is not offered at all.
    code_, subcodes, _ = fault_of(post(pki, responder["url"], raw_query(), iti55.DEFERRED_ACTION))
    assert code_ == "soap:Sender" and subcodes == ["wsa:ActionNotSupported"]


def test_a_non_hl7_payload_gets_a_sender_fault(responder: dict[str, Any], pki: DevPki) -> None:
    response = post(pki, responder["url"], f'<query:AdhocQueryRequest xmlns:query="{QUERY}"/>')
    assert response.status_code == 400
    code, _, reason = fault_of(response)
    assert code == "soap:Sender" and "PRPA_IN201305UV02" in reason


def test_malformed_xml_gets_a_sender_fault(responder: dict[str, Any], pki: DevPki) -> None:
    response = post(pki, responder["url"], f'<PRPA_IN201305UV02 xmlns="{HL7}"><id></PRPA')
    assert response.status_code == 400
    assert fault_of(response)[0] == "soap:Sender"


async def test_an_error_answer_raises_xcpd_error(
    gateway_factory: Callable[..., Gateway], peer_client: PeerClient
) -> None:
    busy = gateway_factory("gamma")

    async def handle(request: SoapRequest) -> SoapResponse:
        error = Hl7v3Error("too busy", issue=("ResponderBusy", iti55.XCPD_ERROR_CODE_SYSTEM))
        payload = iti55.build_response(
            request.payload,
            sender=Device(II("1.3.6.1.4.1.21367.13.70.3")),
            home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.3",
            error=error,
        )
        return SoapResponse(payload, iti55.RESPONSE_ACTION)

    url = install(busy, iti55.endpoint(handle))
    with pytest.raises(iti55.XcpdError, match="ResponderBusy"):
        await ask(peer_client, url, ALICE)


async def test_a_foreign_answer_raises_xcpd_error(
    gateway_factory: Callable[..., Gateway], peer_client: PeerClient
) -> None:
    odd = gateway_factory("gamma")

    async def handle(request: SoapRequest) -> SoapResponse:
        return SoapResponse(etree.Element(f"{{{QUERY}}}AdhocQueryResponse"), "urn:x")

    url = install(odd, iti55.endpoint(handle))
    with pytest.raises(iti55.XcpdError, match="expected PRPA_IN201306UV02"):
        await ask(peer_client, url, ALICE)


# ---------------------------------------------------------------------------- shapes (sans-IO)

# Element sequences of the HL7 v3 NE2008 schemas (PRPA_IN201305UV02 / PRPA_IN201306UV02).
WRAPPER = [
    "id",
    "creationTime",
    "securityText",
    "versionCode",
    "interactionId",
    "profileId",
    "processingCode",
    "processingModeCode",
    "acceptAckCode",
    "sequenceNumber",
    "attachmentText",
    "receiver",
    "respondTo",
    "sender",
    "attentionLine",
    "acknowledgement",
    "controlActProcess",
]
CONTROL_ACT = [
    "id",
    "code",
    "text",
    "effectiveTime",
    "priorityCode",
    "reasonCode",
    "languageCode",
    "overseer",
    "authorOrPerformer",
    "dataEnterer",
    "informationRecipient",
    "subject",
    "reasonOf",
    "queryAck",
    "queryByParameter",
]
QUERY_BY_PARAMETER = [
    "queryId",
    "statusCode",
    "modifyCode",
    "responseElementGroupId",
    "responseModalityCode",
    "responsePriorityCode",
    "initialQuantity",
    "initialQuantityCode",
    "executionAndDeliveryTime",
    "matchCriterionList",
    "parameterList",
    "sortControl",
]
PARAMETER_LIST = [
    "id",
    "livingSubjectAdministrativeGender",
    "livingSubjectBirthPlaceAddress",
    "livingSubjectBirthPlaceName",
    "livingSubjectBirthTime",
    "livingSubjectDeceasedTime",
    "livingSubjectId",
    "livingSubjectName",
    "mothersMaidenName",
    "otherIDsScopingOrganization",
    "patientAddress",
    "patientStatusCode",
    "patientTelecom",
    "principalCareProviderId",
    "principalCareProvisionId",
]
PATIENT = ["id", "addr", "telecom", "statusCode", "effectiveTime", "confidentialityCode"]
PATIENT += ["veryImportantPersonCode", "patientPerson", "providerOrganization", "subjectOf1"]
PERSON = ["id", "name", "desc", "telecom", "administrativeGenderCode", "birthTime"]
PERSON += ["deceasedInd", "deceasedTime", "multipleBirthInd", "multipleBirthOrderNumber"]
PERSON += ["organDonorInd", "addr", "asOtherIDs"]


def full_query() -> etree._Element:
    return raw_query(
        Demographics(
            family="Lindqvist",
            given="Alice",
            birth_date="19620314",
            gender="F",
            address=Address("Storgata 1", "Oslo", None, "0150", "NO"),
            phone="+47 555 1234",
            identifiers=(PatientId("C01-1001", ALPHA_AA), PatientId("123", "2.16.578.1.12.4.1")),
        )
    )


def test_query_shape_follows_the_schema_and_iti55_constraints() -> None:
    query = full_query()
    assert query.tag == h(iti55.QUERY) and query.get("ITSVersion") == "XML_1.0"
    assert in_schema_order(children(query), WRAPPER)
    assert "acknowledgement" not in children(query)
    interaction = query.find(h("interactionId"))
    assert interaction is not None
    assert attrs(interaction) == {"root": "2.16.840.1.113883.1.6", "extension": iti55.QUERY}
    ack_code = query.find(h("acceptAckCode"))
    assert ack_code is not None and ack_code.get("code") == "AL"
    # homeCommunityId: root only, in the sender device's represented organization.
    org = query.find(f"{h('sender')}/{h('device')}/{h('asAgent')}/{h('representedOrganization')}")
    assert org is not None and [attrs(i) for i in org.findall(h("id"))] == [
        {"root": "1.3.6.1.4.1.21367.13.70.1"}
    ]
    control_act = query.find(h("controlActProcess"))
    assert control_act is not None and in_schema_order(children(control_act), CONTROL_ACT)
    trigger = control_act.find(h("code"))
    assert trigger is not None and trigger.get("code") == iti55.QUERY_TRIGGER
    author = control_act.find(f"{h('authorOrPerformer')}/{h('assignedDevice')}/{h('id')}")
    assert author is not None and attrs(author) == {"root": ALPHA_AA}
    qbp = control_act.find(h("queryByParameter"))
    assert qbp is not None and in_schema_order(children(qbp), QUERY_BY_PARAMETER)
    assert {c: qbp.find(h(c)).get("code") for c in ("statusCode", "responseModalityCode")} == {  # type: ignore[union-attr]
        "statusCode": "new",
        "responseModalityCode": "R",
    }
    priority = qbp.find(h("responsePriorityCode"))
    assert priority is not None and priority.get("code") == "I"
    params = qbp.find(h("parameterList"))
    assert params is not None
    assert in_schema_order(children(params), PARAMETER_LIST)
    assert children(params).count("livingSubjectId") == 2
    for parameter in params:
        # Every parameter: its value(s), then one semanticsText.
        assert children(parameter)[-1] == "semanticsText"
    telecom = params.find(f"{h('patientTelecom')}/{h('value')}")
    assert telecom is not None and telecom.get("value") == "tel:+475551234"


def test_query_needs_an_identifier_or_name_and_birth_date() -> None:
    with pytest.raises(ValueError, match="identifier or name and birth date"):
        raw_query(Demographics(family="Lindqvist", given="Alice"))
    only_id = raw_query(Demographics(identifiers=(PatientId("C02-2001", BETA_AA),)))
    assert only_id.find(f".//{h('livingSubjectName')}") is None


def test_response_shape_follows_the_schema() -> None:
    query = full_query()
    record = PatientRecord(
        PatientId("C02-2001", BETA_AA),
        Demographics(
            family="Lindqvist",
            given="Alice",
            birth_date="19620314",
            gender="F",
            address=Address("Storgata 1", "Oslo"),
            phone="+47 555 1234",
        ),
    )
    response = iti55.build_response(
        query,
        sender=Device(II(BETA_HOME[8:]), organization=BETA_HOME[8:]),
        home_community_id=BETA_HOME,
        matches=[(record, 100)],
    )
    assert in_schema_order(children(response), WRAPPER)
    ack_code = response.find(h("acceptAckCode"))
    assert ack_code is not None and ack_code.get("code") == "NE"
    control_act = response.find(h("controlActProcess"))
    assert control_act is not None and in_schema_order(children(control_act), CONTROL_ACT)
    event = control_act.find(f"{h('subject')}/{h('registrationEvent')}")
    assert event is not None
    assert children(event) == ["id", "statusCode", "subject1", "custodian"]
    patient = event.find(f"{h('subject1')}/{h('patient')}")
    assert patient is not None and in_schema_order(children(patient), PATIENT)
    person = patient.find(h("patientPerson"))
    assert person is not None and in_schema_order(children(person), PERSON)
    query_ack = control_act.find(h("queryAck"))
    assert query_ack is not None
    assert children(query_ack) == [
        "queryId",
        "statusCode",
        "queryResponseCode",
        "resultTotalQuantity",
        "resultCurrentQuantity",
        "resultRemainingQuantity",
    ]
    # And our own parser reads back what we wrote.
    parsed = iti55.parse_response(response)
    assert parsed.response_code == "OK"
    assert [(m.patient_id, m.home_community_id, m.score) for m in parsed.matches] == [
        (record.patient_id, BETA_HOME, 100)
    ]
    assert parsed.matches[0].demographics.address == Address("Storgata 1", "Oslo")
    assert parsed.matches[0].demographics.phone == "+475551234"  # as a tel: URI


def test_parse_query_reads_what_build_query_wrote() -> None:
    parsed = iti55.parse_query(full_query())
    d = parsed.demographics
    assert (d.family, d.given, d.birth_date, d.gender) == ("Lindqvist", "Alice", "19620314", "F")
    assert d.address == Address("Storgata 1", "Oslo", None, "0150", "NO")
    assert parsed.community_authority == ALPHA_AA
    assert parsed.initiator_patient_id == PatientId("C01-1001", ALPHA_AA)
    assert parsed.initiating_home_community_id == ALPHA_HOME


def test_parse_query_of_a_third_party_style_request() -> None:
    # Typed name value, family before given, time-of-day in the birth time, no gender.
    xml = f"""<PRPA_IN201305UV02 xmlns="{HL7}" xmlns:xsi="{XSI}" ITSVersion="XML_1.0">
      <id root="1.2.840.114350.1.13.0.1.7.1.1" extension="35423"/>
      <creationTime value="20240417150301"/>
      <interactionId root="2.16.840.1.113883.1.6" extension="PRPA_IN201305UV02"/>
      <processingCode code="T"/><processingModeCode code="T"/><acceptAckCode code="AL"/>
      <receiver typeCode="RCV"><device classCode="DEV" determinerCode="INSTANCE">
        <id root="1.2.840.114350.1.13.999.234"/></device></receiver>
      <sender typeCode="SND"><device classCode="DEV" determinerCode="INSTANCE">
        <id root="1.2.840.114350.1.13.999.567"/>
        <asAgent classCode="AGNT"><representedOrganization classCode="ORG"
          determinerCode="INSTANCE"><id root="1.2.3.928.955"/></representedOrganization>
        </asAgent></device></sender>
      <controlActProcess classCode="CACT" moodCode="EVN">
        <code code="PRPA_TE201305UV02" codeSystem="2.16.840.1.113883.1.6"/>
        <queryByParameter>
          <queryId root="1.2.840.114350.1.13.28.1.18.5.999" extension="18204"/>
          <statusCode code="new"/><responseModalityCode code="R"/>
          <responsePriorityCode code="I"/>
          <parameterList>
            <livingSubjectBirthTime><value value="196308051200"/>
              <semanticsText>LivingSubject.birthTime</semanticsText></livingSubjectBirthTime>
            <livingSubjectId><value nullFlavor="UNK"/>
              <semanticsText>LivingSubject.id</semanticsText></livingSubjectId>
            <livingSubjectName><value xsi:type="PN"><family>Jones</family>
              <given>Jimmy</given><given>J</given></value>
              <semanticsText>LivingSubject.name</semanticsText></livingSubjectName>
          </parameterList>
        </queryByParameter>
      </controlActProcess>
    </PRPA_IN201305UV02>"""
    parsed = iti55.parse_query(etree.fromstring(xml))
    d = parsed.demographics
    assert (d.family, d.given, d.birth_date, d.gender) == ("Jones", "Jimmy", "19630805", None)
    assert d.identifiers == ()
    assert parsed.query_id == II("1.2.840.114350.1.13.28.1.18.5.999", "18204")
    assert parsed.initiating_home_community_id == "urn:oid:1.2.3.928.955"
    assert parsed.community_authority is None and parsed.initiator_patient_id is None


def test_select_match_is_strict() -> None:
    query = raw_query()

    def response_with(*matches: tuple[str, int]) -> iti55.XcpdResponse:
        records = [(PatientRecord(PatientId(i, BETA_AA), ALICE), s) for i, s in matches]
        return iti55.parse_response(
            iti55.build_response(
                query, sender=Device(II("1.2")), home_community_id=BETA_HOME, matches=records
            )
        )

    one = response_with(("C02-2001", 100))
    assert iti55.select_match(one, peer_authority=BETA_AA) == PatientId("C02-2001", BETA_AA)
    # Another community's custodian, another domain, a low score, several: no answer.
    assert iti55.select_match(one, peer_home_community_id=ALPHA_HOME) is None
    assert iti55.select_match(one, peer_authority=ALPHA_AA) is None
    assert iti55.select_match(response_with(("C02-2001", 70))) is None
    assert iti55.select_match(response_with(("C02-2001", 100), ("C02-2002", 100))) is None
    # An answer to another query is an error, not a match.
    with pytest.raises(iti55.XcpdError, match="is for query"):
        iti55.select_match(one, query_id=II("9.9.9", "other"))


def test_a_patient_with_two_ids_in_a_response_is_refused() -> None:
    response = iti55.build_response(
        raw_query(),
        sender=Device(II("1.2")),
        home_community_id=BETA_HOME,
        matches=[(PatientRecord(PatientId("C02-2001", BETA_AA), ALICE), 100)],
    )
    patient = response.find(f".//{h('patient')}")
    assert patient is not None
    patient.insert(1, copy.deepcopy(patient[0]))
    with pytest.raises(iti55.XcpdError, match="2 usable ids"):
        iti55.parse_response(response)


def test_an_id_that_could_break_out_of_a_cx_value_is_refused() -> None:
    response = iti55.build_response(
        raw_query(),
        sender=Device(II("1.2")),
        home_community_id=BETA_HOME,
        matches=[(PatientRecord(PatientId("C02-2001", BETA_AA), ALICE), 100)],
    )
    patient_id = response.find(f".//{h('patient')}/{h('id')}")
    assert patient_id is not None
    patient_id.set("extension", f"X^^^&{ALPHA_AA}&ISO")
    with pytest.raises(iti55.XcpdError, match="0 usable ids"):
        iti55.parse_response(response)
    patient_id.set("extension", "C02-2001")
    patient_id.set("root", "not-an-oid")
    with pytest.raises(iti55.XcpdError, match="0 usable ids"):
        iti55.parse_response(response)


def test_endpoint_serves_only_the_synchronous_action() -> None:
    async def handler(request: SoapRequest) -> SoapResponse:  # pragma: no cover - not called
        raise AssertionError

    handle: Handler = handler
    ep = iti55.endpoint(handle)
    assert ep.path == "/xca/iti55" and set(ep.operations) == {iti55.ACTION}
