"""Patient-id mapping sources in order (xref → pix → xcpd), caching, and the end-to-end path:
an ITI-18 at the initiating gateway whose patient is found at the peer through XCPD."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.test_initiating import echo_peer, errors, find_documents
from tests.test_initiating import install as install_iti38
from tests.test_iti55 import install, tls_of
from tests.test_server import consumer, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.initiating.patient_mapping import (
    PatientIdMapper,
    XcpdPeer,
    parse_patient_mapping_config,
)
from xca_gateway.patients.directory import Demographics, PatientDirectory
from xca_gateway.patients.xref import CrossReferenceTable
from xca_gateway.protocol.namespaces import QUERY, SOAP12, Action, ErrorSeverity
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.soap import SoapFault
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.protocol.tls import gateway_client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import ConfigError, OutboundConfig, PeerConfig
from xca_gateway.transactions import iti45, iti55
from xca_gateway.xds.patient_id import PatientId

ALPHA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.1"
ALPHA_AA = "1.3.6.1.4.1.21367.13.20.1000"
BETA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
BETA_AA = "1.3.6.1.4.1.21367.13.20.2000"

ALICE = Demographics(family="Lindqvist", given="Alice", birth_date="19620314", gender="F")
BOB = Demographics(family="Haugen", given="Bob", birth_date="19751102", gender="M")
CAROL = Demographics(family="Berg", given="Carol", birth_date="19880527", gender="F")

# Alpha's patients: X is cross-referenced locally, P known to the PIX Manager, A(lice) only
# discoverable at beta with XCPD, C(arol) is in alpha's directory but unknown at beta.
P_X = PatientId("C01-1000", ALPHA_AA)
P_P = PatientId("C01-1002", ALPHA_AA)
P_A = PatientId("C01-1001", ALPHA_AA)
P_C = PatientId("C01-1003", ALPHA_AA)


def counting(handler: Handler, calls: list[str]) -> Handler:
    async def handle(request: SoapRequest) -> SoapResponse:
        calls.append(request.envelope.addressing.action)
        return await handler(request)

    return handle


@pytest.fixture
def region(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """beta answers XCPD from its directory; gamma is the region's PIX Manager."""
    calls: dict[str, list[str]] = {"pix": [], "xcpd": []}
    beta = gateway_factory("beta")
    beta_directory = PatientDirectory(tmp_path / "beta-patients.sqlite3")
    beta_directory.register(PatientId("C02-2001", BETA_AA), ALICE)
    beta_directory.register(PatientId("C02-2002", BETA_AA), BOB)
    xcpd = iti55.iti55_handler(
        beta_directory, home_community_id=BETA_HOME, assigning_authority=BETA_AA
    )
    xcpd_url = install(beta, iti55.endpoint(counting(xcpd, calls["xcpd"])))

    mpi = tmp_path / "mpi.csv"
    mpi.write_text(f"{P_P},C02-2002^^^&{BETA_AA}&ISO\n", encoding="utf-8")
    gamma = gateway_factory("gamma", patient_mapping={"xref_csv": str(mpi)})
    pix = iti45.iti45_handler(gamma.xref)
    pix_url = install(gamma, iti45.endpoint(counting(pix, calls["pix"])))
    yield {"beta": beta, "xcpd_url": xcpd_url, "pix_url": pix_url, "calls": calls}
    beta_directory.close()


@pytest.fixture
async def mapper_parts(
    pki: DevPki, tmp_path: Path
) -> AsyncIterator[tuple[PeerClient, CrossReferenceTable, PatientDirectory]]:
    client = PeerClient(gateway_client_context(tls_of(pki, "alpha")), OutboundConfig())
    xref = CrossReferenceTable(tmp_path / "alpha-xref.sqlite3")
    xref.link([P_X, PatientId("C02-2000", BETA_AA)])
    directory = PatientDirectory(tmp_path / "alpha-patients.sqlite3")
    for pid, d in ((P_X, CAROL), (P_P, BOB), (P_A, ALICE), (P_C, CAROL)):
        directory.register(pid, d)
    yield client, xref, directory
    directory.close()
    xref.close()
    await client.aclose()


def make_mapper(
    parts: tuple[PeerClient, CrossReferenceTable, PatientDirectory],
    region: dict[str, Any],
    xcpd_url: str | None = None,
    **kw: Any,
) -> PatientIdMapper:
    client, xref, directory = parts
    return PatientIdMapper(
        xref,
        peer_client=client,
        pix_manager=region["pix_url"],
        directory=directory,
        xcpd_peers={BETA_AA: XcpdPeer("beta", xcpd_url or region["xcpd_url"], BETA_HOME)},
        home_community_id=ALPHA_HOME,
        local_authority=ALPHA_AA,
        deadline=10,
        **kw,
    )


ALL = ("xref", "pix", "xcpd")


async def test_sources_are_tried_in_the_configured_order(
    region: dict[str, Any], mapper_parts: Any
) -> None:
    mapper = make_mapper(mapper_parts, region)
    calls = region["calls"]
    from_xref = await mapper.resolve(P_X, BETA_AA, ALL)
    assert (from_xref.patient_id, from_xref.source) == (PatientId("C02-2000", BETA_AA), "xref")
    assert calls == {"pix": [], "xcpd": []}  # nobody asked when the table knows

    from_pix = await mapper.resolve(P_P, BETA_AA, ALL)
    assert (from_pix.patient_id, from_pix.source) == (PatientId("C02-2002", BETA_AA), "pix")
    assert (len(calls["pix"]), len(calls["xcpd"])) == (1, 0)

    from_xcpd = await mapper.resolve(P_A, BETA_AA, ALL)
    assert (from_xcpd.patient_id, from_xcpd.source) == (PatientId("C02-2001", BETA_AA), "xcpd")
    # PIX was asked first (did not know Alice), then XCPD.
    assert (len(calls["pix"]), len(calls["xcpd"])) == (2, 1)
    assert any(r.startswith("pix:") for r in from_xcpd.reasons)


async def test_order_is_per_peer(region: dict[str, Any], mapper_parts: Any) -> None:
    mapper = make_mapper(mapper_parts, region)
    # Bob is known to both the PIX Manager and beta's XCPD: the first source listed wins.
    found = await mapper.resolve(P_P, BETA_AA, ("xcpd", "pix"))
    assert (found.patient_id, found.source) == (PatientId("C02-2002", BETA_AA), "xcpd")
    assert region["calls"]["pix"] == []


async def test_answers_are_cached_in_the_cross_reference_table(
    region: dict[str, Any], mapper_parts: Any
) -> None:
    mapper = make_mapper(mapper_parts, region)
    _, xref, _ = mapper_parts
    first = await mapper.to_peer(P_A, BETA_AA, ("xcpd",))
    assert first == PatientId("C02-2001", BETA_AA)
    assert xref.lookup(P_A, BETA_AA) == first
    again = await mapper.resolve(P_A, BETA_AA, ("xcpd",))
    assert (again.patient_id, again.source) == (first, "xref")
    assert len(region["calls"]["xcpd"]) == 1
    pix_first = await mapper.to_peer(P_P, BETA_AA, ("pix",))
    assert pix_first is not None and xref.lookup(P_P, BETA_AA) == pix_first


async def test_an_answer_contradicting_the_table_is_not_used(
    region: dict[str, Any], mapper_parts: Any
) -> None:
    mapper = make_mapper(mapper_parts, region)
    _, xref, _ = mapper_parts
    # Beta's C02-2001 is known here as another alpha patient than the one being looked up.
    other = PatientId("C01-1005", ALPHA_AA)
    xref.link([other, PatientId("C02-2001", BETA_AA)])
    result = await mapper.resolve(P_A, BETA_AA, ("xcpd",))
    assert result.patient_id is None and "contradicts the cross-reference table" in result.reason
    assert len(region["calls"]["xcpd"]) == 1
    assert xref.identifiers(other) == [other, PatientId("C02-2001", BETA_AA)]
    assert xref.identifiers(P_A) == []


async def test_caching_can_be_switched_off(region: dict[str, Any], mapper_parts: Any) -> None:
    mapper = make_mapper(mapper_parts, region, cache_answers=False)
    _, xref, _ = mapper_parts
    assert await mapper.to_peer(P_A, BETA_AA, ("xcpd",)) is not None
    assert await mapper.to_peer(P_A, BETA_AA, ("xcpd",)) is not None
    assert xref.lookup(P_A, BETA_AA) is None
    assert len(region["calls"]["xcpd"]) == 2


async def test_a_miss_is_remembered_for_a_while(region: dict[str, Any], mapper_parts: Any) -> None:
    remembering = make_mapper(mapper_parts, region)
    for _ in range(3):
        miss = await remembering.resolve(P_C, BETA_AA, ("xcpd",))
        assert miss.patient_id is None and "no single confident match" in miss.reason
    assert len(region["calls"]["xcpd"]) == 1
    forgetting = make_mapper(mapper_parts, region, negative_cache_seconds=0)
    await forgetting.resolve(P_C, BETA_AA, ("xcpd",))
    await forgetting.resolve(P_C, BETA_AA, ("xcpd",))
    assert len(region["calls"]["xcpd"]) == 3


async def test_unknown_everywhere_gives_the_reason_of_each_source(
    region: dict[str, Any], mapper_parts: Any
) -> None:
    mapper = make_mapper(mapper_parts, region)
    nowhere = PatientId("C01-9999", ALPHA_AA)  # not even in the local directory
    result = await mapper.resolve(nowhere, BETA_AA, ALL)
    assert result.patient_id is None and result.source is None
    assert [r.split(":")[0] for r in result.reasons] == ["xref", "pix", "xcpd"]
    assert "not in the local patient directory" in result.reasons[2]
    assert region["calls"]["xcpd"] == []  # no demographics: nothing to ask with


async def test_an_unreachable_or_faulting_peer_is_a_reason_and_not_remembered(
    gateway_factory: Callable[..., Gateway], region: dict[str, Any], mapper_parts: Any
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    down = make_mapper(mapper_parts, region, xcpd_url=f"https://127.0.0.1:{port}/xca/iti55")
    result = await down.resolve(P_A, BETA_AA, ("xcpd",))
    assert result.patient_id is None and result.reason.startswith("xcpd: connect")

    faults: list[str] = []

    async def explode(request: SoapRequest) -> SoapResponse:
        raise SoapFault.receiver("matcher exploded")

    broken = gateway_factory("alpha")
    url = install(broken, iti55.endpoint(counting(explode, faults)))
    faulty = make_mapper(mapper_parts, region, xcpd_url=url)
    for _ in range(2):
        result = await faulty.resolve(P_A, BETA_AA, ("xcpd",))
        assert result.patient_id is None and "matcher exploded" in result.reason
    assert len(faults) == 2  # failures are retried, unlike "not known" answers


async def test_same_domain_passes_through_and_old_constructor_still_works(
    mapper_parts: Any,
) -> None:
    _, xref, _ = mapper_parts
    mapper = PatientIdMapper(xref)
    assert await mapper.to_peer(P_A, None) == P_A
    assert await mapper.to_peer(P_A, ALPHA_AA) == P_A
    assert await mapper.to_peer(P_X, BETA_AA) == PatientId("C02-2000", BETA_AA)
    # pix / xcpd without their settings are skipped with a reason, not an exception.
    result = await mapper.resolve(P_A, BETA_AA, ALL)
    assert result.patient_id is None
    assert result.reasons[1:] == (
        "pix: no PIX Manager configured",
        "xcpd: no XCPD endpoint configured for this peer",
    )


def test_learned_links_never_merge_two_people(tmp_path: Path) -> None:
    xref = CrossReferenceTable(tmp_path / "x.sqlite3")
    a1, a2 = PatientId("A1", ALPHA_AA), PatientId("A2", BETA_AA)
    b1 = PatientId("B1", ALPHA_AA)
    xref.link([a1, a2])
    # a1 already has another id in beta's domain, a2 another in alpha's: refused.
    assert not xref.link_if_consistent(a1, PatientId("A2-other", BETA_AA))
    assert not xref.link_if_consistent(b1, a2)
    assert xref.lookup(b1, BETA_AA) is None
    assert xref.identifiers(a1) == [a1, a2]
    # Re-learning what is known, or something new, is fine.
    assert xref.link_if_consistent(a1, a2)
    assert xref.link_if_consistent(b1, PatientId("B2", BETA_AA))
    assert xref.lookup(b1, BETA_AA) == PatientId("B2", BETA_AA)
    assert xref.knows_authority(BETA_AA) and not xref.knows_authority("1.2.3")
    xref.close()


# ---------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Peer(PeerConfig):
    # The key the lead adds to PeerConfig; declared here so the test runs before and after.
    xcpd: str | None = None


def peer(**kw: Any) -> Peer:
    values: dict[str, Any] = {
        "name": "beta",
        "home_community_id": BETA_HOME,
        "iti38": "https://127.0.0.1:1/xca/iti38",
        "patient_id_assigning_authority": BETA_AA,
    }
    values.update(kw)
    return Peer(**values)


def test_config_defaults_and_paths(tmp_path: Path) -> None:
    cfg = parse_patient_mapping_config({}, tmp_path, data_dir=tmp_path / "data")
    assert cfg.directory == tmp_path / "data" / "patients.sqlite3"
    assert cfg.xref_csv is None and cfg.pix_manager is None and cfg.xcpd_peers == {}
    assert cfg.xcpd_responder and not cfg.pix_responder
    cfg = parse_patient_mapping_config(
        {"xref_csv": "mpi.csv", "directory": "/var/lib/x/p.sqlite3", "pix_manager": "https://m/p"},
        tmp_path,
        data_dir=tmp_path,
        peers=[peer(xcpd="https://beta/xca/iti55", patient_id_sources=("xcpd", "pix"))],
    )
    assert cfg.xref_csv == tmp_path / "mpi.csv"
    assert cfg.directory == Path("/var/lib/x/p.sqlite3")
    assert cfg.xcpd_peers == {BETA_AA: XcpdPeer("beta", "https://beta/xca/iti55", BETA_HOME)}


@pytest.mark.parametrize(
    ("table", "peers", "message"),
    [
        ({"bogus": 1}, [], "unknown key"),
        ({"pix_manager": "http://m/p"}, [], "https://"),
        ({"deadline": 0}, [], "positive"),
        ({"xcpd_minimum_score": 101}, [], "0..100"),
        ({}, [peer(patient_id_sources=("pix",))], "pix_manager is unset"),
        ({}, [peer(patient_id_sources=("xcpd",))], "no xcpd URL"),
        ({}, [peer(patient_id_sources=("mpi",))], "not supported: mpi"),
        ({}, [peer(xcpd="http://beta/xca/iti55")], "https://"),
        (
            {},
            [
                peer(xcpd="https://b/x", patient_id_assigning_authority=None),
                peer(xcpd="https://b/x", patient_id_sources=("xcpd",), name="b2"),
                peer(xcpd="https://b/y", name="b3"),
            ],
            "already answers XCPD",
        ),
        (
            {},
            [
                peer(
                    xcpd="https://b/x",
                    patient_id_assigning_authority=None,
                    patient_id_sources=("xcpd",),
                )
            ],
            "no patient_id_assigning_authority",
        ),
    ],
)
def test_config_errors(
    tmp_path: Path, table: dict[str, Any], peers: list[Peer], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_patient_mapping_config(table, tmp_path, data_dir=tmp_path, peers=peers)


# ---------------------------------------------------------------------------- end to end


def test_initiating_gateway_finds_the_peer_id_with_xcpd(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    """ITI-18 at alpha → XCPD to beta → ITI-38 to beta with beta's id for the patient."""
    asked: list[str] = []
    beta = gateway_factory("beta")
    install_iti38(beta, echo_peer(calls=asked))
    beta_directory = PatientDirectory(tmp_path / "beta-patients.sqlite3")
    beta_directory.register(PatientId("C02-2001", BETA_AA), ALICE)
    xcpd_url = install(
        beta,
        iti55.endpoint(
            iti55.iti55_handler(
                beta_directory,
                home_community_id=BETA_HOME,
                assigning_authority=BETA_AA,
                xref=beta.xref,
            )
        ),
    )
    alpha = gateway_factory(
        "alpha",
        peers=[
            {
                "name": "beta",
                "home_community_id": BETA_HOME,
                "iti38": beta.endpoint_urls()["iti38"],
                "patient_id_assigning_authority": BETA_AA,
            }
        ],
        initiating={"query_local_community": False},
    )
    alpha_directory = PatientDirectory(tmp_path / "alpha-patients.sqlite3")
    alpha_directory.register(P_A, ALICE)
    alpha_directory.register(P_C, CAROL)
    # Until config.py accepts source "xcpd" and a peer's xcpd URL, set them up by hand.
    initiating = alpha.initiating
    initiating.peers[BETA_HOME] = dataclasses.replace(
        initiating.peers[BETA_HOME], patient_id_sources=("xref", "xcpd")
    )
    initiating.mapper = PatientIdMapper(
        alpha.xref,
        peer_client=alpha.peer_client,
        directory=alpha_directory,
        xcpd_peers={BETA_AA: XcpdPeer("beta", xcpd_url, BETA_HOME)},
        home_community_id=ALPHA_HOME,
        local_authority=ALPHA_AA,
    )
    try:
        payload = ask_iti18(pki, alpha, find_documents(str(P_A)))
        assert asked == [f"'C02-2001^^^&{BETA_AA}&ISO'"]
        assert payload.get("status") == "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
        # Both sides learned the correlation.
        assert alpha.xref.lookup(P_A, BETA_AA) == PatientId("C02-2001", BETA_AA)
        assert beta.xref.lookup(PatientId("C02-2001", BETA_AA), ALPHA_AA) == P_A

        # Carol is unknown at beta: beta is skipped with a warning, not queried.
        payload = ask_iti18(pki, alpha, find_documents(str(P_C)))
        assert len(asked) == 1
        skipped = [e for e in errors(payload) if e["errorCode"] == "XDSUnknownPatientId"]
        assert [(e["location"], e["severity"]) for e in skipped] == [
            (BETA_HOME, ErrorSeverity.WARNING)
        ]
    finally:
        alpha_directory.close()
        beta_directory.close()


def ask_iti18(pki: DevPki, gateway: Gateway, body: str) -> etree._Element:
    with consumer(pki) as client:
        response = client.post(
            gateway.endpoint_urls()["iti18"],
            content=soap12(Action.ITI18, body),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200, response.text
    payload = etree.fromstring(response.content).find(
        f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse"
    )
    assert payload is not None
    return payload
