"""Who a retrieve was about, sans-IO: XDS metadata, DICOM headers as they stream, the memory."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from lxml import etree

from xca_gateway.audit.messages import PatientRef
from xca_gateway.audit.patients import (
    HeaderSniffer,
    InstanceFacts,
    InstanceObservations,
    PatientMemory,
    entry_patients,
    header_facts,
    meta_sop_class,
)
from xca_gateway.protocol.namespaces import RIM
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, generate_study
from xca_gateway.xds import ebrim

CT = "1.2.840.10008.5.1.4.1.1.2"


def _entry(unique_id: str, patient: str, *slots: tuple[str, list[str]]) -> str:
    slot_xml = "".join(
        f'<rim:Slot name="{name}"><rim:ValueList>'
        + "".join(f"<rim:Value>{v}</rim:Value>" for v in values)
        + "</rim:ValueList></rim:Slot>"
        for name, values in slots
    )
    return (
        f'<rim:ExtrinsicObject id="urn:uuid:{unique_id}">{slot_xml}'
        f'<rim:ExternalIdentifier identificationScheme="{ebrim.DE_PATIENT_ID}" value="{patient}"/>'
        f'<rim:ExternalIdentifier identificationScheme="{ebrim.DE_UNIQUE_ID}" value="{unique_id}"/>'
        "</rim:ExtrinsicObject>"
    )


def test_entry_patients_reads_patient_name_and_studies() -> None:
    answer = etree.fromstring(
        f'<q:AdhocQueryResponse xmlns:q="urn:q" xmlns:rim="{RIM}"><rim:RegistryObjectList>'
        + _entry(
            "1.2.3",
            "P1^^^&amp;1.2&amp;ISO",
            (ebrim.SLOT_SOURCE_PATIENT_INFO, ["PID-3|P1", "PID-5|Doe^Alice^^^~Doe^Ally"]),
            (
                ebrim.SLOT_REFERENCE_ID_LIST,
                [
                    f"1.2.9^^^^{ebrim.REFERENCE_ID_STUDY_INSTANCE_UID}",
                    f"ACC1^^^&amp;1.2&amp;ISO^{ebrim.REFERENCE_ID_ACCESSION}",
                ],
            ),
        )
        + _entry("1.2.4", "")  # no patient: skipped
        + "</rim:RegistryObjectList></q:AdhocQueryResponse>"
    )
    (found,) = entry_patients(answer)
    assert found.document_unique_id == "1.2.3"
    assert found.patient == PatientRef("P1^^^&1.2&ISO", "Doe^Alice^^^")
    assert found.study_instance_uids == ("1.2.9",)
    memory = PatientMemory(max_entries=2)
    assert memory.learn_entries(answer) == 1
    assert memory.patient("nope", "1.2.9") == found.patient
    # Bounded: the oldest entries go first.
    memory.learn("1.2.10", PatientRef("P2"))
    assert memory.patient("1.2.3") is None and memory.patient("1.2.9") is not None
    # A later sighting without a name keeps the name learnt before.
    memory.learn("1.2.9", PatientRef("P1^^^&1.2&ISO"))
    assert memory.patient("1.2.9") == found.patient


def _instance(tmp: Path) -> bytes:
    study = generate_study(
        tmp,
        patient=DEFAULT_PATIENTS[0],
        patient_id="C02-2001",
        issuer_oid="1.3.6.1.4.1.21367.13.20.2000",
        modality="CT",
        body_part="HEAD",
        study_date=date(2024, 5, 1),
        institution="South",
        accession_number="SOU1",
        uid_root="1.2.826.0.1.3680043.10.543",
        series_count=1,
        instances_per_series=1,
        seed=7,
    )
    return study.files[0].read_bytes()


def test_header_facts_from_the_first_bytes_of_a_stream(tmp_path: Path) -> None:
    data = _instance(tmp_path)
    alice = DEFAULT_PATIENTS[0]
    expected = PatientRef(
        "C02-2001^^^&1.3.6.1.4.1.21367.13.20.2000&ISO", f"{alice.family}^{alice.given}"
    )
    assert header_facts(data[:100], complete=False) is None  # not even the preamble yet
    facts = header_facts(data, complete=True)
    assert facts is not None and (facts.patient, facts.sop_class_uid) == (expected, CT)
    assert meta_sop_class(data[:140]) is not None and meta_sop_class(data) == CT
    assert meta_sop_class(b"\0" * 200) is None  # not Part 10
    # Fed in small chunks as a response streams: the facts once the header went past.
    sniffer = HeaderSniffer()
    for start in range(0, len(data), 97):
        sniffer.feed(data[start : start + 97])
    assert sniffer.finish() == facts
    cheap = HeaderSniffer(want_patient=False)
    cheap.feed(data[:300])
    assert cheap.finish().sop_class_uid == CT and cheap.facts is not None
    assert cheap.facts.patient is None
    # Garbage tells nothing and stops nothing.
    junk = HeaderSniffer()
    junk.feed(b"not dicom" * 1000)
    assert junk.finish().patient is None


def test_sop_class_read_from_views_of_a_relay_buffer_however_cut(tmp_path: Path) -> None:
    """The SOP class sniff reads a relay's pieces (views into its receive buffer) in place:
    same answer whether the file meta group comes in the first piece or spread over many."""
    data = _instance(tmp_path)
    received = memoryview(bytearray(b"head" + data + b"tail"))[4:-4]
    assert meta_sop_class(received) == CT
    for cut in (1, 7, 131, 132, 140, 200, 1000, len(data)):
        sniffer = HeaderSniffer(want_patient=False)
        for start in range(0, len(data), cut):
            sniffer.feed(received[start : start + cut])
        assert sniffer.finish() == InstanceFacts(None, CT), cut
    not_part10 = HeaderSniffer(want_patient=False)
    not_part10.feed(memoryview(b"\0" * 128 + b"DICX" + data[132:]))
    assert not_part10.done and not_part10.finish() == InstanceFacts(None, None)


def test_observations_name_each_series_once(tmp_path: Path) -> None:
    data = _instance(tmp_path)
    observed = InstanceObservations()
    first = observed.sniffer("S1")
    assert first.want_patient
    first.feed(data)
    observed.record("I1", "S1", first.finish())
    second = observed.sniffer("S1")
    assert not second.want_patient  # the series' patient is known: only the SOP class is read
    second.feed(data)
    observed.record("I2", "S1", second.finish())
    patients = observed.patients()
    assert set(patients) == {"I1", "I2"} and patients["I1"] == patients["I2"]
    assert observed.sop_classes == {"I1": CT, "I2": CT}
