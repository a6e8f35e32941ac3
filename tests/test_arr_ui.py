"""The security officer's review UI: a real Chromium (Debian's, driven by Playwright) signs in,
searches a demo patient, opens an event, exports CSV and PDF; screenshots go to
``test-artifacts/``. Plus the UI's security properties checked over real HTTPS with httpx."""

from __future__ import annotations

import csv
import io
import re
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from xca_gateway.arr.app import AuditRecordRepository, create_officer
from xca_gateway.arr.harness import RepositoryThread, dev_config
from xca_gateway.arr.store import EventFilter
from xca_gateway.audit import messages as am
from xca_gateway.audit.syslog import format_message
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.tools.dicom_samples import local_patient_id
from xca_gateway.transactions import iti38, rad69, rad75

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
OFFICER, PASSWORD = "officer", "correct horse battery staple"
ARC = "1.3.6.1.4.1.21367.13"
COMMUNITIES = ("north", "south", "east")


def demo_patient(community: int, patient: int = 0) -> str:
    """The id the demo gives sample patient ``patient`` (0 = alice) in community ``community``."""
    return f"{local_patient_id(community, patient)}^^^&{ARC}.20.{1000 * (community + 1)}&ISO"


ALICE_NORTH = demo_patient(0)


def _syslog(message: am.AuditMessage, host: str) -> bytes:
    return format_message(
        message.to_xml(),
        outcome=message.outcome,
        timestamp=message.event.date_time,
        hostname=host,
        app_name="xca-gateway",
        procid="1",
    )


def demo_like_events() -> list[bytes]:
    """What the demo's gateways audit when south and east look at alice's images at north,
    and north's own consumer looks at alice across communities."""
    now = datetime.now(UTC)
    out: list[bytes] = []
    for c, name in enumerate(COMMUNITIES):
        ctx = am.AuditContext(am.AuditSource(f"{name}-gateway", f"{ARC}.70.{c + 1}"), host=name)
        for k in range(4):
            peer = COMMUNITIES[(c + 1 + k) % 3]
            requester = am.remote_node(f"127.0.0.{c + 2}", certificate_subject=f"CN={peer}")
            user = [am.xua_requestor(f"dr.{peer}", "idp.example.org", f"Dr {peer.title()}")]
            when = now - timedelta(days=k * 10 + c, hours=k)
            out.append(
                _syslog(
                    iti38.query_audit(
                        ctx,
                        am.Parties(
                            requester=requester,
                            responder=ctx.local_node(f"https://{name}/xca/iti38"),
                            human_requestors=user,
                            when=when,
                        ),
                        side="responding",
                        query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
                        query=b"<AdhocQueryRequest/>",
                        home_community_id=f"urn:oid:{ARC}.70.{c + 1}",
                        patient_ids=[demo_patient(c)],
                    ),
                    name,
                )
            )
            for m in rad75.retrieve_audit(
                ctx,
                am.Parties(
                    requester=requester,
                    responder=ctx.local_node(f"https://{name}/xca/rad75"),
                    human_requestors=user,
                    when=when + timedelta(seconds=5),
                ),
                side="responding",
                instances=[
                    am.ImagingInstanceReference(
                        f"{ARC}.90.{c + 1}.1",
                        f"{ARC}.90.{c + 1}.1.1",
                        f"{ARC}.90.{c + 1}.1.1.{k}",
                        home_community_id=f"urn:oid:{ARC}.70.{c + 1}",
                    )
                ],
                failed=[]
                if k != 3
                else [
                    am.ImagingInstanceReference(
                        "1.2.3",
                        "1.2.3.1",
                        "1.2.3.1.1",
                        home_community_id=f"urn:oid:{ARC}.70.{c + 1}",
                    )
                ],
                patient_id=demo_patient(c),
            ):
                out.append(_syslog(m, name))
        # Someone else (bob) too, so that a search narrows things down.
        out.append(
            _syslog(
                iti38.query_audit(
                    ctx,
                    am.Parties(
                        requester=am.remote_node("127.0.0.9"),
                        responder=ctx.local_node(f"https://{name}/xca/iti38"),
                    ),
                    side="responding",
                    query_id="q",
                    query=b"<q/>",
                    patient_ids=[demo_patient(c, 1)],
                ),
                name,
            )
        )
    return out


@pytest.fixture(scope="module")
def ui_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("arr-ui-pki"), ["alpha", "arr"])


@pytest.fixture(scope="module")
def arr(
    ui_pki: DevPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AuditRecordRepository, RepositoryThread]]:
    workdir = tmp_path_factory.mktemp("arr-ui")
    xref = workdir / "xref.csv"
    xref.write_text(
        "# alice in every community\n" + ",".join(demo_patient(c) for c in range(3)) + "\n",
        encoding="utf-8",
    )
    config = dev_config(
        ui_pki,
        workdir,
        xref_csv=str(xref),
        communities={f"urn:oid:{ARC}.70.{c + 1}": n for c, n in enumerate(COMMUNITIES)},
        ui={"login_attempts": 3, "page_size": 10},
    )
    create_officer(config, OFFICER, PASSWORD)
    create_officer(config, "cert-officer", None, certificate=ui_pki.client.cert)
    thread = RepositoryThread(config)
    repo = thread.__enter__()
    try:
        for raw in demo_like_events():
            repo.ingestor.submit_record_bytes(raw, "127.0.0.1", "tls")
        thread.flush()
        yield repo, thread
    finally:
        thread.__exit__(None, None, None)


def anonymous_context(pki: DevPki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


def login(client: httpx.Client, base: str, username: str, password: str) -> httpx.Response:
    page = client.get(base + "/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    return client.post(
        base + "/login", data={"csrf": token.group(1), "username": username, "password": password}
    )


# --------------------------------------------------------------------------- the browser


def spki_hash(certificate: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)), as Chromium's certificate pinning flags want it."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


@pytest.fixture(scope="module")
def browser_page(ui_pki: DevPki) -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    profile = tempfile.mkdtemp(prefix="arr-ui-chromium-")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            accept_downloads=True,
            viewport={"width": 1400, "height": 1000},
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                # Trust the repository's development certificate (its CA is not in the
                # browser's store) without a failed handshake first.
                f"--ignore-certificate-errors-spki-list={spki_hash(ui_pki.communities['arr'].cert)}",
            ],
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_officer_reviews_a_patient_in_a_real_browser(
    arr: tuple[AuditRecordRepository, RepositoryThread], browser_page: object
) -> None:
    from playwright.sync_api import BrowserContext, expect

    repo, thread = arr
    assert isinstance(browser_page, BrowserContext)
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser_page.new_page()
    base = repo.base_url

    page.goto(base + "/events")
    assert page.url.endswith("/login")  # not signed in: sent to the sign-in page
    page.fill("#username", OFFICER)
    page.fill("#password", "wrong password")
    page.click("#login")
    expect(page.locator("#login-error")).to_contain_text("wrong password")
    page.screenshot(path=str(ARTIFACTS / "arr-ui-01-login-refused.png"))
    page.fill("#username", OFFICER)
    page.fill("#password", PASSWORD)
    page.click("#login")
    expect(page.locator("#officer")).to_have_text(OFFICER)
    page.screenshot(path=str(ARTIFACTS / "arr-ui-02-events.png"), full_page=True)

    # Search for the demo's alice by north's id: the cross-reference finds her in every
    # community (9 events in each), shown newest first, 10 per page.
    page.fill("#f-patient", ALICE_NORTH)
    page.click("#search")
    rows = page.locator("#events tbody tr")
    expect(rows.first).to_be_visible()
    expect(page.locator("#count")).to_have_text("27 events")
    assert rows.count() == 10
    alice_ids = {local_patient_id(c, 0) for c in range(3)}
    for text in rows.all_inner_texts():
        assert any(pid in text for pid in alice_ids)
    assert page.locator("svg#timeline rect.bar").count() > 0
    page.screenshot(path=str(ARTIFACTS / "arr-ui-03-patient-search.png"), full_page=True)
    page.click("#next")
    expect(page.locator("#events tbody tr")).to_have_count(10)
    page.click("#prev")
    expect(page.locator("#events tbody tr")).to_have_count(10)

    # Open an event: all participants and the raw message.
    page.locator("#events a.event-link").first.click()
    expect(page.locator("#participants")).to_be_visible()
    assert page.locator("#participants tbody tr").count() >= 3
    expect(page.locator("#raw")).to_contain_text("<AuditMessage>")
    expect(page.locator("#summary")).to_contain_text("RAD-75")
    page.screenshot(path=str(ARTIFACTS / "arr-ui-04-event-detail.png"), full_page=True)
    page.go_back()

    # Export what was found as CSV.
    with page.expect_download() as download_info:
        page.click("#export-csv")
    download = download_info.value
    target = ARTIFACTS / "arr-ui-export.csv"
    download.save_as(str(target))
    table = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8-sig"))))
    assert len(table) == 27
    assert {row["patient"] for row in table} == {demo_patient(c) for c in range(3)}
    assert {row["allowed"] for row in table} == {"yes", "no"}
    assert {row["community"] for row in table} == set(COMMUNITIES)

    # The patient access report across communities (via the cross-reference): one row per
    # access, not per record. Each community recorded 4 queries and 4 retrieves from peers
    # that do not report here; a retrieve's success and failure records are one access.
    page.goto(base + "/report?patient=" + local_patient_id(0, 0))
    expect(page.locator("#r-accesses")).to_have_text("24")
    expect(page.locator("#report tbody tr")).to_have_count(24)
    expect(page.locator("#r-communities")).to_have_text("3")
    expect(page.locator("#r-failures")).to_have_text("3")
    assert page.locator("svg#report-timeline rect.bar").count() > 0
    page.screenshot(path=str(ARTIFACTS / "arr-ui-05-patient-report.png"), full_page=True)
    with page.expect_download() as pdf_info:
        page.click("#report-pdf")
    pdf = ARTIFACTS / "arr-ui-patient-report.pdf"
    pdf_info.value.save_as(str(pdf))
    assert pdf.read_bytes().startswith(b"%PDF-")
    with page.expect_download() as report_csv_info:
        page.click("#report-csv")
    report_csv = report_csv_info.value.path()
    assert report_csv is not None
    rows_csv = list(csv.DictReader(io.StringIO(Path(report_csv).read_text(encoding="utf-8-sig"))))
    assert len(rows_csv) == 24
    assert {r["community"] for r in rows_csv} == set(COMMUNITIES)
    assert {r["access"] for r in rows_csv} == {"query", "study retrieve"}
    assert {r["allowed"] for r in rows_csv} == {"yes", "partly"}

    page.goto(base + "/dashboard?days=90")
    expect(page.locator("#chart-peers")).to_be_visible()
    expect(page.locator("#failed")).to_contain_text("RAD-75")
    # Each tile counts what the chart below it shows.
    for tile, chart in (("#c-refused", "#chart-refused"), ("#c-failed", "#chart-failed")):
        assert page.locator(tile).inner_text() == page.locator(chart).get_attribute("data-total")
    page.screenshot(path=str(ARTIFACTS / "arr-ui-06-dashboard.png"), full_page=True)

    page.click("#logout")
    assert page.url.endswith("/login")
    page.goto(base + "/events")
    assert page.url.endswith("/login")
    page.close()

    # Everything the officer did is in the trail: sign-in (failed and successful), searches,
    # the event view, the exports, sign-out.
    thread.flush()
    logins = repo.store.search(EventFilter(event_codes=(("110114",),), users=((OFFICER,),)))
    assert {(r.transaction, r.outcome) for r in logins} >= {
        ("110122", 4),
        ("110122", 0),
        ("110123", 0),
    }
    used = repo.store.search(
        EventFilter(event_codes=(("110101",),), users=((OFFICER,),)), limit=100
    )
    objects = set()
    for row in used:
        stored = repo.store.get(row.id)
        assert stored is not None
        objects |= {e.object_id for e in stored.record().entities}
    assert {"/events", "/events.csv", "/report", "/report.pdf", "/report.csv"} <= objects
    assert any(o.startswith("/events/") for o in objects)


# --------------------------------------------------------------------------- security, httpx


def test_session_cookie_and_headers(
    arr: tuple[AuditRecordRepository, RepositoryThread], ui_pki: DevPki
) -> None:
    repo, _ = arr
    with httpx.Client(verify=anonymous_context(ui_pki), timeout=30) as client:
        response = login(client, repo.base_url, OFFICER, PASSWORD)
        assert response.status_code == 303
        cookie = next(
            v
            for k, v in response.headers.multi_items()
            if k == "set-cookie" and v.startswith("arr_session=")
        )
        for attribute in ("Secure", "HttpOnly", "SameSite=Strict"):
            assert attribute in cookie
        page = client.get(repo.base_url + "/events")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src" not in csp and "default-src 'none'" in csp
        assert page.headers["cache-control"] == "no-store"
        assert "<script" not in page.text
        # Read-only: no method but GET changes anything.
        assert client.post(repo.base_url + "/events").status_code == 405
        # Sign-out needs the CSRF token of the session.
        assert client.post(repo.base_url + "/logout", data={"csrf": "forged"}).status_code == 403
        assert client.get(repo.base_url + "/events").status_code == 200


def test_login_needs_the_form_token_and_is_throttled(
    arr: tuple[AuditRecordRepository, RepositoryThread], ui_pki: DevPki
) -> None:
    repo, thread = arr
    base = repo.base_url
    with httpx.Client(verify=anonymous_context(ui_pki), timeout=30) as client:
        # A cross-site POST has no login cookie: refused even with the right password.
        forged = client.post(
            base + "/login", data={"csrf": "x", "username": OFFICER, "password": PASSWORD}
        )
        assert forged.status_code == 401 and "arr_session" not in forged.headers.get(
            "set-cookie", ""
        )
        for _ in range(3):
            assert login(client, base, "mallory", "guess").status_code == 401
        blocked = login(client, base, "mallory", "guess")
        assert "Too many failed attempts" in blocked.text
    thread.flush()
    failures = repo.store.search(EventFilter(event_codes=(("110114",),), users=(("mallory",),)))
    assert len(failures) == 4 and all(r.outcome == 4 for r in failures)
    with httpx.Client(verify=anonymous_context(ui_pki), timeout=30) as client:
        assert client.get(base + "/events").status_code == 303
        assert client.get(base + "/events/1/raw").status_code == 303
        assert client.get(base + "/report.csv?patient=x").status_code == 303


def test_officer_signs_in_with_a_client_certificate(
    arr: tuple[AuditRecordRepository, RepositoryThread], ui_pki: DevPki
) -> None:
    repo, thread = arr
    ctx = client_context(ui_pki.ca, ui_pki.client.cert, ui_pki.client.key)
    with httpx.Client(verify=ctx, timeout=30) as client:
        response = client.get(repo.base_url + "/login")
        assert response.status_code == 303 and response.headers["location"] == "/events"
        events = client.get(repo.base_url + "/events")
        assert events.status_code == 200 and "cert-officer" in events.text
        detail = client.get(repo.base_url + "/events/1")
        assert detail.status_code == 200 and "Raw message" in detail.text
        raw = client.get(repo.base_url + "/events/1/raw")
        stored = repo.store.get(1)
        assert stored is not None and raw.content == stored.raw
    thread.flush()
    assert wait_for(
        lambda: (
            repo.store.count(
                EventFilter(
                    event_codes=(("110114",),), users=(("cert-officer",),), outcomes=((0,),)
                )
            )
            >= 1
        )
    )


def test_report_finds_the_person_by_name_in_the_officers_zone(
    arr: tuple[AuditRecordRepository, RepositoryThread], ui_pki: DevPki
) -> None:
    """A name as the records give it finds the person's accesses; a hostile name stays text
    (Jinja2 autoescaping); times show in the zone the officer picked, UTC on hover."""
    repo, thread = arr
    ctx = am.AuditContext(am.AuditSource("north-gateway"), host="north")
    evil = "O'Brien^<script>alert(1)</script>"
    when = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    for msg in rad69.retrieve_audit(
        ctx,
        am.Parties(
            requester=am.remote_node("127.0.0.7", certificate_subject="CN=viewer"),
            responder=ctx.local_node("https://north/ig/rad69"),
            when=when,
        ),
        side="imaging_document_source",
        instances=[
            am.ImagingInstanceReference("9.1", "9.1.1", f"9.1.1.{i}", "1.2.840.10008.5.1.4.1.1.2")
            for i in range(3)
        ],
        patients={f"9.1.1.{i}": am.PatientRef("EVIL-1^^^&1.2.9&ISO", evil) for i in range(3)},
    ):
        repo.ingestor.submit_record_bytes(_syslog(msg, "north"), "127.0.0.1", "tls")
    thread.flush()
    # (Signed in by certificate: an earlier test used up this address's password attempts.)
    ctx_tls = client_context(ui_pki.ca, ui_pki.client.cert, ui_pki.client.key)
    with httpx.Client(verify=ctx_tls, timeout=30) as client:
        base = repo.base_url
        assert client.get(base + "/login").status_code == 303
        page = client.get(base + "/report", params={"patient": "brien", "from": "2026-06-01"})
        assert page.status_code == 200
        assert "<script>alert" not in page.text
        assert "O&#39;Brien^&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert re.search(r'id="r-accesses">1<', page.text)
        assert "1 study, 1 series, 3 instances" in page.text
        assert 'datetime="2026-07-01T12:00:00Z" title="2026-07-01 12:00:00 UTC"' in page.text
        # The officer's zone: every time on the page in it, the CSV with UTC and local.
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        moved = client.post(
            base + "/settings/timezone",
            data={"csrf": csrf.group(1), "tz": "Asia/Tokyo", "back": "/report?patient=EVIL-1"},
        )
        assert moved.status_code == 303 and moved.headers["location"] == "/report?patient=EVIL-1"
        assert "arr_tz=Asia/Tokyo" in moved.headers["set-cookie"]
        page = client.get(base + "/report", params={"patient": "EVIL-1", "from": "2026-06-01"})
        assert ">2026-07-01 21:00:00 JST</time>" in page.text
        table = client.get(
            base + "/report.csv", params={"patient": "EVIL-1", "from": "2026-06-01"}
        ).text
        (row,) = csv.DictReader(io.StringIO(table.lstrip("\ufeff")))
        assert row["access_time_utc"] == "2026-07-01T12:00:00Z"
        assert row["access_time_local"] == "2026-07-01T21:00:00+09:00"
        assert (row["studies"], row["series"], row["instances"]) == ("1", "1", "3")
        assert row["patient_name"] == evil
        # Somewhere else than this site, or a zone that does not exist: refused.
        refused = client.post(
            base + "/settings/timezone", data={"csrf": csrf.group(1), "tz": "Mars/Olympus"}
        )
        assert refused.status_code == 400
        elsewhere = client.post(
            base + "/settings/timezone",
            data={"csrf": csrf.group(1), "tz": "UTC", "back": "//evil.example/"},
        )
        assert elsewhere.headers["location"] == "/events"
