"""The embedded ATNA Audit Record Repository and the security officer's review UI.

* :mod:`~xca_gateway.arr.receiver` - ITI-20 receivers: syslog over mutual TLS (RFC 5425) and UDP
  (RFC 5426), per-sender limits, batched ingest;
* :mod:`~xca_gateway.arr.parse` - DICOM and RFC 3881 audit messages into indexed records (never
  raises: what is not understood is stored flagged, verbatim);
* :mod:`~xca_gateway.arr.store` - SQLite (default) or PostgreSQL storage, append-only;
* :mod:`~xca_gateway.arr.fhir` - ITI-81 Retrieve ATNA Audit Event (FHIR R4 AuditEvent search);
* :mod:`~xca_gateway.arr.web` - the officers' review UI (login, search, report, dashboard);
* :mod:`~xca_gateway.arr.app` - configuration (``[arr]``), the service, ``arr`` CLI commands.
"""
