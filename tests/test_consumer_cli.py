"""``xca-gateway query`` / ``retrieve``: readable options → valid stored queries (pure), the
ready request bodies of ``examples/``, and the commands against real gateways on loopback."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from lxml import etree

from tests.communities import ARC, seed_community
from tests.conftest import GatewayThread
from xca_gateway.app.config import load_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.cli import main
from xca_gateway.consumer.xds_query import (
    QueryOptionError,
    QueryOptions,
    build_query_request,
    complete_patient_id,
    dtm,
)
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap import build_envelope
from xca_gateway.registry.stored_query import parse_stored_query
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.dicom_samples import SampleStudy, local_patient_id
from xca_gateway.transactions.iti43 import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    build_retrieve_document_set_request,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.patient_id import parse_patient_id

REPO = Path(__file__).resolve().parents[1]
ALPHA_HOME, BETA_HOME = f"urn:oid:{ARC}.70.1", f"urn:oid:{ARC}.70.2"
ALPHA_OID, BETA_OID = f"{ARC}.20.1000", f"{ARC}.20.2000"
# The demo's first two communities (xca_gateway.tools.demo: same arcs as the test communities).
NORTH_ALICE = parse_patient_id(f"C01-1001^^^&{ARC}.20.1000&ISO")
SOUTH_ALICE = parse_patient_id(f"C02-2001^^^&{ARC}.20.2000&ISO")


# ----------------------------------------------------------------------- options → request


def parsed(options: QueryOptions) -> Any:
    return parse_stored_query(build_query_request(options))


def test_find_documents_request_is_what_the_registry_parses() -> None:
    query = parsed(
        QueryOptions(
            patient=NORTH_ALICE,
            class_codes=("18726-0",),
            format_codes=("kos",),
            modalities=("ct", "MR"),
            date_from="2016-01-01",
            date_to="2016-01-04",
        )
    )
    assert query.query_id == ebrim.StoredQueryId.FIND_DOCUMENTS
    assert not query.warnings  # every parameter sent is one FindDocuments defines
    assert query.params["$XDSDocumentEntryPatientId"] == [[str(NORTH_ALICE)]]
    assert query.params["$XDSDocumentEntryServiceStartTimeTo"] == [["20160105"]]
    text = etree.tostring(
        build_query_request(
            QueryOptions(patient=NORTH_ALICE, modalities=("ct", "MR"), date_to="2016-01-04")
        )
    ).decode()
    assert "('CT^^1.2.840.10008.2.16.4','MR^^1.2.840.10008.2.16.4')" in text
    assert ">20160105<" in text  # --to is inclusive: the TF's To bound is exclusive


def test_every_query_name_builds_a_valid_request() -> None:
    cases = {
        "FindDocuments": QueryOptions(patient=NORTH_ALICE),
        "find-submission-sets": QueryOptions(query="FindSubmissionSets", patient=NORTH_ALICE),
        "FindFolders": QueryOptions(query="FindFolders", patient=NORTH_ALICE),
        "GetAll": QueryOptions(query="GetAll", patient=NORTH_ALICE, statuses=("all",)),
        "GetDocuments": QueryOptions(query="GetDocuments", unique_ids=("1.2.3",), home="urn:oid:1"),
        "GetSubmissionSetAndContents": QueryOptions(
            query="GetSubmissionSetAndContents", uuids=("urn:uuid:x",)
        ),
        "GetRelatedDocuments": QueryOptions(query="GetRelatedDocuments", uuids=("urn:uuid:x",)),
        "study": QueryOptions(patient=NORTH_ALICE, study_instance_uids=("1.2.3",)),
    }
    for name, options in cases.items():
        query = parsed(options)
        assert not query.warnings, name
    assert parsed(cases["study"]).query_id == ebrim.StoredQueryId.FIND_DOCUMENTS_BY_REFERENCE_ID


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (QueryOptions(), "FindDocuments needs --patient"),
        (QueryOptions(query="GetDocuments"), "exactly one of --uuid or --unique-id"),
        (QueryOptions(query="GetDocuments", unique_ids=("1",), class_codes=("x",)), "--class"),
        (QueryOptions(query="FindEverything", patient=NORTH_ALICE), "unknown stored query"),
        (QueryOptions(patient=NORTH_ALICE, date_from="2024-13-01"), "not a valid date"),
        (QueryOptions(patient=NORTH_ALICE, statuses=("gone",)), "--status 'gone'"),
        (QueryOptions(query="GetDocuments", patient=NORTH_ALICE, uuids=("x",)), "no --patient"),
    ],
)
def test_options_that_make_no_valid_query_are_refused(options: QueryOptions, message: str) -> None:
    with pytest.raises(QueryOptionError, match=message.replace("(", r"\(")):
        build_query_request(options)


def test_dates_and_patient_ids_people_type() -> None:
    assert dtm("2024") == "2024"
    assert dtm("2024", upper_inclusive=True) == "2025"
    assert dtm("2024-12", upper_inclusive=True) == "202501"
    assert dtm("2024-02-28", upper_inclusive=True) == "20240229"
    assert dtm("2024-03-15T10:30", upper_inclusive=True) == "202403151031"
    assert str(complete_patient_id("C01-1001", f"{ARC}.20.1000")) == str(NORTH_ALICE)
    assert complete_patient_id(str(SOUTH_ALICE), f"{ARC}.20.1000") == SOUTH_ALICE
    with pytest.raises(QueryOptionError, match="no assigning authority"):
        complete_patient_id("C01-1001", None)


# ----------------------------------------------------------------------- examples/


def _envelope(payload: etree._Element, action: str, number: int) -> bytes:
    envelope = build_envelope(
        payload,
        action=action,
        message_id=f"urn:uuid:00000000-0000-4000-8000-{number:012d}",
        reply_to_anonymous=True,
    )
    return etree.tostring(envelope, pretty_print=True, xml_declaration=True, encoding="UTF-8")


def example_bodies() -> dict[str, bytes]:
    """The request bodies of examples/, built by the same sans-IO builders as the CLI."""
    return {
        "iti18-find-documents.xml": _envelope(
            build_query_request(QueryOptions(patient=NORTH_ALICE)), Action.ITI18, 1
        ),
        "iti18-find-imaging-manifests.xml": _envelope(
            build_query_request(
                QueryOptions(patient=NORTH_ALICE, format_codes=("kos",), modalities=("CT",))
            ),
            Action.ITI18,
            2,
        ),
        "iti18-find-submission-sets.xml": _envelope(
            build_query_request(QueryOptions(query="FindSubmissionSets", patient=NORTH_ALICE)),
            Action.ITI18,
            3,
        ),
        "iti38-find-documents.xml": _envelope(
            build_query_request(QueryOptions(patient=SOUTH_ALICE)), Action.ITI38, 4
        ),
        "iti43-retrieve-document.xml": _envelope(
            build_retrieve_document_set_request(
                RetrieveDocumentSetRequest(
                    (
                        DocumentRequest(
                            "REPOSITORY-UNIQUE-ID", "DOCUMENT-UNIQUE-ID", "urn:oid:HOME-COMMUNITY"
                        ),
                    )
                )
            ),
            Action.ITI43,
            5,
        ),
    }


def test_examples_are_what_the_builders_produce() -> None:
    """examples/*.xml are generated; XCA_REGENERATE=1 rewrites them after a builder change."""
    examples = REPO / "examples"
    for name, body in example_bodies().items():
        if os.environ.get("XCA_REGENERATE"):
            (examples / name).write_bytes(body)
        assert (examples / name).read_bytes() == body, f"examples/{name} is stale"
        assert name in (examples / "README.md").read_text()


# ----------------------------------------------------------------------- real gateways


@dataclass
class Federation:
    alpha: Gateway
    beta: Gateway
    beta_studies: list[SampleStudy]
    endpoints: Path
    pki: DevPki


@contextlib.contextmanager
def federation(tmp: Path, pki: DevPki) -> Iterator[Federation]:
    """beta, and alpha peered with it (the demo's layout), and their endpoints.json."""
    with contextlib.ExitStack() as stack:
        beta_config, beta_studies = seed_community(tmp, pki, "beta", 1)
        beta_thread = GatewayThread(load_config(beta_config))
        beta = beta_thread.__enter__()
        stack.callback(beta_thread.__exit__, None, None, None)
        xref = tmp / "xref.csv"
        xref.write_text(
            "".join(
                f"{local_patient_id(0, p)}^^^&{ALPHA_OID}&ISO,"
                f"{local_patient_id(1, p)}^^^&{BETA_OID}&ISO\n"
                for p in range(4)
            )
        )
        peer = f"""
[patient_mapping]
xref_csv = "{xref}"

[[peers]]
name = "beta"
home_community_id = "{BETA_HOME}"
iti38 = "{beta.base_url}/xca/iti38"
iti39 = "{beta.base_url}/xca/iti39"
rad75 = "{beta.base_url}/xca/rad75"
patient_id_assigning_authority = "{BETA_OID}"
"""
        alpha_config, _ = seed_community(tmp, pki, "alpha", 0, peer)
        alpha_thread = GatewayThread(load_config(alpha_config))
        alpha = alpha_thread.__enter__()
        stack.callback(alpha_thread.__exit__, None, None, None)

        def community(name: str, home: str, oid: str, gateway: Gateway) -> dict[str, Any]:
            return {
                "name": name,
                "homeCommunityId": home,
                "patientIdAssigningAuthority": oid,
                "endpoints": {
                    key: f"{gateway.base_url}{path}"
                    for key, path in (
                        ("iti38", "/xca/iti38"),
                        ("iti39", "/xca/iti39"),
                        ("iti18", "/ig/iti18"),
                        ("iti43", "/ig/iti43"),
                    )
                },
                "identities": {
                    "localConsumer": pki.client.to_json(),
                    "gateway": pki.communities[name].to_json(),
                },
            }

        endpoints = tmp / "endpoints.json"
        endpoints.write_text(
            json.dumps(
                {
                    "ca": str(pki.ca),
                    "client": pki.client.to_json(),
                    "communities": [
                        community("alpha", ALPHA_HOME, ALPHA_OID, alpha),
                        community("beta", BETA_HOME, BETA_OID, beta),
                    ],
                }
            )
        )
        yield Federation(alpha, beta, beta_studies, endpoints, pki)


@pytest.fixture(scope="module")
def fed(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with federation(tmp_path_factory.mktemp("consumer-cli"), pki) as f:
        yield f


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def target(fed: Federation, community: str = "alpha") -> list[str]:
    return ["--endpoints", str(fed.endpoints), "--community", community]


def alice_study_at_beta(fed: Federation) -> SampleStudy:
    return next(s for s in fed.beta_studies if s.patient_id == local_patient_id(1, 0))


def test_query_through_the_initiating_gateway_prints_every_community(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "query", *target(fed), "--patient", local_patient_id(0, 0))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["COMMUNITY", "TITLE", "TYPE", "DATE", "SIZE", "STUDY"]
    assert any(
        line.startswith("beta ") and alice_study_at_beta(fed).study_instance_uid in line
        for line in rows
    ), out
    assert any(line.startswith("alpha ") for line in rows), out
    assert rows[-1].endswith("status Success")


def test_query_json_and_filters(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    study = alice_study_at_beta(fed)
    code, out, err = run(
        capsys,
        "query",
        *target(fed),
        "--patient",
        local_patient_id(0, 0),
        "--format",
        "kos",
        "--modality",
        study.modality,
        "--json",
    )
    assert code == 0, err
    answer = json.loads(out)
    assert answer["status"] == "Success"
    beta = [o for o in answer["objects"] if o.get("communityName") == "beta"]
    assert [o["studyInstanceUids"] for o in beta] == [[study.study_instance_uid]]
    assert all(o["mimeType"] == "application/dicom" for o in answer["objects"])
    # A date range that excludes every study finds nothing, and says so.
    code, out, _ = run(
        capsys, "query", *target(fed), "--patient", local_patient_id(0, 0), "--to", "1900"
    )
    assert code == 0
    assert out.strip() == "0 object(s), status Success"


def test_query_to_the_responding_gateway_as_a_peer_with_raw_soap(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys,
        "query",
        *target(fed, "beta"),
        "--responding",
        "--patient",
        local_patient_id(1, 0),
        "--raw",
    )
    assert code == 0, err
    assert f'POST {fed.beta.base_url}/xca/iti38 as identity "gateway" of alpha' in err
    assert "urn:ihe:iti:2007:CrossGatewayQuery<" in err
    assert "AdhocQueryResponse" in err
    lines = out.splitlines()[1:-1]
    assert lines and all(line.startswith("beta ") for line in lines), out


def test_get_documents_by_unique_id_in_another_community(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "query", *target(fed), "--patient", local_patient_id(0, 0), "--json")
    entry = next(o for o in json.loads(out)["objects"] if o.get("communityName") == "beta")
    code, out, err = run(
        capsys,
        "query",
        "GetDocuments",
        *target(fed),
        "--unique-id",
        entry["uniqueId"],
        "--home",
        "beta",
        "--json",
    )
    assert code == 0, err
    [found] = json.loads(out)["objects"]
    assert found["entryUuid"] == entry["entryUuid"]


@pytest.mark.parametrize("responding", [False, True])
def test_retrieve_writes_the_document(
    fed: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path, responding: bool
) -> None:
    study = alice_study_at_beta(fed)
    side = ["--responding"] if responding else []
    code, out, _ = run(
        capsys, "query", *target(fed, "beta"), *side, "--patient", local_patient_id(1, 0), "--json"
    )
    entry = next(
        o for o in json.loads(out)["objects"] if study.study_instance_uid in o["studyInstanceUids"]
    )
    by_lookup = ["--patient", local_patient_id(1 if responding else 0, 0)]
    code, out, err = run(
        capsys,
        "retrieve",
        *target(fed, "beta" if responding else "alpha"),
        *side,
        "--document",
        entry["uniqueId"],
        *by_lookup,
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    written = tmp_path / f"{entry['uniqueId']}.dcm"
    assert f"-> {written}" in out
    kos = pydicom.dcmread(written)
    assert kos.SOPClassUID == ebrim.KOS_FORMAT_CODE
    assert kos.StudyInstanceUID == study.study_instance_uid
    assert written.stat().st_size == entry["size"]


def test_dry_run_prints_a_body_curl_can_send(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "query", *target(fed), "--patient", local_patient_id(0, 0), "--dry-run"
    )
    assert code == 0
    envelope = etree.fromstring(out.encode())
    assert envelope.findtext(".//{*}Action") == Action.ITI18
    assert envelope.findtext(".//{*}Value") == f"'{local_patient_id(0, 0)}^^^&{ALPHA_OID}&ISO'"
