"""HL7 v2 CX patient identifiers as XDS uses them: ``ID^^^&OID&ISO`` (sans-IO).

Stored query parameters carry them quoted (``'ID^^^&1.2.3&ISO'``); metadata carries them bare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class PatientIdError(ValueError):
    pass


@dataclass(frozen=True)
class PatientId:
    id: str
    assigning_authority: str  # universal id (an OID) of the assigning authority

    def __str__(self) -> str:
        return f"{self.id}^^^&{self.assigning_authority}&ISO"

    @property
    def quoted(self) -> str:
        """As a stored query parameter value."""
        return f"'{self}'"


def parse_patient_id(value: str) -> PatientId:
    """Parse a CX value, quoted or bare; the assigning authority must be an ISO OID."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    parts = text.split("^")
    if len(parts) < 4 or not parts[0]:
        raise PatientIdError(f"not a CX patient id (ID^^^&OID&ISO): {value!r}")
    authority = parts[3].split("&")
    if len(authority) < 3 or authority[2] != "ISO" or not _OID.match(authority[1]):
        raise PatientIdError(f"the assigning authority must be &OID&ISO: {value!r}")
    if any(c in parts[0] for c in "&~\\"):
        raise PatientIdError(f"invalid characters in the patient id: {value!r}")
    return PatientId(parts[0], authority[1])
