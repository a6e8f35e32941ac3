"""Initiating gateway fan-out over real mTLS gateways and real failure modes.

Peers are real gateways on loopback; until the registry is wired into them, each good peer runs
a small ITI-38 handler that answers one DocumentEntry per query echoing the patient id it
received, which is what lets these tests see the patient-id mapping at work.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from lxml import etree

from tests.conftest import GatewayThread, make_config, wait_for
from tests.test_server import consumer, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import (
    QUERY,
    RIM,
    RS,
    SOAP12,
    Action,
    ErrorSeverity,
    ResponseStatus,
)
from xca_gateway.protocol.soap import SoapFault
from xca_gateway.protocol.soap_service import Operation, SoapRequest, SoapResponse
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.xds.ebrim import StoredQueryId
from xca_gateway.xds.ebrs import adhoc_query_response

LOCAL_AA = "1.3.6.1.4.1.21367.13.20.1000"


def community(index: int) -> dict[str, str]:
    return {
        "name": f"c{index}",
        "home_community_id": f"urn:oid:1.3.6.1.4.1.21367.13.70.{index}",
        "patient_id_assigning_authority": f"1.3.6.1.4.1.21367.13.20.{index}000",
    }


def echo_peer(delay: float = 0.0, calls: list[str] | None = None) -> Callable[[SoapRequest], Any]:
    """An ITI-38 answer: one DocumentEntry whose patient id is the one the peer was asked for."""

    async def handle(request: SoapRequest) -> SoapResponse:
        if delay:
            await asyncio.sleep(delay)
        slots = request.payload.iterfind(f".//{{{RIM}}}Slot")
        patient = next(
            (
                s.findtext(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
                for s in slots
                if "PatientId" in (s.get("name") or "")
            ),
            "",
        )
        if calls is not None:
            calls.append(patient or "")
        home = request.endpoint.name  # set below: the endpoint name carries the home id
        entry = etree.Element(f"{{{RIM}}}ExtrinsicObject", id=f"urn:uuid:{uuid.uuid4()}", home=home)
        ext = etree.SubElement(
            entry, f"{{{RIM}}}ExternalIdentifier", value=(patient or "").strip("'")
        )
        ext.set("identificationScheme", "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427")
        return SoapResponse(
            adhoc_query_response(ResponseStatus.SUCCESS, [], [entry]), Action.ITI38_RESPONSE
        )

    return handle


def install(gateway: Gateway, handler: Callable[[SoapRequest], Any]) -> None:
    endpoint = gateway.endpoints["iti38"]
    endpoint.name = gateway.config.community.home_community_id
    endpoint.add(Operation(Action.ITI38, "ITI-38", handler))


class ResettingPeer:
    """Answers the headers of a response, part of the body, then resets the connection."""

    def __init__(self, pki: DevPki, *, certificate: tuple[Path, Path]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            try:
                raw.settimeout(5)
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += tls.recv(65536)
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/soap+xml\r\n"
                        b"Content-Length: 100000\r\n\r\n<s:Envelope xmlns:s='"
                    )
                    raw.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            except (OSError, ssl.SSLError):
                pass
            finally:
                raw.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def federation(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path, silent_port: int
) -> Iterator[dict[str, Any]]:
    calls: dict[str, list[str]] = {"c2": [], "c3": [], "c6": []}
    good = gateway_factory(
        "beta", community=community(2), storage={"data_dir": str(tmp_path / "c2")}
    )
    install(good, echo_peer(calls=calls["c2"]))
    slow = gateway_factory(
        "gamma", community=community(3), storage={"data_dir": str(tmp_path / "c3")}
    )
    install(slow, echo_peer(delay=0.3, calls=calls["c3"]))
    faulty = gateway_factory(
        "beta", community=community(4), storage={"data_dir": str(tmp_path / "c4")}
    )

    async def fault(request: SoapRequest) -> SoapResponse:
        raise SoapFault.receiver("registry exploded")

    install(faulty, fault)
    unmapped = gateway_factory(
        "gamma", community=community(6), storage={"data_dir": str(tmp_path / "c6")}
    )
    install(unmapped, echo_peer(calls=calls["c6"]))
    resetting = ResettingPeer(
        pki, certificate=(pki.communities["beta"].cert, pki.communities["beta"].key)
    )
    untrusted = ResettingPeer(
        pki, certificate=(pki.untrusted_client.cert, pki.untrusted_client.key)
    )

    def peer(index: int, url: str, name: str | None = None) -> dict[str, Any]:
        c = community(index)
        return {
            "name": name or c["name"],
            "home_community_id": c["home_community_id"],
            "iti38": url,
            "patient_id_assigning_authority": c["patient_id_assigning_authority"],
        }

    xref = tmp_path / "xref.csv"
    ids = [f"P1^^^&{LOCAL_AA}&ISO"] + [
        f"REMOTE{i}^^^&{community(i)['patient_id_assigning_authority']}&ISO"
        for i in (2, 3, 4, 5, 7, 8, 9)
    ]
    xref.write_text("# person P1 in every community but c6\n" + ",".join(ids) + "\n")
    peers = [
        peer(2, good.endpoint_urls()["iti38"]),
        peer(3, slow.endpoint_urls()["iti38"]),
        peer(4, faulty.endpoint_urls()["iti38"]),
        peer(5, f"https://127.0.0.1:{silent_port}/xca/iti38", "hung"),
        peer(6, unmapped.endpoint_urls()["iti38"]),
        peer(7, f"https://127.0.0.1:{resetting.port}/xca/iti38", "resetting"),
        peer(8, f"https://127.0.0.1:{untrusted.port}/xca/iti38", "untrusted"),
        peer(9, f"https://127.0.0.1:{_closed_port()}/xca/iti38", "refusing"),
    ]
    initiating = gateway_factory(
        "alpha",
        storage={"data_dir": str(tmp_path / "c1")},
        peers=peers,
        initiating={"peer_deadline": 1.5, "overall_deadline": 3.0, "breaker_failures": 2},
        patient_mapping={"xref_csv": str(xref)},
    )
    yield {"ig": initiating, "calls": calls, "peers": peers}
    resetting.close()
    untrusted.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def find_documents(
    patient: str | None, home: str | None = None, query_id: str = StoredQueryId.FIND_DOCUMENTS
) -> str:
    slot = (
        '<rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>'
        f"<rim:Value>'{escape(patient)}'</rim:Value></rim:ValueList></rim:Slot>"
        if patient
        else ""
    )
    if query_id == StoredQueryId.FIND_DOCUMENTS:
        slot += (
            '<rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList><rim:Value>'
            "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')"
            "</rim:Value></rim:ValueList></rim:Slot>"
        )
    home_attr = f' home="{home}"' if home else ""
    return f"""<query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">
      <query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>
      <rim:AdhocQuery id="{query_id}"{home_attr}>{slot}</rim:AdhocQuery>
    </query:AdhocQueryRequest>"""


def ask(pki: DevPki, ig: Gateway, body: str) -> etree._Element:
    with consumer(pki) as client:
        response = client.post(
            ig.endpoint_urls()["iti18"],
            content=soap12(Action.ITI18, body),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200, response.text
    payload = etree.fromstring(response.content).find(
        f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse"
    )
    assert payload is not None
    return payload


def errors(payload: etree._Element) -> list[dict[str, str]]:
    return [dict(e.attrib) for e in payload.iter(f"{{{RS}}}RegistryError")]


def test_fan_out_merges_good_peers_and_reports_every_failed_one(
    federation: dict[str, Any], pki: DevPki
) -> None:
    payload = ask(pki, federation["ig"], find_documents(f"P1^^^&{LOCAL_AA}&ISO"))
    assert payload.get("status") == ResponseStatus.PARTIAL_SUCCESS
    objects = payload.findall(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}ExtrinsicObject")
    # The good and the slow-but-within-deadline peer answered, each under its own home.
    homes = sorted(o.get("home") or "" for o in objects)
    assert homes == [community(2)["home_community_id"], community(3)["home_community_id"]]
    # Each peer was asked with *its* patient id for the person (cross-reference table).
    assert federation["calls"]["c2"] == [
        f"'REMOTE2^^^&{community(2)['patient_id_assigning_authority']}&ISO'"
    ]
    received = {o.get("home"): o.find(f"{{{RIM}}}ExternalIdentifier").get("value") for o in objects}  # type: ignore[union-attr]
    assert received[community(3)["home_community_id"]].startswith("REMOTE3^^^")
    found = errors(payload)
    unavailable = {e["location"] for e in found if e["errorCode"] == "XDSUnavailableCommunity"}
    assert unavailable == {community(i)["home_community_id"] for i in (4, 5, 7, 8, 9)}
    assert all(
        e["severity"] == ErrorSeverity.ERROR
        for e in found
        if e["errorCode"] == "XDSUnavailableCommunity"
    )
    # The community that does not know the person was skipped, with a warning, and not asked.
    skipped = [e for e in found if e["errorCode"] == "XDSUnknownPatientId"]
    assert [e["location"] for e in skipped] == [community(6)["home_community_id"]]
    assert skipped[0]["severity"] == ErrorSeverity.WARNING
    assert federation["calls"]["c6"] == []


def test_bad_consumer_queries_are_refused_without_asking_peers(
    federation: dict[str, Any], pki: DevPki
) -> None:
    ig = federation["ig"]
    cases = {
        "XDSStoredQueryMissingParam": find_documents(None),
        "XDSUnknownCommunity": find_documents(f"P1^^^&{LOCAL_AA}&ISO", home="urn:oid:1.2.3.999"),
        "XDSUnknownPatientId": find_documents("P1^^^&1.2.3.4.5&ISO"),
        "XDSUnknownStoredQuery": find_documents(
            f"P1^^^&{LOCAL_AA}&ISO", query_id="urn:uuid:00000000-0000-0000-0000-000000000000"
        ),
        "XDSMissingHomeCommunityId": find_documents(None, query_id=StoredQueryId.GET_DOCUMENTS),
    }
    for code, body in cases.items():
        payload = ask(pki, ig, body)
        assert payload.get("status") == ResponseStatus.FAILURE, code
        assert [e["errorCode"] for e in errors(payload)] == [code]
    assert federation["calls"] == {"c2": [], "c3": [], "c6": []}


def test_a_query_with_home_goes_only_to_that_community(
    federation: dict[str, Any], pki: DevPki
) -> None:
    home = community(2)["home_community_id"]
    payload = ask(pki, federation["ig"], find_documents(f"P1^^^&{LOCAL_AA}&ISO", home=home))
    assert payload.get("status") == ResponseStatus.SUCCESS
    assert federation["calls"]["c2"] and not federation["calls"]["c3"]


def test_circuit_breaker_skips_a_failing_peer(federation: dict[str, Any], pki: DevPki) -> None:
    ig = federation["ig"]
    for _ in range(2):  # breaker_failures = 2
        ask(pki, ig, find_documents(f"P1^^^&{LOCAL_AA}&ISO"))
    gateway: Gateway = ig
    hung = community(5)["home_community_id"]
    assert gateway.initiating.health[hung].is_open()
    payload = ask(pki, ig, find_documents(f"P1^^^&{LOCAL_AA}&ISO"))
    contexts = [e["codeContext"] for e in errors(payload) if e.get("location") == hung]
    assert contexts and "marked down" in contexts[0]


def test_breaker_probe_brings_back_a_peer_only_with_its_pinned_certificate(
    pki: DevPki, tmp_path: Path
) -> None:
    """The background probe of an open breaker closes it once the peer answers over mutual
    TLS, but not while the peer presents a certificate other than the one pinned for it."""

    beta_thread = GatewayThread(make_config(pki, tmp_path, "beta"))
    beta = beta_thread.__enter__()
    alpha_thread: GatewayThread | None = None
    try:
        home = beta.config.community.home_community_id
        alpha_thread = GatewayThread(
            make_config(
                pki,
                tmp_path,
                "alpha",
                initiating={"breaker_failures": 1, "breaker_open_seconds": 0.3},
                peers=[
                    {
                        "name": "beta",
                        "home_community_id": home,
                        "iti38": beta.endpoint_urls()["iti38"],
                    }
                ],
            )
        )
        alpha = alpha_thread.__enter__()
        initiating = alpha.initiating
        peer = initiating.all_peers[home]
        health = initiating.health[home]

        def trip() -> None:
            health.failure()
            alpha_thread.loop.call_soon_threadsafe(initiating._start_probe, peer)

        alpha.peer_client.pin(peer.iti38, "00" * 32)  # not beta's certificate
        trip()
        time.sleep(1.0)  # several probes (every 0.1 s): each reaches beta, none is accepted
        assert health.consecutive_failures == 1
        alpha.peer_client.pins.clear()
        assert wait_for(lambda: health.consecutive_failures == 0, timeout=10)
        assert not health.is_open()
    finally:
        if alpha_thread is not None:
            alpha_thread.__exit__(None, None, None)
        beta_thread.__exit__(None, None, None)
