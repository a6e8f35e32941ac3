"""HL7 v2 orders and acknowledgements, sans I/O: what the auto-prefetch reads and answers.

An ORM^O01 or OMI^O23 (IHE SWF.b) becomes an :class:`OrderMessage` (:func:`parse_order`; the
MSH is read by hand first, :func:`read_header`, so that even a message the ``hl7`` package
cannot parse gets a correct ACK), its patient in the local domain is chosen among the PID-3
repetitions (:func:`local_patient_id`) and the ordered modality is mapped to DICOM modalities;
:func:`build_ack` writes the original-mode ACK (MSA, and ERR from an :class:`AckError`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "AckError",
    "Header",
    "OrderMessage",
    "PatientIdentifier",
    "build_ack",
    "decode_message",
    "local_patient_id",
    "parse_order",
    "read_header",
]

# HL7 table 0357 (message error condition codes).
SEGMENT_SEQUENCE_ERROR = ("100", "Segment sequence error")
REQUIRED_FIELD_MISSING = ("101", "Required field missing")
DATA_TYPE_ERROR = ("102", "Data type error")
UNSUPPORTED_MESSAGE_TYPE = ("200", "Unsupported message type")
UNSUPPORTED_EVENT_CODE = ("201", "Unsupported event code")
UNSUPPORTED_VERSION_ID = ("203", "Unsupported version id")
UNKNOWN_KEY_IDENTIFIER = ("204", "Unknown key identifier")
APPLICATION_INTERNAL_ERROR = ("207", "Application internal error")

SUPPORTED_MESSAGES = {"ORM": "O01", "OMI": "O23"}
_DICOM_MODALITIES = frozenset(
    {
        "AR",
        "BI",
        "BMD",
        "CR",
        "CT",
        "DG",
        "DX",
        "ECG",
        "EPS",
        "ES",
        "GM",
        "HC",
        "HD",
        "IO",
        "IVOCT",
        "IVUS",
        "KER",
        "LS",
        "MG",
        "MR",
        "NM",
        "OAM",
        "OCT",
        "OP",
        "OPM",
        "OPT",
        "OPV",
        "OSS",
        "PT",
        "PX",
        "RF",
        "RG",
        "SM",
        "SRF",
        "TG",
        "US",
        "XA",
        "XC",
    }
)
# HL7 table 0074 (diagnostic service section) → DICOM modalities; absent: no filter.
_SERVICE_SECTIONS = {
    "CT": ("CT",),
    "NMR": ("MR",),
    "MR": ("MR",),
    "NMS": ("NM", "PT"),
    "RUS": ("US",),
    "US": ("US",),
    "CUS": ("US",),
    "OUS": ("US",),
    "VUS": ("US",),
    "RX": ("CR", "DX"),
    "XRC": ("XA", "RF"),
    "MG": ("MG",),
}
_DATE = re.compile(r"^\d{8}")


class AckError(Exception):
    """The message is answered with ``ack_code`` (AE or AR) and an ERR segment."""

    def __init__(
        self, ack_code: str, condition: tuple[str, str], text: str, location: str = ""
    ) -> None:
        super().__init__(text)
        self.ack_code = ack_code
        self.condition = condition
        self.text = text
        self.location = location  # ERL: segment^sequence^field, e.g. PID^1^3


@dataclass(frozen=True)
class Header:
    """MSH as sent (raw, still escaped), read without a full parse so every message gets an
    ACK; MSH-n is ``fields[n - 1]``."""

    fields: tuple[str, ...]

    def get(self, number: int) -> str:
        return self.fields[number - 1] if 0 < number <= len(self.fields) else ""

    def component(self, number: int, index: int) -> str:
        separator = self.get(2)[:1] or "^"
        parts = self.get(number).split(separator)
        return parts[index - 1] if index <= len(parts) else ""

    @property
    def control_id(self) -> str:
        return self.get(10)

    @property
    def version(self) -> str:
        return self.component(12, 1)


def decode_message(raw: bytes) -> tuple[str, str]:
    """(text with CR segment separators, the encoding to answer in)."""
    for encoding in ("utf-8", "latin-1"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 ")
    return text, encoding


def read_header(text: str) -> Header:
    first = text.split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 8:
        raise AckError("AR", SEGMENT_SEQUENCE_ERROR, "the message does not start with MSH", "MSH")
    separator = first[3]
    if separator.isalnum() or separator in "\r\n ":
        raise AckError("AR", DATA_TYPE_ERROR, "invalid field separator in MSH-1", "MSH^1^1")
    fields = first.split(separator)
    return Header(("MSH", *fields[1:]) if len(fields) > 1 else ("MSH",))


@dataclass(frozen=True)
class PatientIdentifier:
    id: str
    namespace: str
    universal_id: str
    universal_id_type: str


@dataclass(frozen=True)
class OrderMessage:
    header: Header
    message_type: str
    trigger_event: str
    patient_ids: tuple[PatientIdentifier, ...]
    patient_name: str | None  # DICOM PN
    birth_date: str | None
    sex: str | None  # DICOM M/F/O
    order_control: str
    modalities: tuple[str, ...]  # what the order is for, as DICOM modalities (may be empty)


def _value(segment: Any, number: int, rep: int = 1, comp: int = 1, sub: int = 1) -> str:
    """One leaf of an hl7 segment, "" when absent (hl7's extract_field raises instead)."""
    if number >= len(segment):
        return ""
    items = list(segment[number])
    if not items:
        return ""
    if isinstance(items[0], str):  # a plain field
        return items[0] if (rep, comp, sub) == (1, 1, 1) else ""
    if rep > len(items):
        return ""
    repetition = items[rep - 1]
    if isinstance(repetition, str):
        return repetition if (comp, sub) == (1, 1) else ""
    if comp > len(repetition):
        return ""
    component = repetition[comp - 1]
    if isinstance(component, str):
        return component if sub == 1 else ""
    return str(component[sub - 1]) if sub <= len(component) else ""


def _repetitions(segment: Any, number: int) -> int:
    if number >= len(segment):
        return 0
    items = list(segment[number])
    if not items:
        return 0
    return 1 if isinstance(items[0], str) else len(items)


def _segment(message: Any, name: str) -> Any | None:
    for segment in message:
        if str(segment[0]) == name:
            return segment
    return None


def _pn(message: Any, pid: Any) -> str | None:
    """PID-5 (XPN: family&…^given^second^suffix^prefix) → DICOM PN (family^given^middle^
    prefix^suffix)."""
    unescape = message.unescape
    family = unescape(_value(pid, 5, 1, 1, 1))
    given = unescape(_value(pid, 5, 1, 2))
    middle = unescape(_value(pid, 5, 1, 3))
    suffix = unescape(_value(pid, 5, 1, 4))
    prefix = unescape(_value(pid, 5, 1, 5))
    name = "^".join((family, given, middle, prefix, suffix)).rstrip("^")
    return name or None


def _order_modalities(message: Any) -> tuple[str, ...]:
    ipc = _segment(message, "IPC")
    if ipc is not None and _value(ipc, 5).strip().upper() in _DICOM_MODALITIES:
        return (_value(ipc, 5).strip().upper(),)
    obr = _segment(message, "OBR")
    if obr is None:
        return ()
    section = _value(obr, 24).strip().upper()
    if section in _SERVICE_SECTIONS:
        return _SERVICE_SECTIONS[section]
    code = _value(obr, 4).strip().upper()
    if code in _DICOM_MODALITIES:
        return (code,)
    return ()


def parse_order(text: str) -> OrderMessage:
    """An ORM^O01 / OMI^O23, or AckError saying how to refuse it."""
    import hl7

    header = read_header(text)
    if not header.control_id:
        raise AckError(
            "AR", REQUIRED_FIELD_MISSING, "MSH-10 (message control id) is empty", "MSH^1^10"
        )
    version = header.version
    if not re.match(r"^2\.[1-9](\.\d+)?$", version):
        raise AckError(
            "AR", UNSUPPORTED_VERSION_ID, f"HL7 version {version!r} is not 2.x", "MSH^1^12"
        )
    message_type = header.component(9, 1).upper()
    trigger = header.component(9, 2).upper()
    if message_type not in SUPPORTED_MESSAGES:
        raise AckError(
            "AR",
            UNSUPPORTED_MESSAGE_TYPE,
            f"message type {message_type or '(none)'} is not supported (ORM^O01, OMI^O23)",
            "MSH^1^9",
        )
    if trigger != SUPPORTED_MESSAGES[message_type]:
        raise AckError(
            "AR",
            UNSUPPORTED_EVENT_CODE,
            f"{message_type}^{trigger} is not supported (ORM^O01, OMI^O23)",
            "MSH^1^9",
        )
    try:
        message = hl7.parse(text)
    except Exception as exc:  # hl7 raises assorted errors on broken structure
        raise AckError("AE", SEGMENT_SEQUENCE_ERROR, f"unparseable message: {exc}") from None
    pid = _segment(message, "PID")
    if pid is None:
        raise AckError("AE", SEGMENT_SEQUENCE_ERROR, "no PID segment", "PID")
    unescape = message.unescape
    ids = tuple(
        PatientIdentifier(
            unescape(_value(pid, 3, rep, 1)).strip(),
            unescape(_value(pid, 3, rep, 4, 1)).strip(),
            unescape(_value(pid, 3, rep, 4, 2)).strip(),
            unescape(_value(pid, 3, rep, 4, 3)).strip().upper(),
        )
        for rep in range(1, _repetitions(pid, 3) + 1)
    )
    ids = tuple(i for i in ids if i.id)
    if not ids:
        raise AckError(
            "AE", REQUIRED_FIELD_MISSING, "PID-3 (patient identifier list) is empty", "PID^1^3"
        )
    orc = _segment(message, "ORC")
    if orc is None:
        raise AckError("AE", SEGMENT_SEQUENCE_ERROR, "no ORC segment", "ORC")
    order_control = _value(orc, 1).strip().upper()
    if not order_control:
        raise AckError("AE", REQUIRED_FIELD_MISSING, "ORC-1 (order control) is empty", "ORC^1^1")
    birth = _value(pid, 7).strip()
    sex = _value(pid, 8).strip().upper()
    return OrderMessage(
        header=header,
        message_type=message_type,
        trigger_event=trigger,
        patient_ids=ids,
        patient_name=_pn(message, pid),
        birth_date=birth[:8] if _DATE.match(birth) else None,
        sex={"M": "M", "F": "F", "O": "O", "A": "O", "N": "O"}.get(sex),
        order_control=order_control,
        modalities=_order_modalities(message),
    )


def local_patient_id(
    order: OrderMessage,
    local_authority: str,
    *,
    local_namespaces: Sequence[str] = (),
    accept_unqualified: bool = True,
) -> str | None:
    """The order's patient in the local domain as an XDS CX (ID^^^&OID&ISO), or None."""

    def is_local(i: PatientIdentifier) -> int:
        """2: by universal id, 1: by namespace or unqualified, 0: foreign."""
        if i.universal_id == local_authority and i.universal_id_type in ("", "ISO"):
            return 2
        if i.namespace and (i.namespace in local_namespaces or i.namespace == local_authority):
            return 1
        if accept_unqualified and not (i.namespace or i.universal_id):
            return 1
        return 0

    ranked = sorted(
        (i for i in order.patient_ids if is_local(i) and not set(i.id) & set("^&~\\")),
        key=is_local,
        reverse=True,
    )
    return f"{ranked[0].id}^^^&{local_authority}&ISO" if ranked else None


def _escape(value: str) -> str:
    return (
        value.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def build_ack(
    header: Header | None,
    ack_code: str,
    *,
    now: datetime,
    control_id: str,
    application: str,
    facility: str,
    error: AckError | None = None,
) -> str:
    """An original-mode ACK (MSH, MSA, and ERR when ``error``) to the message ``header``."""
    h = header or Header(("MSH",))
    version = h.version if re.match(r"^2\.[1-9](\.\d+)?$", h.version) else "2.5.1"
    trigger = h.component(9, 2) if header is not None else ""
    msh = "|".join(
        (
            "MSH",
            "^~\\&",
            _escape(application),
            _escape(facility),
            h.get(3),
            h.get(4),
            now.strftime("%Y%m%d%H%M%S"),
            "",
            f"ACK^{trigger}^ACK" if trigger else "ACK",
            control_id,
            h.get(11) or "P",
            version,
        )
    )
    modern = tuple(int(p) for p in version.split(".")[:2]) >= (2, 5)
    msa = ["MSA", ack_code, h.control_id]
    segments = []
    if error is not None and not modern:
        msa.append(_escape(error.text)[:80])  # MSA-3 text message (before 2.5)
    segments.append("|".join(msa))
    if error is not None:
        code, text = error.condition
        if modern:
            segments.append(
                "|".join(
                    (
                        "ERR",
                        "",
                        error.location,
                        f"{code}^{text}^HL70357",
                        "E",
                        "",
                        "",
                        "",
                        _escape(error.text),
                    )
                )
            )
        else:  # ERR-1 (ELD): segment^sequence^field^code&text&table
            where = [*error.location.split("^"), "", "", ""][:3]
            segments.append("ERR|" + "^".join([*where, f"{code}&{text}&HL70357"]))
    return "\r".join((msh, *segments)) + "\r"
