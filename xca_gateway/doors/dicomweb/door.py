"""The DICOMweb front door's I/O: the HTTP(S) server, the federation, the streamed answers.

:class:`DicomWebFrontDoor` serves QIDO-RS and WADO-RS for one gateway: it reads the request,
asks the federation (:mod:`xca_gateway.doors.federation`) for the patient's studies or a RAD-69
retrieve, and streams instances (multipart/related) or metadata (JSON) part by part as they
arrive; the decisions are the sans-IO modules' (negotiation, qido, model, audit).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, cast
from urllib.parse import parse_qsl

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xca_gateway.audit import messages as m
from xca_gateway.consumer.imaging import ConsumerError
from xca_gateway.doors.dicomweb.config import DicomWebFrontConfig
from xca_gateway.doors.dicomweb.model import (
    closing_delimiter,
    metadata_json,
    part_header,
    search,
    to_dicom_json,
)
from xca_gateway.doors.dicomweb.negotiation import (
    ANY_TRANSFER_SYNTAX,
    DICOM_JSON,
    PREFIX,
    DicomWebError,
    Route,
    bad_request,
    error_response,
    negotiate_json,
    negotiate_transfer_syntaxes,
    parse_route,
    retrieve_failure,
    warning_header,
)
from xca_gateway.doors.dicomweb.qido import cx_safe, parse_qido
from xca_gateway.doors.dicomweb.qido_wado_audit import RetrieveAudit, audit_query
from xca_gateway.doors.dicomweb.rendered import (
    image_refs,
    parse_rendered,
    thumbnail_instance,
)
from xca_gateway.doors.federation import (
    FederationError,
    FederationView,
    StudyManifest,
    close_body,
    imaging_request_for,
    patient_cx,
)
from xca_gateway.doors.ports import DoorHost
from xca_gateway.imaging import transfer_syntax as ts
from xca_gateway.imaging.rendering import (
    FrameOutOfRange,
    NotRenderable,
    RenderOptions,
    frame_count,
    render_frame,
)
from xca_gateway.imaging.request import RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.retrieve import ImagingRetrieval
from xca_gateway.protocol.encrypted_spool import EncryptedSpool
from xca_gateway.protocol.http_server import (
    BodyTooLarge,
    ConnectionLimits,
    HttpServer,
    Request,
    Response,
    ServerTimeouts,
)
from xca_gateway.protocol.tls import HandshakeFailure, server_context
from xca_gateway.security.callers import Door
from xca_gateway.security.guard import identity_from_peer
from xca_gateway.xds.kos import InstanceRef

log = logging.getLogger(__name__)

# An instance's header is parsed from a spooled copy: in memory up to this size, then on disk.
_HEADER_SPOOL_MEMORY = 4 * 1024 * 1024
_MAX_REQUEST_BODY = 64 * 1024
_MAX_QUERY_FIELDS = 200


class _InstanceError(Exception):
    """An instance from the federation that cannot be sent as it is (not Part 10, cut)."""


@dataclass
class _Delivery:
    delivered: list[str] = field(default_factory=list)


class DicomWebFrontDoor:
    """The HTTP(S) server of the DICOMweb front door for ``gateway``."""

    def __init__(
        self,
        gateway: DoorHost,
        config: DicomWebFrontConfig,
        *,
        on_handshake_failure: Callable[[HandshakeFailure], None] | None = None,
        base_url: Callable[[], str] | None = None,
    ) -> None:
        self.gateway = gateway
        self.config = config
        # Another listener that serves this door's resources (the web door) names its own base.
        self._base_url = base_url
        self.local_authority = gateway.config.community.patient_id_assigning_authority
        self.view = FederationView(gateway, study_access_seconds=config.study_access_seconds)
        self.server = HttpServer(
            self,
            ssl_context=server_context(gateway.config.tls) if config.tls else None,
            on_handshake_failure=on_handshake_failure,
            timeouts=ServerTimeouts.for_gateway(gateway.config),
            # The same per-source caps, pending-handshake pool and deadlines as the SOAP port.
            limits=ConnectionLimits.for_gateway(gateway.config),
            on_refused=gateway.connection_refused,
            name="dicomweb",
            max_header_bytes=gateway.config.limits.max_header_bytes,
        )
        self._started = False
        self._closing: set[asyncio.Future[None]] = set()

    @property
    def port(self) -> int:
        return self.server.port if self._started else self.config.port

    @property
    def base_url(self) -> str:
        """Where the door is reached (the service root is this plus ``/dicomweb``)."""
        if self._base_url is not None:
            return self._base_url()
        if self.config.public_base_url:
            return self.config.public_base_url
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.server.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        await self.server.start(self.config.host, self.config.port)
        self._started = True
        log.info("DICOMweb front door on %s%s", self.base_url, PREFIX)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.server.close()

    # -- HTTP

    async def __call__(self, request: Request) -> Response:
        started = time.monotonic()
        refused = self._admit(request)
        if refused is not None:
            self._count("DICOMweb", refused, started)
            return refused
        return await self.handle(request)

    async def handle(self, request: Request) -> Response:
        """A QIDO-RS / WADO-RS request of a caller some door admitted already (this one by
        its certificate, the web door by a clinician's token): the current caller is set."""
        started = time.monotonic()
        transaction = "DICOMweb"
        try:
            try:
                await request.read(_MAX_REQUEST_BODY)  # GET has none; lets keep-alive go on
            except BodyTooLarge:
                raise DicomWebError(413, "request bodies are not accepted here") from None
            route = parse_route(request.path)
            if route is None:
                raise DicomWebError(404, f"no DICOMweb resource at {request.path[:200]}")
            transaction = "QIDO-RS" if route.kind == "search" else "WADO-RS"
            if request.method != "GET":
                raise DicomWebError(
                    405,
                    f"{request.method[:20]} is not supported (QIDO-RS and WADO-RS only)",
                    [("allow", "GET")],
                )
            if route.kind == "unsupported":
                raise DicomWebError(
                    406,
                    f"{route.detail} resources are not served: only DICOM instances "
                    f'(multipart/related; type="application/dicom"), metadata '
                    f"({DICOM_JSON}) and rendered images (image/png, image/jpeg)",
                )
            if route.kind == "search":
                response = await self._search(request, route)
            elif route.kind in ("rendered", "thumbnail"):
                response = await self._render(request, route)
            else:
                response = await self._retrieve(request, route)
        except DicomWebError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("DICOMweb request %s failed", request.path[:200])
            response = error_response(DicomWebError(500, "internal error"))
        self._count(transaction, response, started)
        return response

    def _admit(self, request: Request) -> Response | None:
        """The door guard, before the body is read or anything else is done: the verified
        certificate must name a local consumer. On success the principal is the current caller
        of this request (its audit records and the initiating side act for it); a refusal is
        audited once by the guard and answered 403, the connection closed."""
        decision = self.gateway.guard.admit(
            identity_from_peer(request.peer),
            Door.DICOMWEB,
            resource=self.base_url + request.path[:200],
        )
        if decision.allowed:
            return None
        refusal = error_response(DicomWebError(403, "access denied: not a local consumer"))
        refusal.close = True
        return refusal

    def _count(self, transaction: str, response: Response, started: float) -> None:
        metrics = self.gateway.metrics
        outcome = (
            "success"
            if response.status == 200
            else "partial"
            if response.status == 206
            else "failure"
        )
        metrics.requests.labels(transaction, outcome).inc()
        metrics.latency.labels(transaction).observe(time.monotonic() - started)

    def _pairs(self, request: Request) -> list[tuple[str, str]]:
        try:
            return parse_qsl(
                request.query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS
            )
        except ValueError:
            raise bad_request(f"too many query parameters (at most {_MAX_QUERY_FIELDS})") from None

    def _accept(self, request: Request, pairs: Sequence[tuple[str, str]]) -> list[str]:
        # PS3.18: an "accept" query parameter takes precedence over the Accept header.
        from_query = [v for k, v in pairs if k.lower() == "accept"]
        if from_query:
            return from_query
        return [v for k, v in request.headers if k == "accept"]

    async def _studies(
        self, patient_id: str | None, study_uids: Sequence[str], *, retrieve: bool
    ) -> tuple[list[StudyManifest], list[str]]:
        """The studies to answer from, and warnings: from the federation when a patient is
        named, else those the current caller's own searches found (nothing found by others).

        A study the caller may not name alone gets the same answer whether it exists or another
        caller found it: 404 for a retrieve, 400 for a search (which then needs a PatientID)."""
        if patient_id is not None:
            try:
                found = await self.view.studies_of_patient(patient_id)
            except FederationError as exc:
                raise DicomWebError(exc.http_status, exc.message) from None
            return found.studies, found.warnings
        if not study_uids:
            raise bad_request("a PatientID is required: XDS queries are per patient")
        try:
            known = await self.view.studies_by_uid(study_uids)
        except FederationError as exc:
            raise DicomWebError(exc.http_status, exc.message) from None
        if not known:
            hint = (
                "search for the patient's studies first (QIDO-RS with PatientID) or add "
                "PatientID to the request (XDS queries are per patient)"
            )
            if retrieve:
                raise DicomWebError(404, f"study {study_uids[0]} not found for this caller: {hint}")
            raise bad_request(f"study {study_uids[0]} is not known to this caller: {hint}")
        return known, []

    # -- QIDO-RS

    async def _search(self, request: Request, route: Route) -> Response:
        patient: str | None = None
        try:
            pairs = self._pairs(request)
            negotiate_json(self._accept(request, pairs))
            query = parse_qido(
                route,
                pairs,
                local_authority=self.local_authority,
                max_results=self.config.max_results,
            )
            patient = query.patient_id
            studies, warnings = await self._studies(
                query.patient_id, query.study_uids, retrieve=False
            )
            result = search(query, studies, self.base_url)
        except DicomWebError as exc:
            audit_query(
                self,
                request,
                patient,
                m.EventOutcome.MINOR_FAILURE
                if exc.status < 500
                else m.EventOutcome.SERIOUS_FAILURE,
                exc.message,
            )
            raise
        headers = [("content-type", DICOM_JSON)]
        if query.fuzzy:
            headers.append(
                warning_header(
                    "The fuzzymatching parameter is not supported. "
                    "Only literal matching has been performed."
                )
            )
        if result.remaining:
            headers.append(
                warning_header(
                    f"There are {result.remaining} additional results that can be requested"
                )
            )
        headers.extend(warning_header(w) for w in warnings[:10])
        body = json.dumps([to_dicom_json(ds) for ds in result.matches], separators=(",", ":"))
        audit_query(
            self,
            request,
            patient,
            m.EventOutcome.MINOR_FAILURE if warnings else m.EventOutcome.SUCCESS,
            "; ".join(warnings)[:1000] or None,
        )
        return Response(200, headers, body.encode("utf-8"))

    # -- WADO-RS

    def _patient(self, pairs: Sequence[tuple[str, str]], *, others: bool) -> str | None:
        """The patient a retrieve names (PatientID with IssuerOfPatientID, our extension), as
        a CX; other parameters are refused unless ``others`` (rendered parameters)."""
        pid: str | None = None
        issuer: str | None = None
        for key, value in pairs:
            if key in ("PatientID", "00100020"):
                pid = cx_safe(value.strip(), "PatientID") or None
            elif key in ("IssuerOfPatientID", "00100021"):
                issuer = value.strip() or None
            elif not others and key.lower() not in ("accept", "charset"):
                raise bad_request(f"unsupported query parameter {key[:80]!r} for a retrieve")
        if issuer is not None and not re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
            raise bad_request(
                "IssuerOfPatientID must be the OID of the patient's assigning authority"
            )
        return patient_cx(pid, issuer, self.local_authority) if pid else None

    async def _federated(
        self,
        route: Route,
        patient: str | None,
        audit: RetrieveAudit,
        syntaxes: Sequence[str],
        select: Callable[[list[InstanceRef]], list[InstanceRef]] | None = None,
    ) -> tuple[RetrieveImagingDocumentSetRequest, ImagingRetrieval]:
        """The instances a route names (narrowed by ``select``), opened as a RAD-69 through the
        initiating gateway; at least one instance is coming. Audits a failure before raising."""
        assert route.study is not None
        try:
            studies, _ = await self._studies(patient, [route.study], retrieve=True)
            matching = [s for s in studies if route.study in s.study_instance_uids]
            if not matching:
                raise DicomWebError(404, f"study {route.study} not found for this patient")
            audit.name_patients(matching)
            refs = [
                r
                for s in matching
                for r in s.references
                if r.study_instance_uid == route.study
                and (route.series is None or r.series_instance_uid == route.series)
                and (route.instance is None or r.sop_instance_uid == route.instance)
            ]
            if not refs:
                what = f"instance {route.instance}" if route.instance else f"series {route.series}"
                raise DicomWebError(404, f"{what} not found in study {route.study}")
            if select is not None:
                refs = select(refs)
            try:
                imaging = imaging_request_for(
                    matching, {r.sop_instance_uid for r in refs}, syntaxes
                )
            except ConsumerError as exc:
                raise DicomWebError(502, f"unusable manifest: {exc}") from None
            audit.describe(imaging.documents, refs)
            try:
                retrieval = await self.view.retrieve(imaging)
            except FederationError as exc:
                raise DicomWebError(exc.http_status, exc.message) from None
        except DicomWebError as exc:
            audit.failed_before_streaming(exc)
            raise
        if not retrieval.instances:
            await retrieval.aclose()
            error = retrieve_failure(retrieval.errors)
            audit.failed_before_streaming(error)
            raise error
        return imaging, retrieval

    def _completion(
        self,
        audit: RetrieveAudit,
        retrieval: ImagingRetrieval,
        delivery: _Delivery,
        missing: list[str],
    ) -> Callable[[bool], None]:
        def complete(ok: bool) -> None:
            audit.completed(ok, delivery.delivered, missing)
            # A body the server never started has not closed the retrieval's sources.
            task = asyncio.ensure_future(retrieval.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        return complete

    @staticmethod
    def _missing_warning(
        retrieval: ImagingRetrieval, imaging: RetrieveImagingDocumentSetRequest
    ) -> list[tuple[str, str]]:
        missing = retrieval.missing
        if not missing:
            return []
        first = retrieval.errors[0].code_context if retrieval.errors else "not returned"
        return [
            warning_header(
                f"{len(missing)} of {len(imaging.documents)} instances could not be "
                f"retrieved: {first}"
            )
        ]

    async def _retrieve(self, request: Request, route: Route) -> Response:
        assert route.study is not None
        pairs = self._pairs(request)
        patient = self._patient(pairs, others=False)
        accept = self._accept(request, pairs)
        metadata = route.kind == "metadata"
        # Metadata: whatever is stored (no transcoding just to read a header).
        syntaxes: tuple[str, ...] = ANY_TRANSFER_SYNTAX
        if metadata:
            negotiate_json(accept)
        else:
            syntaxes = negotiate_transfer_syntaxes(accept)
        audit = RetrieveAudit(self, request, route.study, [patient] if patient else [])
        imaging, retrieval = await self._federated(route, patient, audit, syntaxes)
        headers = self._missing_warning(retrieval, imaging)
        missing = retrieval.missing
        delivery = _Delivery()
        body: AsyncIterator[bytes]
        if metadata:
            headers.insert(0, ("content-type", DICOM_JSON))
            body = self._metadata_body(retrieval, delivery)
        else:
            boundary = uuid.uuid4().hex
            headers.insert(
                0,
                (
                    "content-type",
                    f'multipart/related; type="application/dicom"; boundary={boundary}',
                ),
            )
            body = self._multipart_body(retrieval, boundary, delivery)
        complete = self._completion(audit, retrieval, delivery, missing)
        return Response(206 if missing else 200, headers, body, on_complete=complete)

    # -- WADO-RS rendered and thumbnail resources

    async def _render(self, request: Request, route: Route) -> Response:
        """A rendered or thumbnail resource: instances fetched through the federation like a
        retrieve (as stored, any syntax this gateway decodes), decoded and rendered here in a
        thread, one instance at a time, never kept."""
        assert route.study is not None
        pairs = self._pairs(request)
        patient = self._patient(pairs, others=True)
        asked = parse_rendered(route, pairs, self._accept(request, pairs))
        options = asked.options
        instance_level = route.level == "IMAGE"
        if route.kind == "thumbnail" and not instance_level:
            select = _pick_thumbnail
        elif instance_level:
            select = _only_images
        else:
            select = _images_of
        audit = RetrieveAudit(self, request, route.study, [patient] if patient else [])
        imaging, retrieval = await self._federated(
            route, patient, audit, ANY_TRANSFER_SYNTAX, select
        )
        headers = [warning_header(w) for w in asked.warnings]
        headers += self._missing_warning(retrieval, imaging)
        missing = retrieval.missing
        delivery = _Delivery()
        complete = self._completion(audit, retrieval, delivery, missing)
        single = route.kind == "thumbnail" or (instance_level and len(route.frames) <= 1)
        if not single:
            boundary = uuid.uuid4().hex
            headers.insert(
                0,
                (
                    "content-type",
                    f'multipart/related; type="{options.media_type}"; boundary={boundary}',
                ),
            )
            body = self._rendered_body(retrieval, route, options, boundary, delivery)
            return Response(206 if missing else 200, headers, body, on_complete=complete)
        # One image: rendered before answering, so that an instance without an image or a
        # frame out of range gets its status (406 / 404), not a cut body.
        frames = 1
        try:
            ds = await self._read_instance(retrieval, 0)
            frame = route.frames[0] - 1 if route.frames else 0
            try:
                frames = frame_count(ds)
                image = await asyncio.to_thread(render_frame, ds, frame, options)
            except NotRenderable as exc:
                raise DicomWebError(
                    406, f"instance {retrieval.uids[0]} cannot be rendered: {exc}"
                ) from None
            except FrameOutOfRange as exc:
                raise DicomWebError(404, f"instance {retrieval.uids[0]}: {exc}") from None
        except DicomWebError as exc:
            await retrieval.aclose()
            audit.failed_before_streaming(exc)
            raise
        except _InstanceError as exc:
            await retrieval.aclose()
            error = DicomWebError(502, str(exc))
            audit.failed_before_streaming(error)
            raise error from None
        if route.kind == "rendered" and not route.frames and frames > 1:
            # A multi-frame instance: every frame, the first already rendered.
            boundary = uuid.uuid4().hex
            headers.insert(
                0,
                (
                    "content-type",
                    f'multipart/related; type="{options.media_type}"; boundary={boundary}',
                ),
            )
            body = self._frames_body(ds, image, frames, options, boundary, retrieval, delivery)
            return Response(200, headers, body, on_complete=complete)
        delivery.delivered.append(retrieval.uids[0])
        headers.insert(0, ("content-type", options.media_type))
        return Response(200, headers, image, on_complete=complete)

    async def _frames_body(
        self,
        ds: Dataset,
        first: bytes,
        frames: int,
        options: RenderOptions,
        boundary: str,
        retrieval: ImagingRetrieval,
        delivery: _Delivery,
    ) -> AsyncIterator[bytes]:
        try:
            image = first
            for frame in range(frames):
                if frame:
                    image = await asyncio.to_thread(render_frame, ds, frame, options)
                yield part_header(boundary, options.media_type, first=frame == 0)
                yield image
            yield closing_delimiter(boundary, empty=False)
            delivery.delivered.append(retrieval.uids[0])
        finally:
            await retrieval.aclose()

    async def _rendered_body(
        self,
        retrieval: ImagingRetrieval,
        route: Route,
        options: RenderOptions,
        boundary: str,
        delivery: _Delivery,
    ) -> AsyncIterator[bytes]:
        """Every asked frame (all, when none is named) of every instance, one part each, in
        arrival order; an instance without an image is left out (a study holds reports too)."""
        first = True
        try:
            for index, uid in enumerate(retrieval.uids):
                ds = await self._read_instance(retrieval, index)
                try:
                    count = frame_count(ds)
                except NotRenderable:
                    log.info("rendered %s: instance %s has no image, left out", route.study, uid)
                    continue
                frames = [f - 1 for f in route.frames] or list(range(count))
                for frame in frames:
                    try:
                        image = await asyncio.to_thread(render_frame, ds, frame, options)
                    except FrameOutOfRange as exc:
                        raise _InstanceError(f"instance {uid}: {exc}") from None
                    except NotRenderable as exc:
                        log.info("rendered %s: instance %s left out: %s", route.study, uid, exc)
                        break
                    yield part_header(boundary, options.media_type, first=first)
                    first = False
                    yield image
                delivery.delivered.append(uid)
            yield closing_delimiter(boundary, empty=first)
        finally:
            await retrieval.aclose()

    async def _read_instance(self, retrieval: ImagingRetrieval, index: int) -> Dataset:
        """Instance ``index`` of the retrieval, whole (pixels included), through a spool."""
        uid = retrieval.uids[index]
        chunks = retrieval.take(index)
        spool_dir = self.gateway.config.limits.spool_dir
        try:
            # Patient data: sealed past the memory threshold, as in _read_header.
            with EncryptedSpool(
                max_size=_HEADER_SPOOL_MEMORY, dir=str(spool_dir) if spool_dir else None
            ) as spool:
                size = 0
                async for chunk in chunks:
                    size += len(chunk)
                    if size > _HEADER_SPOOL_MEMORY:
                        await asyncio.to_thread(spool.write, chunk)  # on disk by now
                    else:
                        spool.write(chunk)
                return await asyncio.to_thread(_parse_instance, cast(IO[bytes], spool), uid)
        finally:
            await close_body(chunks)

    async def _multipart_body(
        self, retrieval: ImagingRetrieval, boundary: str, delivery: _Delivery
    ) -> AsyncIterator[bytes]:
        """Each instance as one part, in arrival order, its header written once the file meta
        told its transfer syntax. A broken instance raises: the server then resets the
        connection, so a client never mistakes a cut study for a complete one."""
        try:
            for index, uid in enumerate(retrieval.uids):
                chunks = retrieval.take(index)
                try:
                    prefix = bytearray()
                    syntax: str | None = None
                    async for chunk in chunks:
                        if syntax is not None:
                            yield chunk
                            continue
                        prefix += chunk
                        try:
                            syntax = ts.sniff_transfer_syntax(bytes(prefix))
                        except ts.NeedMoreData:
                            if len(prefix) > ts.META_SNIFF_LIMIT + 4096:
                                raise _InstanceError(f"instance {uid}: no file meta") from None
                            continue
                        except ts.TranscodeError as exc:
                            raise _InstanceError(f"instance {uid}: {exc}") from None
                        content_type = f"application/dicom; transfer-syntax={syntax}"
                        yield part_header(boundary, content_type, first=index == 0)
                        yield bytes(prefix)
                        prefix = bytearray()
                    if syntax is None:
                        raise _InstanceError(f"instance {uid}: cut before its file meta ended")
                finally:
                    await close_body(chunks)
                delivery.delivered.append(uid)
            yield closing_delimiter(boundary, empty=not retrieval.uids)
        finally:
            await retrieval.aclose()

    async def _metadata_body(
        self, retrieval: ImagingRetrieval, delivery: _Delivery
    ) -> AsyncIterator[bytes]:
        """A JSON array, one instance's metadata at a time (each read through a spool)."""
        try:
            yield b"["
            for index, uid in enumerate(retrieval.uids):
                chunks = retrieval.take(index)
                try:
                    ds = await self._read_header(chunks, uid)
                finally:
                    await close_body(chunks)
                item = json.dumps(metadata_json(ds), separators=(",", ":")).encode("utf-8")
                yield (b"," if index else b"") + item
                delivery.delivered.append(uid)
            yield b"]"
        finally:
            await retrieval.aclose()

    async def _read_header(self, chunks: AsyncIterator[bytes], uid: str) -> Dataset:
        spool_dir = self.gateway.config.limits.spool_dir
        # Patient data: past the memory threshold the instance goes to an unnamed file,
        # AES-GCM sealed under a key that lives only in this spool (encrypted_spool.py).
        with EncryptedSpool(
            max_size=_HEADER_SPOOL_MEMORY, dir=str(spool_dir) if spool_dir else None
        ) as spool:
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > _HEADER_SPOOL_MEMORY:
                    await asyncio.to_thread(spool.write, chunk)  # on disk by now
                else:
                    spool.write(chunk)
            return await asyncio.to_thread(_parse_header, cast(IO[bytes], spool), uid)


def _parse_header(spool: IO[bytes], uid: str) -> Dataset:
    spool.seek(0)
    try:
        ds = dcmread(spool, stop_before_pixels=True)
        for _element in ds.iterall():  # decode now: a bad element must fail here
            pass
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise _InstanceError(f"instance {uid} is not valid DICOM: {exc}") from None
    if str(ds.get("SOPInstanceUID", "")) != uid:
        raise _InstanceError(f"instance {uid}: the source sent {ds.get('SOPInstanceUID')}")
    return ds


def _parse_instance(spool: IO[bytes], uid: str) -> Dataset:
    spool.seek(0)
    try:
        ds = dcmread(spool)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise _InstanceError(f"instance {uid} is not valid DICOM: {exc}") from None
    if str(ds.get("SOPInstanceUID", "")) != uid:
        raise _InstanceError(f"instance {uid}: the source sent {ds.get('SOPInstanceUID')}")
    return ds


def _images_of(refs: list[InstanceRef]) -> list[InstanceRef]:
    images = image_refs(refs)
    if not images:
        raise DicomWebError(406, "nothing here can be rendered: no image instances")
    return images


def _only_images(refs: list[InstanceRef]) -> list[InstanceRef]:
    if not image_refs(refs):
        raise DicomWebError(
            406,
            f"instance {refs[0].sop_instance_uid} is not an image (SOP class "
            f"{refs[0].sop_class_uid}): it cannot be rendered",
        )
    return refs


def _pick_thumbnail(refs: list[InstanceRef]) -> list[InstanceRef]:
    chosen = thumbnail_instance(refs)
    if chosen is None:
        raise DicomWebError(406, "no image instance to make a thumbnail of")
    return [chosen]
