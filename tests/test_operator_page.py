"""The operator page on the admin port: real gateways, a dead peer, a down audit destination,
refused callers; its JSON, its metrics, and a Chromium screenshot (docs/operator-page.png)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import wait_for
from tests.test_initiating import find_documents
from tests.test_server import soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.app.operator_page import (
    AuditStatus,
    OperatorPage,
    OperatorStatus,
    PeerStatus,
    certificate_status,
)
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki, issue_client_certificate

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ALPHA_PATIENT = "C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def alpha(gateway_factory: Callable[..., Gateway], pki: DevPki) -> Gateway:
    """alpha with two peers: beta up (its certificate pinned), gamma dead; auditing to a
    repository that is down; a breaker that opens at the first failure."""
    beta = gateway_factory("beta")
    beta_cert = x509.load_pem_x509_certificate(pki.communities["beta"].cert.read_bytes())
    beta_pin = hashlib.sha256(beta_cert.public_bytes(Encoding.DER)).hexdigest()
    dead = f"https://127.0.0.1:{free_port()}"
    return gateway_factory(
        "alpha",
        peers=[
            {
                "name": "beta",
                "home_community_id": "urn:oid:1.3.6.1.4.1.21367.13.70.2",
                "iti38": f"{beta.base_url}/xca/iti38",
                "iti39": f"{beta.base_url}/xca/iti39",
                "certificate_sha256": beta_pin,
            },
            {
                "name": "gamma",
                "home_community_id": "urn:oid:1.3.6.1.4.1.21367.13.70.3",
                "iti38": f"{dead}/xca/iti38",
            },
        ],
        initiating={"breaker_failures": 1, "breaker_open_seconds": 300, "peer_deadline": 5},
        audit={
            "destinations": [
                {"name": "arr", "transport": "tls", "host": "127.0.0.1", "port": free_port()}
            ]
        },
    )


def exercise(alpha: Gateway, pki: DevPki) -> None:
    """A consumer query (beta answers, gamma does not), a TLS handshake refused (foreign CA)
    and a caller refused at a door (a certificate of the CA that the policy does not name)."""
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    with httpx.Client(verify=ctx, timeout=30) as client:
        response = client.post(
            alpha.base_url + "/ig/iti18",
            content=soap12(Action.ITI18, find_documents(ALPHA_PATIENT)),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200
    foreign = client_context(pki.ca, pki.untrusted_client.cert, pki.untrusted_client.key)
    with (
        httpx.Client(verify=foreign, timeout=10) as client,
        pytest.raises((httpx.HTTPError, ssl.SSLError)),
    ):
        client.post(alpha.base_url + "/ig/iti18", content=b"<x/>")
    stranger = issue_client_certificate(pki, "stranger")
    with httpx.Client(
        verify=client_context(pki.ca, stranger.cert, stranger.key), timeout=10
    ) as client:
        refused = client.post(
            alpha.base_url + "/ig/iti18",
            content=soap12(Action.ITI18, find_documents(ALPHA_PATIENT)),
            headers={"content-type": "application/soap+xml"},
        )
    assert refused.status_code == 403
    assert wait_for(lambda: len(alpha.handshake_failures) >= 1)


def test_status_shows_peers_certificates_audit_and_refusals(alpha: Gateway, pki: DevPki) -> None:
    exercise(alpha, pki)
    status = httpx.get(alpha.admin_url + "/status.json").json()
    assert status["community"] == "alpha"
    assert status["version"]
    peers = {p["name"]: p for p in status["peers"]}
    assert peers["beta"]["state"] == "up" and peers["beta"]["breaker"] == "closed"
    assert peers["beta"]["pinned"] is True and peers["beta"]["last_error"] is None
    assert peers["gamma"]["state"] == "down" and peers["gamma"]["breaker"] == "open"
    assert peers["gamma"]["consecutive_failures"] == 1
    assert "connect" in peers["gamma"]["last_error"].lower(), peers["gamma"]["last_error"]
    kinds = {(c["kind"], c["name"]): c for c in status["certificates"]}
    assert kinds[("own", "alpha")]["subject"].startswith("CN=alpha.xca-gateway.test")
    assert kinds[("peer", "beta")]["pinned"] is True
    assert kinds[("peer", "beta")]["level"] == "ok"
    assert ("trust_anchor", "trust store #1") in kinds
    assert ("peer", "gamma") not in kinds  # never reached: no certificate seen
    audit = status["audit"]
    assert audit["enabled"] and [d["name"] for d in audit["destinations"]] == ["arr"]
    assert audit["destinations"][0]["up"] is False
    assert audit["pending"] >= 1  # at least Application Start waits for the repository
    refusals = status["refusals"]
    assert {r["kind"] for r in refusals} == {"door", "tls"}
    door = next(r for r in refusals if r["kind"] == "door")
    assert "stranger" in door["who"] and door["where"].startswith("/ig/iti18")
    assert status["refused_at_doors"] == 1 and status["refused_handshakes"] >= 1
    assert any("gamma" in w for w in status["warnings"])
    assert any("audit destination arr is down" in w for w in status["warnings"])


def test_page_is_html_with_the_same_facts(alpha: Gateway, pki: DevPki) -> None:
    exercise(alpha, pki)
    response = httpx.get(alpha.admin_url + "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html = response.text
    for fact in ("alpha", "beta", "gamma", "pinned", "open", "Recent refusals", "stranger"):
        assert fact in html, fact
    assert httpx.post(alpha.admin_url + "/").status_code == 405


def test_metrics_export_version_and_certificate_expiry(alpha: Gateway, pki: DevPki) -> None:
    exercise(alpha, pki)
    text = httpx.get(alpha.admin_url + "/metrics").text
    build = [line for line in text.splitlines() if line.startswith("xca_gateway_build_info{")]
    assert len(build) == 1 and 'community="alpha"' in build[0] and build[0].endswith(" 1.0")
    expiry = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("xca_gateway_certificate_expiry_seconds{")
    }
    own = next(v for k, v in expiry.items() if 'kind="own"' in k)
    pem = x509.load_pem_x509_certificate(pki.communities["alpha"].cert.read_bytes())
    expected = (pem.not_valid_after_utc - datetime.now(UTC)).total_seconds()
    assert abs(own - expected) < 120
    assert any('kind="peer",name="beta"' in k for k in expiry)


def test_certificate_levels_warn_from_30_days(pki: DevPki) -> None:
    cert = x509.load_pem_x509_certificate(pki.communities["alpha"].cert.read_bytes())
    end = cert.not_valid_after_utc
    assert certificate_status(cert, kind="own", name="a", now=end - timedelta(days=31)).level == (
        "ok"
    )
    soon = certificate_status(cert, kind="own", name="a", now=end - timedelta(days=29, hours=1))
    assert soon.level == "warning" and soon.days_left == 29
    assert certificate_status(cert, kind="own", name="a", now=end).level == "expired"


def test_page_escapes_what_peers_and_callers_say(alpha: Gateway) -> None:
    page: OperatorPage = alpha.operator_page
    status = page.status()
    hostile = "<script>alert(1)</script>"
    peer = PeerStatus(
        hostile, "urn:oid:1", "https://x", "down", "open", 1.0, 1, None, hostile, "now", None, False
    )
    html = page.render_html(
        replace(status, peers=(peer,), audit=replace(status.audit, spool_dir=hostile))
    )
    assert hostile not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert isinstance(status.audit, AuditStatus) and isinstance(status, OperatorStatus)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_screenshot_in_chromium(alpha: Gateway, pki: DevPki, tmp_path: Path) -> None:
    """Debian's headless Chromium renders the page (no script, no external resources).
    The screenshot is kept as docs/operator-page.png when XCA_UPDATE_DOCS=1 (or when it is
    missing), so that ordinary test runs leave the working tree clean."""
    exercise(alpha, pki)
    shot = tmp_path / "operator-page.png"
    env: dict[str, Any] = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1440,1000",
            f"--screenshot={shot}",
            alpha.admin_url + "/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert _png_size(data) == (1440, 1000)
    assert len(data) > 30_000, "a blank page compresses to almost nothing"
    target = REPO / "docs" / "operator-page.png"
    if os.environ.get("XCA_UPDATE_DOCS") or not target.exists():
        shutil.copyfile(shot, target)


def test_page_answers_only_a_host_that_names_the_admin_listener(alpha: Gateway) -> None:
    # The page shows what peers said and who was refused: a DNS-rebinding web page (whose name
    # the browser sends as Host) must not read it; probes and Prometheus are not concerned.
    refused_before = alpha.guard.refused
    for path in ("/", "/status.json"):
        rebinding = httpx.get(
            alpha.admin_url + path, headers={"host": f"evil.example:{alpha.admin.port}"}
        )
        assert rebinding.status_code == 403
        assert "peer" not in rebinding.text
    assert alpha.guard.refused == refused_before + 2
    assert httpx.get(alpha.admin_url + "/status.json").status_code == 200
    named = httpx.get(alpha.admin_url + "/", headers={"host": f"localhost:{alpha.admin.port}"})
    assert named.status_code == 200
    for path in ("/healthz", "/metrics"):
        probe = httpx.get(alpha.admin_url + path, headers={"host": "evil.example"})
        assert probe.status_code == 200
