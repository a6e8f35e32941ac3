"""The Initiating Gateway role, query side: an ITI-18 from a local consumer fans out as ITI-38.

Every peer community is asked at once (plus, if configured, our own registry); the answers are
merged into one ITI-18 response. Total time is bounded by the slowest *live* peer and by the
overall deadline; a peer that is down, slow, refuses TLS or faults becomes an
``XDSUnavailableCommunity`` error naming it, and the others' results still come back
(PartialSuccess). The request analysis and the merge are pure functions; only
:meth:`InitiatingGateway.query` does I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass

from lxml import etree

from xca_gateway.initiating.health import PeerHealth
from xca_gateway.initiating.patient_mapping import PatientIdMapper
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.namespaces import QUERY, RIM, Action, ErrorSeverity, ResponseStatus
from xca_gateway.protocol.peer_client import PeerClient, PeerError, SharedRequest
from xca_gateway.protocol.soap_service import (
    Handler,
    SoapRequest,
    SoapResponse,
    StreamedChildren,
)
from xca_gateway.registry.stored_query import (
    ID_BASED_QUERIES,
    QUERIES,
    StoredQueryError,
    parse_stored_query,
)
from xca_gateway.settings import InitiatingConfig, PeerConfig
from xca_gateway.transactions.iti38 import (
    CommunityAnswer,
    QueryRequest,
    read_peer_answer,
    render_objects,
    request_for_peer,
)
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId
from xca_gateway.xds.ebrs import RegistryError, adhoc_query_response
from xca_gateway.xds.patient_id import PatientId, PatientIdError, parse_patient_id

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- request analysis


class QueryRejected(Exception):
    def __init__(self, errors: Sequence[RegistryError]) -> None:
        super().__init__("; ".join(e.code_context for e in errors))
        self.errors = list(errors)


def analyse_query(
    element: etree._Element, *, local_authority: str, known_communities: set[str]
) -> QueryRequest:
    """Validate a consumer's ITI-18 once, before any community is asked; raise
    :class:`QueryRejected` with the errors to answer.

    Routing problems come first (they hold whatever the parameters say); then the request
    goes through the registry's own stored-query validation (:func:`parse_stored_query`), so
    that the consumer gets exactly the answer our registry would give and no peer ever
    receives (and audits) an ITI-38 that it would have to refuse.
    """
    adhoc = (
        element.find(f"{{{RIM}}}AdhocQuery")
        if element.tag == f"{{{QUERY}}}AdhocQueryRequest"
        else None
    )
    query_id = (adhoc.get("id") or "").strip() if adhoc is not None else ""
    home = ((adhoc.get("home") or "").strip() or None) if adhoc is not None else None
    if query_id in QUERIES:
        if home is not None and home not in known_communities:
            raise QueryRejected(
                [
                    RegistryError(
                        ErrorCode.UNKNOWN_COMMUNITY, f"no route to community {home}", location=home
                    )
                ]
            )
        if home is None and query_id in ID_BASED_QUERIES:
            raise QueryRejected(
                [
                    RegistryError(
                        ErrorCode.MISSING_HOME_COMMUNITY_ID,
                        "an id-based stored query needs the homeCommunityId (AdhocQuery/@home)",
                    )
                ]
            )
    try:
        query = parse_stored_query(element)
    except StoredQueryError as exc:
        raise QueryRejected(exc.errors) from None
    patient: PatientId | None = None
    value = query.patient_id
    if value is not None:
        try:
            patient = parse_patient_id(value)
        except PatientIdError as exc:  # pragma: no cover - parse_stored_query checked the CX
            raise QueryRejected([RegistryError(ErrorCode.REGISTRY_ERROR, str(exc))]) from None
        if patient.assigning_authority != local_authority and home is None:
            # We can only map identifiers of our own patient identifier domain.
            raise QueryRejected(
                [
                    RegistryError(
                        ErrorCode.UNKNOWN_PATIENT_ID,
                        f"patient id {patient} is not from this community's assigning "
                        f"authority {local_authority}",
                    )
                ]
            )
    return QueryRequest(
        element, query.query_id, query.return_type, home, query.spec.patient_param, patient
    )


# ---------------------------------------------------------------------------- merge


@dataclass
class QueryOutcome:
    status: str
    errors: list[RegistryError]
    objects: list[etree._Element]
    # Peers' objects serialised as their answers arrived (``query(render=True)``), after
    # ``objects`` in the answer.
    rendered: list[bytes] = dataclasses.field(default_factory=list)


def merge(
    answers: Sequence[CommunityAnswer], extra_errors: Sequence[RegistryError] = ()
) -> QueryOutcome:
    objects = [o for a in answers for o in a.objects]
    rendered = [r for a in answers for r in a.rendered]
    errors = [*extra_errors, *(e for a in answers for e in a.errors)]
    hard_errors = [e for e in errors if e.severity == ErrorSeverity.ERROR]
    if not hard_errors:
        status = ResponseStatus.SUCCESS
    elif objects or rendered or any(a.responded and not _failed(a) for a in answers):
        status = ResponseStatus.PARTIAL_SUCCESS
    else:
        status = ResponseStatus.FAILURE
    return QueryOutcome(status, errors, objects, rendered)


def _failed(answer: CommunityAnswer) -> bool:
    return any(e.severity == ErrorSeverity.ERROR for e in answer.errors) and not answer.has_objects


# ---------------------------------------------------------------------------- circuit breaker


LocalQuery = Callable[
    [etree._Element], Awaitable[tuple[str, list[RegistryError], list[etree._Element]]]
]


class InitiatingGateway:
    def __init__(
        self,
        *,
        home_community_id: str,
        patient_id_assigning_authority: str,
        peers: Sequence[PeerConfig],
        peer_client: PeerClient,
        mapper: PatientIdMapper,
        config: InitiatingConfig | None = None,
        local_query: LocalQuery | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.home_community_id = home_community_id
        self.local_authority = patient_id_assigning_authority
        self.all_peers = {p.home_community_id: p for p in peers}
        self.peers = {p.home_community_id: p for p in peers if p.iti38}
        self.peer_client = peer_client
        self.mapper = mapper
        self.config = config or InitiatingConfig()
        self.local_query = local_query
        self.metrics = metrics
        self.health = {
            home: PeerHealth(self.config.breaker_failures, self.config.breaker_open_seconds)
            for home in self.all_peers
        }
        self._probes: dict[str, asyncio.Task[None]] = {}

    async def close(self) -> None:
        for task in self._probes.values():
            task.cancel()
        if self._probes:
            await asyncio.wait(list(self._probes.values()), timeout=2)

    async def query(self, element: etree._Element, *, render: bool = False) -> QueryOutcome:
        """Fan ``element`` (a consumer's AdhocQueryRequest) out and merge the answers.

        With ``render``, each peer's objects are serialised as its answer arrives and come
        back as bytes (:attr:`QueryOutcome.rendered`), for a caller that only sends them on.
        """
        known = set(self.peers)
        if self.local_query is not None:
            known.add(self.home_community_id)
        try:
            request = analyse_query(
                element, local_authority=self.local_authority, known_communities=known
            )
        except QueryRejected as exc:
            # Found here, before any community was asked: our community reports it.
            return QueryOutcome(ResponseStatus.FAILURE, self._located(exc.errors), [])

        deadline = time.monotonic() + self.config.overall_deadline
        targets = [request.home] if request.home else [*self.peers]
        targets.sort(key=lambda h: -self.health[h].latency if h in self.health else 0.0)
        extra: list[RegistryError] = []
        jobs: list[Coroutine[object, object, CommunityAnswer | None]] = []
        # Peers asked with the same patient id get the same request, serialised once.
        shared: dict[str | None, SharedRequest] = {}
        for home in targets:
            if home != self.home_community_id:
                peer = self.peers[home]
                jobs.append(self._map_and_ask(peer, request, deadline, extra, shared, render))
        # Our own registry last: its query runs on the event loop for a while before its first
        # await, and the peers' requests (the slowest peer's first) must not wait for it.
        local = self.local_query is not None and request.home in (None, self.home_community_id)
        if local:
            jobs.append(self._ask_local(request))
        answers = await _run_slowest_first(jobs)
        if local:  # our community's objects first in the answer
            answers = [answers[-1], *answers[:-1]]
        return merge([a for a in answers if a is not None], extra)

    async def _map_and_ask(
        self,
        peer: PeerConfig,
        request: QueryRequest,
        deadline: float,
        warnings: list[RegistryError],
        shared: dict[str | None, SharedRequest],
        render: bool,
    ) -> CommunityAnswer | None:
        """Map the patient for this peer (maybe a PIX or XCPD round trip), then query it.

        Every peer runs this concurrently, so discovery latency does not add up across peers.
        """
        patient = request.patient_id
        if patient is not None:
            mapping = await self.mapper.resolve(
                patient, peer.patient_id_assigning_authority, peer.patient_id_sources
            )
            if mapping.patient_id is None:
                # Not an error for the query as a whole: this community does not know the
                # patient (or we cannot tell who they are there).
                warnings.append(
                    RegistryError(
                        "XDSUnknownPatientId",
                        f"{peer.name} not queried: no patient id for {patient} ({mapping.reason})",
                        location=peer.home_community_id,
                        severity=ErrorSeverity.WARNING,
                    )
                )
                return None
            patient = mapping.patient_id
        key = str(patient) if patient is not None else None
        payload = shared.get(key)
        if payload is None:
            payload = SharedRequest(request_for_peer(request, patient, request.home), Action.ITI38)
            shared[key] = payload
        answer = await self._ask_peer(peer, payload, deadline, request.return_type)
        if render:
            render_objects(answer)
        return answer

    async def _ask_local(self, request: QueryRequest) -> CommunityAnswer:
        assert self.local_query is not None
        answer = CommunityAnswer(self.home_community_id, "local")
        try:
            _status, errors, objects = await self.local_query(request.element)
        except Exception:
            log.exception("local registry query failed")
            answer.errors.append(
                RegistryError("XDSRegistryError", "local registry failed", self.home_community_id)
            )
            return answer
        answer.responded = True
        answer.errors.extend(self._located(errors))
        for obj in objects:
            obj.set("home", self.home_community_id)
        answer.objects.extend(objects)
        return answer

    async def _ask_peer(
        self,
        peer: PeerConfig,
        payload: etree._Element | SharedRequest,
        deadline: float,
        return_type: str,
    ) -> CommunityAnswer:
        answer = CommunityAnswer(peer.home_community_id, peer.name)
        health = self.health[peer.home_community_id]
        if health.is_open():
            answer.errors.append(self._unavailable(peer, "marked down after repeated failures"))
            return answer
        remaining = deadline - time.monotonic()
        budget = min(self.config.peer_deadline, remaining)
        assert peer.iti38 is not None
        started = time.monotonic()
        try:
            if budget <= 0:
                raise PeerError("timeout", "overall deadline exhausted")
            reply = await self.peer_client.call(
                peer.iti38,
                payload,
                Action.ITI38,
                peer=peer.name,
                transaction="ITI-38",
                deadline=budget,
            )
        except PeerError as exc:
            health.failure()
            if health.is_open():
                self._start_probe(peer)
            log.warning("ITI-38 to %s failed (%s): %s", peer.name, exc.kind, exc.message)
            answer.errors.append(self._unavailable(peer, f"{exc.kind}: {exc.message}"))
            return answer
        health.success()
        health.observe(time.monotonic() - started)
        try:
            read_peer_answer(answer, reply.payload)
        finally:
            reply.close()
        if return_type == "LeafClass":
            await self._follow_up_object_refs(peer, answer, deadline)
        return answer

    async def _follow_up_object_refs(
        self, peer: PeerConfig, answer: CommunityAnswer, deadline: float
    ) -> None:
        """Turn ObjectRefs a peer returned for a LeafClass query into full objects."""
        refs = [o for o in answer.objects if o.tag == f"{{{RIM}}}ObjectRef"]
        if not refs:
            return
        answer.objects = [o for o in answer.objects if o.tag != f"{{{RIM}}}ObjectRef"]
        batch = max(1, self.config.follow_up_batch)
        assert peer.iti38 is not None
        for start in range(0, len(refs), batch):
            ids = [r.get("id", "") for r in refs[start : start + batch]]
            request = get_documents_request(ids, peer.home_community_id)
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise PeerError("timeout", "overall deadline exhausted")
                reply = await self.peer_client.call(
                    peer.iti38,
                    request,
                    Action.ITI38,
                    peer=peer.name,
                    transaction="ITI-38",
                    deadline=min(self.config.peer_deadline, remaining),
                )
            except PeerError as exc:
                answer.errors.append(
                    self._unavailable(peer, f"GetDocuments follow-up: {exc.message}")
                )
                return
            try:
                read_peer_answer(answer, reply.payload)
            finally:
                reply.close()

    def _located(self, errors: Sequence[RegistryError]) -> list[RegistryError]:
        """Errors of our own community carry our homeCommunityId as location, as peers'
        carry theirs, so that a consumer can tell which community an error came from."""
        return [
            e if e.location else dataclasses.replace(e, location=self.home_community_id)
            for e in errors
        ]

    def _unavailable(self, peer: PeerConfig, why: str) -> RegistryError:
        return RegistryError(
            "XDSUnavailableCommunity",
            f"community {peer.name} ({peer.home_community_id}) unavailable: {why}",
            location=peer.home_community_id,
        )

    def _start_probe(self, peer: PeerConfig) -> None:
        task = self._probes.get(peer.home_community_id)
        if task is not None and not task.done():
            return
        self._probes[peer.home_community_id] = asyncio.create_task(self._probe(peer))

    async def _probe(self, peer: PeerConfig) -> None:
        """While the breaker is open, check in the background whether the peer is back."""
        health = self.health[peer.home_community_id]
        assert peer.iti38 is not None
        while health.consecutive_failures >= health.threshold:
            await asyncio.sleep(min(5.0, health.open_seconds / 3))
            try:
                # Any HTTP answer over mutual TLS (405 to a GET) from the right certificate
                # shows the node is up again.
                async with asyncio.timeout(self.config.peer_deadline):
                    response = await self.peer_client.relay.get(peer.iti38, [])
                    try:
                        self.peer_client.check_pin_der(peer.iti38, response.peer_certificate)
                    finally:
                        await response.aclose()
            except Exception:
                health.open_until = time.monotonic() + health.open_seconds
                if self.metrics is not None:
                    self.metrics.peer_up.labels(peer.name).set(0)
                continue
            health.success()
            if self.metrics is not None:
                self.metrics.peer_up.labels(peer.name).set(1)


async def _run_slowest_first(
    jobs: Sequence[Coroutine[object, object, CommunityAnswer | None]],
) -> list[CommunityAnswer | None]:
    """``asyncio.gather`` of ``jobs``, the first of which (the slowest peer's) is started
    before the others are made tasks: its request then leaves before the event loop spends a
    few hundred microseconds on the other hundred tasks."""
    if not jobs:
        return []
    first = asyncio.ensure_future(jobs[0])
    try:
        await asyncio.sleep(0)  # the first job runs up to its first wait (its request sent)
    except BaseException:
        first.cancel()
        for job in jobs[1:]:
            job.close()
        raise
    return list(await asyncio.gather(first, *jobs[1:]))


def get_documents_request(entry_uuids: Sequence[str], home: str) -> etree._Element:
    root = etree.Element(f"{{{QUERY}}}AdhocQueryRequest", nsmap={"query": QUERY, "rim": RIM})
    etree.SubElement(root, f"{{{QUERY}}}ResponseOption").attrib.update(
        {"returnType": "LeafClass", "returnComposedObjects": "true"}
    )
    adhoc = etree.SubElement(root, f"{{{RIM}}}AdhocQuery")
    adhoc.set("id", StoredQueryId.GET_DOCUMENTS)
    adhoc.set("home", home)
    slot = etree.SubElement(adhoc, f"{{{RIM}}}Slot")
    slot.set("name", "$XDSDocumentEntryEntryUUID")
    values = etree.SubElement(slot, f"{{{RIM}}}ValueList")
    etree.SubElement(values, f"{{{RIM}}}Value").text = (
        "(" + ",".join(f"'{u}'" for u in entry_uuids) + ")"
    )
    return root


def initiating_query_handler(gateway: InitiatingGateway) -> Handler:
    """ITI-18 at the initiating endpoint: answered by the fan-out."""

    async def handle(request: SoapRequest) -> SoapResponse:
        outcome = await gateway.query(request.payload, render=True)
        payload = adhoc_query_response(outcome.status, outcome.errors, outcome.objects)
        label = {
            ResponseStatus.SUCCESS: "success",
            ResponseStatus.PARTIAL_SUCCESS: "partial",
        }.get(outcome.status, "failure")
        rendered = outcome.rendered
        # The peers' objects go out as the bytes they were serialised to on arrival.
        streamed = (
            StreamedChildren(
                len(rendered),
                lambda: iter(rendered),
                holder=payload.find(f"{{{RIM}}}RegistryObjectList"),
            )
            if rendered
            else None
        )
        return SoapResponse(payload, Action.ITI18_RESPONSE, outcome=label, streamed=streamed)

    return handle


# ---------------------------------------------------------------------------- retrieve (ITI-43)
