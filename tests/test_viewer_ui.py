"""A clinician in a real Chromium (Debian's, driven by Playwright) against ``xca-gateway demo``:
signs in at the demo's authorization server, opens the IID launch URL for alice (studies in
every community), sees every community's studies, opens one held by another community and finds
an image drawn on the viewer's canvas. The screenshots are kept as docs/viewer-list.png and
docs/viewer-image.png when XCA_UPDATE_DOCS=1 (or when missing), so that ordinary runs leave the
working tree clean."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.demo_process import running_demo
from xca_gateway.tools.dicom_samples import local_patient_id

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CHROMIUM = Path("/usr/bin/chromium")
ARC = "1.3.6.1.4.1.21367.13"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_demo(tmp_path_factory.mktemp("viewer-demo")) as data:
        yield data


def keep(shot: Path) -> None:
    target = DOCS / shot.name
    if os.environ.get("XCA_UPDATE_DOCS") or not target.exists():
        shutil.copyfile(shot, target)


def test_a_clinician_sees_every_communitys_studies_and_an_image(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    communities = demo["communities"]
    assert len(communities) >= 3
    home = communities[0]
    clinician = next(c for c in demo["clinicians"] if c["community"] == home["name"])
    # alice, in the home community's own patient identifier domain.
    alice = f"{local_patient_id(0, 0)}^^^&{ARC}.20.1000&ISO"
    launch = (
        home["viewer"]["launch"] + "?" + urlencode({"requestType": "PATIENT", "patientID": alice})
    )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"],
        )
        try:
            # The demo's certificates come from its own development CA.
            context = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1400, "height": 900}
            )
            page = context.new_page()
            page.goto(launch)
            # Not signed in: the web door sends the browser to the authorization server.
            page.fill("#username", clinician["username"])
            page.fill("#password", clinician["password"])
            page.click("#sign-in")
            rows = page.locator("#studies tbody tr")
            sync_api.expect(rows.first).to_be_visible(timeout=60_000)
            listed = set(page.locator("#studies td.community").all_inner_texts())
            names = {c["name"] for c in communities}
            assert listed == names, listed
            page.screenshot(path=str(tmp_path / "viewer-list.png"), full_page=True)
            keep(tmp_path / "viewer-list.png")
            # Open a study another community holds.
            other = rows.filter(has_not_text=home["name"]).first
            other.locator("a.open").click()
            # (a locator, not wait_for_function: the viewer's CSP forbids eval)
            page.locator("#image[data-drawn]").wait_for(state="attached", timeout=60_000)
            sync_api.expect(page.locator(".series img").first).to_be_visible()
            # The middle of the canvas lies inside the image (fitted, centred): its pixels must
            # not be uniform (the black margins around the image are left out).
            stats = page.evaluate(
                """() => {
                    const c = document.getElementById('image');
                    const x = Math.floor(c.width * 0.3), y = Math.floor(c.height * 0.3);
                    const d = c.getContext('2d')
                        .getImageData(x, y, Math.floor(c.width * 0.4), Math.floor(c.height * 0.4))
                        .data;
                    const seen = new Set();
                    for (let i = 0; i < d.length; i += 4) seen.add(d[i]);
                    return {width: c.width, height: c.height, values: seen.size};
                }"""
            )
            assert stats["width"] > 100 and stats["values"] > 1, stats
            page.screenshot(path=str(tmp_path / "viewer-image.png"))
            keep(tmp_path / "viewer-image.png")
        finally:
            browser.close()
