"""The federation's studies as DICOM datasets, sans I/O: QIDO-RS matching and the answers.

The KOS manifests found for a patient are merged into one :class:`StudyEntity` per study;
:func:`search` matches a :class:`~xca_gateway.doors.dicomweb.qido.QidoQuery` against them at the
study, series or instance level and projects the attributes to return; :func:`to_dicom_json`
and :func:`metadata_json` write the PS3.18 Annex F JSON model (metadata without bulk data), and
:func:`part_header` / :func:`closing_delimiter` frame instances as multipart/related.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from xca_gateway.doors.dicomweb.negotiation import PREFIX
from xca_gateway.doors.dicomweb.qido import RANGE_KEYS, QidoQuery, split_values
from xca_gateway.doors.federation import StudyManifest
from xca_gateway.xds.kos import InstanceRef

# Binary values above this size are left out of metadata (no bulk data resource is served).
METADATA_INLINE_LIMIT = 64 * 1024

_PATIENT_ATTRS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
_STUDY_ATTRS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_ATTRS = ("SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances")
_INSTANCE_ATTRS = ("SOPInstanceUID", "SOPClassUID")
_LIST_KEYS = frozenset({"ModalitiesInStudy", "Modality"})

# Attributes QIDO-RS returns by default at each level (PS3.18 10.6, the search transaction).
_DEFAULT_RETURN = {
    "STUDY": (
        *_PATIENT_ATTRS,
        *_STUDY_ATTRS,
        "InstanceAvailability",
        "RetrieveURL",
    ),
    "SERIES": (*_SERIES_ATTRS, "StudyInstanceUID", "InstanceAvailability", "RetrieveURL"),
    "IMAGE": (
        *_INSTANCE_ATTRS,
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "InstanceAvailability",
        "RetrieveURL",
    ),
}


# ----------------------------------------------------------------------------- the model


@dataclass
class StudyEntity:
    """One study as the federation knows it, merged over the manifests that reference it."""

    uid: str
    header: Dataset
    modalities: tuple[str, ...]
    series: dict[str, list[InstanceRef]] = field(default_factory=dict)


def study_entities(studies: Iterable[StudyManifest]) -> list[StudyEntity]:
    entities: dict[str, StudyEntity] = {}
    for study in studies:
        for ref in study.references:
            entity = entities.get(ref.study_instance_uid)
            if entity is None:
                entity = StudyEntity(ref.study_instance_uid, study.header, study.modalities)
                entities[ref.study_instance_uid] = entity
            elif study.modalities:
                merged = dict.fromkeys((*entity.modalities, *study.modalities))
                entity.modalities = tuple(merged)
            members = entity.series.setdefault(ref.series_instance_uid, [])
            if all(r.sop_instance_uid != ref.sop_instance_uid for r in members):
                members.append(ref)
    return list(entities.values())


def _study_dataset(entity: StudyEntity, query: QidoQuery, base_url: str) -> Dataset:
    header = entity.header
    ds = Dataset()
    for keyword in (*_PATIENT_ATTRS, *_STUDY_ATTRS[1:6]):
        if keyword in header:
            element = header[keyword]  # copied: the cached manifest must stay as it is
            ds.add_new(element.tag, element.VR, element.value)
    if query.caller_patient_id:
        # Other communities' manifests carry their own patient id: answer with the caller's,
        # so that the matches stay one patient (as the DIMSE door does).
        ds.PatientID = query.caller_patient_id
        ds.IssuerOfPatientID = query.caller_issuer
    ds.StudyInstanceUID = entity.uid
    if entity.modalities:
        ds.ModalitiesInStudy = list(entity.modalities)
    ds.NumberOfStudyRelatedSeries = len(entity.series)
    ds.NumberOfStudyRelatedInstances = sum(len(v) for v in entity.series.values())
    ds.InstanceAvailability = "ONLINE"
    ds.RetrieveURL = f"{base_url}{PREFIX}/studies/{entity.uid}"
    return ds


def _copy(ds: Dataset) -> Dataset:
    """A dataset with new elements (setting a value on a shared element changes both)."""
    out = Dataset()
    for element in ds:
        out.add_new(element.tag, element.VR, element.value)
    return out


def _series_modality(entity: StudyEntity) -> str | None:
    # A DocumentEntry lists the study's modalities, not each series': exact only when single.
    return entity.modalities[0] if len(entity.modalities) == 1 else None


def _matches(keyword: str, pattern: str, ds: Dataset, entity: StudyEntity) -> bool:
    if keyword == "Modality" and "Modality" not in ds:
        # Series modality unknown (a multi-modality study): answer the series of a study that
        # has the modality rather than hide images; the client sees Modality absent.
        return any(v.upper() in entity.modalities for v in split_values(pattern))
    element = ds.get(keyword)
    if element is None or element == "":
        return False
    if keyword in _LIST_KEYS:
        have = {str(v).upper() for v in ([element] if isinstance(element, str) else element)}
        return any(v.upper() in have for v in split_values(pattern))
    value = str(element)
    if keyword in RANGE_KEYS:
        low, dash, high = pattern.partition("-")
        if not dash:
            return value[: len(pattern)] == pattern if keyword == "StudyTime" else value == pattern
        return (not low or value >= low) and (not high or value[: len(high)] <= high)
    if keyword == "PatientName":
        value, pattern = value.upper(), pattern.upper()
    if "*" in pattern or "?" in pattern:
        regex = "".join(
            ".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern
        )
        return re.fullmatch(regex, value, re.DOTALL) is not None
    return value == pattern


def _project(ds: Dataset, query: QidoQuery, extra: Sequence[str]) -> Dataset:
    """The attributes to return: defaults of the level, what was matched or included."""
    if query.include_all:
        return ds
    wanted = {*_DEFAULT_RETURN[query.level], *extra, *query.include}
    out = Dataset()
    for element in ds:
        if element.keyword in wanted:
            out.add(element)
    for keyword in sorted(wanted - {e.keyword for e in ds}):
        tag = tag_for_keyword(keyword)
        if keyword in query.include and tag is not None:
            # Asked for but unknown to the manifests: present with no Value (PS3.18 Annex F).
            vr = str(dictionary_VR(tag))
            if " or " not in vr:
                out.add_new(tag, vr, [] if vr == "SQ" else None)
    return out


@dataclass
class SearchResult:
    matches: list[Dataset]
    remaining: int  # matches beyond this page


def search(query: QidoQuery, studies: Iterable[StudyManifest], base_url: str) -> SearchResult:
    """Match ``query`` against the manifests' studies; newest study first, then manifest order."""
    entities = [
        e for e in study_entities(studies) if not query.study_uids or e.uid in query.study_uids
    ]
    entities.sort(
        key=lambda e: (str(e.header.get("StudyDate", "")), str(e.header.get("StudyTime", ""))),
        reverse=True,
    )
    found: list[Dataset] = []
    for entity in entities:
        study = _study_dataset(entity, query, base_url)
        if query.level == "STUDY":
            if all(_matches(k, p, study, entity) for k, p in query.filters):
                found.append(_project(study, query, ()))
            continue
        study_extra = () if query.study_in_path else (*_PATIENT_ATTRS, *_STUDY_ATTRS)
        modality = _series_modality(entity)
        for series_uid, refs in entity.series.items():
            if query.series_uids and series_uid not in query.series_uids:
                continue
            series = _copy(study)
            series.SeriesInstanceUID = series_uid
            if modality:
                series.Modality = modality
            series.NumberOfSeriesRelatedInstances = len(refs)
            series_url = f"{study.RetrieveURL}/series/{series_uid}"
            series.RetrieveURL = series_url
            if query.level == "SERIES":
                if all(_matches(k, p, series, entity) for k, p in query.filters):
                    found.append(_project(series, query, study_extra))
                continue
            series_extra = () if query.series_in_path else _SERIES_ATTRS
            for ref in refs:
                if query.sop_uids and ref.sop_instance_uid not in query.sop_uids:
                    continue
                instance = _copy(series)
                instance.SOPClassUID = ref.sop_class_uid
                instance.SOPInstanceUID = ref.sop_instance_uid
                instance.RetrieveURL = f"{series_url}/instances/{ref.sop_instance_uid}"
                if all(_matches(k, p, instance, entity) for k, p in query.filters):
                    found.append(_project(instance, query, (*study_extra, *series_extra)))
    page_end = query.offset + (query.limit if query.limit is not None else len(found))
    return SearchResult(found[query.offset : page_end], max(0, len(found) - page_end))


def to_dicom_json(ds: Dataset, *, suppress_invalid: bool = False) -> dict[str, Any]:
    """The PS3.18 Annex F JSON model of ``ds``: tag keys, vr, Value (PN as Alphabetic...).

    ``suppress_invalid`` leaves out values that cannot be converted (instance headers come
    from sources we do not control) instead of failing the whole answer."""
    result: dict[str, Any] = ds.to_json_dict(
        bulk_data_threshold=1 << 62, suppress_invalid_tags=suppress_invalid
    )
    return dict(sorted(result.items()))  # ascending tags, as the examples in PS3.18 F show


def _drop_bulk(ds: Dataset, limit: int) -> None:
    """Remove pixel data and binary values above ``limit`` bytes (recursively)."""
    for element in list(ds):
        if element.VR == "SQ":
            for item in element.value or []:
                _drop_bulk(item, limit)
        elif element.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) or (
            element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN")
            and element.value is not None
            and len(element.value) > limit
        ):
            del ds[element.tag]


def metadata_json(ds: Dataset, inline_limit: int = METADATA_INLINE_LIMIT) -> dict[str, Any]:
    """An instance's metadata (WADO-RS /metadata): every attribute but bulk data."""
    _drop_bulk(ds, inline_limit)
    return to_dicom_json(ds, suppress_invalid=True)


# ----------------------------------------------------------------------------- multipart


def part_header(boundary: str, content_type: str, *, first: bool) -> bytes:
    lead = "" if first else "\r\n"
    return f"{lead}--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")


def closing_delimiter(boundary: str, *, empty: bool) -> bytes:
    lead = "" if empty else "\r\n"
    return f"{lead}--{boundary}--\r\n".encode("ascii")
