"""Gateways audit every transaction on both sides to a real rsyslog over mutual TLS."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.test_initiating import find_documents
from tests.test_server import _handshake, consumer, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit.rsyslog import RsyslogRepository, gtls_available, rsyslogd_path
from xca_gateway.audit.syslog import parse_message
from xca_gateway.audit.validate import schema_errors
from xca_gateway.imaging import remote
from xca_gateway.protocol.namespaces import XDSB, XDSI, Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, generate_study


@pytest.fixture
def rsyslog(pki: DevPki, tmp_path: Path) -> Iterator[RsyslogRepository]:
    if rsyslogd_path() is None:
        pytest.skip("rsyslogd is not installed (Debian package rsyslog)")
    if not gtls_available():
        pytest.skip("rsyslog's TLS driver is not installed (Debian package rsyslog-gnutls)")
    workdir = tmp_path / "arr"
    workdir.mkdir()
    repo = RsyslogRepository(
        workdir, pki.ca, pki.communities["gamma"].cert, pki.communities["gamma"].key
    )
    repo.check_config()
    repo.start()
    yield repo
    repo.stop()


def audited(
    gateway_factory: Callable[..., Gateway],
    rsyslog: RsyslogRepository,
    tmp: Path,
    name: str,
    **extra: object,
) -> Gateway:
    return gateway_factory(
        name,
        storage={"data_dir": str(tmp / name)},
        audit={
            "audit_source_id": f"gw-{name}",
            "destinations": [
                {"name": "arr", "transport": "tls", "host": "127.0.0.1", "port": rsyslog.tls_port}
            ],
        },
        **extra,
    )


def records(rsyslog: RsyslogRepository, count: int) -> list[etree._Element]:
    found = []
    for raw in rsyslog.wait_for(count, timeout=30):
        message = parse_message(raw)
        xml = message.msg[3:] if message.msg.startswith(b"\xef\xbb\xbf") else message.msg
        root = etree.fromstring(xml)
        assert not schema_errors(root), schema_errors(root)
        found.append(root)
    return found


def event(root: etree._Element) -> tuple[str, str, str]:
    ident = root.find("EventIdentification")
    assert ident is not None
    event_id = ident.find("EventID")
    type_code = ident.find("EventTypeCode")
    return (
        event_id.get("csd-code", "") if event_id is not None else "",
        type_code.get("csd-code", "") if type_code is not None else "",
        ident.get("EventOutcomeIndicator", ""),
    )


def source_of(root: etree._Element) -> str:
    for participant in root.iter("ActiveParticipant"):
        if any(r.get("csd-code") == "110153" for r in participant.iter("RoleIDCode")):
            return participant.get("UserID", "")
    return ""


def test_both_sides_of_a_cross_gateway_query_are_audited(
    gateway_factory: Callable[..., Gateway], pki: DevPki, rsyslog: RsyslogRepository, tmp_path: Path
) -> None:
    beta = audited(gateway_factory, rsyslog, tmp_path, "beta")
    alpha = audited(
        gateway_factory,
        rsyslog,
        tmp_path,
        "alpha",
        peers=[
            {
                "name": "beta",
                "home_community_id": beta.config.community.home_community_id,
                "iti38": beta.endpoint_urls()["iti38"],
            }
        ],
    )
    patient = "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    with consumer(pki) as client:
        response = client.post(
            alpha.endpoint_urls()["iti18"],
            content=soap12(Action.ITI18, find_documents(patient)),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200
    # Start/stop of each gateway's application plus: ITI-18 (alpha, serving the consumer),
    # ITI-38 (alpha, initiating) and ITI-38 (beta, responding).
    roots = records(rsyslog, 5)
    queries = [r for r in roots if event(r)[0] == "110112"]
    kinds = sorted(event(r)[1] for r in queries)
    assert kinds == ["ITI-18", "ITI-38", "ITI-38"]
    for root in queries:
        ids = [p.get("ParticipantObjectID") for p in root.iter("ParticipantObjectIdentification")]
        assert patient in ids  # the patient the query was about
    responding = next(
        r
        for r in queries
        if event(r)[1] == "ITI-38"
        and r.find("AuditSourceIdentification").get("AuditSourceID") == "gw-beta"  # type: ignore[union-attr]
    )
    # The responding side names the requesting gateway by its TLS certificate subject.
    assert "alpha.xca-gateway.test" in source_of(responding)
    # beta answered from its (empty) embedded registry: Success, and the audit says so (0).
    assert event(responding)[2] == "0"
    consumer_side = next(r for r in queries if event(r)[1] == "ITI-18")
    assert "consumer" in source_of(consumer_side)
    # Both records of the cross-gateway query say which community answered it: beta.
    beta_home = base64.b64encode(beta.config.community.home_community_id.encode()).decode()
    for root in queries:
        if event(root)[1] == "ITI-38":
            details = {d.get("type"): d.get("value") for d in root.iter("ParticipantObjectDetail")}
            assert details["urn:ihe:iti:xca:2010:homeCommunityId"] == beta_home


def test_refused_handshake_is_a_security_alert(
    gateway_factory: Callable[..., Gateway], pki: DevPki, rsyslog: RsyslogRepository, tmp_path: Path
) -> None:
    alpha = audited(gateway_factory, rsyslog, tmp_path, "alpha")
    ctx = client_context(pki.ca, pki.expired_client.cert, pki.expired_client.key)

    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(alpha.https.port, ctx)
    roots = records(rsyslog, 2)
    alerts = [r for r in roots if event(r)[0] == "110113"]
    assert alerts, [event(r) for r in roots]
    text = etree.tostring(alerts[0]).decode()
    assert "expired" in text
    assert "127.0.0.1" in text


@pytest.mark.parametrize("streamed_request", [False, True])
def test_imaging_retrieve_is_audited_on_both_gateways(
    gateway_factory: Callable[..., Gateway],
    pki: DevPki,
    rsyslog: RsyslogRepository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    streamed_request: bool,
) -> None:
    if streamed_request:  # the RAD-75 written as it is sent, as for a large study
        monkeypatch.setattr(remote, "STREAMED_REQUEST_DOCUMENTS", 0)
    from datetime import date

    import pydicom

    source_id = "1.3.6.1.4.1.21367.13.81.2"
    study = generate_study(
        tmp_path / "beta" / "images",
        patient=DEFAULT_PATIENTS[0],
        patient_id="C02-2001",
        issuer_oid="1.3.6.1.4.1.21367.13.20.2000",
        modality="CT",
        body_part="HEAD",
        study_date=date(2024, 5, 1),
        institution="South",
        accession_number="SOU1",
        uid_root="1.2.826.0.1.3680043.10.543",
        series_count=1,
        instances_per_series=2,
        seed=7,
    )
    beta = audited(
        gateway_factory,
        rsyslog,
        tmp_path,
        "beta",
        imaging={"sources": [{"repository_unique_id": source_id, "kind": "filesystem"}]},
    )
    home = beta.config.community.home_community_id
    alpha = audited(
        gateway_factory,
        rsyslog,
        tmp_path,
        "alpha",
        peers=[{"name": "beta", "home_community_id": home, "rad75": beta.endpoint_urls()["rad75"]}],
    )
    docs = "".join(
        f"<xdsi:DocumentRequest><xdsb:HomeCommunityId>{home}</xdsb:HomeCommunityId>"
        f"<xdsb:RepositoryUniqueId>{source_id}</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>"
        f"{pydicom.dcmread(f).SOPInstanceUID}</xdsb:DocumentUniqueId></xdsi:DocumentRequest>"
        for f in study.files
    )
    request = (
        f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI}" xmlns:xdsb="{XDSB}">'
        f'<xdsi:StudyRequest studyInstanceUID="{study.study_instance_uid}">'
        f'<xdsi:SeriesRequest seriesInstanceUID="{study.series_instance_uids[0]}">{docs}'
        "</xdsi:SeriesRequest></xdsi:StudyRequest><xdsi:TransferSyntaxUIDList>"
        "<xdsi:TransferSyntaxUID>1.2.840.10008.1.2.1</xdsi:TransferSyntaxUID>"
        "</xdsi:TransferSyntaxUIDList></xdsi:RetrieveImagingDocumentSetRequest>"
    )
    # Issue 22: no per-instance XML is kept as a tree on either side of alpha; the records
    # below still name every instance (fed from the compact records).
    kept: list[etree._Element] = []
    alpha.soap.observers.append(
        lambda request, _t, payload, _f, _d: kept.extend([request.payload, payload])
    )
    alpha.peer_client.observers.append(
        lambda _u, _a, sent, reply, _e, _f: kept.extend([sent, reply])
    )
    with consumer(pki) as client:
        response = client.post(
            alpha.endpoint_urls()["rad69"],
            content=soap12(Action.RAD69, request),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200
    assert response.content.count(b"DocumentResponse>") == 2 * len(study.files)
    # Two application starts, then RAD-69 (alpha serving), RAD-75 (alpha initiating) and
    # RAD-75 (beta responding).
    roots = records(rsyslog, 5)  # written once the observers ran
    assert len(kept) == 4 and all(e is not None for e in kept)
    for element in kept:
        names = {etree.QName(e).localname for e in element.iter() if isinstance(e.tag, str)}
        assert not names & {"DocumentRequest", "StudyRequest", "DocumentResponse"}, names
    imaging = sorted((event(r)[1], event(r)[2]) for r in roots if event(r)[1].startswith("RAD-"))
    assert imaging == [("RAD-69", "0"), ("RAD-75", "0"), ("RAD-75", "0")]
    # PS3.15 A.5.3.4: one transfer, "DICOM Instances Transferred" (110104) at both ends of each
    # leg; R from the sender, C from the receiver (alpha holds no copy), so the pair matches.
    legs = sorted(
        (
            event(r)[1],
            r.find("AuditSourceIdentification").get("AuditSourceID"),  # type: ignore[union-attr]
            event(r)[0],
            r.find("EventIdentification").get("EventActionCode"),  # type: ignore[union-attr]
        )
        for r in roots
        if event(r)[1].startswith("RAD-")
    )
    assert legs == [
        ("RAD-69", "gw-alpha", "110104", "R"),
        ("RAD-75", "gw-alpha", "110104", "C"),
        ("RAD-75", "gw-beta", "110104", "R"),
    ]
    for root in roots:
        if event(root)[1].startswith("RAD-"):
            studies = [
                p.get("ParticipantObjectID")
                for p in root.iter("ParticipantObjectIdentification")
                if p.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
            ]
            assert studies == [study.study_instance_uid]
    # Each record names the patient: beta's and alpha's RAD-69 from the instances' headers as
    # they streamed; alpha's RAD-75 went out before any header and after no query of this
    # patient, so it says the patient is not known to alpha (DICOM A.5.3.4, Patient 1..1).
    patient_id = "C02-2001^^^&1.3.6.1.4.1.21367.13.20.2000&ISO"
    for root in roots:
        if not event(root)[1].startswith("RAD-"):
            continue
        (patient,) = [
            p
            for p in root.iter("ParticipantObjectIdentification")
            if p.get("ParticipantObjectTypeCodeRole") == "1"
        ]
        assert patient.get("ParticipantObjectTypeCode") == "1"
        source = root.find("AuditSourceIdentification").get("AuditSourceID")  # type: ignore[union-attr]
        if (event(root)[1], source) == ("RAD-75", "gw-alpha"):
            assert patient.get("ParticipantObjectID") is None
            (detail,) = patient.iter("ParticipantObjectDetail")
            assert detail.get("type") == "PatientNotKnown"
            assert base64.b64decode(detail.get("value", "")) == b"patient not known to this node"
        else:
            assert patient.get("ParticipantObjectID") == patient_id
            alice = DEFAULT_PATIENTS[0]
            assert patient.findtext("ParticipantObjectName") == f"{alice.family}^{alice.given}"


def _named_objects(root: etree._Element) -> list[tuple[str | None, str | None]]:
    return [
        (p.get("ParticipantObjectID"), p.findtext("ParticipantObjectName"))
        for p in root.iter("ParticipantObjectIdentification")
    ]


def test_retrieve_audits_name_malformed_document_requests(
    gateway_factory: Callable[..., Gateway], pki: DevPki, rsyslog: RsyslogRepository, tmp_path: Path
) -> None:
    beta = audited(gateway_factory, rsyslog, tmp_path, "beta")
    alpha = audited(gateway_factory, rsyslog, tmp_path, "alpha")
    beta_home = beta.config.community.home_community_id
    alpha_home = alpha.config.community.home_community_id
    repository = "1.3.6.1.4.1.21367.13.80.2"
    no_uid = (
        f'<b:RetrieveDocumentSetRequest xmlns:b="{XDSB}"><b:DocumentRequest>'
        "<b:HomeCommunityId>{home}</b:HomeCommunityId>"
        f"<b:RepositoryUniqueId>{repository}</b:RepositoryUniqueId>"
        "</b:DocumentRequest></b:RetrieveDocumentSetRequest>"
    )
    empty_uid = (
        f'<i:RetrieveImagingDocumentSetRequest xmlns:i="{XDSI}" xmlns:b="{XDSB}">'
        '<i:StudyRequest studyInstanceUID="1.2.3"><i:SeriesRequest seriesInstanceUID="1.2.3.4">'
        f"<i:DocumentRequest><b:HomeCommunityId>{{home}}</b:HomeCommunityId>"
        f"<b:RepositoryUniqueId>{repository}</b:RepositoryUniqueId>"
        "<b:DocumentUniqueId></b:DocumentUniqueId></i:DocumentRequest></i:SeriesRequest>"
        "</i:StudyRequest><i:TransferSyntaxUIDList><i:TransferSyntaxUID>1.2.840.10008.1.2.1"
        "</i:TransferSyntaxUID></i:TransferSyntaxUIDList></i:RetrieveImagingDocumentSetRequest>"
    )
    calls = [
        (beta.endpoint_urls()["iti39"], Action.ITI39, no_uid.format(home=beta_home)),
        (alpha.endpoint_urls()["iti43"], Action.ITI43, no_uid.format(home=alpha_home)),
        (beta.endpoint_urls()["rad75"], Action.RAD75, empty_uid.format(home=beta_home)),
        (alpha.endpoint_urls()["rad69"], Action.RAD69, empty_uid.format(home=alpha_home)),
    ]
    with consumer(pki) as client:
        for url, action, body in calls:
            response = client.post(
                url, content=soap12(action, body), headers={"content-type": "application/soap+xml"}
            )
            # Answered per DocumentRequest, never a fault for a schema-valid request.
            assert response.status_code == 200, (action, response.text[:500])
    roots = records(rsyslog, 2 + len(calls))
    retrieves = {
        event(r)[1]: r for r in roots if event(r)[1] in ("ITI-39", "ITI-43", "RAD-69", "RAD-75")
    }
    assert sorted(retrieves) == ["ITI-39", "ITI-43", "RAD-69", "RAD-75"]
    for kind in ("ITI-39", "ITI-43"):
        root = retrieves[kind]
        assert event(root)[2] != "0"  # nothing was retrieved
        # The Document participant of what was asked for (Export/Import, ITI TF-2 3.39.5).
        assert ("", "DocumentRequest without DocumentUniqueId") in _named_objects(root), kind
    for kind in ("RAD-69", "RAD-75"):
        root = retrieves[kind]
        assert event(root)[0] == "110104" and event(root)[2] != "0"
        assert ("1.2.3", "DocumentRequest with an empty DocumentUniqueId") in _named_objects(
            root
        ), kind
