"""The DICOMweb front door: QIDO-RS and WADO-RS (DICOM PS3.18) over the XCA-I federation.

Web viewers and VNAs speak DICOMweb, not XDS-I. This door lets them search and retrieve across
the federation through the community's own initiating gateway, in-process, with the same
federation logic as the DIMSE door (:mod:`xca_gateway.doors.federation`):

* QIDO-RS (``GET /dicomweb/studies``, ``/series``, ``/instances`` and the study/series-scoped
  forms): the PatientID (with IssuerOfPatientID, default the community's assigning authority)
  becomes an ITI-18 FindDocuments for KOS manifests across the federation; the manifests and
  their DocumentEntries answer the match (application/dicom+json).
* WADO-RS (``GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]``): a
  RAD-69 through the initiating gateway (routed as RAD-75); instances are streamed as
  ``multipart/related; type="application/dicom"`` part by part as they arrive, never buffered.
  ``.../metadata`` answers the headers as application/dicom+json without pixel data.

XDS is per patient: there is no query by study alone. A request that names only a study
(every WADO-RS request, QIDO-RS below a study) is served from the studies the same caller's
own earlier search found (for ``study_access_seconds``); otherwise it must carry ``PatientID``
(an extension on WADO-RS URLs) and the federation must confirm that the patient owns the
study; never by UID alone across callers (404 for a retrieve, 400 for a search, as for a
study that does not exist). Every request is first admitted by the gateway's door guard
(local consumers only, 403 otherwise).

Each search is audited as a Query (110112, RAD-129 "QIDO-RS Query") and each retrieve as
"DICOM Instances Transferred" (110104, RAD-107 "WADO-RS Retrieve"), through the gateway's
audit trail when one is configured.
"""

from xca_gateway.doors.dicomweb.config import (
    ConfigError,
    DicomWebFrontConfig,
    parse_dicomweb_front_config,
)
from xca_gateway.doors.dicomweb.door import DicomWebFrontDoor
from xca_gateway.doors.dicomweb.model import metadata_json, search, to_dicom_json
from xca_gateway.doors.dicomweb.negotiation import (
    ANY_TRANSFER_SYNTAX,
    DicomWebError,
    Route,
    negotiate_json,
    negotiate_transfer_syntaxes,
    parse_accept,
    parse_route,
    retrieve_failure,
)
from xca_gateway.doors.dicomweb.qido import QidoQuery, parse_qido
from xca_gateway.doors.dicomweb.qido_wado_audit import qido_audit, wado_audit

__all__ = [
    "ANY_TRANSFER_SYNTAX",
    "ConfigError",
    "DicomWebError",
    "DicomWebFrontConfig",
    "DicomWebFrontDoor",
    "QidoQuery",
    "Route",
    "metadata_json",
    "negotiate_json",
    "negotiate_transfer_syntaxes",
    "parse_accept",
    "parse_dicomweb_front_config",
    "parse_qido",
    "parse_route",
    "qido_audit",
    "retrieve_failure",
    "search",
    "to_dicom_json",
    "wado_audit",
]
