"""The door guard every listener calls first: identity → principal → door allowed?

Each listener builds an :class:`~xca_gateway.security.callers.Identity` from what it verified
(TLS client certificate, DIMSE calling AE with its certificate or address, loopback address) and
calls :meth:`DoorGuard.admit`. A refusal is logged and audited exactly once, as a DICOM Security
Alert (110113) of type "Use of Restricted Function" (DCM 110132) naming the *verified* identity:
PS3.15 A.5.3.11 uses Security Alert for an attempt to use a function the node is not permitted to
use, and the caller never reaches a transaction whose own event could carry the failure.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from xca_gateway.audit.messages import (
    ActiveParticipant,
    AuditContext,
    AuditMessage,
    CodedValue,
    EventId,
    EventIdentification,
    EventOutcome,
    ObjectRole,
    ObjectType,
    ParticipantObject,
    ParticipantObjectIdType,
)
from xca_gateway.protocol.http_server import PeerInfo
from xca_gateway.security.callers import (
    AccessDecision,
    CallerDirectory,
    Door,
    Identity,
    Principal,
    decide,
    normalize_fingerprint,
    set_current_caller,
)

log = logging.getLogger(__name__)


def identity_from_peer(peer: PeerInfo, *, ae_title: str | None = None) -> Identity:
    """What TLS (and the TCP peer) proved about an HTTP or DIMSE caller."""
    cert = peer.certificate
    if cert is None:
        return Identity(address=peer.address, ae_title=ae_title)
    return Identity(
        address=peer.address,
        certificate_subject=cert.subject,
        certificate_fingerprint=normalize_fingerprint(cert.fingerprint_sha256),
        san_dns=cert.san_dns,
        san_uri=cert.san_uri,
        ae_title=ae_title,
    )


class DoorGuard:
    """Deny-by-default admission for one listener (or several sharing one directory).

    ``directory`` is a callable so that a hot-reloaded policy is seen by the next caller;
    ``on_refusal`` records the audit message (it is called once per refused caller).
    """

    def __init__(
        self,
        directory: Callable[[], CallerDirectory],
        *,
        on_refusal: Callable[[AccessDecision, str], None] | None = None,
    ) -> None:
        self._directory = directory
        self.on_refusal = on_refusal
        self.refused = 0
        # The latest refusals (wall time, decision, resource), for the operator page.
        self.recent: collections.deque[tuple[float, AccessDecision, str]] = collections.deque(
            maxlen=50
        )

    @property
    def directory(self) -> CallerDirectory:
        return self._directory()

    def identify(self, identity: Identity) -> Principal | None:
        return self._directory().identify(identity)

    def check(self, identity: Identity, door: Door) -> AccessDecision:
        """The decision alone: no audit, no current caller (for previews and tests)."""
        return decide(self._directory(), identity, door)

    def admit(self, identity: Identity, door: Door, *, resource: str) -> AccessDecision:
        """Decide; on success make the principal the current caller, else audit the refusal.

        ``resource`` names what was asked for (an endpoint path, ``C-FIND``, ...) in the audit.
        """
        decision = decide(self._directory(), identity, door)
        if decision.allowed:
            set_current_caller(decision.principal)
            return decision
        self.refuse(decision, resource)
        return decision

    def refuse(self, decision: AccessDecision, resource: str) -> None:
        self.refused += 1
        self.recent.append((time.time(), decision, resource))
        log.warning(
            "refused %s at %s (%s): %s", decision.who, resource, decision.door, decision.reason
        )
        if self.on_refusal is not None:
            try:
                self.on_refusal(decision, resource)
            except Exception:  # an audit failure must not turn a refusal into a crash
                log.exception("recording the refusal failed")


def access_denied_message(
    ctx: AuditContext,
    decision: AccessDecision,
    *,
    resource: str,
    reporter_user_id: str,
    when: datetime | None = None,
) -> AuditMessage:
    """Security Alert (110113) / Use of Restricted Function (110132) for a refused caller.

    The caller is named by what was verified: the principal's certificate subject, or the
    certificate subject of an unknown-but-trusted caller, or its address (and AE title, marked
    as claimed) when it presented no certificate.
    """
    identity = decision.identity
    if decision.principal is not None:
        user_id = decision.principal.user_id
        user_name: str | None = decision.principal.name
    elif identity.certificate_subject is not None:
        user_id = identity.certificate_subject
        user_name = None
    else:
        user_id = identity.address or "unknown"
        user_name = f"AE {identity.ae_title} (claimed, unverified)" if identity.ae_title else None
    description = f"{resource} refused: {decision.reason}"
    details: list[tuple[str, bytes]] = [("Alert Description", description.encode())]
    if identity.certificate_fingerprint:
        details.append(("Certificate SHA-256", identity.certificate_fingerprint.encode()))
    if identity.ae_title:
        details.append(("Calling AE Title", identity.ae_title.encode()))
    participants = (
        ActiveParticipant(
            user_id=user_id,
            user_is_requestor=True,
            user_name=user_name,
            network_access_point_id=identity.address,
        ),
        ActiveParticipant(
            user_id=reporter_user_id,
            user_is_requestor=False,
            alternative_user_id=ctx.process_id,
            network_access_point_id=ctx.host,
        ),
    )
    return AuditMessage(
        event=EventIdentification(
            event_id=EventId.SECURITY_ALERT,
            action="E",
            outcome=EventOutcome.MINOR_FAILURE,
            date_time=when or datetime.now(UTC),
            type_codes=(CodedValue("110132", "DCM", "Use of Restricted Function"),),
            outcome_description=description,
        ),
        participants=participants,
        source=ctx.audit_source,
        objects=(
            ParticipantObject(
                object_id=resource,
                id_type_code=ParticipantObjectIdType.URI,
                type_code=ObjectType.SYSTEM_OBJECT,
                type_code_role=ObjectRole.SECURITY_RESOURCE,
                details=tuple(details),
            ),
        ),
    )
