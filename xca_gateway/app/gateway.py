"""One community's gateway: the HTTPS SOAP server, the admin server and the peer client.

Roles compose transactions: the responding side (ITI-38, ITI-39, RAD-75) serves peer
communities, the initiating side (ITI-18, ITI-43, RAD-69) serves local consumers. A transaction
whose back end is not configured answers with a standards-shaped Failure.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xca_gateway.app import diagnostics
from xca_gateway.app.admin import AdminApp
from xca_gateway.app.config import GatewayConfig
from xca_gateway.app.operator_page import install_operator_page
from xca_gateway.app.transaction_audit import (
    OutboundCall,
    RegistryPatients,
    TransactionAuditor,
    local_caller_requestor,
)
from xca_gateway.audit.exchange import ImagingFacts
from xca_gateway.audit.patients import PatientMemory
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.doors.dicomweb import DicomWebFrontDoor
from xca_gateway.doors.dimse import DicomFrontDoor, DicomFrontServices
from xca_gateway.doors.hl7_prefetch import Prefetcher
from xca_gateway.doors.study_access_store import PostgresStudyAccess
from xca_gateway.doors.viewer.pages import install_viewer
from xca_gateway.doors.web.audit import record_launch
from xca_gateway.doors.web.door import WebDoor
from xca_gateway.imaging.config import ImagingConfig
from xca_gateway.imaging.request import IMAGING_REQUEST, RetrieveImagingRequestReader
from xca_gateway.imaging.service import ImagingService
from xca_gateway.initiating.imaging import InitiatingImagingGateway
from xca_gateway.initiating.patient_mapping import PatientIdMapper
from xca_gateway.initiating.query import InitiatingGateway, initiating_query_handler
from xca_gateway.initiating.retrieve import InitiatingRetrieve, initiating_retrieve_handler
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.patients.directory import PatientDirectory
from xca_gateway.patients.xref import CrossReferenceTable
from xca_gateway.protocol.http_server import (
    ConnectionLimits,
    HttpServer,
    Response,
    ServerTimeouts,
    listen_errors,
)
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.proxy_protocol import ProxySources
from xca_gateway.protocol.shared_db import SharedDatabase, SharedDatabaseError
from xca_gateway.protocol.soap import SoapFault, build_fault
from xca_gateway.protocol.soap_service import CURRENT_REQUEST, Operation, SoapEndpoint, SoapService
from xca_gateway.protocol.tls import HandshakeFailure, gateway_client_context, server_context
from xca_gateway.registry import RegistryAction, open_registry
from xca_gateway.security.callers import AccessDecision, Door, soap_door
from xca_gateway.security.consent.admin import ConsentAdminApp, ConsentChange, consent_change_audit
from xca_gateway.security.consent.guard import ConsentGuard
from xca_gateway.security.consent.postgres_store import PostgresConsentStore
from xca_gateway.security.consent.service import ConsentService
from xca_gateway.security.guard import DoorGuard, access_denied_message, identity_from_peer
from xca_gateway.security.operators import AdminAccessError, AdminGate, load_operator_tokens
from xca_gateway.security.policy import (
    AccessPolicy,
    AuthorizationGate,
    PolicyStore,
    refusal_audit_message,
)
from xca_gateway.security.replay_store import PostgresReplayCache
from xca_gateway.security.xua import XuaOutbound, XuaValidator
from xca_gateway.settings import ConfigError
from xca_gateway.transactions import TRANSACTIONS, iti45, iti55, unavailable_handler
from xca_gateway.transactions.iti18 import registry_stored_query_handler
from xca_gateway.transactions.iti38 import iti38_handler
from xca_gateway.transactions.iti39 import iti39_handler
from xca_gateway.transactions.iti42 import iti42_handler
from xca_gateway.transactions.iti43 import (
    RemoteRepositories,
    repository_retrieve_handler,
    retrieve_documents,
)
from xca_gateway.transactions.rad75 import rad75_handler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenSockets:
    """Already-bound listening sockets (socket activation, or the demo launcher)."""

    https: socket.socket | None = None
    admin: socket.socket | None = None
    # The web door's: its URL must be known before start (the authorization server redirects
    # browsers back to it).
    web: socket.socket | None = None


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.handshake_failures: collections.deque[HandshakeFailure] = collections.deque(
            maxlen=1000
        )
        self._handshake_listeners: list[Callable[[HandshakeFailure], None]] = []
        community = config.community
        mapping = config.patient_mapping
        self.xref = CrossReferenceTable(config.storage.data_dir / "xref.sqlite3")
        if mapping.xref_csv is not None:
            self.xref.load_csv(mapping.xref_csv)
        self.patients = PatientDirectory(
            mapping.directory or config.storage.data_dir / "patients.sqlite3"
        )
        # The database the replicas of this community share, when [shared] names one.
        self.shared: SharedDatabase | None = None
        if config.shared.database:
            try:
                self.shared = SharedDatabase(
                    config.shared.database, statement_timeout=config.shared.statement_timeout
                )
            except SharedDatabaseError as exc:
                raise ConfigError(f"[shared] database: {exc}") from None
        self.draining = False
        self.endpoints = self._build_endpoints()
        if mapping.xcpd_responder:
            self.endpoints["iti55"] = iti55.endpoint(
                iti55.iti55_handler(
                    self.patients,
                    home_community_id=community.home_community_id,
                    assigning_authority=community.patient_id_assigning_authority,
                    xref=self.xref if mapping.xcpd_learn_correlations else None,
                )
            )
        if mapping.pix_responder:
            self.endpoints["iti45"] = iti45.endpoint(iti45.iti45_handler(self.xref))
        self.soap = SoapService(list(self.endpoints.values()), config.limits, self.metrics)
        # RAD-69 / RAD-75 requests are read element by element into compact records, never
        # as a tree (issue 22: 20,000 instances in one request).
        max_documents = getattr(config.imaging, "max_documents", 100_000)
        self.soap.payload_readers[IMAGING_REQUEST] = lambda: RetrieveImagingRequestReader(
            max_documents=max_documents
        )
        self.https = HttpServer(
            self.soap,
            ssl_context=server_context(config.tls),
            on_handshake_failure=self.on_handshake_failure,
            timeouts=ServerTimeouts.for_gateway(config),
            limits=ConnectionLimits.for_gateway(config),
            on_refused=self.connection_refused,
            max_header_bytes=config.limits.max_header_bytes,
            proxy=(
                ProxySources.parse(config.server.proxy_sources)
                if config.server.proxy_protocol
                else None
            ),
        )
        self.admin_app = AdminApp(
            self.metrics,
            self.readiness,
            lambda: self.listening(),
            listener=lambda: (self.config.admin.host, self.admin.port),
            on_refusal=lambda decision, resource: self.guard.refuse(decision, resource),
        )
        self.admin = HttpServer(self.admin_app, ssl_context=None)
        self.peer_client = PeerClient(
            gateway_client_context(config.tls), config.outbound, self.metrics
        )
        # Certificate pinning per peer community (on top of the trust store).
        for peer in config.peers:
            if peer.certificate_sha256:
                for url in (peer.iti38, peer.iti39, peer.rad75, getattr(peer, "xcpd", None)):
                    if url:
                        self.peer_client.pin(url, peer.certificate_sha256)
        self.initiating = InitiatingGateway(
            home_community_id=config.community.home_community_id,
            patient_id_assigning_authority=config.community.patient_id_assigning_authority,
            peers=config.peers,
            peer_client=self.peer_client,
            mapper=PatientIdMapper(
                self.xref,
                peer_client=self.peer_client,
                pix_manager=mapping.pix_manager,
                directory=self.patients,
                xcpd_peers=mapping.xcpd_peers,
                home_community_id=community.home_community_id,
                local_authority=community.patient_id_assigning_authority,
                deadline=mapping.deadline,
                xcpd_minimum_score=mapping.xcpd_minimum_score,
                negative_cache_seconds=mapping.negative_cache_seconds,
            ),
            config=config.initiating,
            metrics=self.metrics,
        )
        self.endpoints["iti18"].add(
            Operation(Action.ITI18, "ITI-18", initiating_query_handler(self.initiating))
        )
        self._wire_repository()

        # The patients of the documents and studies that went through this gateway (query
        # answers, manifests read by the front doors), for the retrieve audits that follow.
        self.audit_patients = PatientMemory()

        self.imaging = install_imaging(self, config.imaging)
        self._wire_audit()
        self._wire_authorization()

        # Patient consent (opt-in/opt-out), checked by the responding handlers; managed with
        # `xca-gateway consent ...` and the admin port's /consent API (operators only).
        self.consent: ConsentService | None = None
        if config.consent.enabled:
            self.consent = (
                ConsentService(PostgresConsentStore(self.shared), config.consent)
                if self.shared is not None
                else ConsentService.open(config.consent)
            )
            self.admin_app.mount("/consent", self._consent_admin(self.consent))
        self._started = False
        self.registry: Any = None

        # The DIMSE front door (C-FIND / C-GET / C-MOVE over the federation), when configured.
        self.dicom_front = (
            DicomFrontDoor(
                DicomFrontServices.of(self, on_handshake_failure=self.on_handshake_failure),
                config.dicom,
            )
            if config.dicom is not None
            else None
        )

        # HL7 v2 orders (MLLP) prefetch the patient's foreign priors into the PACS, in-process.
        self.prefetch = Prefetcher(self, config.prefetch) if config.prefetch is not None else None

        # The DICOMweb front door (QIDO-RS / WADO-RS over the federation), when configured.
        self.dicomweb_front = (
            DicomWebFrontDoor(self, config.dicomweb, on_handshake_failure=self.on_handshake_failure)
            if config.dicomweb is not None
            else None
        )

        # The web door (browsers: clinicians with IUA bearer tokens), when [web] is enabled.
        self.web_door = (
            WebDoor(
                self,
                config.web,
                dicomweb=config.dicomweb,
                on_handshake_failure=self.on_handshake_failure,
            )
            if config.web is not None
            else None
        )
        if self.web_door is not None:
            # What the clinician sees: the IID launch (/iid) and the viewer (/viewer/).
            install_viewer(self.web_door, functools.partial(record_launch, self.web_door))

        # Replicas: a study found through one is granted to its caller on all.
        if self.shared is not None:
            access = PostgresStudyAccess(self.shared)
            if self.dicom_front is not None:
                self.dicom_front.view.access = access
            if self.dicomweb_front is not None:
                self.dicomweb_front.view.access = access
            if self.web_door is not None:
                self.web_door.dicomweb.view.access = access

        # The operator page on the admin port (/, /status.json) and its metrics.
        self.operator_page = install_operator_page(self)

    def _build_endpoints(self) -> dict[str, SoapEndpoint]:
        home = self.config.community.home_community_id
        endpoints: dict[str, SoapEndpoint] = {}
        for spec in TRANSACTIONS:
            endpoint = SoapEndpoint(path=spec.path, name=spec.key, operations={})
            # Until the transaction's back end exists, answer with a registry-shaped Failure.
            reason = (
                "no registry configured for this community"
                if spec.kind == "query"
                else "no repository or imaging source configured for this community"
            )
            endpoint.add(Operation(spec.action, spec.name, unavailable_handler(spec, home, reason)))
            endpoints[spec.key] = endpoint
        if self.config.diagnostics.echo:
            endpoints["echo"] = diagnostics.echo_endpoint()
        return endpoints

    async def _open_registry(self) -> None:
        """The community's registry answers ITI-38 for peers, ITI-18 locally, takes ITI-42."""

        cfg = self.config
        home = cfg.community.home_community_id
        registry = await open_registry(cfg.registry, peer_client=self.peer_client)
        self.registry = registry
        self.endpoints["iti38"].add(
            Operation(
                Action.ITI38,
                "ITI-38",
                iti38_handler(
                    registry, home_community_id=home, unknown_patient=cfg.registry.unknown_patient
                ),
            )
        )
        for path, name, operation in (
            (
                "/registry/iti18",
                "registry-iti18",
                Operation(
                    Action.ITI18,
                    "ITI-18",
                    registry_stored_query_handler(registry, home_community_id=home),
                ),
            ),
            (
                "/registry/iti42",
                "registry-iti42",
                Operation(RegistryAction.ITI42, "ITI-42", iti42_handler(registry)),
            ),
        ):
            endpoint = SoapEndpoint(path, name, {})
            endpoint.add(operation)
            self.endpoints[name] = endpoint
            self.soap.endpoints[path] = endpoint
        if self.consent is not None:
            self._guard_consent(registry)
        if cfg.audit.enabled:
            self._audit_patients_from(registry)
        if cfg.initiating.query_local_community:

            async def local_query(element: Any) -> Any:
                result = await registry.stored_query(element)
                return result.status, result.errors, result.objects

            self.initiating.local_query = local_query

    def _audit_patients_from(self, registry: Any) -> None:
        """Retrieves of this community's documents and studies find their patient in its
        registry (for the audit record), before the handler runs."""

        lookup = RegistryPatients(registry)
        for key, action, imaging in (
            ("iti39", Action.ITI39, False),
            ("repository-iti43", Action.ITI43, False),
            ("iti43", Action.ITI43, False),
            ("rad75", Action.RAD75, True),
            ("rad69", Action.RAD69, True),
        ):
            endpoint = self.endpoints.get(key)
            operation = endpoint.operations.get(action) if endpoint is not None else None
            if endpoint is None or operation is None:
                continue
            endpoint.add(
                Operation(
                    action, operation.transaction, lookup.wrap(operation.handler, imaging=imaging)
                )
            )

    def _guard_consent(self, registry: Any) -> None:
        """Patient consent wraps the responding handlers (ITI-38, ITI-39, RAD-75)."""

        assert self.consent is not None
        guard = ConsentGuard(self.consent, registry, self.config.community.home_community_id)
        for key, action, wrap in (
            ("iti38", Action.ITI38, guard.iti38),
            ("iti39", Action.ITI39, guard.iti39),
            ("rad75", Action.RAD75, guard.rad75),
        ):
            endpoint = self.endpoints[key]
            operation = endpoint.operations[action]
            endpoint.add(Operation(action, operation.transaction, wrap(operation.handler)))

    def _wire_audit(self) -> None:
        """ATNA: every served request and every outbound call is audited, both sides."""

        self.audit = AuditTrail(self.config.audit, self.metrics)
        if not self.config.audit.enabled:
            return
        self.add_handshake_listener(self.audit.on_handshake_failure)
        auditor = TransactionAuditor(
            self.audit,
            lambda: self.base_url,
            self.audit_patients,
            home_community_id=self.config.community.home_community_id,
            peer_communities={p.iti38: p.home_community_id for p in self.config.peers if p.iti38},
            queries_local_community=self.config.initiating.query_local_community,
        )
        self.soap.observers.append(
            lambda request, transaction, payload, fault, delivered: auditor.served(
                request, transaction, payload, fault=fault, delivered=delivered
            )
        )
        self.peer_client.observers.append(
            lambda url, action, request, reply, error, facts: auditor.called(
                OutboundCall(
                    url,
                    action,
                    request,
                    reply,
                    error,
                    local_caller_requestor(),
                    facts if isinstance(facts, ImagingFacts) else None,
                )
            )
        )

    def _wire_authorization(self) -> None:
        """Every door: identity → principal → role allowed? Then, on /xca/*, XUA and policy.

        The access policy (``[policy]``) names every caller: peer gateways in
        ``[[policy.peers]]``, the community's own systems and other principals in
        ``[[policy.callers]]`` with their roles. A certificate from the trust store that no entry
        names gets nothing (deny-by-default); each door admits only the roles of
        :data:`xca_gateway.security.callers.ACCESS`.
        """

        cfg = self.config
        store = (
            PolicyStore.from_config(cfg.policy, cfg.path)
            if cfg.policy is not None
            else PolicyStore(AccessPolicy())
        )
        self.policy_store = store
        audit = self.audit

        def denied(decision: AccessDecision, resource: str) -> None:
            if audit.config.enabled:
                audit.record(
                    access_denied_message(
                        audit.context,
                        decision,
                        resource=resource,
                        reporter_user_id=(self._configured_url("") or self.base_url) + resource
                        if resource.startswith("/")
                        else audit.application_id,
                    )
                )

        self.guard = DoorGuard(lambda: store.policy.caller_directory(), on_refusal=denied)
        guard = self.guard

        def admission(request: Any, endpoint: SoapEndpoint) -> Response | None:
            identity = identity_from_peer(request.peer)
            door = soap_door(endpoint.path) or (Door(endpoint.door) if endpoint.door else None)
            if door is None:
                decision = AccessDecision(
                    False, None, identity, None, "no door of the access table serves this path"
                )
                guard.refuse(decision, endpoint.path)
            else:
                decision = guard.admit(identity, door, resource=endpoint.path)
                if decision.allowed:
                    return None
            body, content_type = build_fault(
                SoapFault.sender(f"access denied: {decision.reason}", http_status=403)
            )
            return Response(403, [("content-type", content_type)], body, close=True)

        self.soap.admission = admission
        policy = store.policy
        if policy.default == "allow":
            log.warning(
                'policy.default = "allow": any certificate from the trust store may call '
                "/xca/* as an anonymous peer (development only)"
            )
        if not policy.directory.rules:
            log.warning("the access policy names no caller: every request will be refused")
        if cfg.xua.enabled:
            for peer in policy.peers:
                if peer.xua_exempt:
                    log.warning("XUA: peer %s is exempt from the assertion requirement", peer.name)
        audiences = [
            url
            for ep in ("iti38", "iti39", "rad75")
            if (url := self._configured_url(ep)) is not None
        ]

        def refused(refusal: Any) -> None:
            if audit.config.enabled:
                local = (self._configured_url("") or "") + (refusal.endpoint or "")
                audit.record(refusal_audit_message(audit.context, refusal, local_user_id=local))

        self.gate: AuthorizationGate | None = AuthorizationGate(
            store,
            XuaValidator(
                cfg.xua,
                default_audiences=audiences,
                replay_cache=PostgresReplayCache(self.shared) if self.shared else None,
            )
            if cfg.xua.enabled
            else None,
            home_community_id=cfg.community.home_community_id,
            on_refusal=refused,
        )
        gate = self.gate

        async def authorize(request: Any, operation: Operation) -> Any:
            # XUA and the per-peer transaction policy guard the community's edge.
            if request.endpoint.path.startswith("/xca/"):
                return await gate.authorize(request, operation)
            return None

        self.soap.authorizer = authorize
        if cfg.xua.outbound.mode != "off":
            outbound = XuaOutbound.from_config(
                cfg.xua.outbound,
                tls_key=cfg.tls.private_key,
                tls_certificate=cfg.tls.certificate,
                base_url=cfg.base_url,
                home_community_id=cfg.community.home_community_id,
            )
            by_url = {
                url: p.home_community_id
                for p in cfg.peers
                for url in (p.iti38, p.iti39, p.rad75)
                if url
            }
            cross_community = {Action.ITI38, Action.ITI39, Action.RAD75}

            def headers(url: str, action: str, payload: Any) -> list[Any]:
                if action not in cross_community:
                    return []
                return outbound.security_headers(
                    CURRENT_REQUEST.get(), endpoint_url=url, peer_home_community_id=by_url.get(url)
                )

            self.peer_client.set_header_provider(headers)

    def _consent_admin(self, consent: Any) -> Any:
        """The /consent admin API: Host checked and operator tokens (:mod:`xca_gateway.app.admin`),
        refusals audited once by the door guard, each change audited as 110110."""

        token_file = self.config.consent.admin_token_file
        try:
            tokens = load_operator_tokens(token_file) if token_file is not None else ()
        except AdminAccessError as exc:
            raise ConfigError(f"[consent] admin_token_file: {exc}") from None
        if not tokens:
            log.warning("consent admin API: no operator tokens ([consent] admin_token_file)")
        audit = self.audit

        def changed(change: ConsentChange) -> None:
            if audit.config.enabled:
                audit.record(consent_change_audit(audit.context, change))

        gate = AdminGate(
            tokens,
            lambda: (self.config.admin.host, self.admin.port),
            on_refusal=self.guard.refuse,
        )
        return ConsentAdminApp(consent, gate, on_change=changed, base_url=lambda: self.admin_url)

    def _configured_url(self, endpoint_key: str) -> str | None:
        """An endpoint URL known from the configuration alone (None while the port is 0)."""
        server = self.config.server
        if server.public_base_url:
            base = server.public_base_url.rstrip("/")
        elif server.port:
            base = f"https://{server.host}:{server.port}"
        else:
            return None
        return base + (self.endpoints[endpoint_key].path if endpoint_key else "")

    def _wire_repository(self) -> None:
        """The community's document repository: ITI-39 for peers, ITI-43 locally and routed."""

        config = self.config
        home = config.community.home_community_id
        rc = config.repository
        local_retrieve = None
        local_ids: frozenset[str] = frozenset()
        if rc is not None:
            repositories = {rc.repository_unique_id: rc.open()}
            remote = RemoteRepositories.from_config(rc, self.peer_client) if rc.remote else None
            local_ids = frozenset([*repositories, *(r.repository_unique_id for r in rc.remote)])
            self.endpoints["iti39"].add(
                Operation(
                    Action.ITI39,
                    "ITI-39",
                    iti39_handler(repositories, home_community_id=home, remote=remote),
                )
            )
            # The repository's own ITI-43 endpoint, inside the community.
            repository_endpoint = SoapEndpoint("/repository/iti43", "repository-iti43", {})
            repository_endpoint.add(
                Operation(
                    Action.ITI43,
                    "ITI-43",
                    repository_retrieve_handler(
                        repositories, home_community_id=home, remote=remote
                    ),
                )
            )
            self.endpoints["repository-iti43"] = repository_endpoint
            self.soap.endpoints[repository_endpoint.path] = repository_endpoint

            async def local_retrieve_impl(docs: Any) -> Any:
                return await retrieve_documents(
                    docs, repositories, remote, location=home, override_remote_location=False
                )

            local_retrieve = local_retrieve_impl
        self.retrieving = InitiatingRetrieve(
            self.initiating, local_retrieve=local_retrieve, local_repositories=local_ids
        )
        self.endpoints["iti43"].add(
            Operation(Action.ITI43, "ITI-43", initiating_retrieve_handler(self.retrieving))
        )

    def add_handshake_listener(self, listener: Callable[[HandshakeFailure], None]) -> None:
        self._handshake_listeners.append(listener)

    def connection_refused(self, listener: str, reason: str) -> None:
        """Listeners report connections refused at accept (per-source and global caps)."""
        self.metrics.connections_refused.labels(listener, reason).inc()

    def on_handshake_failure(self, failure: HandshakeFailure) -> None:
        self.handshake_failures.append(failure)
        self.metrics.handshake_failures.labels(failure.reason).inc()
        for listener in self._handshake_listeners:
            listener(failure)

    def readiness(self) -> dict[str, bool]:
        """``/readyz``: a balancer takes a replica out of rotation while it drains or cannot
        reach the shared database (it would decide alone on consent and replays)."""
        checks = {
            "https": self._started,
            "admin": self._started,
            "accepting": not self.draining,
        }
        if self.shared is not None:
            checks["shared_database"] = self.shared.healthy
        return checks

    async def _probe_shared(self) -> None:
        """Keep ``/readyz``'s view of the shared database fresh (a probe every 2 s, off the
        event loop), so that the endpoint itself never waits on the database."""
        assert self.shared is not None
        while True:
            await self.shared.probe_async(2.0)
            await asyncio.sleep(2.0)

    def listening(self) -> dict[str, int]:
        """Ports chosen at start-up (the DICOM port may be 0 = any in the configuration)."""
        ports = {"https": self.https.port, "admin": self.admin.port}
        if self.dicom_front is not None and self._started:
            ports["dicom"] = self.dicom_front.port
        if self.prefetch is not None and self._started:
            ports["mllp"] = self.prefetch.port
        if self.dicomweb_front is not None and self._started:
            ports["dicomweb"] = self.dicomweb_front.port
        if self.web_door is not None and self._started:
            ports["web"] = self.web_door.port
        return ports

    async def start(self, sockets: ListenSockets | None = None) -> None:
        sockets = sockets or ListenSockets()
        cfg = self.config
        await self._open_registry()
        await self.imaging.start()
        with listen_errors("[server] port", cfg.server.host, cfg.server.port):
            await self.https.start(cfg.server.host, cfg.server.port, sock=sockets.https)
        with listen_errors("[admin] port", cfg.admin.host, cfg.admin.port):
            await self.admin.start(cfg.admin.host, cfg.admin.port, sock=sockets.admin)
        self.audit.application_id = self.base_url
        await self.audit.start()
        if self.dicom_front is not None:
            with listen_errors("[dicom] port", cfg.dicom.host, cfg.dicom.port):
                await self.dicom_front.start()
        if self.prefetch is not None:
            with listen_errors("[prefetch] port", cfg.prefetch.host, cfg.prefetch.port):
                await self.prefetch.start()
        if self.dicomweb_front is not None:
            with listen_errors("[dicomweb] port", cfg.dicomweb.host, cfg.dicomweb.port):
                await self.dicomweb_front.start()
        if self.web_door is not None:
            with listen_errors("[web] port", cfg.web.host, cfg.web.port):
                await self.web_door.start(sock=sockets.web)

        if self.shared is not None:
            self._probe_task: asyncio.Task[None] | None = asyncio.create_task(self._probe_shared())
        self._started = True
        log.info(
            "gateway %s (%s) serving on %s, admin on http://%s:%d",
            cfg.community.name,
            cfg.community.home_community_id,
            self.base_url,
            cfg.admin.host,
            self.admin.port,
        )

    async def drain(self, deadline: float) -> None:
        """SIGTERM: leave the balancer's rotation (``/readyz`` 503), stop accepting, let the
        requests in flight finish within ``deadline`` seconds. :meth:`stop` follows."""
        self.draining = True
        log.info("draining: no new connections, %g s for requests in flight", deadline)
        await self.https.drain(deadline)

    async def stop(self) -> None:
        self._started = False
        probe = getattr(self, "_probe_task", None)
        if probe is not None:
            probe.cancel()
        if self.prefetch is not None:
            await self.prefetch.stop()
        if self.dicom_front is not None:
            await self.dicom_front.stop()
        if self.dicomweb_front is not None:
            await self.dicomweb_front.stop()
        if self.web_door is not None:
            await self.web_door.stop()
        await self.https.close()
        await self.imaging.stop()
        await self.admin.close()
        await self.initiating.close()
        if self.registry is not None:
            await self.registry.close()
        await self.peer_client.aclose()
        self.xref.close()
        self.patients.close()
        if self.consent is not None:
            self.consent.close()
        await self.audit.stop()
        if self.shared is not None:
            self.shared.close()

    @property
    def base_url(self) -> str:
        cfg = self.config
        if cfg.server.public_base_url:
            return cfg.server.public_base_url.rstrip("/")
        return f"https://{cfg.server.host}:{self.https.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.config.admin.host}:{self.admin.port}"

    def endpoint_urls(self) -> dict[str, str]:
        return {key: self.base_url + ep.path for key, ep in self.endpoints.items()}


def install_imaging(gateway: Gateway, config: ImagingConfig) -> ImagingService:
    """Register the RAD-75 (responding) and RAD-69 (initiating) handlers on ``gateway``.

    Returns the service whose ``start()``/``stop()`` must run with the gateway's own; its
    ``retrieve()`` is RAD-69 in-process, the same path ``/ig/rad69`` takes.
    """

    home = gateway.config.community.home_community_id
    service = ImagingService(config, peer_client=gateway.peer_client, home_community_id=home)
    peers = {p.home_community_id: p.rad75 for p in gateway.config.peers if p.rad75}
    gateway.endpoints["rad75"].add(
        Operation(
            Action.RAD75,
            "RAD-75",
            rad75_handler(
                service.sources,
                home_community_id=home,
                open_timeout=config.open_timeout,
                idle_timeout=config.idle_timeout,
                abandon_timeout=config.abandon_timeout,
                max_documents=config.max_documents,
            ),
        )
    )
    service.initiating = InitiatingImagingGateway(
        service.sources,
        home_community_id=home,
        peers=peers,
        peer_client=gateway.peer_client,
        open_timeout=config.open_timeout,
        idle_timeout=config.idle_timeout,
        abandon_timeout=config.abandon_timeout,
        max_documents=config.max_documents,
    )
    gateway.endpoints["rad69"].add(Operation(Action.RAD69, "RAD-69", service.initiating.handle))
    return service
