"""Imaging Document Source backed by a PACS that speaks only DIMSE (pynetdicom).

Resolve: C-FIND at IMAGE level (Study Root) per requested series gives the SOP instances that
exist and their SOP classes, which the C-GET association must propose as storage contexts.

Retrieve, one instance at a time in plan order, either

* **C-GET** (Study Root GET): the PACS sends the instance back over our own association with
  SCP/SCU role selection; no inbound port needed; or
* **C-MOVE** (Study Root MOVE) to the gateway's own storage SCP (an AE title the PACS knows):
  the PACS opens an association to us; the C-STORE is matched to the waiting retrieve by its
  SOP Instance UID.

pynetdicom is thread-based and hands a C-STORE over as one complete dataset, so a DIMSE instance
is held in memory while it is relayed (bounded by ``max_instance_bytes``; never written to
disk). The next instance is requested while the current one is being sent (one instance of
look-ahead), and no further one until the consumer has taken it: a slow consumer slows the
PACS down instead of growing the gateway's memory. The received bytes are the dataset exactly
as the PACS sent it, behind a file meta header the gateway writes (DIMSE carries no group 2).

Transfer syntax: the C-GET association proposes one presentation context per (SOP class,
syntax) for the requested syntaxes plus those the gateway can convert losslessly into a
requested one, so the PACS can send each instance as stored when that is acceptable. What
arrives in a syntax that is neither requested nor convertible makes the instance fail (and the
already started response is aborted).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from xca_gateway.imaging.dicom_negotiation import take_requestor_order
from xca_gateway.imaging.request import RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.sources import (
    DEFAULT_CHUNK,
    ImagingSource,
    InstanceStreamError,
    PlannedInstance,
    Retrieval,
    SourceUnavailable,
    chunked,
    document_not_found,
)
from xca_gateway.imaging.transfer_syntax import (
    CONVERTIBLE,
    TranscodeError,
    can_convert,
    choose_target,
    sniff_transfer_syntax,
    transcode,
)
from xca_gateway.xds.ebrs import RegistryError

log = logging.getLogger(__name__)

FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"
_MAX_CONTEXTS = 127  # 128 minus the C-GET context
# Proposed for C-GET when C-FIND did not return SOP Class UIDs (dcmqrscp does not).
COMMON_STORAGE_CLASSES: tuple[str, ...] = tuple(
    f"1.2.840.10008.5.1.4.1.1.{suffix}"
    for suffix in (
        "2",  # CT Image
        "2.1",  # Enhanced CT
        "4",  # MR Image
        "4.1",  # Enhanced MR
        "1",  # Computed Radiography
        "1.1",  # Digital X-Ray, for presentation
        "1.1.1",  # Digital X-Ray, for processing
        "1.2",  # Digital Mammography, for presentation
        "1.2.1",  # Digital Mammography, for processing
        "13.1.3",  # Breast Tomosynthesis
        "6.1",  # Ultrasound
        "3.1",  # Ultrasound Multi-frame
        "7",  # Secondary Capture
        "20",  # Nuclear Medicine
        "128",  # PET
        "12.1",  # X-Ray Angiographic
        "12.2",  # X-Ray Radiofluoroscopic
        "77.1.4",  # VL Photographic
        "66.4",  # Segmentation
        "11.1",  # Grayscale Softcopy Presentation State
        "88.59",  # Key Object Selection
        "88.11",  # Basic Text SR
        "88.22",  # Enhanced SR
        "88.33",  # Comprehensive SR
        "104.1",  # Encapsulated PDF
        "481.2",  # RT Dose
        "481.3",  # RT Structure Set
        "481.5",  # RT Plan
    )
)


@dataclass(frozen=True)
class DimseSettings:
    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = "XCAGW"
    mode: str = "c-get"  # or "c-move"
    # C-MOVE: the AE title the PACS sends to (configured there) and where we listen for it.
    move_destination_ae_title: str | None = None
    storage_scp_host: str = "127.0.0.1"
    storage_scp_port: int = 0
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0
    max_pdu: int = 0  # 0: unlimited
    max_instance_bytes: int = 1024 * 1024 * 1024
    # SOP classes to propose for C-GET when C-FIND does not name them (default: common ones).
    sop_classes: tuple[str, ...] = ()


def _quiet_pynetdicom() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _MoveRouter:
    """The C-MOVE storage SCP hands each arriving instance to the retrieve waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[_MoveSlot]] = {}

    def expect(self, sop_instance_uid: str) -> _MoveSlot:
        slot = _MoveSlot(sop_instance_uid)
        with self._lock:
            self._waiting.setdefault(sop_instance_uid, []).append(slot)
        return slot

    def forget(self, slot: _MoveSlot) -> None:
        with self._lock:
            slots = self._waiting.get(slot.sop_instance_uid, [])
            if slot in slots:
                slots.remove(slot)
            if not slots:
                self._waiting.pop(slot.sop_instance_uid, None)

    def deliver(self, sop_instance_uid: str, data: bytes) -> bool:
        with self._lock:
            slots = self._waiting.get(sop_instance_uid)
            if not slots:
                return False
            slot = slots.pop(0)
            if not slots:
                self._waiting.pop(sop_instance_uid, None)
        slot.data = data
        return True


@dataclass(eq=False)
class _MoveSlot:
    sop_instance_uid: str
    data: bytes | None = None


class DimseSource(ImagingSource):
    kind = "dimse"

    def __init__(self, repository_unique_id: str, settings: DimseSettings) -> None:
        super().__init__(repository_unique_id)
        if settings.mode not in ("c-get", "c-move"):
            raise ValueError(f"DIMSE mode must be c-get or c-move, not {settings.mode!r}")
        if settings.mode == "c-move" and not settings.move_destination_ae_title:
            raise ValueError("C-MOVE needs move_destination_ae_title")
        self.settings = settings
        self._router = _MoveRouter()
        self._scp: Any = None
        _quiet_pynetdicom()

    def describe(self) -> str:
        s = self.settings
        return (
            f"DIMSE ({s.mode}) imaging source {self.repository_unique_id} at "
            f"{s.called_ae_title}@{s.host}:{s.port}"
        )

    # -- lifecycle (C-MOVE storage SCP) ------------------------------------------------------

    @property
    def storage_scp_port(self) -> int | None:
        if self._scp is None:
            return None
        return int(self._scp.server_address[1])

    async def start(self) -> None:
        if self.settings.mode == "c-move" and self._scp is None:
            self._scp = await asyncio.to_thread(self._start_scp)

    async def stop(self) -> None:
        if self._scp is not None:
            scp, self._scp = self._scp, None
            await asyncio.to_thread(scp.shutdown)

    def _start_scp(self) -> Any:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom._globals import ALL_TRANSFER_SYNTAXES

        s = self.settings
        ae = AE(ae_title=s.move_destination_ae_title or s.calling_ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.network_timeout = s.network_timeout
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            # The PACS's first proposal (the syntax it stores, as a rule), not pynetdicom's
            # Implicit VR first: an Implicit VR detour loses the private attributes' VRs.
            (evt.EVT_REQUESTED, _take_requestor_order),
            (evt.EVT_C_STORE, self._on_moved_instance),
        ]
        return ae.start_server(
            (s.storage_scp_host, s.storage_scp_port), block=False, evt_handlers=handlers
        )

    def _on_moved_instance(self, event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        data = event.encoded_dataset(include_meta=True)
        if len(data) > self.settings.max_instance_bytes:
            return 0xA700  # Refused: out of resources
        if not self._router.deliver(sop, data):
            log.warning("C-MOVE delivered SOP instance %s that nobody is waiting for", sop)
            return 0xA900  # Error: dataset does not match SOP class (no better "unexpected")
        return 0x0000

    # -- associations ------------------------------------------------------------------------

    def associate(
        self,
        contexts: list[tuple[str, list[str]]],
        *,
        scp_roles: Sequence[str] = (),
        on_store: Callable[[Any], int] | None = None,
    ) -> Any:
        from pynetdicom import AE, build_role, evt

        s = self.settings
        ae = AE(ae_title=s.calling_ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        roles: list[Any] = [build_role(uid, scp_role=True) for uid in scp_roles]
        handlers: list[Any] = [(evt.EVT_C_STORE, on_store)] if on_store is not None else []
        assoc = ae.associate(
            s.host, s.port, ae_title=s.called_ae_title, ext_neg=roles, evt_handlers=handlers
        )
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "aborted or unreachable"
            raise SourceUnavailable(f"association with {s.called_ae_title} {reason}")
        return assoc

    def find_series(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
        """SOP Instance UID -> SOP Class UID for each (study, series), by C-FIND."""
        from pynetdicom._globals import DEFAULT_TRANSFER_SYNTAXES

        assoc = self.associate([(FIND_MODEL, list(DEFAULT_TRANSFER_SYNTAXES))])
        try:
            found: dict[tuple[str, str], dict[str, str]] = {}
            for study, series in keys:
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "IMAGE"
                identifier.StudyInstanceUID = study
                identifier.SeriesInstanceUID = series
                identifier.SOPInstanceUID = ""
                identifier.SOPClassUID = ""
                instances: dict[str, str] = {}
                for status, answer in assoc.send_c_find(identifier, FIND_MODEL):
                    if not status or "Status" not in status:
                        raise SourceUnavailable("C-FIND got no answer (timeout or abort)")
                    code = int(status.Status)
                    if code in (0xFF00, 0xFF01) and answer is not None:
                        sop = str(answer.get("SOPInstanceUID", ""))
                        if sop:
                            instances[sop] = str(answer.get("SOPClassUID", "") or "")
                    elif code != 0x0000:
                        raise SourceUnavailable(f"C-FIND failed with status 0x{code:04X}")
                found[(study, series)] = instances
            return found
        finally:
            assoc.release()

    # -- retrieve ----------------------------------------------------------------------------

    async def open(self, request: RetrieveImagingDocumentSetRequest) -> Retrieval:
        keys = list(
            dict.fromkeys((d.study_instance_uid, d.series_instance_uid) for d in request.documents)
        )
        try:
            found = await asyncio.to_thread(self.find_series, keys)
        except SourceUnavailable:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise SourceUnavailable(f"C-FIND failed: {exc}") from None
        planned: list[PlannedInstance] = []
        errors: list[RegistryError] = []
        for doc in request.documents:
            sop_class = found[(doc.study_instance_uid, doc.series_instance_uid)].get(
                doc.document_unique_id
            )
            if sop_class is None:
                errors.append(document_not_found(doc))
            else:
                planned.append(PlannedInstance(doc, handle=sop_class))
        return DimseRetrieval(self, planned, errors, request.transfer_syntax_uids)


def proposed_syntaxes(requested: tuple[str, ...]) -> list[str]:
    """Requested syntaxes, then the ones the gateway can convert into a requested one."""
    extra = [
        ts
        for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", *sorted(CONVERTIBLE))
        if ts not in requested and any(can_convert(ts, r) for r in requested)
    ]
    return list(dict.fromkeys([*requested, *extra]))


class DimseRetrieval(Retrieval):
    def __init__(
        self,
        source: DimseSource,
        planned: list[PlannedInstance],
        errors: list[RegistryError],
        requested: tuple[str, ...],
    ) -> None:
        super().__init__(planned, errors)
        self.source = source
        self.requested = requested
        self._assoc: Any = None
        self._received: dict[str, bytes] = {}
        self._lock = threading.Lock()  # one DIMSE operation at a time on the association
        self._fetches: dict[int, asyncio.Task[bytes]] = {}
        self._index = {id(p): i for i, p in enumerate(planned)}
        self._closed = False

    # Each fetch runs in a worker thread; the association is reused between instances.

    def _contexts(self) -> tuple[list[tuple[str, list[str]]], list[str]]:
        classes = list(dict.fromkeys(str(p.handle) for p in self.planned if p.handle))
        if any(not p.handle for p in self.planned):
            fallback = self.source.settings.sop_classes or COMMON_STORAGE_CLASSES
            classes = list(dict.fromkeys([*classes, *fallback]))
        syntaxes = proposed_syntaxes(self.requested)
        per_class = max(1, min(len(syntaxes), _MAX_CONTEXTS // max(1, len(classes))))
        contexts: list[tuple[str, list[str]]] = [
            (GET_MODEL, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ]
        for sop_class in classes[:_MAX_CONTEXTS]:
            # One context per syntax, so the PACS can pick the one its stored instance has.
            contexts.extend((sop_class, [ts]) for ts in syntaxes[:per_class])
        return contexts, classes

    def _on_store(self, event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        if len(data) > self.source.settings.max_instance_bytes:
            return 0xA700
        self._received[str(event.request.AffectedSOPInstanceUID)] = data
        return 0x0000

    def _fetch_blocking(self, instance: PlannedInstance) -> bytes:
        with self._lock:
            if self._closed:
                raise InstanceStreamError("retrieve closed")
            try:
                return self._retrieve_once(instance)
            except SourceUnavailable as exc:
                raise InstanceStreamError(exc.reason) from None
            except InstanceStreamError:
                raise
            except Exception as exc:
                self._drop_association()
                raise InstanceStreamError(f"DIMSE retrieve failed: {exc!r}") from None

    def _retrieve_once(self, instance: PlannedInstance) -> bytes:
        settings = self.source.settings
        doc = instance.document
        if self._assoc is None or not self._assoc.is_established:
            if settings.mode == "c-get":
                contexts, classes = self._contexts()
                self._assoc = self.source.associate(
                    contexts, scp_roles=classes, on_store=self._on_store
                )
            else:
                self._assoc = self.source.associate(
                    [(MOVE_MODEL, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]
                )
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = doc.study_instance_uid
        identifier.SeriesInstanceUID = doc.series_instance_uid
        identifier.SOPInstanceUID = doc.document_unique_id
        sop = doc.document_unique_id
        slot = None
        if settings.mode == "c-get":
            responses = self._assoc.send_c_get(identifier, GET_MODEL)
        else:
            slot = self.source._router.expect(sop)
            destination = settings.move_destination_ae_title or settings.calling_ae_title
            responses = self._assoc.send_c_move(identifier, destination, MOVE_MODEL)
        try:
            final: int | None = None
            for status, _identifier in responses:
                if not status or "Status" not in status:
                    self._drop_association()
                    raise InstanceStreamError(f"C-{settings.mode[2:].upper()} got no answer")
                code = int(status.Status)
                if code not in (0xFF00, 0xFF01):
                    final = code
            data = slot.data if slot is not None else self._received.pop(sop, None)
            if data is None:
                detail = f"status 0x{final:04X}" if final is not None else "no final status"
                raise InstanceStreamError(f"{sop} was not delivered by the PACS ({detail})")
            return data
        finally:
            if slot is not None:
                self.source._router.forget(slot)
            self._received.clear()

    def _drop_association(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
            try:
                assoc.abort()
            except Exception:  # pragma: no cover - already broken
                log.debug("aborting DIMSE association failed", exc_info=True)

    def _fetch(self, index: int) -> asyncio.Task[bytes]:
        task = self._fetches.get(index)
        if task is None:
            fetch = asyncio.to_thread(self._fetch_blocking, self.planned[index])
            task = asyncio.ensure_future(fetch)
            self._fetches[index] = task
        return task

    async def stream(self, instance: PlannedInstance) -> AsyncIterator[bytes]:
        index = self._index[id(instance)]
        data = await self._fetch(index)
        self._fetches.pop(index, None)
        if index + 1 < len(self.planned):
            self._fetch(index + 1)  # look-ahead while this one is sent
        try:
            stored = sniff_transfer_syntax(data)
        except Exception as exc:
            raise InstanceStreamError(f"PACS sent an unreadable instance: {exc}") from None
        if stored not in self.requested:
            target = choose_target(stored, self.requested)
            if target is None:
                raise InstanceStreamError(
                    f"{instance.document.document_unique_id} arrived in {stored}, which is "
                    "neither requested nor convertible"
                )
            try:
                data = await asyncio.to_thread(transcode, data, target)
            except TranscodeError as exc:
                raise InstanceStreamError(str(exc)) from None
        async for chunk in chunked(data, DEFAULT_CHUNK):
            yield chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._fetches.values():
            task.cancel()
        if self._fetches:
            await asyncio.gather(*self._fetches.values(), return_exceptions=True)
        self._fetches.clear()

        def release() -> None:
            with self._lock:
                assoc, self._assoc = self._assoc, None
                if assoc is not None and assoc.is_established:
                    try:
                        assoc.release()
                    except Exception:  # pragma: no cover
                        assoc.abort()

        await asyncio.to_thread(release)


def _take_requestor_order(event: Any) -> None:
    from pynetdicom._globals import ALL_TRANSFER_SYNTAXES

    take_requestor_order(event.assoc, ALL_TRANSFER_SYNTAXES)
