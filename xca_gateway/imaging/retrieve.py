"""The streaming retrieve engine shared by the RAD-69 and RAD-75 handlers and in-process callers.

Given the request split into routes (a local Imaging Document Source, or a peer community's
Responding Imaging Gateway), :func:`open_retrieval` opens every route concurrently and returns an
:class:`ImagingRetrieval`: the planned instances in delivery order, RegistryErrors for the rest,
and one lazily pulled stream per instance. The SOAP handlers turn it into an MTOM response
(:func:`soap_response`: the root part from what the routes resolved, one part per instance pulled
from its route only when the HTTP writer gets to it); the DIMSE and DICOMweb front doors and the
import of priors read it directly, without a SOAP round trip. Memory per retrieve is bounded by
one chunk per route (plus one instance when the gateway itself converts the transfer syntax); a
slow consumer slows the reads from the sources through the server's drain() back-pressure.

Per-instance failures found *after* the root part went out cannot be reported in it any more;
the part body then raises, the server resets the connection without the closing MIME delimiter
and chunk, and every route is closed. A consumer therefore never gets a truncated response that
looks complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from xca_gateway.audit.exchange import CONTEXT_RETURNED_INSTANCES
from xca_gateway.audit.patients import CONTEXT_INSTANCES, HeaderSniffer, InstanceObservations
from xca_gateway.imaging.request import DocumentRequest, RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.response import (
    DICOM_MIME_TYPE,
    DocumentResponse,
    retrieve_response_shell,
    write_document_responses,
)
from xca_gateway.imaging.sources import (
    IdleWatch,
    InstanceReader,
    InstanceStreamError,
    PlannedInstance,
    Retrieval,
    SourceUnavailable,
)
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import ResponseStatus
from xca_gateway.protocol.soap_service import SoapResponse, StreamedChildren
from xca_gateway.xds.ebrs import RegistryError, status_for

log = logging.getLogger(__name__)

DEFAULT_OPEN_TIMEOUT = 30.0
DEFAULT_ABANDON_TIMEOUT = 120.0
DEFAULT_IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Route:
    """Where a group of DocumentRequests is retrieved from."""

    name: str
    open: Callable[[RetrieveImagingDocumentSetRequest], Awaitable[Retrieval]]
    # RegistryError for when the route cannot be used at all (reason, number of instances).
    unavailable: Callable[[str, int], RegistryError]
    # HomeCommunityId to put in DocumentResponses that the route did not label itself.
    home_community_id: str | None = None


class _Streams:
    """Owns the open retrievals of one response and closes them exactly once.

    A watchdog releases them when the response is abandoned: the HTTP writer stopped pulling
    for ``abandon_timeout`` seconds (consumer gone, or the response never streamed) while no
    source read was pending. The server resets a connection whose writes stall beyond its own
    body timeout, so a live consumer is never cut off by this as long as ``abandon_timeout``
    is longer than that.
    """

    def __init__(
        self,
        retrievals: Sequence[Retrieval],
        abandon_timeout: float,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.retrievals = list(retrievals)
        self.abandon_timeout = abandon_timeout
        self.idle_timeout = idle_timeout
        self._closed = False
        # Since when the HTTP writer has had the last piece and not asked for the next; None
        # while a source read is pending (set by the instance readers, per piece).
        self._waiting_since: float | None = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        # The sources' idle timeout: one timer for the whole response (made at its first read).
        self._idle: IdleWatch | None = None
        # Instance readers in progress (suspended while the writer waits for the consumer).
        self.active: set[_InstanceReader] = set()

    @property
    def closed(self) -> bool:
        return self._closed

    def start_watchdog(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def idle_watch(self) -> IdleWatch:
        watch = self._idle
        if watch is None:
            watch = self._idle = IdleWatch(asyncio.get_running_loop(), self.idle_timeout)
        return watch

    async def _watch(self) -> None:
        interval = min(1.0, self.abandon_timeout / 4)
        while not self._closed:
            await asyncio.sleep(interval)
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.abandon_timeout:
                log.warning("imaging response abandoned by its consumer; releasing its sources")
                await self._close_retrievals()
                return

    async def aclose(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()
        await self._close_retrievals()

    async def _close_retrievals(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._idle is not None:
            self._idle.close()
        for reader in list(self.active):
            try:
                await reader.aclose()  # e.g. closes the file or reply it was reading
            except RuntimeError:  # running right now: it fails on its next read instead
                log.debug("instance stream busy while closing", exc_info=True)
            except Exception:
                log.exception("closing an instance stream failed")
        self.active.clear()
        for retrieval in self.retrievals:
            try:
                await retrieval.aclose()
            except Exception:
                log.exception("closing an imaging retrieval failed")


async def _open_route(
    route: Route,
    request: RetrieveImagingDocumentSetRequest,
    timeout: float,
) -> Retrieval | RegistryError:
    count = len(request.documents)
    try:
        async with asyncio.timeout(timeout):
            return await route.open(request)
    except SourceUnavailable as exc:
        log.warning("%s unavailable: %s", route.name, exc.reason)
        return route.unavailable(exc.reason, count)
    except TimeoutError:
        log.warning("%s did not resolve the request within %g s", route.name, timeout)
        return route.unavailable(f"no answer within {timeout:g} s", count)
    except Exception as exc:
        log.exception("%s failed", route.name)
        return route.unavailable(f"internal error ({type(exc).__name__})", count)


# What an _InstanceReader is doing.
_NEW, _READING, _ENDED, _CLOSED = range(4)


class _InstanceReader(mtom.PartReader):
    """One instance's body in a response: its pieces pulled from its route's reader, under the
    sources' idle timeout, past the audit's header sniffer; the route finished and released
    after its last instance. One coroutine call per piece, nothing made per piece.

    An :class:`InstanceStreamError` (or any failure, or closing the reader before its end)
    closes every route of the response: the instances after it are lost.
    """

    __slots__ = (
        "_instance",
        "_last_of_retrieval",
        "_last_overall",
        "_observed",
        "_retrieval",
        "_size",
        "_sniffer",
        "_sniffing",
        "_source",
        "_state",
        "_streams",
        "_task",
        "_watch",
    )

    def __init__(
        self,
        streams: _Streams,
        retrieval: Retrieval,
        instance: PlannedInstance,
        observed: InstanceObservations,
        *,
        last_of_retrieval: bool,
        last_overall: bool,
    ) -> None:
        self._streams = streams
        self._retrieval = retrieval
        self._instance = instance
        self._observed = observed
        self._last_of_retrieval = last_of_retrieval
        self._last_overall = last_overall
        self._state = _NEW
        self._size = 0
        # Set by the first read (see _start).
        self._source: InstanceReader | None = None
        self._sniffer: HeaderSniffer | None = None
        self._sniffing = False
        self._task: asyncio.Task[Any] | None = None
        self._watch: IdleWatch | None = None

    def _start(self) -> tuple[InstanceReader, IdleWatch]:
        streams = self._streams
        if streams.closed:
            raise InstanceStreamError("the response was abandoned")
        self._state = _READING
        streams.active.add(self)
        # The audit names the patient the instance's own header names (read as it passes).
        self._sniffer = self._observed.sniffer(self._instance.document.series_instance_uid)
        self._sniffing = True
        watch = self._watch = streams.idle_watch()
        # The task reading it, for the idle timeout to cancel: looked up once per instance,
        # with the loop given (else asyncio asks for it, a getpid() system call each time).
        self._task = asyncio.current_task(watch.loop)
        source = self._source = self._retrieval.reader(self._instance)
        return source, watch

    async def read(self) -> bytes:
        streams = self._streams
        state = self._state
        try:
            if state == _READING:
                source, watch = self._source, self._watch
                assert source is not None and watch is not None
                if streams.closed:  # closed under us: what was sent is not the whole instance
                    raise InstanceStreamError(f"instance {self._uid}: the response was abandoned")
            elif state == _NEW:
                source, watch = self._start()
            elif state == _ENDED:
                return b""
            else:
                raise InstanceStreamError(f"instance {self._uid}: the response was abandoned")
            streams._waiting_since = None  # a source read is pending: its idle timeout applies
            watch.since = time.monotonic()
            watch.task = task = self._task
            try:
                chunk = await source.read()
            except asyncio.CancelledError:
                if watch.timed_out(task):
                    raise InstanceStreamError(
                        f"{self._uid}: no data for {watch.timeout:g} s"
                    ) from None
                raise
            finally:
                watch.task = None
            if chunk:
                self._size += len(chunk)
                if self._sniffing:
                    sniffer = self._sniffer
                    assert sniffer is not None
                    sniffer.feed(chunk)
                    self._sniffing = not sniffer.done
                # Handed to the HTTP writer: now waiting for it to ask for more.
                streams._waiting_since = time.monotonic()
                return chunk
            if streams.closed:
                raise InstanceStreamError(f"instance {self._uid}: the response was abandoned")
            if self._size == 0:
                raise InstanceStreamError(f"instance {self._uid}: the source sent no data")
        except InstanceStreamError as exc:
            log.warning("aborting imaging response mid-stream: %s", exc)
            await self._abort()
            raise
        except BaseException:
            # Cancelled, or a bug: release every route.
            await self._abort()
            raise
        await self._release(_ENDED)
        retrieval = self._retrieval
        if self._last_overall or self._last_of_retrieval:
            await retrieval.finish()
        if self._last_overall:
            await streams.aclose()
        elif self._last_of_retrieval:
            await retrieval.aclose()
        return b""

    @property
    def _uid(self) -> str:
        return self._instance.document.document_unique_id

    async def aclose(self) -> None:
        """Closed before its end (the consumer went away, or the response is released):
        every route is released, and a later read fails."""
        await self._abort()

    async def _abort(self) -> None:
        if self._state >= _ENDED:
            return
        self._streams.active.discard(self)
        try:
            await self._streams.aclose()
        finally:
            await self._release(_CLOSED)

    async def _release(self, state: int) -> None:
        """Once per instance, however it ended: close its source, record what was seen."""
        if self._state >= _ENDED:
            return
        self._state = state
        self._streams.active.discard(self)
        source, self._source = self._source, None
        try:
            if source is not None:
                await source.aclose()
        finally:
            sniffer = self._sniffer
            if self._size and sniffer is not None:
                doc = self._instance.document
                self._observed.record(
                    doc.document_unique_id, doc.series_instance_uid, sniffer.finish()
                )


@dataclass(frozen=True, slots=True)  # one per instance in flight
class RetrievedInstance:
    """One instance an open retrieve will deliver: what was asked, and the community holding it
    (as the DocumentResponse names it)."""

    document: DocumentRequest
    home_community_id: str | None


class InstanceTooLarge(ValueError):
    """An instance above the reader's limit (it was read to its end, not kept)."""


class ImagingRetrieval:
    """A RAD-69 / RAD-75 retrieve opened in-process: the planned instances in delivery order,
    each streamed from its route on demand, and RegistryErrors for every instance that will not
    come (unknown source or community, source unavailable, not found, transfer syntax).

    The SOAP handlers turn it into an MTOM response (:func:`soap_response`); the front doors
    and the import of priors read it directly. Bodies are taken at most once and in order (the
    instances of one route share its stream). A body that fails raises
    :class:`InstanceStreamError` and closes every route: the instances after it are lost.
    :meth:`aclose` releases whatever is still open; call it when done, read or not.
    """

    def __init__(
        self,
        request: RetrieveImagingDocumentSetRequest,
        instances: Sequence[RetrievedInstance],
        body: Callable[[int], _InstanceReader],
        errors: Sequence[RegistryError],
        streams: _Streams,
        observed: InstanceObservations | None = None,
    ) -> None:
        self.request = request
        self.instances = list(instances)
        self.errors = list(errors)
        # Filled as the bodies are read: each series' patient and each instance's SOP class.
        self.observed = observed if observed is not None else InstanceObservations()
        # Bodies are made when taken: a generator per instance of a 20,000-instance study
        # waiting its turn would cost more memory than the rest of its bookkeeping.
        self._body = body
        self._taken = bytearray(len(self.instances))
        self._streams = streams

    @property
    def status(self) -> str:
        """The ebRS status of the retrieve as a response would carry it."""
        return status_for(self.errors, results=len(self.instances))

    @property
    def closed(self) -> bool:
        """Every route released (all read, :meth:`aclose`, a failure, or abandoned)."""
        return self._streams.closed

    @property
    def uids(self) -> list[str]:
        """The SOP Instance UID of each instance, in delivery order."""
        return [i.document.document_unique_id for i in self.instances]

    @property
    def missing(self) -> list[str]:
        """Requested instances that will not be delivered (the errors say why)."""
        present = set(self.uids)
        return [
            d.document_unique_id
            for d in self.request.requested
            if d.document_unique_id not in present
        ]

    def take(self, index: int) -> AsyncGenerator[bytes, None]:
        """The body of instance ``index`` as async chunks (the caller closes it)."""
        return _chunks(self.reader(index))

    def reader(self, index: int) -> mtom.PartReader:
        """The body of instance ``index`` as a reader (the caller closes it), for a response's
        part: nothing is read from the route before its first ``read``."""
        if self._taken[index]:
            raise RuntimeError(f"instance {index} was already taken")
        self._taken[index] = 1
        return self._body(index)

    async def read(self, index: int, limit: int | None = None) -> bytes:
        """Instance ``index`` read completely. Past ``limit`` bytes the rest is still read (so
        the instances after it keep coming) and :class:`InstanceTooLarge` is raised."""
        data = bytearray()
        too_large = False
        chunks = self.take(index)
        try:
            async for chunk in chunks:
                if too_large:
                    continue
                data += chunk
                too_large = limit is not None and len(data) > limit
        finally:
            await chunks.aclose()
        if too_large:
            raise InstanceTooLarge(f"instance {self.uids[index]} is larger than {limit} bytes")
        return bytes(data)

    async def aclose(self) -> None:
        for index in range(len(self._taken)):
            self._taken[index] = 1  # never made, nothing to close
        await self._streams.aclose()


async def _chunks(reader: mtom.PartReader) -> AsyncGenerator[bytes, None]:
    try:
        while chunk := await reader.read():
            yield chunk
    finally:
        await reader.aclose()


async def open_retrieval(
    request: RetrieveImagingDocumentSetRequest,
    routes: Sequence[tuple[Route, Sequence[DocumentRequest]]],
    errors: Sequence[RegistryError],
    *,
    error_location: str | None = None,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    abandon_timeout: float = DEFAULT_ABANDON_TIMEOUT,
) -> ImagingRetrieval:
    """Open ``routes`` concurrently and plan the instances they resolved.

    ``errors`` are routing errors found before any route was contacted. ``error_location``, if
    set, replaces the location of every RegistryError (RAD-75: the Responding Imaging
    Gateway's homeCommunityId).
    """
    tasks = [
        asyncio.ensure_future(_open_route(route, request.subset(docs), open_timeout))
        for route, docs in routes
    ]
    try:
        opened = await asyncio.gather(*tasks)
    except BaseException:  # cancelled (handler timeout): close what did open
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                result = task.result()
                if isinstance(result, Retrieval):
                    await result.aclose()
        raise
    retrievals = [r for r in opened if isinstance(r, Retrieval)]
    streams = _Streams(retrievals, abandon_timeout, idle_timeout)
    try:
        all_errors = list(errors)
        instances: list[RetrievedInstance] = []
        plan: list[tuple[Retrieval, PlannedInstance, bool]] = []
        for (route, _docs), result in zip(routes, opened, strict=True):
            if isinstance(result, RegistryError):
                all_errors.append(result)
                continue
            all_errors.extend(result.errors)
            for index, instance in enumerate(result.planned):
                doc = instance.document
                home = (
                    instance.home_community_id or route.home_community_id or doc.home_community_id
                )
                instances.append(RetrievedInstance(doc, home))
                plan.append((result, instance, index == len(result.planned) - 1))
            if not result.planned:
                await result.aclose()
        if error_location is not None:
            all_errors = [dataclasses.replace(e, location=error_location) for e in all_errors]
        observed = InstanceObservations()

        def body(index: int) -> _InstanceReader:
            retrieval, instance, last = plan[index]
            # The very last body closes everything when the retrieve completes normally.
            return _InstanceReader(
                streams,
                retrieval,
                instance,
                observed,
                last_of_retrieval=last,
                last_overall=index == len(plan) - 1,
            )

        if plan:
            streams.start_watchdog()
        else:
            await streams.aclose()
        return ImagingRetrieval(request, instances, body, all_errors, streams, observed)
    except BaseException:
        await streams.aclose()
        raise


def soap_response(
    retrieval: ImagingRetrieval,
    *,
    response_action: str,
    context: dict[str, Any] | None = None,
) -> SoapResponse:
    """The streaming MTOM response of an opened retrieve: the root part (status,
    RegistryErrors, then the DocumentResponses written straight to bytes as it is sent), then
    one part per instance pulled from its route only when the HTTP writer gets to it.
    ``context`` (the SOAP request's) learns what the audit record needs: the instances'
    headers as they stream, and which instances the response listed."""
    # Content-IDs made from one random token and the index: nothing kept per instance.
    token = uuid.uuid4().hex

    def parts() -> Iterator[mtom.OutgoingPart]:
        for index in range(len(retrieval.instances)):
            yield mtom.OutgoingPart(
                f"{index}.{token}@xca-gateway", DICOM_MIME_TYPE, retrieval.reader(index)
            )

    def documents() -> Iterator[DocumentResponse]:
        for index, instance in enumerate(retrieval.instances):
            doc = instance.document
            yield DocumentResponse(
                home_community_id=instance.home_community_id,
                repository_unique_id=doc.repository_unique_id,
                document_unique_id=doc.document_unique_id,
                mime_type=DICOM_MIME_TYPE,
                content_id=f"{index}.{token}@xca-gateway",
            )

    status = retrieval.status
    payload = retrieve_response_shell(status, retrieval.errors)
    streamed = StreamedChildren(
        len(retrieval.instances), lambda: write_document_responses(documents()), parts
    )
    if context is not None:
        context[CONTEXT_INSTANCES] = retrieval.observed
        context[CONTEXT_RETURNED_INSTANCES] = lambda: retrieval.uids
    outcome = {
        ResponseStatus.SUCCESS: "success",
        ResponseStatus.PARTIAL_SUCCESS: "partial",
    }.get(status, "failure")
    return SoapResponse(payload, response_action, mtom=True, outcome=outcome, streamed=streamed)


async def respond(
    request: RetrieveImagingDocumentSetRequest,
    routes: Sequence[tuple[Route, Sequence[DocumentRequest]]],
    errors: Sequence[RegistryError],
    *,
    response_action: str,
    error_location: str | None = None,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    abandon_timeout: float = DEFAULT_ABANDON_TIMEOUT,
    context: dict[str, Any] | None = None,
) -> SoapResponse:
    """Open ``routes`` and return the streaming MTOM response (see :func:`open_retrieval`).
    ``context`` (the SOAP request's) receives what the instances' headers say as they
    stream, for the transaction's audit record."""
    retrieval = await open_retrieval(
        request,
        routes,
        errors,
        error_location=error_location,
        open_timeout=open_timeout,
        idle_timeout=idle_timeout,
        abandon_timeout=abandon_timeout,
    )
    try:
        return soap_response(retrieval, response_action=response_action, context=context)
    except BaseException:
        await retrieval.aclose()
        raise
