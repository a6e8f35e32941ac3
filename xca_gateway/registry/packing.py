"""The stored form of a registry object's canonical XML: zlib with a preset dictionary.

Every object's XML repeats the same XDS metadata vocabulary (namespace, element and slot names,
classification and identification scheme UUIDs, status and association URNs, common coding
schemes): about 3 KB of a DocumentEntry's 4 KB. zlib compresses each row on its own, so
without a dictionary every row pays for that vocabulary again; with it as a preset dictionary
(RFC 1950 FDICT) a row stores mostly what is its own, and the blob of a DocumentEntry is about
half as large. The dictionary holds standard vocabulary only (no deployment's codes or ids).

Rows written without a dictionary are still read: the zlib header says whether a dictionary
was used, and which (its Adler-32). The dictionary is part of the storage format: never edit
it; a better one is added under its own id, and both stay readable.
"""

from __future__ import annotations

import zlib

from xca_gateway.xds import ebrim

_RIM = 'xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0" id="urn:uuid:'
_STATUS = f'" status="{ebrim.STATUS_APPROVED}" lid="urn:uuid:'
_VALUE = "<rim:ValueList><rim:Value>"
_END_VALUE = "</rim:Value></rim:ValueList></rim:Slot>"


def _slot(name: str) -> str:
    return f'<rim:Slot name="{name}">{_VALUE}'


def _classification(scheme: str) -> str:
    return (
        f'<rim:Classification id="urn:uuid:" classificationScheme="{scheme}" '
        'classifiedObject="urn:uuid:" nodeRepresentation="">'
    )


def _identifier(scheme: str) -> str:
    return (
        f'<rim:ExternalIdentifier id="urn:uuid:" identificationScheme="{scheme}" '
        'registryObject="urn:uuid:" value="'
    )


# Least frequent first: zlib reaches the dictionary's end with the shortest distances.
_FRAGMENTS = [
    *(
        _classification(s) + _slot("codingScheme") + f"{c}{_END_VALUE}"
        for s, c in [
            (ebrim.FOLDER_CODE_LIST, ""),
            (ebrim.SS_CONTENT_TYPE_CODE, "2.16.840.1.113883.6.1"),
            (ebrim.DE_PRACTICE_SETTING_CODE, "2.16.840.1.113883.6.96"),
            (ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE, "2.16.840.1.113883.5.10588"),
            (ebrim.DE_FORMAT_CODE, "1.2.840.10008.2.6.1"),
            (ebrim.DE_EVENT_CODE, "1.2.840.10008.2.16.4"),
            (ebrim.DE_CONFIDENTIALITY_CODE, "2.16.840.1.113883.5.25"),
            (ebrim.DE_CLASS_CODE, ""),
            (ebrim.DE_TYPE_CODE, "2.16.840.1.113883.6.1"),
        ]
    ),
    *(
        _identifier(s)
        for s in (
            ebrim.FOLDER_UNIQUE_ID,
            ebrim.FOLDER_PATIENT_ID,
            ebrim.SS_SOURCE_ID,
            ebrim.SS_UNIQUE_ID,
            ebrim.SS_PATIENT_ID,
        )
    ),
    f'<rim:Classification id="urn:uuid:" classifiedObject="urn:uuid:" '
    f'classificationNode="{ebrim.FOLDER_NODE}"/>',
    f'<rim:Classification id="urn:uuid:" classifiedObject="urn:uuid:" '
    f'classificationNode="{ebrim.SUBMISSION_SET_NODE}"/>',
    f"<rim:RegistryPackage {_RIM}{_STATUS}" + _slot("lastUpdateTime") + _slot("submissionTime"),
    "</rim:RegistryPackage>",
    *(
        _slot(name)
        for name in (
            "legalAuthenticator",
            "sourcePatientInfo",
            "authorSpecialty",
            "authorRole",
            "authorInstitution",
            "serviceStopTime",
            "URI",
        )
    ),
    f"^^^^{ebrim.REFERENCE_ID_ACCESSION}",
    f"^^^^{ebrim.REFERENCE_ID_STUDY_INSTANCE_UID}",
    'mimeType="application/dicom" mimeType="text/xml" mimeType="application/pdf"',
    f'" objectType="{ebrim.DOCUMENT_ENTRY_ON_DEMAND}',
    f"<rim:Association {_RIM}" + f'" associationType="{ebrim.RPLC}',
    f'" associationType="{ebrim.HAS_MEMBER}" sourceObject="urn:uuid:" targetObject="urn:uuid:'
    + _STATUS
    + _slot("SubmissionSetStatus")
    + f"Original{_END_VALUE}</rim:Association>",
    f'<rim:ExtrinsicObject {_RIM}" mimeType="" objectType="{ebrim.DOCUMENT_ENTRY_STABLE}' + _STATUS,
    _slot("creationTime") + _slot("hash") + _slot("size") + _slot("languageCode") + "en-US",
    _slot("repositoryUniqueId") + _slot("serviceStartTime") + _slot("sourcePatientId"),
    _slot(ebrim.SLOT_REFERENCE_ID_LIST),
    '<rim:Name><rim:LocalizedString value=""/></rim:Name>',
    _classification(ebrim.DE_AUTHOR) + _slot("authorPerson") + _END_VALUE,
    "</rim:Classification>",
    _identifier(ebrim.DE_PATIENT_ID) + "^^^&amp;&amp;ISO",
    _identifier(ebrim.DE_UNIQUE_ID),
    '"/></rim:ExtrinsicObject>',
    _slot("codingScheme") + _END_VALUE + '<rim:Name><rim:LocalizedString value=""/></rim:Name>',
]
DICTIONARY = "".join(_FRAGMENTS).encode("utf-8")
_DICTIONARIES = {zlib.adler32(DICTIONARY): DICTIONARY}
# The FDICT bit of the zlib header's second byte (RFC 1950, 2.2).
_FDICT = 0x20


def pack(xml: bytes, level: int = 6) -> bytes:
    """``xml`` as stored: zlib with the preset dictionary."""
    packer = zlib.compressobj(level, zdict=DICTIONARY)
    return packer.compress(xml) + packer.flush()


def unpack(blob: bytes | memoryview) -> bytes:
    """The XML of a stored blob, written with a dictionary (any known one) or without."""
    data = bytes(blob)
    if len(data) < 6 or not data[1] & _FDICT:
        return zlib.decompress(data)
    dictionary = _DICTIONARIES.get(int.from_bytes(data[2:6], "big"))
    if dictionary is None:
        raise ValueError("registry object written with an unknown zlib dictionary")
    unpacker = zlib.decompressobj(zdict=dictionary)
    return unpacker.decompress(data) + unpacker.flush()
