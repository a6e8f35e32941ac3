"""ebRS 3.0 registry responses and RegistryErrors (sans-IO).

Both query responses (query:AdhocQueryResponse) and retrieve responses
(xdsb:RetrieveDocumentSetResponse/rs:RegistryResponse) report their outcome the same way: a
status URN and an optional rs:RegistryErrorList. ebRS puts the error list *before* the
rim:RegistryObjectList.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lxml import etree

from xca_gateway.protocol.namespaces import QUERY, RIM, RS, XDSB, ErrorSeverity, ResponseStatus

# The responder's policy forbids the request (ITI TF-3 Table 4.2.4.1-2); IPF
# ``ErrorCode.LOCAL_POLICY_RESTRICTION_ERROR``.
LOCAL_POLICY_RESTRICTION_ERROR = "LocalPolicyRestrictionError"


@dataclass(frozen=True)
class RegistryError:
    error_code: str
    code_context: str
    location: str | None = None
    severity: str = ErrorSeverity.ERROR

    @property
    def is_error(self) -> bool:
        return self.severity == ErrorSeverity.ERROR


def status_for(errors: Sequence[RegistryError], *, results: int) -> str:
    """Success with no errors; PartialSuccess when errors and results mix; else Failure."""
    if not any(e.is_error for e in errors):
        return ResponseStatus.SUCCESS
    return ResponseStatus.PARTIAL_SUCCESS if results else ResponseStatus.FAILURE


def _append_errors(parent: etree._Element, errors: Iterable[RegistryError]) -> None:
    errors = list(errors)
    if not errors:
        return
    error_list = etree.SubElement(parent, f"{{{RS}}}RegistryErrorList")
    worst = ErrorSeverity.ERROR if any(e.is_error for e in errors) else ErrorSeverity.WARNING
    error_list.set("highestSeverity", worst)
    for error in errors:
        el = etree.SubElement(error_list, f"{{{RS}}}RegistryError")
        el.set("errorCode", error.error_code)
        el.set("codeContext", error.code_context)
        el.set("severity", error.severity)
        if error.location:
            el.set("location", error.location)


def parse_registry_errors(parent: etree._Element) -> list[RegistryError]:
    return [
        RegistryError(
            error_code=el.get("errorCode", ""),
            code_context=el.get("codeContext", ""),
            location=el.get("location"),
            severity=el.get("severity", ErrorSeverity.ERROR),
        )
        for el in parent.iterfind(f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError")
    ]


def adhoc_query_response(
    status: str,
    errors: Iterable[RegistryError] = (),
    objects: Iterable[etree._Element] = (),
) -> etree._Element:
    root = etree.Element(
        f"{{{QUERY}}}AdhocQueryResponse", nsmap={"query": QUERY, "rim": RIM, "rs": RS}
    )
    root.set("status", status)
    _append_errors(root, errors)
    object_list = etree.SubElement(root, f"{{{RIM}}}RegistryObjectList")
    for obj in objects:
        object_list.append(obj)
    return root


def retrieve_document_set_response(
    status: str, errors: Iterable[RegistryError] = ()
) -> etree._Element:
    """The response element without DocumentResponses (callers append those)."""
    root = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetResponse", nsmap={"xdsb": XDSB, "rs": RS})
    registry_response = etree.SubElement(root, f"{{{RS}}}RegistryResponse")
    registry_response.set("status", status)
    _append_errors(registry_response, errors)
    return root
