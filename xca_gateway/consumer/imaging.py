"""An imaging document consumer: find a patient's study across communities and fetch it.

The XDS-I.b consumer flow, against an initiating gateway: ITI-18 FindDocuments (KOS manifests of
the patient, any community) → ITI-43 of the chosen manifest (routed as ITI-39 to the community
that holds it) → the KOS names each series' imaging source (RetrieveLocationUID) → RAD-69
(routed as RAD-75) streams the instances, written to disk as they arrive.

``xca-gateway retrieve-study`` is the command line of this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from xca_gateway.consumer.commands import ExchangeError, check_reachable
from xca_gateway.consumer.endpoints_file import EndpointsError, EndpointsFile
from xca_gateway.imaging.request import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    build_retrieve_imaging_request,
)
from xca_gateway.imaging.transfer_syntax import LOSSLESS_AS_STORED
from xca_gateway.protocol import mtom
from xca_gateway.protocol.credentials import CredentialError, check_key_pair
from xca_gateway.protocol.namespaces import QUERY, RIM, SOAP12, XDSB, XOP, Action
from xca_gateway.protocol.soap import build_envelope, element_content, read_fault, serialize
from xca_gateway.protocol.tls import client_context
from xca_gateway.protocol.xmlsafe import XmlLimits, parse_xml
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import RegistryError, parse_registry_errors
from xca_gateway.xds.kos import kos_from_bytes, kos_references, kos_retrieve_locations
from xca_gateway.xds.patient_id import parse_patient_id

if TYPE_CHECKING:
    import httpx

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


class ConsumerError(Exception):
    pass


@dataclass(frozen=True)
class Manifest:
    """A KOS manifest DocumentEntry found for the patient."""

    home_community_id: str
    repository_unique_id: str
    document_unique_id: str
    study_instance_uids: tuple[str, ...]
    service_start_time: str | None


# ----------------------------------------------------------------------------- sans-IO parts


def find_manifests_request(patient_id: str) -> etree._Element:
    """ITI-18 FindDocuments for the patient's approved KOS manifests, LeafClass."""
    root = etree.Element(f"{{{QUERY}}}AdhocQueryRequest", nsmap={"query": QUERY, "rim": RIM})
    option = etree.SubElement(root, f"{{{QUERY}}}ResponseOption")
    option.set("returnType", "LeafClass")
    option.set("returnComposedObjects", "true")
    adhoc = etree.SubElement(root, f"{{{RIM}}}AdhocQuery")
    adhoc.set("id", ebrim.StoredQueryId.FIND_DOCUMENTS)
    slots = {
        "$XDSDocumentEntryPatientId": [parse_patient_id(patient_id).quoted],
        "$XDSDocumentEntryStatus": [f"('{ebrim.STATUS_APPROVED}')"],
        "$XDSDocumentEntryFormatCode": [f"('{ebrim.KOS_FORMAT_CODE}^^{ebrim.DICOM_UID_REGISTRY}')"],
    }
    for name, values in slots.items():
        slot = etree.SubElement(adhoc, f"{{{RIM}}}Slot")
        slot.set("name", name)
        value_list = etree.SubElement(slot, f"{{{RIM}}}ValueList")
        for value in values:
            etree.SubElement(value_list, f"{{{RIM}}}Value").text = value
    return root


def _slot(entry: etree._Element, name: str) -> list[str]:
    return [
        (v.text or "").strip()
        for slot in entry.iterfind(f"{{{RIM}}}Slot")
        if slot.get("name") == name
        for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
    ]


def manifests_from_response(payload: etree._Element) -> list[Manifest]:
    """The KOS DocumentEntries of an AdhocQueryResponse."""
    found = []
    for entry in payload.iter(f"{{{RIM}}}ExtrinsicObject"):
        unique_id = next(
            (
                e.get("value", "")
                for e in entry.iterfind(f"{{{RIM}}}ExternalIdentifier")
                if e.get("identificationScheme") == ebrim.DE_UNIQUE_ID
            ),
            "",
        )
        repository = next(iter(_slot(entry, ebrim.SLOT_REPOSITORY_UNIQUE_ID)), "")
        studies = tuple(
            ref.split("^")[0]
            for ref in _slot(entry, ebrim.SLOT_REFERENCE_ID_LIST)
            if ref.endswith("urn:ihe:iti:xds:2016:studyInstanceUID")
        )
        if unique_id and repository and entry.get("home"):
            found.append(
                Manifest(
                    home_community_id=entry.get("home", ""),
                    repository_unique_id=repository,
                    document_unique_id=unique_id,
                    study_instance_uids=studies,
                    service_start_time=next(iter(_slot(entry, "serviceStartTime")), None),
                )
            )
    return found


def retrieve_manifest_request(manifest: Manifest) -> etree._Element:
    root = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": XDSB})
    request = etree.SubElement(root, f"{{{XDSB}}}DocumentRequest")
    etree.SubElement(request, f"{{{XDSB}}}HomeCommunityId").text = manifest.home_community_id
    etree.SubElement(request, f"{{{XDSB}}}RepositoryUniqueId").text = manifest.repository_unique_id
    etree.SubElement(request, f"{{{XDSB}}}DocumentUniqueId").text = manifest.document_unique_id
    return root


def imaging_request_from_kos(
    kos_bytes: bytes, home_community_id: str, transfer_syntaxes: Sequence[str]
) -> RetrieveImagingDocumentSetRequest:
    kos = kos_from_bytes(kos_bytes)
    locations = kos_retrieve_locations(kos)
    documents = []
    for ref in kos_references(kos):
        source = locations.get(ref.series_instance_uid)
        if not source:
            raise ConsumerError(
                f"the manifest names no source for series {ref.series_instance_uid}"
            )
        documents.append(
            DocumentRequest(
                study_instance_uid=ref.study_instance_uid,
                series_instance_uid=ref.series_instance_uid,
                repository_unique_id=source,
                document_unique_id=ref.sop_instance_uid,
                home_community_id=home_community_id,
            )
        )
    return RetrieveImagingDocumentSetRequest(tuple(documents), tuple(transfer_syntaxes))


# ----------------------------------------------------------------------------- I/O


@dataclass
class RetrieveReport:
    manifest: Manifest
    written: list[Path]
    errors: list[RegistryError]


class Consumer:
    def __init__(self, client: httpx.AsyncClient, gateway: str, *, progress: bool) -> None:
        self.client = client
        self.gateway = gateway.rstrip("/")
        self.progress = progress
        self.limits = XmlLimits()

    def _envelope(self, payload: etree._Element, action: str) -> bytes:
        return serialize(build_envelope(payload, action=action, reply_to_anonymous=True))

    async def _soap(self, path: str, payload: etree._Element, action: str) -> Any:
        response = await self.client.post(
            self.gateway + path,
            content=self._envelope(payload, action),
            headers={"content-type": f'application/soap+xml; charset=UTF-8; action="{action}"'},
        )
        content_type = response.headers.get("content-type", "")
        if mtom.is_mtom(content_type):
            reader = mtom.MtomRequestReader(
                content_type,
                max_root_bytes=self.limits.max_bytes,
                max_part_bytes=1 << 31,
                max_total_bytes=1 << 31,
                max_parts=10,
            )
            reader.feed(response.content)
            message = reader.close()
            return self._payload(message.root), message
        return self._payload(response.content), None

    def _payload(self, data: bytes) -> etree._Element:
        root = parse_xml(data, self.limits)
        fault = read_fault(root)
        if fault is not None:
            raise ConsumerError(f"SOAP fault {fault.code}: {fault.reason}")
        body = root.find(f"{{{SOAP12}}}Body")
        if body is None or len(body) == 0:
            raise ConsumerError("response without a SOAP body")
        return body[0]

    async def find_manifests(self, patient_id: str) -> tuple[list[Manifest], list[RegistryError]]:
        payload, _ = await self._soap("/ig/iti18", find_manifests_request(patient_id), Action.ITI18)
        return manifests_from_response(payload), parse_registry_errors(payload)

    async def fetch_manifest(self, manifest: Manifest) -> bytes:
        payload, message = await self._soap(
            "/ig/iti43", retrieve_manifest_request(manifest), Action.ITI43
        )
        try:
            document = payload.find(f"{{{XDSB}}}DocumentResponse/{{{XDSB}}}Document")
            if document is None:
                errors = parse_registry_errors(
                    payload.find("{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryResponse")
                    or payload
                )
                raise ConsumerError(
                    "manifest not retrieved: "
                    + "; ".join(f"{e.error_code} {e.code_context}" for e in errors)
                )
            content = element_content(document, message.attachments if message else {})
            return content if isinstance(content, bytes) else content.read_all()
        finally:
            if message is not None:
                message.close()

    async def retrieve_instances(
        self, request: RetrieveImagingDocumentSetRequest, out_dir: Path
    ) -> tuple[list[Path], list[RegistryError]]:
        """RAD-69, with every instance streamed straight to ``out_dir`` as it arrives."""
        out_dir.mkdir(parents=True, exist_ok=True)
        total = len(request.documents)
        written: list[Path] = []
        errors: list[RegistryError] = []
        current: Any = None
        temp: Path | None = None
        try:
            async with contextlib.aclosing(self.rad69_stream(request)) as events:
                async for event in events:
                    if isinstance(event, Rad69Root):
                        errors = event.errors
                    elif isinstance(event, InstanceBegins):
                        temp = out_dir / f".{event.uid}.{uuid.uuid4().hex}.part"
                        current = temp.open("wb")
                    elif isinstance(event, InstanceEnds):
                        current.close()
                        assert temp is not None
                        target = out_dir / f"{event.uid}.dcm"
                        os.replace(temp, target)
                        written.append(target)
                        if self.progress:
                            print(f"\r{len(written)}/{total} instances", end="", file=sys.stderr)
                    else:
                        current.write(event)
        except BaseException:
            # A truncated or failed stream leaves no half-written file behind.
            if current is not None and not current.closed:
                current.close()
            for leftover in out_dir.glob(".*.part"):
                leftover.unlink(missing_ok=True)
            raise
        if self.progress:
            print(file=sys.stderr)
        return written, errors

    async def rad69_stream(
        self, request: RetrieveImagingDocumentSetRequest
    ) -> AsyncGenerator[Rad69Event, None]:
        """RAD-69 through the gateway, streamed: the root part's index and errors
        (:class:`Rad69Root`, once, before any instance), then per instance
        :class:`InstanceBegins`, its bytes as they arrive and :class:`InstanceEnds`.

        A response that breaks off raises (httpx.HTTPError, mtom.MtomError); a fault or a
        response that is not MTOM raises ConsumerError."""
        body = self._envelope(build_retrieve_imaging_request(request), Action.RAD69)
        async with self.client.stream(
            "POST",
            self.gateway + "/ig/rad69",
            content=body,
            headers={
                "content-type": f'application/soap+xml; charset=UTF-8; action="{Action.RAD69}"'
            },
        ) as response:
            content_type = response.headers.get("content-type", "")
            if not mtom.is_mtom(content_type):
                self._payload(await response.aread())  # raises on a fault
                raise ConsumerError("RAD-69 answer is not MTOM")
            boundary = mtom.parse_content_type(content_type)[1]["boundary"]
            parser = mtom.MultipartParser(boundary, max_parts=len(request.documents) + 2)
            root = bytearray()
            index: Rad69Root | None = None
            uid = ""
            part = -1
            async for chunk in response.aiter_raw(1 << 20):
                for event in parser.feed(chunk):
                    if isinstance(event, mtom.PartStart):
                        part += 1
                        if part == 0:
                            continue
                        if index is None:
                            index = root_index(bytes(root), self.limits)
                            yield index
                        cid = event.headers.content_id or ""
                        if cid not in index.names:
                            raise ConsumerError(f"unexpected MIME part {cid}")
                        uid = index.names[cid]
                        yield InstanceBegins(uid)
                    elif isinstance(event, mtom.PartData):
                        if part == 0:
                            root += event.data
                        else:
                            yield event.data
                    elif isinstance(event, mtom.PartEnd) and part > 0:
                        yield InstanceEnds(uid)
            parser.close()
            if index is None:
                yield root_index(bytes(root), self.limits)


@dataclass(frozen=True)
class Rad69Root:
    """The root part of a RAD-69 response: content id -> SOP Instance UID, and its errors."""

    names: dict[str, str]
    errors: list[RegistryError]


@dataclass(frozen=True)
class InstanceBegins:
    uid: str


@dataclass(frozen=True)
class InstanceEnds:
    uid: str


Rad69Event = Rad69Root | InstanceBegins | InstanceEnds | bytes


def root_index(root: bytes, limits: XmlLimits) -> Rad69Root:
    """Index a RAD-69 root part (a SOAP envelope); ConsumerError for a fault."""
    envelope = parse_xml(root, limits)
    fault = read_fault(envelope)
    if fault is not None:
        raise ConsumerError(f"SOAP fault {fault.code}: {fault.reason}")
    names: dict[str, str] = {}
    for doc in envelope.iter(f"{{{XDSB}}}DocumentResponse"):
        include = doc.find(f"{{{XDSB}}}Document/{{{XOP}}}Include")
        uid = doc.findtext(f"{{{XDSB}}}DocumentUniqueId") or ""
        if include is not None:
            names[mtom.cid_from_href(include.get("href", ""))] = uid
    status = envelope.find(".//{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryResponse")
    return Rad69Root(names, parse_registry_errors(status) if status is not None else [])


async def retrieve_study(
    *,
    gateway: str,
    ca: Path,
    cert: Path,
    key: Path,
    patient_id: str,
    study_instance_uid: str | None,
    out_dir: Path,
    transfer_syntaxes: Sequence[str] = LOSSLESS_AS_STORED,
    progress: bool = False,
) -> list[RetrieveReport]:
    """The whole consumer flow; one report per manifest fetched. By default the instances
    are written as stored (native or lossless compressed), else converted to native."""
    # local: the CLI's HTTPS client (httpx, ~6 MB of RSS) loads only in the commands that call
    import httpx

    ctx = client_context(ca, cert, key)
    async with httpx.AsyncClient(verify=ctx, timeout=httpx.Timeout(300, connect=10)) as client:
        consumer = Consumer(client, gateway, progress=progress)
        manifests, _errors = await consumer.find_manifests(patient_id)
        if study_instance_uid is not None:
            manifests = [m for m in manifests if study_instance_uid in m.study_instance_uids]
        if not manifests:
            raise ConsumerError("no imaging manifest found for the patient (and study)")
        reports = []
        for manifest in manifests:
            kos = await consumer.fetch_manifest(manifest)
            request = imaging_request_from_kos(kos, manifest.home_community_id, transfer_syntaxes)
            study_dir = out_dir / (
                manifest.study_instance_uids[0]
                if manifest.study_instance_uids
                else manifest.document_unique_id
            )
            written, errors = await consumer.retrieve_instances(request, study_dir)
            reports.append(RetrieveReport(manifest, written, errors))
        return reports


# ----------------------------------------------------------------------------- CLI


def add_retrieve_study_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "retrieve-study",
        help="fetch a patient's study from any community through an initiating gateway",
        description="Find the patient's imaging manifests across communities (ITI-18), fetch "
        "the manifest (ITI-43) and then its instances (RAD-69), writing DICOM files to "
        "OUT/<StudyInstanceUID>/<SOPInstanceUID>.dcm. Give the gateway either with "
        "--gateway/--ca/--cert/--key or with --endpoints (a demo's endpoints.json) and "
        "--community.",
    )
    parser.add_argument("--patient", required=True, help="local patient id, ID^^^&OID&ISO")
    parser.add_argument("--study", help="Study Instance UID (default: every study found)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--gateway", help="initiating gateway base URL, e.g. https://host:8443")
    parser.add_argument("--ca", help="CA certificate (PEM) to trust")
    parser.add_argument("--cert", help="client certificate (PEM)")
    parser.add_argument("--key", help="client private key (PEM)")
    parser.add_argument("--endpoints", help="a demo's endpoints.json instead of the four above")
    parser.add_argument("--community", help="with --endpoints: the community to ask")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.set_defaults(func=_cmd_retrieve_study)


def _cmd_retrieve_study(args: argparse.Namespace) -> int:
    # local: the CLI's HTTPS client (httpx, ~6 MB of RSS) loads only in the commands that call
    import httpx

    try:
        if args.endpoints:
            endpoints = EndpointsFile.load(Path(args.endpoints))
            community = endpoints.community(args.community)
            gateway = community.base_url
            ca, cert, key = endpoints.ca, endpoints.client.cert, endpoints.client.key
        else:
            if not all((args.gateway, args.ca, args.cert, args.key)):
                print(
                    "xca-gateway: retrieve-study: give --gateway, --ca, --cert and --key, or "
                    "--endpoints FILE --community NAME",
                    file=sys.stderr,
                )
                return 2
            gateway = args.gateway.rstrip("/")
            ca, cert, key = Path(args.ca), Path(args.cert), Path(args.key)
        parse_patient_id(args.patient)
        check_key_pair(cert, key, what="client certificate")
        # Fail fast, before any file is written, when the gateway cannot be reached.
        check_reachable(gateway + "/ig/rad69", client_context(ca, cert, key))
    except (EndpointsError, CredentialError, ValueError) as exc:
        print(f"xca-gateway: retrieve-study: {exc}", file=sys.stderr)
        return 2
    except ExchangeError as exc:
        print(f"xca-gateway: retrieve-study: {exc}", file=sys.stderr)
        return 1
    try:
        reports = asyncio.run(
            retrieve_study(
                gateway=gateway,
                ca=ca,
                cert=cert,
                key=key,
                patient_id=args.patient,
                study_instance_uid=args.study,
                out_dir=Path(args.out),
                progress=not args.no_progress and sys.stderr.isatty(),
            )
        )
    except (ConsumerError, httpx.HTTPError, OSError, ValueError, mtom.MtomError) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"xca-gateway: retrieve-study failed: {reason}", file=sys.stderr)
        return 1
    failed = 0
    for report in reports:
        print(
            f"{report.manifest.home_community_id} study "
            f"{','.join(report.manifest.study_instance_uids)}: {len(report.written)} instance(s)"
        )
        for error in report.errors:
            failed += 1
            print(f"  {error.error_code}: {error.code_context}", file=sys.stderr)
    return 1 if failed else 0
