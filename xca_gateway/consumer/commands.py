"""``xca-gateway query`` and ``xca-gateway retrieve``: an XDS consumer for people (I/O edge).

``query`` sends a stored query (ITI-18 to a community's initiating gateway, or with
``--responding`` ITI-38 to its responding gateway, as a peer would) built by
:mod:`xca_gateway.consumer.xds_query` and prints the answer as a table or JSON. ``retrieve`` fetches
documents (ITI-43, or ITI-39 with ``--responding``) and writes them to files.

The target and the certificate come from a demo's ``endpoints.json`` (``--endpoints FILE
--community NAME``; ``--identity`` picks one of the community's ``identities``) or are given
one by one (``--gateway URL --ca --cert --key``). Calls to a responding gateway carry, when the
file describes the demo's identity provider (``xua``), a SAML assertion it signs (ITI-40), as
the calling community's initiating gateway would send.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lxml import etree

from xca_gateway.consumer import xds_query
from xca_gateway.consumer.endpoints_file import EndpointsError, EndpointsFile
from xca_gateway.protocol import mtom
from xca_gateway.protocol.credentials import CredentialError, check_key_pair
from xca_gateway.protocol.namespaces import SOAP12, Action
from xca_gateway.protocol.soap import build_envelope, element_content, read_fault, serialize
from xca_gateway.protocol.tls import client_context, describe_handshake_error
from xca_gateway.protocol.xmlsafe import XmlLimits, parse_xml
from xca_gateway.security.xua import Ce, XuaIdentity, issue_assertion, wsse_security_header
from xca_gateway.transactions.iti43 import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    build_retrieve_document_set_request,
    parse_retrieve_document_set_response,
)
from xca_gateway.xds.patient_id import PatientIdError

CONNECT_TIMEOUT = 10.0

# File name extensions of retrieved documents, by mimeType.
_EXTENSIONS = {
    "application/dicom": ".dcm",
    "application/pdf": ".pdf",
    "text/xml": ".xml",
    "application/xml": ".xml",
    "text/plain": ".txt",
    "application/json": ".json",
    "application/fhir+json": ".json",
    "image/jpeg": ".jpg",
    "image/png": ".png",
}


class OperatorError(Exception):
    """Something the person running the command can fix; printed as one line, exit 2."""


class ExchangeError(Exception):
    """The gateway could not be reached or did not answer usefully; exit 1."""


# ------------------------------------------------------------------------------ the target


@dataclass
class Target:
    """Where a request goes, as whom, and what the answer's ids mean."""

    url: str
    action: str
    ca: Path
    cert: Path
    key: Path
    who: str  # e.g. 'identity "localConsumer" of north'
    assigning_authority: str | None = None
    community_names: dict[str, str] = field(default_factory=dict)
    home_community_id: str | None = None  # the community asked
    endpoints: EndpointsFile | None = None
    extra_headers: list[etree._Element] = field(default_factory=list)


def _endpoint_key(kind: str, responding: bool) -> tuple[str, str, str]:
    """(endpoints.json key, wsa:Action, gateway path) of a query or a retrieve."""
    if kind == "query":
        return (
            ("iti38", Action.ITI38, "/xca/iti38")
            if responding
            else (
                "iti18",
                Action.ITI18,
                "/ig/iti18",
            )
        )
    return (
        ("iti39", Action.ITI39, "/xca/iti39")
        if responding
        else (
            "iti43",
            Action.ITI43,
            "/ig/iti43",
        )
    )


def resolve_target(args: argparse.Namespace, kind: str) -> Target:
    """The target of ``query``/``retrieve`` from ``--endpoints`` or ``--gateway`` options."""
    key, action, path = _endpoint_key(kind, args.responding)
    if args.endpoints:
        endpoints = EndpointsFile.load(Path(args.endpoints))
        community = endpoints.community(args.community)
        if key not in community.endpoints:
            raise OperatorError(
                f"{endpoints.path}: community {community.name!r} has no {key!r} endpoint"
            )
        if args.responding:
            # As a peer: another community's gateway calls this one's responding side.
            caller = (
                endpoints.community(args.as_community)
                if args.as_community
                else endpoints.other_community(community.name)
            )
            if caller.name == community.name:
                raise OperatorError("--as names the community being asked; name a peer")
            identity = endpoints.identity(caller, args.identity, default="gateway")
            who = f'identity "{identity.name}" of {caller.name}'
        else:
            caller = community
            identity = endpoints.identity(community, args.identity, default="localConsumer")
            who = f'identity "{identity.name}"' + (
                f" of {community.name}" if identity.name != "client" else ""
            )
        url = community.endpoints[key]
        target = Target(
            url=url,
            action=action,
            ca=endpoints.ca,
            cert=identity.cert,
            key=identity.key,
            who=who,
            assigning_authority=community.assigning_authority,
            community_names=endpoints.community_names_by_home(),
            home_community_id=community.home_community_id,
            endpoints=endpoints,
        )
        if args.responding and "xua" in endpoints.data:
            target.extra_headers.append(_xua_header(endpoints, caller, url))
        return target
    missing = [
        option
        for option, value in (
            ("--gateway", args.gateway),
            ("--ca", args.ca),
            ("--cert", args.cert),
            ("--key", args.key),
        )
        if not value
    ]
    if missing:
        raise OperatorError(
            "give --endpoints FILE --community NAME, or --gateway, --ca, --cert and --key "
            f"(missing: {', '.join(missing)})"
        )
    if args.identity or args.as_community:
        raise OperatorError("--identity and --as choose from --endpoints; not with --gateway")
    return Target(
        url=args.gateway.rstrip("/") + path,
        action=action,
        ca=Path(args.ca),
        cert=Path(args.cert),
        key=Path(args.key),
        who=f"certificate {args.cert}",
        assigning_authority=args.assigning_authority,
        home_community_id=args.home_community_id,
    )


def _xua_header(endpoints: EndpointsFile, caller: Any, audience: str) -> etree._Element:
    """A WS-Security header with an assertion from the demo's identity provider for a user of
    the calling community (the attributes endpoints.json names)."""

    xua = endpoints.data["xua"]
    attributes = xua.get("attributes") or {}

    def ce(value: Any) -> tuple[Ce, ...]:
        if not isinstance(value, dict) or "code" not in value:
            return ()
        return (Ce(value["code"], value.get("code_system"), value.get("display_name")),)

    identity = XuaIdentity(
        name_id=f"{caller.name}-operator",
        subject_id=f"{caller.name} operator (xca-gateway query)",
        organization=f"Community {caller.name}",
        organization_id=caller.home_community_id,
        home_community_id=caller.home_community_id,
        roles=ce(attributes.get("urn:oasis:names:tc:xacml:2.0:subject:role")),
        purposes_of_use=ce(attributes.get("urn:oasis:names:tc:xspa:1.0:subject:purposeofuse")),
    )
    try:
        key_pem = Path(xua["key"]).read_bytes()
        cert_pem = Path(xua["certificate"]).read_bytes()
    except (KeyError, OSError) as exc:
        raise OperatorError(f"{endpoints.path}: xua signing pair not usable: {exc}") from None
    assertion = issue_assertion(
        identity, issuer=xua["issuer"], audience=audience, key_pem=key_pem, cert_pem=cert_pem
    )
    return wsse_security_header(assertion)


# ------------------------------------------------------------------------------ exchanges


def tls_context(target: Target) -> ssl.SSLContext:
    """The client context, after checking the files the way an operator needs to hear it."""
    check_key_pair(target.cert, target.key, what="client certificate")
    return client_context(target.ca, target.cert, target.key)


def check_reachable(url: str, ctx: ssl.SSLContext, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast, in one line, when the gateway cannot be reached or its TLS handshake fails,
    before a long exchange starts (a retrieve writes files as they arrive)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            pass
    except (OSError, ssl.SSLError) as exc:
        raise ExchangeError(f"{url}: {describe_connection_error(exc, host, port)}") from None


def describe_connection_error(exc: BaseException, host: str, port: int) -> str:
    """One line for why a connection failed: refused, timed out, TLS (whose certificate)."""
    # local: the CLI's HTTPS client (httpx, ~6 MB of RSS) loads only in the commands that call
    import httpx

    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"the server's certificate is not trusted: {error.verify_message}"
        if isinstance(error, ssl.SSLError):
            reason = error.reason or str(error)
            if "ALERT" in reason or "CERTIFICATE_REQUIRED" in reason:
                return (
                    "the gateway refused our client certificate in the TLS handshake "
                    f"({reason.lower().replace('_', ' ')})"
                )

            return f"TLS handshake failed: {describe_handshake_error(error)[0]}"
        if isinstance(error, ConnectionRefusedError):
            return f"connection refused: nothing listens on {host}:{port} (is the gateway up?)"
        if isinstance(error, socket.gaierror):
            return f"unknown host {host!r} ({error.strerror})"
        if isinstance(error, TimeoutError | httpx.TimeoutException):
            return f"no answer from {host}:{port} in time"
    for error in chain:
        if isinstance(error, ConnectionResetError | BrokenPipeError):
            return "the gateway closed the connection (it may have refused our certificate)"
        if isinstance(error, OSError) and error.strerror:
            return f"cannot connect to {host}:{port}: {error.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _pretty(data: bytes) -> str:
    try:
        root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
        return etree.tostring(root, pretty_print=True, encoding="unicode")
    except etree.XMLSyntaxError:
        return data.decode("utf-8", "replace")


def request_envelope(
    target: Target | None, payload: etree._Element, *, action: str | None = None
) -> bytes:
    """The SOAP 1.2 request: WS-Addressing headers (and the XUA header of ``target``)."""
    return serialize(
        build_envelope(
            payload,
            action=action or (target.action if target else ""),
            reply_to_anonymous=True,
            to=target.url if target else None,
            extra_headers=[*target.extra_headers] if target else [],
        )
    )


@dataclass
class Exchange:
    status: int
    payload: etree._Element
    message: mtom.MtomMessage | None


def soap_exchange(
    target: Target,
    payload: etree._Element,
    *,
    raw: bool,
    timeout: float,
    out: Any = None,
) -> Exchange:
    """POST one SOAP 1.2 request; the response's body payload (MTOM read, attachments kept)."""
    # local: the CLI's HTTPS client (httpx, ~6 MB of RSS) loads only in the commands that call
    import httpx

    out = out or sys.stderr
    envelope = request_envelope(target, payload)
    if raw:
        print(f"--- request: POST {target.url} as {target.who}", file=out)
        print(_pretty(envelope), file=out)
    ctx = tls_context(target)
    check_reachable(target.url, ctx, min(timeout, CONNECT_TIMEOUT))
    content_type = f'application/soap+xml; charset=UTF-8; action="{target.action}"'
    try:
        with (
            httpx.Client(verify=ctx, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)) as c,
            c.stream(
                "POST", target.url, content=envelope, headers={"content-type": content_type}
            ) as response,
        ):
            answer_type = response.headers.get("content-type", "")
            message = None
            if mtom.is_mtom(answer_type):
                reader = mtom.MtomRequestReader(
                    answer_type,
                    max_root_bytes=XmlLimits().max_bytes,
                    max_part_bytes=1 << 40,
                    max_total_bytes=1 << 40,
                    max_parts=100_000,
                )
                for chunk in response.iter_raw(1 << 20):
                    reader.feed(chunk)
                message = reader.close()
                root = message.root
            else:
                root = response.read()
            status = response.status_code
    except httpx.HTTPError as exc:
        parts = urlsplit(target.url)
        reason = describe_connection_error(exc, parts.hostname or "", parts.port or 443)
        raise ExchangeError(f"{target.url}: {reason}") from None
    except mtom.MtomError as exc:
        raise ExchangeError(f"{target.url}: malformed MTOM answer: {exc}") from None
    if raw:
        print(f"--- response: HTTP {status} ({answer_type})", file=out)
        print(_pretty(root), file=out)
        if message is not None and message.attachments:
            print(f"--- {len(message.attachments)} MIME attachment(s) not shown", file=out)
    if not root.strip():
        raise ExchangeError(f"{target.url}: HTTP {status} with an empty body")
    try:
        envelope_element = parse_xml(root, XmlLimits())
    except Exception as exc:
        raise ExchangeError(f"{target.url}: HTTP {status}, not a SOAP answer: {exc}") from None
    fault = read_fault(envelope_element)
    if fault is not None:
        hint = " (see --identity)" if status == 403 else ""
        raise ExchangeError(
            f"{target.url}: HTTP {status} SOAP fault {fault.code}: {fault.reason}{hint}"
        )
    body = envelope_element.find(f"{{{SOAP12}}}Body")
    if body is None or len(body) == 0:
        raise ExchangeError(f"{target.url}: HTTP {status}, a SOAP envelope without a body")
    return Exchange(status, body[0], message)


# ------------------------------------------------------------------------------ query


def _query_options(args: argparse.Namespace, target: Target) -> xds_query.QueryOptions:
    patient = (
        xds_query.complete_patient_id(args.patient, target.assigning_authority)
        if args.patient
        else None
    )
    home = args.home
    if home and target.endpoints is not None:
        home = target.endpoints.home_community_id(home)
    spec = xds_query.query_spec(args.query)
    if home is None and spec.patient_param is None and not args.responding:
        # An id-based query through an initiating gateway names the community that holds
        # the objects (XDSMissingHomeCommunityId otherwise); default: the one asked.
        home = target.home_community_id
    return xds_query.QueryOptions(
        query=args.query,
        patient=patient,
        class_codes=tuple(args.class_code),
        type_codes=tuple(args.type_code),
        format_codes=tuple(args.format_code),
        modalities=tuple(args.modality),
        date_from=args.date_from,
        date_to=args.date_to,
        statuses=tuple(args.status or ["approved"]),
        uuids=tuple(args.uuid),
        unique_ids=tuple(args.unique_id),
        study_instance_uids=tuple(args.study),
        association_types=tuple(args.association_type),
        home=home,
        object_ref=args.object_ref,
    )


def run_query(args: argparse.Namespace) -> int:
    target = resolve_target(args, "query")
    options = _query_options(args, target)
    request = xds_query.build_query_request(options)
    if args.dry_run:
        sys.stdout.write(_pretty(request_envelope(target, request)))
        return 0
    exchange = soap_exchange(target, request, raw=args.raw, timeout=args.timeout)
    try:
        answer = xds_query.rows_from_response(exchange.payload)
    except ValueError as exc:
        raise ExchangeError(f"{target.url}: {exc}") from None
    # Most recent first, as a clinician reads a history (the fan-out answers in any order).
    answer.rows.sort(key=lambda row: row.date, reverse=True)
    names = target.community_names
    if args.json:
        print(json.dumps(xds_query.rows_json(answer, names), indent=2))
    else:
        if answer.rows:
            sys.stdout.write(xds_query.format_table(answer.rows, names))
        print(f"{len(answer.rows)} object(s), status {answer.status}")
    for error in answer.errors:
        where = names.get(error.location or "", error.location or "")
        severity = error.severity.rsplit(":", 1)[-1]
        print(
            f"  {severity} {error.error_code}"
            + (f" ({where})" if where else "")
            + f": {error.code_context}",
            file=sys.stderr,
        )
    return 1 if any(e.is_error for e in answer.errors) else 0


# ------------------------------------------------------------------------------ retrieve


def _document_requests(args: argparse.Namespace, target: Target) -> list[DocumentRequest]:
    """The DocumentRequests: ids as given, or looked up by a FindDocuments for --patient."""
    home = args.home
    if home and target.endpoints is not None:
        home = target.endpoints.home_community_id(home)
    if args.repository and (home or args.responding):
        return [
            DocumentRequest(args.repository, uid, home or target.home_community_id)
            for uid in args.document
        ]
    if not args.patient:
        raise OperatorError(
            "give --repository and --home of the documents, or --patient to look them up"
        )
    if args.dry_run:
        raise OperatorError("--dry-run sends nothing: give --repository and --home")
    query_args = argparse.Namespace(**vars(args))
    query_args.raw = False
    query_target = resolve_target(query_args, "query")
    options = xds_query.QueryOptions(
        query="FindDocuments",
        patient=xds_query.complete_patient_id(args.patient, query_target.assigning_authority),
        statuses=("approved", "deprecated"),
    )
    exchange = soap_exchange(
        query_target, xds_query.build_query_request(options), raw=False, timeout=args.timeout
    )
    answer = xds_query.rows_from_response(exchange.payload)
    found = {row.unique_id: row for row in answer.rows if row.kind == "DocumentEntry"}
    requests = []
    for uid in args.document:
        row = found.get(uid)
        if row is None:
            raise OperatorError(
                f"document {uid} is not among the {len(found)} document(s) of patient "
                f"{options.patient} (query answered {answer.status})"
            )
        requests.append(
            DocumentRequest(
                args.repository or row.repository_unique_id,
                uid,
                home or row.community or target.home_community_id,
            )
        )
    return requests


def _chunks(content: Any) -> Iterator[bytes]:
    """An inline document's bytes, or an attachment's in chunks (it may be spooled to disk)."""
    if isinstance(content, bytes):
        yield content
    elif isinstance(content, mtom.Attachment):
        yield from content.iter_chunks()
    else:
        yield content.read_all()


def run_retrieve(args: argparse.Namespace) -> int:
    target = resolve_target(args, "retrieve")
    requests = _document_requests(args, target)
    payload = build_retrieve_document_set_request(RetrieveDocumentSetRequest(tuple(requests)))
    if args.dry_run:
        sys.stdout.write(_pretty(request_envelope(target, payload)))
        return 0
    exchange = soap_exchange(target, payload, raw=args.raw, timeout=args.timeout)
    try:
        response = parse_retrieve_document_set_response(exchange.payload)
    except ValueError as exc:
        raise ExchangeError(f"{target.url}: {exc}") from None
    names = target.community_names
    to_stdout = args.out == "-"
    if to_stdout and len(response.documents) > 1:
        raise OperatorError("--out - writes one document; name a directory for several")
    out_dir = Path(args.out or ".")
    attachments = exchange.message.attachments if exchange.message else {}
    try:
        for doc in response.documents:
            if doc.document is None:
                continue
            content = element_content(doc.document, attachments)
            community = names.get(doc.home_community_id or "", doc.home_community_id or "")
            if to_stdout:
                for chunk in _chunks(content):
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                print(f"{community} {doc.document_unique_id} {doc.mime_type}", file=sys.stderr)
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / (doc.document_unique_id + _EXTENSIONS.get(doc.mime_type, ".bin"))
            size = 0
            with path.open("wb") as fh:
                for chunk in _chunks(content):
                    fh.write(chunk)
                    size += len(chunk)
            print(
                f"{community}  {doc.document_unique_id}  {doc.mime_type}  "
                f"{xds_query.readable_size(size)}  -> {path}"
            )
    finally:
        if exchange.message is not None:
            exchange.message.close()
    for error in response.errors:
        where = names.get(error.location or "", error.location or "")
        print(
            f"  {error.error_code}" + (f" ({where})" if where else "") + f": {error.code_context}",
            file=sys.stderr,
        )
    status = response.status.rsplit(":", 1)[-1]
    print(f"{len(response.documents)} document(s), status {status}", file=sys.stderr)
    return 1 if any(e.is_error for e in response.errors) or not response.documents else 0


# ------------------------------------------------------------------------------ CLI


def _add_target_options(parser: argparse.ArgumentParser, kind: str) -> None:
    side = parser.add_argument_group("where to send it, and as whom")
    side.add_argument(
        "--endpoints", metavar="FILE", help="a demo's endpoints.json (docs/contract.md)"
    )
    side.add_argument(
        "--community",
        metavar="NAME",
        help="with --endpoints: the community to ask (default: the first one)",
    )
    side.add_argument(
        "--identity",
        metavar="NAME",
        help="with --endpoints: the certificate to call with, one of the community's "
        "identities (localConsumer, localRepository, gateway) or client; default "
        "localConsumer, or with --responding the calling community's gateway; files without "
        "identities use client",
    )
    side.add_argument(
        "--responding",
        action="store_true",
        help=(
            "ask the community's responding gateway (ITI-38) as a peer would, not its "
            "initiating gateway (ITI-18)"
            if kind == "query"
            else "retrieve from the community's responding gateway (ITI-39) as a peer would, "
            "not through its initiating gateway (ITI-43)"
        ),
    )
    side.add_argument(
        "--as",
        dest="as_community",
        metavar="NAME",
        help="with --responding: the calling community (default: the first other one)",
    )
    side.add_argument("--gateway", metavar="URL", help="gateway base URL, https://host:port")
    side.add_argument("--ca", metavar="FILE", help="with --gateway: CA certificate(s) to trust")
    side.add_argument("--cert", metavar="FILE", help="with --gateway: client certificate (PEM)")
    side.add_argument("--key", metavar="FILE", help="with --gateway: its private key (PEM)")
    side.add_argument(
        "--assigning-authority",
        metavar="OID",
        help="with --gateway: the patient id domain that completes a bare --patient",
    )
    side.add_argument(
        "--home-community-id", metavar="URN", help="with --gateway: the community asked"
    )
    parser.add_argument(
        "--raw", action="store_true", help="print the SOAP request and response on stderr"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the SOAP request on stdout and send nothing (a body for curl)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds for the whole exchange (120)"
    )


def add_consumer_commands(subparsers: Any) -> None:
    query = subparsers.add_parser(
        "query",
        help="find documents, submission sets, folders (ITI-18 / ITI-38) and print them",
        description="Send a registry stored query through a community's initiating gateway "
        "(ITI-18, fanned out to every peer) or, with --responding, to its responding gateway "
        "(ITI-38) as a peer would, and print what it finds: a table (community, title, type, "
        "date, size, Study Instance UID of imaging manifests) or --json. Exit status 1 when "
        "the answer carries errors (e.g. a community that did not answer).",
        epilog="Queries: " + ", ".join(xds_query.QUERY_NAMES) + ". Examples: "
        "xca-gateway query --endpoints /tmp/xca/endpoints.json --community north --patient "
        "C01-1001 --format kos; ... query GetDocuments --unique-id 1.2.3 --home south",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    query.add_argument(
        "query",
        nargs="?",
        default="FindDocuments",
        metavar="QUERY",
        help="stored query name (default FindDocuments), e.g. FindSubmissionSets, GetAll, "
        "GetDocuments, GetRelatedDocuments",
    )
    what = query.add_argument_group("what to find")
    what.add_argument(
        "--patient",
        metavar="ID",
        help="patient id: ID^^^&OID&ISO, or a bare ID in the asked community's domain",
    )
    what.add_argument(
        "--class",
        dest="class_code",
        action="append",
        default=[],
        metavar="CODE",
        help="classCode, code^^scheme or a LOINC code (repeatable: any of)",
    )
    what.add_argument(
        "--type",
        dest="type_code",
        action="append",
        default=[],
        metavar="CODE",
        help="typeCode, code^^scheme or a LOINC code (repeatable)",
    )
    what.add_argument(
        "--format",
        dest="format_code",
        action="append",
        default=[],
        metavar="CODE",
        help="formatCode: kos (imaging manifests), pdf, text, a DICOM SOP class UID or "
        "code^^scheme (repeatable)",
    )
    what.add_argument(
        "--modality",
        action="append",
        default=[],
        metavar="MOD",
        help="imaging manifests whose eventCodeList has this DICOM modality, e.g. CT (repeatable)",
    )
    what.add_argument(
        "--from",
        dest="date_from",
        metavar="DATE",
        help="earliest date, YYYY[-MM[-DD]]: service start (documents), submission time "
        "(submission sets), last update (folders)",
    )
    what.add_argument(
        "--to", dest="date_to", metavar="DATE", help="latest date, inclusive (same fields)"
    )
    what.add_argument(
        "--status",
        action="append",
        metavar="STATUS",
        help="approved (default), deprecated or all (repeatable)",
    )
    what.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="UID",
        help="imaging manifests of this Study Instance UID (FindDocumentsByReferenceId)",
    )
    what.add_argument(
        "--uuid",
        action="append",
        default=[],
        metavar="UUID",
        help="entryUUID for Get* queries (repeatable)",
    )
    what.add_argument(
        "--unique-id",
        action="append",
        default=[],
        metavar="ID",
        help="uniqueId for Get* queries (repeatable)",
    )
    what.add_argument(
        "--association-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="GetRelatedDocuments: RPLC, XFRM, APND, XFRM_RPLC, signs (default: all)",
    )
    what.add_argument(
        "--home",
        metavar="COMMUNITY",
        help="homeCommunityId (or a community name from --endpoints) of the community that "
        "holds the objects; needed by Get* queries (default: the community asked)",
    )
    what.add_argument(
        "--object-ref", action="store_true", help="ask for ObjectRefs instead of full metadata"
    )
    query.add_argument("--json", action="store_true", help="print the answer as JSON")
    _add_target_options(query, "query")
    query.set_defaults(func=_cmd(run_query, "query"))

    retrieve = subparsers.add_parser(
        "retrieve",
        help="fetch documents (ITI-43 / ITI-39) and write them to files",
        description="Retrieve documents by uniqueId through a community's initiating gateway "
        "(ITI-43, routed to the community that holds them) or, with --responding, from its "
        "responding gateway (ITI-39) as a peer would. Give each document's --repository and "
        "--home, or --patient to look them up with FindDocuments. Files are written to "
        "--out DIR as <uniqueId>.<ext> (--out - writes one document to stdout). For imaging "
        "studies see retrieve-study.",
    )
    retrieve.add_argument(
        "--document",
        action="append",
        required=True,
        metavar="UID",
        help="DocumentEntry uniqueId (repeatable)",
    )
    retrieve.add_argument("--repository", metavar="OID", help="repositoryUniqueId")
    retrieve.add_argument(
        "--home", metavar="COMMUNITY", help="homeCommunityId or community name of the documents"
    )
    retrieve.add_argument(
        "--patient", metavar="ID", help="look --repository and --home up by this patient's id"
    )
    retrieve.add_argument("--out", metavar="DIR", default=".", help="output directory (.)")
    _add_target_options(retrieve, "retrieve")
    retrieve.set_defaults(func=_cmd(run_retrieve, "retrieve"))


def _cmd(run: Any, name: str) -> Any:
    def command(args: argparse.Namespace) -> int:
        try:
            result: int = run(args)
            return result
        except (
            OperatorError,
            EndpointsError,
            CredentialError,
            xds_query.QueryOptionError,
            PatientIdError,
        ) as exc:
            print(f"xca-gateway {name}: {exc}", file=sys.stderr)
            return 2
        except ExchangeError as exc:
            print(f"xca-gateway {name}: {exc}", file=sys.stderr)
            return 1

    return command
