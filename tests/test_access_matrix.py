"""Authorization at every door, against a real demo: every endpoint family × every role.

The expected answer of each cell is computed from one table, ``security.callers.ACCESS`` (the
README shows it, generated from the same table): a caller is admitted exactly when one of its
roles is listed for the door. A trusted certificate that no policy entry names has no roles; an
untrusted one never completes the handshake. Every refusal is audited exactly once in the demo's
Audit Record Repository, naming the verified caller.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from tests.test_initiating import find_documents
from xca_gateway.arr.store import EventFilter, open_store
from xca_gateway.audit.messages import AuditContext, AuditSource, application_activity
from xca_gateway.audit.syslog import format_message, frame
from xca_gateway.protocol.namespaces import SOAP12, WSA, Action
from xca_gateway.protocol.tls import certificate_info, client_context
from xca_gateway.security.callers import ACCESS, Door, Role, access_table_markdown
from xca_gateway.security.dev_pki import issue_client_certificate, load_dev_pki
from xca_gateway.security.xua import (
    Ce,
    XuaIdentity,
    issue_assertion,
    load_signing_key,
    wsse_security_header,
)

REPO = Path(__file__).resolve().parents[1]

# The identities a tool gets from endpoints.json, and the roles the demo's policy gives them.
# None: no policy entry names the certificate (trusted CA, unknown caller).
IDENTITY_ROLES: dict[str, frozenset[Role] | None] = {
    "peer gateway (south)": frozenset({Role.PEER_GATEWAY}),
    "local consumer (north)": frozenset({Role.LOCAL_CONSUMER}),
    "local repository (north)": frozenset({Role.LOCAL_REPOSITORY}),
    "demo client": frozenset({Role.LOCAL_CONSUMER}),
    "unknown trusted certificate": None,
    "audit consumer (ARR)": frozenset({Role.AUDIT_CONSUMER}),
}

# The SOAP doors of north's gateway: path and the request each caller sends.
SOAP_DOORS: dict[Door, tuple[str, str]] = {
    Door.XCA: ("/xca/iti38", Action.ITI38),
    Door.INITIATING: ("/ig/iti18", Action.ITI18),
    Door.REGISTRY_QUERY: ("/registry/iti18", Action.ITI18),
    Door.REGISTRY_REGISTER: ("/registry/iti42", "urn:ihe:iti:2007:RegisterDocumentSet-b"),
    Door.REPOSITORY: ("/repository/iti43", Action.ITI43),
}


def expected_allowed(roles: frozenset[Role] | None, door: Door) -> bool:
    return bool(roles and roles & ACCESS[door])


@dataclass(frozen=True)
class Caller:
    label: str
    cert: Path
    key: Path
    subject: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    workdir = tmp_path_factory.mktemp("access-demo")
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway", "demo", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    endpoints = workdir / "endpoints.json"
    try:
        deadline = time.monotonic() + 90
        while not endpoints.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        if not endpoints.exists():
            process.kill()
            out = process.communicate(timeout=10)[0].decode(errors="replace")
            pytest.fail(f"demo did not write endpoints.json:\n{out}")
        yield json.loads(endpoints.read_text()), workdir
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _pair(entry: dict[str, str], label: str) -> Caller:
    cert = Path(entry["cert"])
    return Caller(label, cert, Path(entry["key"]), certificate_info(cert.read_bytes()).subject)


def callers(data: dict[str, Any], workdir: Path) -> dict[str, Caller]:
    north, south = data["communities"][0], data["communities"][1]
    stranger = issue_client_certificate(load_dev_pki(workdir / "certs"), "stranger")
    return {
        "peer gateway (south)": _pair(south["identities"]["gateway"], "peer"),
        "local consumer (north)": _pair(north["identities"]["localConsumer"], "consumer"),
        "local repository (north)": _pair(north["identities"]["localRepository"], "repository"),
        "demo client": _pair(data["client"], "client"),
        "unknown trusted certificate": _pair(
            {"cert": str(stranger.cert), "key": str(stranger.key)}, "stranger"
        ),
        "audit consumer (ARR)": _pair(data["auditRepository"]["auditConsumer"], "auditor"),
    }


def assertion_header(data: dict[str, Any], audience: str, name: str) -> str:
    """A signed assertion from the demo's identity provider for a user of south (endpoints.json
    "xua" gives the signing pair and the attribute values a valid demo assertion carries)."""
    xua = data["xua"]
    south = data["communities"][1]["homeCommunityId"]
    role = xua["attributes"]["urn:oasis:names:tc:xacml:2.0:subject:role"]
    purpose = xua["attributes"]["urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"]
    identity = XuaIdentity(
        name_id=name,
        subject_id=name,
        organization="Community south",
        organization_id=south,
        home_community_id=south,
        roles=(Ce(role["code"], role["code_system"]),),
        purposes_of_use=(Ce(purpose["code"], purpose["code_system"]),),
    )
    assertion = issue_assertion(
        identity,
        issuer=xua["issuer"],
        audience=audience,
        key_pem=load_signing_key(Path(xua["key"]).read_bytes()),
        cert_pem=Path(xua["certificate"]).read_bytes(),
        lifetime=timedelta(minutes=5),
    )
    return etree.tostring(wsse_security_header(assertion)).decode()


def envelope(action: str, body: str, header: str = "") -> bytes:
    return (
        f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{action}</a:Action>'
        f"<a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>{header}"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def request_body(door: Door, data: dict[str, Any]) -> str:
    north = data["communities"][0]
    alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
    if door in (Door.XCA, Door.INITIATING, Door.REGISTRY_QUERY):
        home = north["homeCommunityId"] if door == Door.XCA else None
        return find_documents(alice, home)
    if door == Door.REPOSITORY:
        return (
            '<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="urn:ihe:iti:xds-b:2007">'
            "<xdsb:DocumentRequest><xdsb:RepositoryUniqueId>1.2.3</xdsb:RepositoryUniqueId>"
            "<xdsb:DocumentUniqueId>1.2.3.4</xdsb:DocumentUniqueId></xdsb:DocumentRequest>"
            "</xdsb:RetrieveDocumentSetRequest>"
        )
    # An empty submission: admitted callers get the registry's own error, nothing registered.
    return (
        '<lcm:SubmitObjectsRequest xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0" '
        'xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"><rim:RegistryObjectList/>'
        "</lcm:SubmitObjectsRequest>"
    )


def security_alerts(workdir: Path) -> list[etree._Element]:
    """Every Use-of-Restricted-Function / Node-Authentication alert the demo ARR stored."""

    store = open_store(workdir / "arr" / "data" / "arr.sqlite3")
    rows = store.search(EventFilter(), limit=100_000)
    alerts = []
    for event in store.get_many([r.id for r in rows]):
        root = etree.fromstring(_xml(event.raw))
        if root.find(".//EventID[@csd-code='110113']") is not None:
            alerts.append(root)
    return alerts


def _xml(raw: bytes) -> bytes:
    # Stored messages are the syslog payloads: the XML starts at the first '<?xml' or '<Audit'.
    start = min(i for i in (raw.find(b"<?xml"), raw.find(b"<AuditMessage")) if i >= 0)
    return raw[start:]


def refusals_of(alerts: list[etree._Element], subject: str, resource: str) -> int:
    count = 0
    for alert in alerts:
        if alert.find(".//EventTypeCode[@csd-code='110132']") is None:
            continue
        users = {
            p.get("UserID")
            for p in alert.iter("ActiveParticipant")
            if p.get("UserIsRequestor") in ("true", "1")
        }
        objects = {
            o.get("ParticipantObjectID") for o in alert.iter("ParticipantObjectIdentification")
        }
        if subject in users and resource in objects:
            count += 1
    return count


def test_readme_shows_the_access_table() -> None:
    """The README's table is the one the gateway enforces (generated, never hand-edited)."""
    assert access_table_markdown() in (REPO / "README.md").read_text(encoding="utf-8")


def test_every_soap_door_for_every_role(demo: tuple[dict[str, Any], Path]) -> None:
    data, workdir = demo
    north = data["communities"][0]
    base = north["endpoints"]["iti38"].rsplit("/xca/", 1)[0]
    ca = Path(data["ca"])
    who = callers(data, workdir)
    outcomes: dict[tuple[str, Door], bool] = {}
    for label, caller in who.items():
        ctx = client_context(ca, caller.cert, caller.key)
        with httpx.Client(verify=ctx, timeout=30) as client:
            for door, (path, action) in SOAP_DOORS.items():
                header = assertion_header(data, base + path, f"user-of-{caller.label}")
                response = client.post(
                    base + path,
                    content=envelope(action, request_body(door, data), header),
                    headers={"content-type": "application/soap+xml"},
                )
                assert response.status_code in (200, 403), (label, door, response.text[:300])
                outcomes[(label, door)] = response.status_code == 200
                if response.status_code == 403:
                    assert b"access denied" in response.content
    expected = {
        (label, door): expected_allowed(IDENTITY_ROLES[label], door)
        for label in who
        for door in SOAP_DOORS
    }
    assert outcomes == expected
    # A peer gateway with a valid assertion really gets north's answer (not just admission).
    # Every refusal: exactly one Security Alert naming the verified certificate subject.
    denied = [(who[label], SOAP_DOORS[door][0]) for (label, door), ok in expected.items() if not ok]
    deadline = time.monotonic() + 30
    while True:
        alerts = security_alerts(workdir)
        counts = {(c.label, path): refusals_of(alerts, c.subject, path) for c, path in denied}
        if all(n >= 1 for n in counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counts == {key: 1 for key in counts}


def test_dicomweb_and_iti81_for_every_role(demo: tuple[dict[str, Any], Path]) -> None:
    """The HTTP doors beside SOAP: north's DICOMweb front door and the ARR's ITI-81 search."""
    data, workdir = demo
    north = data["communities"][0]
    alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
    dicomweb = north["dicomweb"]
    fhir = data["auditRepository"]["fhir"]
    targets = {
        Door.DICOMWEB: (f"{dicomweb}/studies", {"PatientID": alice.split("^")[0]}),
        Door.ITI81: (f"{fhir}/AuditEvent", {"_count": "1", "date": "ge2000-01-01"}),
    }
    who = callers(data, workdir)
    outcomes: dict[tuple[str, Door], bool] = {}
    for label, caller in who.items():
        ctx = client_context(Path(data["ca"]), caller.cert, caller.key)
        with httpx.Client(verify=ctx, timeout=60) as client:
            for door, (url, params) in targets.items():
                response = client.get(url, params=params)
                assert response.status_code in (200, 403), (label, door, response.text[:300])
                outcomes[(label, door)] = response.status_code == 200
    expected = {
        (label, door): expected_allowed(IDENTITY_ROLES[label], door)
        for label in who
        for door in targets
    }
    assert outcomes == expected
    # Each DICOMweb refusal is one Security Alert in the ARR naming the verified subject
    # (north audits it); the ARR audits its own refusals in its own trail.
    refused = [(who[label], door) for (label, door), ok in expected.items() if not ok]
    deadline = time.monotonic() + 30
    while True:
        alerts = security_alerts(workdir)
        counts = {
            (c.label, door): refusals_of_prefix(alerts, c.subject, targets[door][0])
            for c, door in refused
        }
        if all(n >= 1 for n in counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counts == {key: 1 for key in counts}


def test_dimse_door_for_every_role(demo: tuple[dict[str, Any], Path]) -> None:
    """DICOM TLS associations to north's DIMSE door with each identity and the calling AE title
    north ties to its local consumer: only that consumer's certificate gets an association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    data, workdir = demo
    north = data["communities"][0]
    dicom = north["dicom"]
    who = callers(data, workdir)
    outcomes: dict[str, bool] = {}
    for label, caller in who.items():
        ae = AE(ae_title=dicom["callingAeTitle"])
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.acse_timeout = ae.network_timeout = 20
        tls = client_context(Path(data["ca"]), caller.cert, caller.key)
        assoc = ae.associate(
            dicom["host"], dicom["port"], ae_title=dicom["aeTitle"], tls_args=(tls, dicom["host"])
        )
        outcomes[label] = bool(assoc.is_established)
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    # The demo client is a local consumer of every community, but the calling AE title is tied
    # to north's own consumer certificate: the client gets no association with it.
    expected = {
        label: expected_allowed(IDENTITY_ROLES[label], Door.DIMSE) and label != "demo client"
        for label in who
    }
    assert outcomes == expected
    # Each refused association: one Security Alert naming the verified certificate subject.
    resource = f"DIMSE {dicom['aeTitle']} (C-FIND/C-GET/C-MOVE)"
    refused = [who[label] for label, ok in expected.items() if not ok]
    deadline = time.monotonic() + 30
    while True:
        alerts = security_alerts(workdir)
        counts = {c.label: refusals_of(alerts, c.subject, resource) for c in refused}
        if all(n >= 1 for n in counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counts == {c.label: 1 for c in refused}


# The ARR's own policy: each demo gateway certificate is an audit source bound to its
# <community>-gateway AuditSourceID, the demo client one bound to xca-gateway-import (what the
# import-priors command audits as), the auditConsumer an audit consumer, nobody else anything.
ARR_ROLES: dict[str, frozenset[Role] | None] = {
    "peer gateway (south)": frozenset({Role.AUDIT_SOURCE}),
    "local consumer (north)": None,
    "local repository (north)": None,
    "demo client": frozenset({Role.AUDIT_SOURCE}),
    "unknown trusted certificate": None,
    "audit consumer (ARR)": frozenset({Role.AUDIT_CONSUMER}),
}


def test_syslog_door_for_every_role(demo: tuple[dict[str, Any], Path]) -> None:
    """ITI-20 over syslog-TLS to the ARR: only audit sources' records are stored, each with its
    authenticated sender; every other certificate is refused and audited once."""
    from datetime import UTC, datetime

    data, workdir = demo
    host, port = data["auditRepository"]["syslogTls"].rsplit(":", 1)
    who = callers(data, workdir)
    markers = {label: f"matrix-{uuid.uuid4()}" for label in who}
    for label, caller in who.items():
        ctx = AuditContext(audit_source=AuditSource("south-gateway"), host="matrix")
        message = application_activity(ctx, event="start", application_id=markers[label])
        payload = frame(
            format_message(
                message.to_xml(),
                outcome=message.outcome,
                timestamp=datetime.now(UTC),
                hostname="matrix",
                app_name="matrix",
                procid="1",
            )
        )
        tls = client_context(Path(data["ca"]), caller.cert, caller.key)
        try:
            with (
                socket.create_connection((host, int(port)), timeout=10) as raw,
                tls.wrap_socket(raw, server_hostname="localhost") as conn,
            ):
                conn.sendall(payload)
                conn.settimeout(2)
                with contextlib.suppress(TimeoutError, OSError):
                    conn.recv(1)  # the ARR never answers; a refused sender is closed
        except (ssl.SSLError, OSError):
            pass  # TLS 1.3: a refused certificate may surface on the write
    store = open_store(workdir / "arr" / "data" / "arr.sqlite3")
    deadline = time.monotonic() + 30
    stored: dict[str, list[Any]] = {}
    expected = {label: expected_allowed(ARR_ROLES[label], Door.SYSLOG) for label in who}
    while time.monotonic() < deadline:
        rows = store.search(EventFilter(), limit=100_000)
        events = store.get_many([r.id for r in rows])
        stored = {label: [e for e in events if markers[label].encode() in e.raw] for label in who}
        if all(bool(stored[label]) == ok for label, ok in expected.items()):
            break
        time.sleep(0.5)
    assert {label: bool(found) for label, found in stored.items()} == expected
    for label, ok in expected.items():
        if ok:
            [event] = stored[label]
            assert event.row.sender_identity == who[label].subject
            # Every record claims AuditSourceID south-gateway: only south's gateway may.
            unbound = "audit-source-unbound" in event.row.flags
            assert unbound == (label != "peer gateway (south)"), (label, event.row.flags)
    refused = [who[label] for label, ok in expected.items() if not ok]
    while True:
        alerts = security_alerts(workdir)
        counts = {c.label: syslog_refusals(alerts, c.subject) for c in refused}
        if all(n >= 1 for n in counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counts == {c.label: 1 for c in refused}


def syslog_refusals(alerts: list[etree._Element], subject: str) -> int:
    return sum(
        1
        for alert in alerts
        if alert.find(".//EventTypeCode[@csd-code='110132']") is not None
        and any(
            p.get("UserID") == subject
            for p in alert.iter("ActiveParticipant")
            if p.get("UserIsRequestor") in ("true", "1")
        )
        and any(
            "syslog" in (o.get("ParticipantObjectID") or "").lower()
            for o in alert.iter("ParticipantObjectIdentification")
        )
    )


def refusals_of_prefix(alerts: list[etree._Element], subject: str, prefix: str) -> int:
    """Refusal alerts naming ``subject`` for a resource under ``prefix`` (URL or path)."""
    path = "/" + prefix.split("//", 1)[1].split("/", 1)[1]
    count = 0
    for alert in alerts:
        if alert.find(".//EventTypeCode[@csd-code='110132']") is None:
            continue
        users = {
            p.get("UserID")
            for p in alert.iter("ActiveParticipant")
            if p.get("UserIsRequestor") in ("true", "1")
        }
        objects = [
            o.get("ParticipantObjectID") or ""
            for o in alert.iter("ParticipantObjectIdentification")
        ]
        if subject in users and any(o.startswith((prefix, path)) for o in objects):
            count += 1
    return count


def test_an_untrusted_certificate_is_refused_at_the_handshake_and_audited(
    demo: tuple[dict[str, Any], Path],
) -> None:
    data, workdir = demo
    north = data["communities"][0]
    host, port = north["endpoints"]["iti18"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    untrusted = data["untrusted_client"]
    ctx = client_context(Path(data["ca"]), Path(untrusted["cert"]), Path(untrusted["key"]))
    before = alerts_of_type(workdir, "110126")
    with (
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        # TLS 1.3: a refused client certificate surfaces on the first read.
        tls.sendall(b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        if not tls.recv(1024):
            raise ConnectionError("closed")
    deadline = time.monotonic() + 30
    after = before
    while after == before and time.monotonic() < deadline:
        time.sleep(0.5)
        after = alerts_of_type(workdir, "110126")
    assert after == before + 1


def alerts_of_type(workdir: Path, type_code: str) -> int:
    return sum(
        1
        for alert in security_alerts(workdir)
        if alert.find(f".//EventTypeCode[@csd-code='{type_code}']") is not None
    )
