"""Officers' browsers and nodes on listeners of their own; the repository's /metrics.

With ``[arr.https] ui_port`` the review UI gets a listener that asks for no client certificate:
a browser that does not trust the repository yet (it drops the handshake) is counted, never
recorded as a failed node authentication. The mutual-TLS listener then requires a certificate,
and a node refused there is a Security Alert as before. ``[arr.admin]`` serves Prometheus text.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.test_arr_receiver import bound_access, query_message, refused, tls_socket
from xca_gateway.arr.app import AuditRecordRepository, create_officer, parse_arr_config
from xca_gateway.arr.harness import RepositoryThread, dev_config
from xca_gateway.arr.store import EventFilter
from xca_gateway.audit.syslog import frame
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.settings import ConfigError

ALERTS = EventFilter(event_codes=(("110113",),), subtypes=(("110126",),))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("arr-listeners-pki"), ["alpha", "arr", "north"])


@pytest.fixture
def split(pki: DevPki, tmp_path: Path) -> Iterator[tuple[AuditRecordRepository, RepositoryThread]]:
    config = dev_config(
        pki,
        tmp_path,
        https={"ui_port": 0},
        admin={"port": 0},
        access=bound_access(["alpha-gw"]),
    )
    create_officer(config, "olga", "a long enough password")
    thread = RepositoryThread(config)
    repo = thread.__enter__()
    try:
        yield repo, thread
    finally:
        thread.__exit__(None, None, None)


def alerts(thread: RepositoryThread, repo: AuditRecordRepository) -> int:
    thread.flush()
    return repo.store.count(ALERTS)


def browser_without_the_ca(port: int) -> None:
    """What a browser that does not trust the repository's CA does: it refuses the server's
    certificate and drops the handshake."""
    ctx = ssl.create_default_context()  # the system's CAs, not the development CA
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_browsers_are_not_nodes(
    split: tuple[AuditRecordRepository, RepositoryThread], pki: DevPki
) -> None:
    repo, thread = split
    assert repo.ui_https is not None and repo.ui_url != repo.base_url
    before = alerts(thread, repo)
    # Four visits of a browser that does not hold the CA yet: nothing in the trail.
    for _ in range(4):
        browser_without_the_ca(repo.ui_https.port)
    assert wait_for(lambda: repo.counters.get("ui_handshake_failures") >= 4)
    assert alerts(thread, repo) == before
    # With the CA (what the demo hands the officer), no client certificate is asked for.
    browser = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(verify=browser, timeout=30, base_url=repo.ui_url) as ui:
        page = ui.get("/login")
        assert page.status_code == 200 and 'id="username"' in page.text
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        signed_in = ui.post(
            "/login",
            data={
                "csrf": token.group(1),
                "username": "olga",
                "password": "a long enough password",
            },
        )
        assert signed_in.status_code == 303
        assert ui.get("/report").status_code == 200
        # The ITI-81 API is for nodes: not on the officers' listener.
        assert ui.get("/fhir/AuditEvent", params={"date": "ge2020"}).status_code == 404
    assert alerts(thread, repo) == before
    # The nodes' listener requires a certificate: a refused node is a Security Alert.
    with socket.create_connection(("127.0.0.1", repo.https.port), timeout=10) as raw:
        nocert = ssl.create_default_context(cafile=str(pki.ca))
        nocert.check_hostname = False
        try:
            with nocert.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /fhir/metadata HTTP/1.1\r\nhost: x\r\n\r\n")
                tls.recv(1)  # TLS 1.3: the refusal arrives after the client's Finished
        except (ssl.SSLError, OSError):
            pass
    assert wait_for(lambda: alerts(thread, repo) == before + 1)
    # An audit consumer with its certificate searches there.
    consumer = client_context(pki.ca, pki.client.cert, pki.client.key)
    with httpx.Client(verify=consumer, timeout=30, base_url=repo.base_url) as api:
        assert api.get("/fhir/AuditEvent", params={"date": "ge2020"}).status_code == 200
    endpoints = repo.endpoints()
    assert endpoints["ui"] == repo.ui_url and endpoints["uiCertificate"] == repo.base_url
    assert endpoints["fhir"] == repo.base_url + "/fhir"


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert match is not None, (name, text)
    return float(match.group(1))


def test_metrics_show_ingest_store_refusals_and_flags(
    split: tuple[AuditRecordRepository, RepositoryThread], pki: DevPki
) -> None:
    repo, thread = split
    assert repo.admin_url is not None and repo.syslog_tls is not None
    url = repo.admin_url + "/metrics"
    first = httpx.get(url, timeout=30).text
    for name in (
        "xca_arr_ingest_records_per_second",
        "xca_arr_ingested_records_total",
        "xca_arr_store_records",
        "xca_arr_store_bytes",
        "xca_arr_flagged_records_total",
    ):
        assert f"# TYPE {name} " in first
    stored_before = metric(first, "xca_arr_store_records")

    # Two records from alpha, one of them passing itself off as another source (flagged) ...
    with tls_socket(pki, repo.syslog_tls.port, cert="alpha") as tls:
        tls.sendall(
            frame(query_message("M1^^^&1.2.3&ISO", 1))
            + frame(query_message("M1^^^&1.2.3&ISO", 2, source="north-gateway"))
        )
    # ... and a certificate that is no audit source, refused at the syslog door.
    assert refused(pki, repo.syslog_tls.port, "client", query_message("M2^^^&1.2.3&ISO"))
    assert wait_for(lambda: repo.store.count(EventFilter(patients=(("M1|",),))) == 2)
    thread.flush()
    after = httpx.get(url, timeout=30).text
    assert metric(after, "xca_arr_store_records") >= stored_before + 2
    assert metric(after, "xca_arr_ingested_records_total") >= 2
    assert metric(after, "xca_arr_flagged_records_total") >= 1
    assert metric(after, "xca_arr_refused_senders_total", '{door="syslog"}') >= 1
    assert metric(after, "xca_arr_store_bytes") > 0
    assert metric(after, "xca_arr_ingest_records_per_second") > 0
    health = httpx.get(repo.admin_url + "/healthz", timeout=30).json()
    assert health["ready"] is True


def test_listener_configuration(tmp_path: Path) -> None:
    tls = {"certificate": "c.pem", "private_key": "k.pem", "trust_store": "ca.pem"}
    base: dict[str, Any] = {"tls": tls, "https": {"port": 9443, "ui_port": 9444}}
    config = parse_arr_config({**base, "admin": {"port": 9464}}, tmp_path)
    assert config.ui_https is not None and config.ui_https.port == 9444
    assert config.admin_http is not None and config.admin_http.host == "127.0.0.1"
    assert parse_arr_config({"tls": tls}, tmp_path).ui_https is None
    with pytest.raises(ConfigError, match="ui_port"):
        parse_arr_config({"tls": tls, "https": {"ui_port": 70000}}, tmp_path)
    with pytest.raises(ConfigError, match=r"arr\.admin"):
        parse_arr_config({"tls": tls, "admin": {"bind": "x"}}, tmp_path)
