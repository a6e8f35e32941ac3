"""ATNA (ITI-20 Record Audit Event): the DICOM audit messages (``messages``), the trail that
spools and sends them (``trail``, ``spool``, ``syslog``, ``sender``) and its ``[audit]``
configuration (``config``)."""

from xca_gateway.audit.config import AuditConfig, AuditDestination, parse_audit_config
from xca_gateway.audit.trail import AuditTrail

__all__ = ["AuditConfig", "AuditDestination", "AuditTrail", "parse_audit_config"]
