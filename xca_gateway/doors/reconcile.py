"""Import reconciliation: a foreign community's instance takes the local patient's identity.

IHE RAD Import Reconciliation Workflow (IRWF.b) and DICOM PS3.3 C.12.1.1.9 (sans-IO): an
Importer coerces the patient identification and the accession number of imported instances to
the local values and keeps the previous ones, so that the local PACS files a prior under the
local patient while nothing about its origin is lost:

* Patient ID, Issuer of Patient ID and its qualifiers (Universal Entity ID, type ISO) become
  the local ones; the foreign Patient ID and issuer are added to the Other Patient IDs
  Sequence (TypeOfPatientID TEXT). Name, birth date and sex are coerced when the caller knows
  the local values.
* The Accession Number gets the source community's prefix, so that accession numbers issued
  by different RIS cannot collide in the local PACS; the foreign issuer of the accession
  number no longer applies and is removed.
* Every replaced or removed attribute's previous value goes into one new item of the Original
  Attributes Sequence (Modified Attributes Sequence, Attribute Modification DateTime,
  Modifying System, Source of Previous Values = the source community,
  Reason for the Attribute Modification = COERCE).

SOP, Study and Series Instance UIDs are never touched (IRWF: the instance stays the same
instance, only its identification is reconciled). The function is idempotent: reconciling an
already reconciled instance changes nothing and adds no Original Attributes item, and an
accession number this importer already prefixed is recognised from its own Original Attributes
item, so it is never prefixed twice.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

__all__ = [
    "MAX_ACCESSION_NUMBER_LENGTH",
    "REASON_COERCE",
    "Reconciled",
    "Reconciliation",
    "ReconciliationError",
    "accession_prefix_for",
    "reconcile",
]

REASON_COERCE = "COERCE"
# Accession Number is SH: at most 16 characters (PS3.5 6.2).
MAX_ACCESSION_NUMBER_LENGTH = 16
# LO: at most 64 characters.
_MAX_LO = 64
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_UTF8 = "ISO_IR 192"


class ReconciliationError(ValueError):
    """The instance cannot be reconciled as configured (e.g. the prefixed accession number
    would not fit its VR)."""


@dataclass(frozen=True)
class Reconciliation:
    """The local identity to give to instances imported from ``source_community_id``."""

    local_patient_id: str
    # The local assigning authority: its OID (then also written as the ISO Universal Entity
    # ID qualifier) or, for sites that use one, a namespace.
    local_issuer: str
    source_community_id: str  # homeCommunityId of the community the instances come from
    accession_prefix: str = ""
    local_patient_name: str | None = None  # DICOM PN (Family^Given^Middle^Prefix^Suffix)
    local_patient_birth_date: str | None = None  # DA, YYYYMMDD
    local_patient_sex: str | None = None  # M, F, O
    modifying_system: str = "xca-gateway"

    def __post_init__(self) -> None:
        if not self.local_patient_id.strip():
            raise ReconciliationError("the local patient id is empty")
        if not self.local_issuer.strip():
            raise ReconciliationError("the local issuer of patient id is empty")
        if "\\" in self.accession_prefix or len(self.accession_prefix) >= 16:
            raise ReconciliationError(f"unusable accession prefix {self.accession_prefix!r}")


@dataclass(frozen=True)
class Reconciled:
    dataset: Dataset
    # Keywords of the attributes replaced, added or removed (empty: already reconciled).
    modified: tuple[str, ...]


def accession_prefix_for(
    home_community_id: str,
    prefixes: Mapping[str, str] | None = None,
    community_names: Mapping[str, str] | None = None,
) -> str:
    """The accession prefix for a source community.

    An explicit prefix wins; else the community's name upper-cased with a dash ("SOUTH-");
    else the last arc of its homeCommunityId OID ("2-").
    """
    key = _normalise_community(home_community_id)
    for mapping, derive in ((prefixes, False), (community_names, True)):
        for community, value in (mapping or {}).items():
            if _normalise_community(community) == key:
                return f"{value.strip().upper()}-" if derive else value
    return key.rsplit(".", 1)[-1] + "-"


def _normalise_community(value: str) -> str:
    value = value.strip()
    return value[8:] if value.lower().startswith("urn:oid:") else value


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _qualifier(ds: Dataset) -> tuple[str, str] | None:
    """(Universal Entity ID, type) of a single-item Issuer of Patient ID Qualifiers Sequence."""
    items = ds.get("IssuerOfPatientIDQualifiersSequence")
    if not items:
        return None
    item = items[0]
    return _text(item, "UniversalEntityID"), _text(item, "UniversalEntityIDType")


def _format_dt(when: datetime) -> str:
    """DT with UTC offset (PS3.5 6.2: YYYYMMDDHHMMSS.FFFFFF&ZZXX)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.strftime("%Y%m%d%H%M%S.%f%z")


def _new_element(keyword: str, value: Any) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return DataElement(tag, dictionary_VR(tag), value)


def _already_prefixed(ds: Dataset, accession: str, rec: Reconciliation) -> bool:
    """True when our own earlier reconciliation added ``rec.accession_prefix`` to it."""
    prefix = rec.accession_prefix
    if not prefix or not accession.startswith(prefix):
        return False
    original = accession[len(prefix) :]
    source = rec.source_community_id[:_MAX_LO]
    for item in ds.get("OriginalAttributesSequence") or []:
        if _text(item, "ReasonForTheAttributeModification") != REASON_COERCE:
            continue
        if _text(item, "SourceOfPreviousValues") != source:
            continue
        for modified in item.get("ModifiedAttributesSequence") or []:
            if "AccessionNumber" in modified and _text(modified, "AccessionNumber") == original:
                return True
    return False


def _other_ids_with(ds: Dataset, patient_id: str, issuer: str) -> list[Dataset] | None:
    """The Other Patient IDs Sequence items plus one for (id, issuer), None if it is there."""
    items = list(ds.get("OtherPatientIDsSequence") or [])
    for item in items:
        if _text(item, "PatientID") == patient_id and _text(item, "IssuerOfPatientID") == issuer:
            return None
    other = Dataset()
    other.PatientID = patient_id
    if issuer:
        other.IssuerOfPatientID = issuer
    if "IssuerOfPatientIDQualifiersSequence" in ds:
        other.IssuerOfPatientIDQualifiersSequence = copy.deepcopy(
            ds.IssuerOfPatientIDQualifiersSequence
        )
    other.TypeOfPatientID = "TEXT"
    return [*items, other]


def reconcile(ds: Dataset, rec: Reconciliation, *, now: datetime | None = None) -> Reconciled:
    """The reconciled copy of ``ds`` (which is left unchanged); see the module docstring.

    Raises :class:`ReconciliationError` when the prefixed accession number would exceed the
    16 characters of its VR: truncating it could make two studies share one.
    """
    out = Dataset()
    out.update(ds)
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    previous = Dataset()  # the Modified Attributes Sequence item
    changed: list[str] = []

    def replace(keyword: str, value: Any) -> None:
        """Set (or, with None, remove) an attribute, keeping its previous value."""
        if keyword in ds:
            previous.add(copy.deepcopy(ds[keyword]))
        if value is None:
            if keyword in out:
                del out[keyword]
        else:
            out.add(_new_element(keyword, value))
        changed.append(keyword)

    local_id = rec.local_patient_id.strip()
    local_issuer = rec.local_issuer.strip()
    foreign_id = _text(ds, "PatientID")
    foreign_issuer = _text(ds, "IssuerOfPatientID")
    if foreign_id and (foreign_id, foreign_issuer) != (local_id, local_issuer):
        others = _other_ids_with(ds, foreign_id, foreign_issuer)
        if others is not None:
            replace("OtherPatientIDsSequence", Sequence(others))
    if foreign_id != local_id:
        replace("PatientID", local_id)
    if foreign_issuer != local_issuer:
        replace("IssuerOfPatientID", local_issuer)
    if _OID.match(local_issuer):
        qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence") or []
        if _qualifier(ds) != (local_issuer, "ISO") or len(qualifiers) > 1:
            qualifier = Dataset()
            qualifier.UniversalEntityID = local_issuer
            qualifier.UniversalEntityIDType = "ISO"
            replace("IssuerOfPatientIDQualifiersSequence", Sequence([qualifier]))
    elif "IssuerOfPatientIDQualifiersSequence" in ds:
        # The foreign qualifiers describe the foreign issuer; a namespace has none of ours.
        replace("IssuerOfPatientIDQualifiersSequence", None)
    for keyword, value in (
        ("PatientName", rec.local_patient_name),
        ("PatientBirthDate", rec.local_patient_birth_date),
        ("PatientSex", rec.local_patient_sex),
    ):
        if value is not None and value.strip() and _text(ds, keyword) != value.strip():
            replace(keyword, value.strip())

    accession = _text(ds, "AccessionNumber")
    if accession and rec.accession_prefix and not _already_prefixed(ds, accession, rec):
        prefixed = rec.accession_prefix + accession
        if len(prefixed) > MAX_ACCESSION_NUMBER_LENGTH:
            raise ReconciliationError(
                f"accession number {prefixed!r} would exceed {MAX_ACCESSION_NUMBER_LENGTH} "
                "characters (SH); configure a shorter accession prefix for "
                f"{rec.source_community_id}"
            )
        replace("AccessionNumber", prefixed)
        if "IssuerOfAccessionNumberSequence" in ds:
            replace("IssuerOfAccessionNumberSequence", None)

    if not changed:
        return Reconciled(out, ())
    if not _all_ascii(out, changed):
        # pydicom holds decoded text, so declaring UTF-8 re-encodes every value correctly.
        charsets = ds.get("SpecificCharacterSet")
        values = [charsets] if isinstance(charsets, str) else list(charsets or [])
        if _UTF8 not in values:
            out.SpecificCharacterSet = _UTF8
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([previous])
    item.AttributeModificationDateTime = _format_dt(now or datetime.now(UTC))
    item.ModifyingSystem = rec.modifying_system[:_MAX_LO]
    item.SourceOfPreviousValues = rec.source_community_id[:_MAX_LO]
    item.ReasonForTheAttributeModification = REASON_COERCE
    existing = list(ds.get("OriginalAttributesSequence") or [])
    out.add(_new_element("OriginalAttributesSequence", Sequence([*existing, item])))
    return Reconciled(out, (*changed, "OriginalAttributesSequence"))


def _all_ascii(ds: Dataset, keywords: Iterable[str]) -> bool:
    for keyword in keywords:
        value = ds.get(keyword)
        if value is not None and not isinstance(value, Sequence) and not str(value).isascii():
            return False
    return True
