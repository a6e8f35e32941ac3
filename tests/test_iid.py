"""IHE Invoke Image Display (RAD-106), sans I/O: launch parameters and the study list."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydicom.dataset import Dataset

from xca_gateway.consumer.imaging import Manifest
from xca_gateway.doors.federation import StudyManifest
from xca_gateway.doors.viewer.iid import (
    IidError,
    IidRequest,
    parse_iid,
    select_studies,
    study_rows,
)
from xca_gateway.doors.viewer.pages import ViewerPages
from xca_gateway.protocol.http_server import PeerInfo, Request
from xca_gateway.xds.kos import InstanceRef

LOCAL = "1.2.3.4"
CT = "1.2.840.10008.5.1.4.1.1.2"


def parse(query: dict[str, str]) -> IidRequest:
    return parse_iid(list(query.items()), LOCAL)


def test_patient_launch_with_every_filter() -> None:
    asked = parse(
        {
            "requestType": "PATIENT",
            "patientID": "12345^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
            "lowerDateTime": "2020-01-01T00:00:00Z",
            "upperDateTime": "2024-12-31",
            "modalitiesInStudy": "CT,mr",
            "mostRecentResults": "3",
            "viewerType": "IHE_BIR",
            "diagnosticQuality": "false",
            "somethingElse": "ignored",  # parameters IID does not define are ignored
        }
    )
    assert asked.request_type == "PATIENT"
    assert asked.patient_id == "12345^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    assert asked.lower == datetime(2020, 1, 1, tzinfo=UTC)
    assert asked.upper == datetime(2024, 12, 31, tzinfo=UTC)
    assert asked.modalities == ("CT", "MR") and asked.most_recent == 3
    assert asked.viewer_type == "IHE_BIR" and asked.diagnostic_quality is False


def test_a_bare_patient_id_is_of_the_local_domain_and_study_launches_name_studies() -> None:
    assert parse({"requestType": "PATIENT", "patientID": "P1"}).patient_id == (f"P1^^^&{LOCAL}&ISO")
    study = parse({"requestType": "study", "patientID": "P1", "studyUID": "1.2.3,1.2.4"})
    assert study.request_type == "STUDY" and study.study_uids == ("1.2.3", "1.2.4")
    by_accession = parse(
        {"requestType": "STUDY", "patientID": "P1", "accessionNumber": "A1^^^&1.2&ISO"}
    )
    assert by_accession.accession_numbers == ("A1",)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ({"patientID": "P1"}, "requestType must be PATIENT or STUDY"),
        ({"requestType": "SERIES", "patientID": "P1"}, "requestType"),
        ({"requestType": "PATIENT"}, "patientID is required"),
        ({"requestType": "PATIENT", "patientID": "P1^^^&notanoid&ISO"}, "&OID&ISO"),
        ({"requestType": "PATIENT", "patientID": "P1^^^1.2.3"}, "&OID&ISO"),
        ({"requestType": "PATIENT", "patientID": "^^^&1.2&ISO"}, "patientID"),
        ({"requestType": "STUDY", "patientID": "P1"}, "studyUID or accessionNumber"),
        ({"requestType": "STUDY", "patientID": "P1", "studyUID": "1.2.x"}, "not a valid UID"),
        ({"requestType": "PATIENT", "patientID": "P1", "studyUID": "1.2"}, "requestType=STUDY"),
        ({"requestType": "PATIENT", "patientID": "P1", "lowerDateTime": "yesterday"}, "ISO 8601"),
        (
            {
                "requestType": "PATIENT",
                "patientID": "P1",
                "lowerDateTime": "2024-01-02",
                "upperDateTime": "2024-01-01",
            },
            "after",
        ),
        ({"requestType": "PATIENT", "patientID": "P1", "mostRecentResults": "0"}, "positive"),
        ({"requestType": "PATIENT", "patientID": "P1", "modalitiesInStudy": "C T"}, "modality"),
        ({"requestType": "PATIENT", "patientID": "P1", "diagnosticQuality": "yes"}, "true or"),
    ],
)
def test_bad_launches_say_what_is_wrong(query: dict[str, str], words: str) -> None:
    with pytest.raises(IidError) as caught:
        parse(query)
    assert words in caught.value.message


def test_a_parameter_given_twice_is_refused() -> None:
    with pytest.raises(IidError, match="more than once"):
        parse_iid([("requestType", "PATIENT"), ("patientID", "a"), ("patientID", "b")], LOCAL)


def manifest(
    community: str, study: str, date: str, modality: str, refs: int, *, series: str = "9.1"
) -> StudyManifest:
    header = Dataset()
    header.PatientName = "Lindqvist^Alice"
    header.StudyInstanceUID = study
    header.StudyDate = date
    header.StudyTime = "101500"
    header.StudyDescription = f"{modality} study"
    header.AccessionNumber = f"ACC{study[-1]}"
    references = tuple(InstanceRef(study, series, CT, f"{study}.{i}") for i in range(refs))
    return StudyManifest(
        Manifest(community, "1.9", f"{study}.99", (study,), None),
        b"",
        header,
        references,
        (modality,),
    )


NAMES = {"urn:oid:1.1": "north", "urn:oid:1.2": "south", "urn:oid:1.3": "west"}
FOUND = [
    manifest("urn:oid:1.1", "2.1", "20200105", "CT", 3),
    manifest("urn:oid:1.2", "2.2", "20230610", "MR", 2),
    manifest("urn:oid:1.3", "2.3", "20240101", "CR", 1),
    # The same study referenced by a second manifest, one more series: still one row.
    manifest("urn:oid:1.1", "2.1", "20200105", "CT", 2, series="9.2"),
]


def test_one_row_per_study_with_its_community_newest_first() -> None:
    rows = select_studies(
        study_rows(FOUND, NAMES), parse({"requestType": "PATIENT", "patientID": "P"})
    )
    assert [(r.study_uid, r.communities) for r in rows] == [
        ("2.3", ("west",)),
        ("2.2", ("south",)),
        ("2.1", ("north",)),
    ]
    oldest = rows[-1]
    assert (oldest.series, oldest.instances) == (2, 3)  # refs 2.1.0, 2.1.1 counted once
    assert oldest.display_date == "2020-01-05" and oldest.description == "CT study"
    assert oldest.patient_name == "Lindqvist Alice" and oldest.modalities == ("CT",)


def test_filters_select_the_studies_asked_for() -> None:
    rows = study_rows(FOUND, NAMES)

    def chosen(**query: str) -> list[str]:
        asked = parse({"requestType": "PATIENT", "patientID": "P", **query})
        return [r.study_uid for r in select_studies(rows, asked)]

    assert chosen(modalitiesInStudy="MR,CR") == ["2.3", "2.2"]
    assert chosen(lowerDateTime="2021-01-01") == ["2.3", "2.2"]
    assert chosen(upperDateTime="2023-06-10T23:59:59Z") == ["2.2", "2.1"]
    assert chosen(mostRecentResults="1") == ["2.3"]
    study = parse({"requestType": "STUDY", "patientID": "P", "accessionNumber": "ACC2"})
    assert [r.study_uid for r in select_studies(rows, study)] == ["2.2"]


def test_viewer_assets_are_served_with_a_strict_policy() -> None:
    import asyncio
    from types import SimpleNamespace

    community = SimpleNamespace(
        name="north", home_community_id="urn:oid:1.1", patient_id_assigning_authority=LOCAL
    )
    host = SimpleNamespace(
        gateway=SimpleNamespace(config=SimpleNamespace(community=community, peers=())),
        dicomweb=None,
    )
    pages = ViewerPages(host)  # type: ignore[arg-type]

    async def nothing() -> Any:
        return
        yield b""

    def get(path: str, method: str = "GET") -> Any:
        request = Request(method, path, [], PeerInfo("127.0.0.1", 1), nothing(), "https")
        return asyncio.run(pages.assets(request))

    index = get("/viewer/")
    headers = dict(index.headers)
    assert index.status == 200 and headers["content-type"].startswith("text/html")
    assert b'<canvas id="image"' in index.body and b"/viewer/viewer.js" in index.body
    assert "script-src 'self'" in headers["content-security-policy"]
    script = get("/viewer/viewer.js")
    assert script.status == 200 and b"/rendered" in script.body
    assert get("/viewer/viewer.css").status == 200
    assert get("/viewer/../pages.py").status == 404
    assert get("/viewer/", "POST").status == 405
