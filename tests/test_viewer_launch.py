"""The IID launch and the viewer on the real web door: a clinician's bearer token (from the
demo authorization server's key), two communities, the launch audited (RAD-106), and the
studies it found then readable by UID alone, renderings included, for that clinician."""

from __future__ import annotations

from urllib.parse import urlencode

from lxml import etree
from pydicom import dcmread

from tests.conftest import wait_for
from tests.test_dicom_front import AUTHORITY
from tests.test_web_door import Live, live  # noqa: F401  (the module's live fixture)
from xca_gateway.audit.validate import schema_errors
from xca_gateway.tools.dicom_samples import local_patient_id


def test_the_launch_lists_both_communities_and_grants_the_viewer_its_studies(
    live: Live,  # noqa: F811
) -> None:
    alice = f"{local_patient_id(0, 0)}^^^&{AUTHORITY}&ISO"
    headers = {"authorization": f"Bearer {live.token()}"}
    query = urlencode({"requestType": "PATIENT", "patientID": alice})
    with live.client() as client:
        page = client.get(f"{live.web}/iid?{query}", headers=headers)
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        html = page.text
        assert '<td class="community">alpha</td>' in html
        assert '<td class="community">beta</td>' in html
        # The launch's search granted this clinician the studies: the viewer names them alone.
        study = next(s for s in live.peer_studies if s.patient_id == local_patient_id(1, 0))
        assert f'data-study="{study.study_instance_uid}"' in html
        ds = dcmread(study.files[0], stop_before_pixels=True)
        image = client.get(
            f"{live.web}/dicomweb/studies/{study.study_instance_uid}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered",
            headers=headers,
        )
        assert image.status_code == 200, image.text
        assert image.headers["content-type"] == "image/png"
        thumbnail = client.get(
            f"{live.web}/dicomweb/studies/{study.study_instance_uid}/thumbnail", headers=headers
        )
        assert thumbnail.status_code == 200
        # The viewer's files need no token; the launch does.
        assert client.get(f"{live.web}/viewer/").status_code == 200
        assert client.get(f"{live.web}/viewer/viewer.js").status_code == 200
        anonymous = client.get(f"{live.web}/iid?{query}", headers={"accept": "text/html"})
        assert anonymous.status_code == 303 and "/login" in anonymous.headers["location"]
        bad = client.get(f"{live.web}/iid?requestType=PATIENT", headers=headers)
        assert bad.status_code == 400 and "patientID is required" in bad.text

    name = f"{live.clinician.name}<{live.clinician.subject}@{live.auth.issuer}>"

    def launches() -> list[etree._Element]:
        return [
            r
            for r in live.audit.records
            if any(t.get("csd-code") == "RAD-106" for t in r.iter("EventTypeCode"))
            and any(p.get("UserName") == name for p in r.iter("ActiveParticipant"))
        ]

    assert wait_for(lambda: len(launches()) >= 2, timeout=15)
    for record in launches():
        assert not schema_errors(record), schema_errors(record)
    outcomes = sorted(
        str(r.find("EventIdentification").get("EventOutcomeIndicator")) for r in launches()
    )
    assert outcomes[0] == "0" and outcomes[-1] == "4"  # the launch, the malformed one
