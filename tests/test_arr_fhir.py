"""ITI-81 Retrieve ATNA Audit Event over real HTTPS: httpx as the FHIR client, fhir.resources
to validate what comes back, events produced by a real gateway and delivered by the real audit
trail over syslog-TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome

import xca_gateway.arr.app as arr_app
from tests.conftest import wait_for
from tests.test_server import ADHOC_QUERY, consumer, post, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.arr.app import AuditRecordRepository
from xca_gateway.arr.harness import RepositoryThread, dev_config
from xca_gateway.arr.store import EventFilter
from xca_gateway.arr.web import new_officer
from xca_gateway.audit import messages as am
from xca_gateway.audit.config import AuditConfig, AuditDestination
from xca_gateway.audit.syslog import format_message, frame
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import certificate_info, client_context
from xca_gateway.security.dev_pki import DevPki, issue_client_certificate
from xca_gateway.transactions import iti38, rad75

CTX = am.AuditContext(am.AuditSource("north-gw", "1.3.6.1.4.1.21367.13.70.1"), host="north")
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def arr_pki(pki: DevPki) -> DevPki:
    # The session PKI, whose CA the gateways trust; the repository serves with gamma's
    # certificate (not otherwise used here).
    return pki


def _message(i: int) -> bytes:
    patient = f"F{i % 3}^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    if i % 2:
        messages = rad75.retrieve_audit(
            CTX,
            am.Parties(
                requester=am.remote_node(f"10.1.0.{i % 4}", certificate_subject="CN=south"),
                responder=CTX.local_node("https://north/xca/rad75"),
                human_requestors=[am.xua_requestor(f"dr{i % 2}", "idp.example.org")],
                when=NOW - timedelta(minutes=i),
            ),
            side="responding",
            instances=[am.ImagingInstanceReference(f"1.2.9.{i}", f"1.2.9.{i}.1", f"1.2.9.{i}.1.1")],
            failed=[am.ImagingInstanceReference("1.2.9.99", "1.2.9.99.1", "1.2.9.99.1.1")]
            if i % 5 == 0
            else (),
            patient_id=patient,
        )
    else:
        messages = (
            iti38.query_audit(
                CTX,
                am.Parties(
                    requester=am.remote_node(f"10.1.0.{i % 4}", certificate_subject="CN=south"),
                    responder=CTX.local_node("https://north/xca/iti38"),
                    when=NOW - timedelta(minutes=i),
                ),
                side="responding",
                query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
                query=b"<AdhocQueryRequest/>",
                home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.2",
                patient_ids=[patient],
            ),
        )
    return b"".join(
        frame(
            format_message(
                m.to_xml(),
                outcome=m.outcome,
                timestamp=m.event.date_time,
                hostname="north",
                app_name="xca-gateway",
                procid="7",
            )
        )
        for m in messages
    )


@pytest.fixture
def arr(
    arr_pki: DevPki, tmp_path: Path
) -> Iterator[tuple[AuditRecordRepository, RepositoryThread]]:
    thread = RepositoryThread(dev_config(arr_pki, tmp_path, name="gamma"))
    repo = thread.__enter__()
    try:
        yield repo, thread
    finally:
        thread.__exit__(None, None, None)


@pytest.fixture
def loaded(
    arr: tuple[AuditRecordRepository, RepositoryThread], arr_pki: DevPki
) -> AuditRecordRepository:
    repo, thread = arr
    assert repo.syslog_tls is not None
    pair = arr_pki.communities["alpha"]
    ctx = client_context(arr_pki.ca, pair.cert, pair.key)
    with (
        socket.create_connection(("127.0.0.1", repo.syslog_tls.port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"".join(_message(i) for i in range(30)))
    # 30 events, 3 of which (RAD-75 with i % 5 == 0 and odd) also have a failure message.
    assert wait_for(lambda: (thread.flush(), repo.store.total())[1] >= 33, timeout=20)
    return repo


def fhir_client(pki: DevPki) -> httpx.Client:
    return httpx.Client(verify=client_context(pki.ca, pki.client.cert, pki.client.key), timeout=30)


def bundle_of(response: httpx.Response) -> Bundle:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return Bundle.model_validate(response.json())


def test_search_by_patient_and_date_returns_a_valid_bundle(
    loaded: AuditRecordRepository, arr_pki: DevPki
) -> None:
    since = (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with fhir_client(arr_pki) as client:
        bundle = bundle_of(
            client.get(
                loaded.fhir_base + "/AuditEvent",
                params={
                    "date": f"ge{since}",
                    "patient.identifier": "urn:oid:1.3.6.1.4.1.21367.13.20.1000|F1",
                },
            )
        )
    assert bundle.type == "searchset"
    events = [AuditEvent.model_validate(e.resource.model_dump()) for e in bundle.entry]
    # i % 3 == 1 for i in 0..29: 10 events; plus the failure message of i == 25.
    assert bundle.total == len(events) == 11
    recorded = [e.recorded for e in events]
    assert recorded == sorted(recorded, reverse=True)
    for event in events:
        patients = [x for x in event.entity if x.role and x.role.code == "1"]
        assert patients[0].what.identifier.value == "F1"


def test_filters_and_paging(loaded: AuditRecordRepository, arr_pki: DevPki) -> None:
    base = loaded.fhir_base + "/AuditEvent"
    with fhir_client(arr_pki) as client:
        failures = bundle_of(client.get(base, params={"date": "ge2020", "outcome": "8"}))
        assert failures.total == 3
        assert all(e.resource.outcome == "8" for e in failures.entry)
        imaging = bundle_of(
            client.get(
                base,
                params={
                    "date": "ge2020",
                    "subtype": "urn:ihe:event-type-code|RAD-75",
                    "type": "http://dicom.nema.org/resources/ontology/DCM|110104",
                },
            )
        )
        assert imaging.total == 18
        address = bundle_of(client.get(base, params={"date": "ge2020", "address": "10.1.0.3"}))
        assert address.total is not None and address.total > 0
        for entry in address.entry:
            assert any(a.network and a.network.address == "10.1.0.3" for a in entry.resource.agent)
        user = bundle_of(
            client.get(base, params={"date": "ge2020", "agent": "dr1@idp.example.org"})
        )
        assert user.total == 18  # every odd i is a RAD-75 by dr1, three with a failure too
        queries = bundle_of(client.get(base, params={"date": "ge2020", "entity-role": "24"}))
        assert queries.total == 15
        # Paging: 33 events in pages of 10, following "next" links (our own searches are
        # audited too, hence the source).
        seen: list[str] = []
        url: str | None = base + "?date=ge2020&source=north-gw&_count=10"
        pages = 0
        while url is not None and pages < 10:
            page = bundle_of(client.get(url))
            seen += [e.resource.id for e in page.entry]
            url = next((link.url for link in page.link if link.relation == "next"), None)
            pages += 1
        assert pages == 4 and len(seen) == len(set(seen)) == 33
        # Out of range date: nothing.
        empty = bundle_of(client.get(base, params={"date": "lt2000-01-01"}))
        assert empty.total == 0 and not empty.entry


def test_exact_counts_past_the_estimate_cap(
    loaded: AuditRecordRepository, arr_pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordinary searches stop counting at a cap; _summary=count and _total=accurate do not."""

    monkeypatch.setattr(arr_app, "_ESTIMATE_CAP", 20)  # 33 stored events: past the cap
    base = loaded.fhir_base + "/AuditEvent"
    with fhir_client(arr_pki) as client:
        page = bundle_of(
            client.get(base, params={"date": "ge2020", "source": "north-gw", "_count": "5"})
        )
        assert page.total is None and len(page.entry) == 5
        accurate = bundle_of(
            client.get(
                base,
                params={
                    "date": "ge2020",
                    "source": "north-gw",
                    "_count": "5",
                    "_total": "accurate",
                },
            )
        )
        assert accurate.total == 33 and len(accurate.entry) == 5
        counted = bundle_of(
            client.get(base, params={"date": "ge2020", "source": "north-gw", "_summary": "count"})
        )
        assert counted.total == 33 and not counted.entry
        bad = client.get(base, params={"date": "ge2020", "_summary": "everything"})
        assert bad.status_code == 400
        assert OperationOutcome.model_validate(bad.json()).issue[0].code == "invalid"


def test_read_and_raw_message(loaded: AuditRecordRepository, arr_pki: DevPki) -> None:
    with fhir_client(arr_pki) as client:
        bundle = bundle_of(client.get(loaded.fhir_base + "/AuditEvent", params={"date": "ge2020"}))
        first = bundle.entry[0].resource
        read = client.get(f"{loaded.fhir_base}/AuditEvent/{first.id}")
        assert read.status_code == 200
        event = AuditEvent.model_validate(read.json())
        raw_url = next(x.valueUrl for x in event.extension if x.url.endswith("raw-message"))
        raw = client.get(raw_url)
        assert raw.status_code == 200
        stored = loaded.store.get(int(first.id))
        assert stored is not None and raw.content == stored.raw
        assert raw.content.startswith(b"<8") and b"<AuditMessage>" in raw.content
        missing = client.get(f"{loaded.fhir_base}/AuditEvent/999999")
        assert missing.status_code == 404
        OperationOutcome.model_validate(missing.json())


def test_errors_are_operation_outcomes(loaded: AuditRecordRepository, arr_pki: DevPki) -> None:
    base = loaded.fhir_base + "/AuditEvent"
    with fhir_client(arr_pki) as client:
        no_date = client.get(base, params={"outcome": "0"})
        assert no_date.status_code == 400
        outcome = OperationOutcome.model_validate(no_date.json())
        assert "date" in (outcome.issue[0].diagnostics or "")
        bad = client.get(base, params={"date": "ge2020", "outcome": "banana"})
        assert bad.status_code == 400
        strict = client.get(
            base, params={"date": "ge2020", "nonsense": "1"}, headers={"prefer": "handling=strict"}
        )
        assert strict.status_code == 400
        lenient = client.get(base, params={"date": "ge2020", "nonsense": "1"})
        assert lenient.status_code == 200
        assert client.post(base, content=b"{}").status_code == 405
        assert client.get(loaded.fhir_base + "/metadata").json()["resourceType"] == (
            "CapabilityStatement"
        )


def test_fhir_needs_a_trusted_client_certificate(
    loaded: AuditRecordRepository,
    arr_pki: DevPki,
    arr: tuple[AuditRecordRepository, RepositoryThread],
) -> None:
    _, thread = arr
    url = loaded.fhir_base + "/AuditEvent?date=ge2020"
    anonymous = ssl.create_default_context(cafile=str(arr_pki.ca))
    with httpx.Client(verify=anonymous, timeout=10) as client:
        response = client.get(url)
    assert response.status_code == 401
    OperationOutcome.model_validate(response.json())
    untrusted = client_context(
        arr_pki.ca, arr_pki.untrusted_client.cert, arr_pki.untrusted_client.key
    )
    with (
        httpx.Client(verify=untrusted, timeout=10) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        client.get(url)
    # The search itself and the refusal are in the audit trail.
    with fhir_client(arr_pki) as client:
        client.get(url)
    alerts = EventFilter(event_codes=(("110113",),))
    used = EventFilter(event_codes=(("110101",),))
    assert wait_for(
        lambda: (thread.flush(), loaded.store.count(alerts) >= 1 and loaded.store.count(used) >= 1)[
            1
        ]
    )
    record = loaded.store.get(loaded.store.search(used)[0].id).record()  # type: ignore[union-attr]
    assert any("client" in p.user_id for p in record.participants)


def test_events_produced_by_a_gateway_come_back_through_iti81(
    gateway_factory: Callable[..., Gateway],
    arr: tuple[AuditRecordRepository, RepositoryThread],
    arr_pki: DevPki,
    tmp_path: Path,
) -> None:
    """A real gateway refuses a node; its audit trail sends the Security Alert over
    syslog-TLS; an Audit Consumer finds it with ITI-81."""
    repo, thread = arr
    assert repo.syslog_tls is not None
    gateway = gateway_factory("alpha")
    alpha = arr_pki.communities["alpha"]
    config = AuditConfig(
        enabled=True,
        spool_dir=tmp_path / "gateway-spool",
        destinations=(
            AuditDestination(
                "arr",
                "tls",
                "127.0.0.1",
                repo.syslog_tls.port,
                alpha.cert,
                alpha.key,
                arr_pki.ca,
                server_name="localhost",
            ),
        ),
        audit_source_id="alpha-gateway",
        hostname="alpha",
    )
    loop = asyncio.new_event_loop()
    trail = AuditTrail(config)
    loop.run_until_complete(trail.start())
    gateway.add_handshake_listener(trail.on_handshake_failure)
    try:
        untrusted = client_context(
            arr_pki.ca, arr_pki.untrusted_client.cert, arr_pki.untrusted_client.key
        )
        with (
            httpx.Client(verify=untrusted, timeout=10) as client,
            pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
        ):
            client.post(gateway.endpoint_urls()["iti38"], content=b"<x/>")
        assert wait_for(lambda: len(gateway.handshake_failures) == 1)
        loop.run_until_complete(trail.flush())
        loop.run_until_complete(trail.wait_delivered(20))
    finally:
        loop.run_until_complete(trail.stop())
        loop.close()
    thread.flush()
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    with fhir_client(arr_pki) as client:
        alerts = bundle_of(
            client.get(
                repo.fhir_base + "/AuditEvent",
                params={"date": f"ge{today}", "type": "110113", "source": "alpha-gateway"},
            )
        )
        lifecycle = bundle_of(
            client.get(
                repo.fhir_base + "/AuditEvent",
                params={"date": f"ge{today}", "type": "110100", "source": "alpha-gateway"},
            )
        )
    assert alerts.total == 1
    alert = alerts.entry[0].resource
    assert alert.subtype[0].code == "110126"
    assert "untrusted" in (alert.outcomeDesc or "").lower() or "certificate" in (
        alert.outcomeDesc or ""
    )
    assert any(a.network and a.network.address == "127.0.0.1" for a in alert.agent)
    assert {e.resource.subtype[0].code for e in lifecycle.entry} == {"110120", "110121"}


def test_a_gateway_configured_with_audit_reports_its_transactions(
    gateway_factory: Callable[..., Gateway],
    arr: tuple[AuditRecordRepository, RepositoryThread],
    arr_pki: DevPki,
) -> None:
    """A gateway whose [audit] names the repository: a peer's ITI-38 is audited by the
    gateway and found again by patient through ITI-81."""

    repo, thread = arr
    assert repo.syslog_tls is not None
    gateway = gateway_factory(
        "alpha",
        audit={
            "audit_source_id": "alpha-gateway",
            "destinations": [
                {
                    "name": "arr",
                    "transport": "tls",
                    "host": "127.0.0.1",
                    "port": repo.syslog_tls.port,
                },
            ],
        },
    )
    with consumer(arr_pki) as client:
        response = post(client, gateway.endpoint_urls()["iti38"], soap12(Action.ITI38, ADHOC_QUERY))
    assert response.status_code == 200
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    params = {
        "date": f"ge{today}",
        "patient.identifier": "urn:oid:1.3.6.1.4.1.21367.13.20.1000|C01-1001",
        "subtype": "ITI-38",
    }
    found: list[AuditEvent] = []
    with fhir_client(arr_pki) as client:
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while not found and datetime.now(UTC) < deadline:
            thread.flush()
            bundle = bundle_of(client.get(repo.fhir_base + "/AuditEvent", params=params))
            found = [AuditEvent.model_validate(e.resource.model_dump()) for e in bundle.entry or []]
            if not found:
                time.sleep(0.1)
    assert found, "the gateway's ITI-38 audit did not reach the repository"
    event = found[0]
    assert event.source.observer.display == "alpha-gateway"
    assert event.type.code == "110112"
    assert any(
        x.role and x.role.code == "24" and x.query and b"AdhocQueryRequest" in x.query
        for x in event.entity
    )


def test_iti81_and_raw_messages_are_for_audit_consumers_and_officers_only(
    arr_pki: DevPki, tmp_path: Path
) -> None:
    """A trusted certificate is not enough: only the listed audit consumer, a listed officer
    certificate and officers' registered certificates search; everyone else gets a 403
    OperationOutcome and exactly one Security Alert naming the verified subject."""

    auditor = issue_client_certificate(arr_pki, "audit-consumer")
    access = {
        "callers": [
            {
                "name": "auditor",
                "roles": ["audit-consumer"],
                "certificate_uris": ["urn:xca-gateway:client:audit-consumer"],
            },
            {
                "name": "beta officer workstation",
                "roles": ["security-officer"],
                "certificate_dns_names": ["beta.xca-gateway.test"],
            },
            {
                "name": "alpha gateway",
                "roles": ["audit-source"],
                "certificate_dns_names": ["alpha.xca-gateway.test"],
                "audit_source_ids": ["north-gw"],
            },
        ]
    }
    thread = RepositoryThread(dev_config(arr_pki, tmp_path, name="gamma", access=access))
    with thread as repo:
        assert repo.syslog_tls is not None
        alpha = arr_pki.communities["alpha"]
        ctx = client_context(arr_pki.ca, alpha.cert, alpha.key)
        with (
            socket.create_connection(("127.0.0.1", repo.syslog_tls.port)) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(_message(0))
        assert wait_for(lambda: (thread.flush(), repo.store.total())[1] >= 1, timeout=20)
        (first,) = repo.store.search(EventFilter(), limit=1, newest_first=False)
        search = repo.fhir_base + "/AuditEvent?date=ge2020"
        raw_url = f"{repo.fhir_base}/AuditEvent/{first.id}/$raw"

        def client_for(cert: Path, key: Path) -> httpx.Client:
            return httpx.Client(verify=client_context(arr_pki.ca, cert, key), timeout=30)

        refused = 0
        for pair in (arr_pki.client, alpha):
            with client_for(pair.cert, pair.key) as client:
                for url in (search, raw_url, repo.fhir_base + "/metadata"):
                    response = client.get(url)
                    assert response.status_code == 403, (url, response.text)
                    outcome = OperationOutcome.model_validate(response.json())
                    assert outcome.issue[0].code == "forbidden"
                    assert b"AuditMessage" not in response.content
                    refused += 1
        for pair in (auditor, arr_pki.communities["beta"]):
            with client_for(pair.cert, pair.key) as client:
                assert bundle_of(client.get(search)).total is not None
                assert client.get(raw_url).content == first_raw(repo, first.id)
        # An officer account with a registered certificate may use the API as well.
        fingerprint = certificate_info(arr_pki.client.cert.read_bytes()).fingerprint_sha256
        repo.store.add_officer(new_officer("olga", None, fingerprint))
        with client_for(arr_pki.client.cert, arr_pki.client.key) as client:
            assert client.get(raw_url).content == first_raw(repo, first.id)

        alerts = EventFilter(event_codes=(("110113",),), subtypes=(("110132",),))
        assert wait_for(lambda: (thread.flush(), repo.store.count(alerts))[1] >= refused)
        thread.flush()
        assert repo.store.count(alerts) == refused
        assert repo.counters.get("refused_callers", "iti81") == refused
        subjects = {certificate_info(p.cert.read_bytes()).subject for p in (arr_pki.client, alpha)}
        named: set[str] = set()
        resources: set[str] = set()
        for row in repo.store.search(alerts, limit=100):
            stored = repo.store.get(row.id)
            assert stored is not None
            record = stored.record()
            requestor = next(p for p in record.participants if p.user_is_requestor)
            named.add(requestor.user_id)
            resources.update(e.object_id for e in record.entities)
            assert record.outcome == 4
        assert named == subjects
        assert {"/fhir/AuditEvent", f"/fhir/AuditEvent/{first.id}/$raw", "/fhir/metadata"} <= (
            resources
        )


def first_raw(repo: AuditRecordRepository, event_id: int) -> bytes:
    stored = repo.store.get(event_id)
    assert stored is not None
    return stored.raw
