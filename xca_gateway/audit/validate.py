"""Validation of audit messages against the DICOM audit message schema (``schema/``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from lxml import etree

from xca_gateway.audit.messages import AuditMessage

SCHEMA_PATH = Path(__file__).with_name("schema") / "dicom2017c.xsd"


class AuditSchemaError(ValueError):
    pass


@functools.cache
def audit_schema() -> etree.XMLSchema:
    # The schema is our own file, not network input, but parse it without network access.
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return etree.XMLSchema(etree.parse(str(SCHEMA_PATH), parser))


def schema_errors(document: AuditMessage | bytes | etree._Element) -> list[str]:
    """The schema violations of an audit message (empty when it is valid)."""
    if isinstance(document, AuditMessage):
        root = document.to_element()
    elif isinstance(document, bytes):
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        root = etree.fromstring(document, parser)
    else:
        root = document
    schema = audit_schema()
    if schema.validate(root):
        return []
    log: Any = schema.error_log
    return [f"line {e.line}: {e.message}" for e in log]


def validate(document: AuditMessage | bytes | etree._Element) -> None:
    """Raise :class:`AuditSchemaError` unless the message is valid."""
    errors = schema_errors(document)
    if errors:
        raise AuditSchemaError("; ".join(errors))
