"""The hostile-input and TLS cases, each with the outcome the standards require.

A case sends something to a real demo gateway and describes what came back as a short string
(``"400 Sender"``, ``"413 Sender"``, ``"400 Sender ActionNotSupported"``, ``"refused"``, ...);
it passes when that string equals the expected one. Describing before comparing keeps the
report readable when a case fails: it shows what the gateway did instead.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from lxml import etree

from reliability.certs import not_yet_valid_client, server_only_client
from xca_gateway.protocol.namespaces import QUERY, RIM, RS, SOAP11, SOAP12, WSA, XDSB, Action
from xca_gateway.protocol.tls import client_context

IO_TIMEOUT = 30.0
# Longer than the demo's handler_timeout (300 s), the outer bound of any request.
SLOW_BODY_BOUND = 360.0


@dataclass(frozen=True)
class Target:
    """What a case needs from the running demo (endpoints.json and its work directory)."""

    endpoints: dict[str, Any]
    workdir: Path

    def community(self, index: int = 0) -> dict[str, Any]:
        community: dict[str, Any] = self.endpoints["communities"][index]
        return community

    def url(self, key: str, index: int = 0) -> str:
        return str(self.community(index)["endpoints"][key])

    def pair(self, who: str) -> tuple[Path, Path]:
        return Path(self.endpoints[who]["cert"]), Path(self.endpoints[who]["key"])

    @property
    def ca(self) -> Path:
        return Path(self.endpoints["ca"])

    def audit_consumer_context(self) -> ssl.SSLContext:
        """The identity that may search the audit trail (ITI-81): only the auditConsumer."""
        pair = self.endpoints["auditRepository"]["auditConsumer"]
        return client_context(self.ca, Path(pair["cert"]), Path(pair["key"]))

    def context(self, who: str | None = "client") -> ssl.SSLContext:
        if who is None:
            return client_context(self.ca)
        cert, key = self.pair(who)
        return client_context(self.ca, cert, key)

    def host_port(self, index: int = 0) -> tuple[str, int]:
        authority = self.url("iti38", index).split("//", 1)[1].split("/", 1)[0]
        host, port = authority.rsplit(":", 1)
        return host, int(port)


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    expected: str
    run: Callable[[Target], str]


@dataclass(frozen=True)
class CaseResult:
    case: Case
    observed: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.observed in self.case.expected.split(" or ")


# ----------------------------------------------------------------------------- message helpers


def envelope(
    body: str, action: str | None = Action.ITI18, extra_headers: str = "", ns: str = SOAP12
) -> bytes:
    action_header = f'<a:Action s:mustUnderstand="1">{action}</a:Action>' if action else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{ns}" xmlns:a="{WSA}">'
        f"<s:Header>{action_header}<a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>"
        f"<a:ReplyTo><a:Address>{WSA}/anonymous</a:Address></a:ReplyTo>{extra_headers}"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def adhoc_query(patient: str = "C01-1001^^^&amp;1.3.6.1.4.1.21367.13.20.1000&amp;ISO") -> str:
    return (
        f'<query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">'
        '<query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>'
        '<rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d">'
        '<rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>'
        f"<rim:Value>'{patient}'</rim:Value></rim:ValueList></rim:Slot>"
        '<rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList><rim:Value>'
        "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value></rim:ValueList>"
        "</rim:Slot></rim:AdhocQuery></query:AdhocQueryRequest>"
    )


def describe(response: httpx.Response) -> str:
    """``"<status> <fault code> <subcodes...>"`` (local names), or ``"<status> <root>"``."""
    try:
        root = etree.fromstring(response.content)
    except etree.XMLSyntaxError:
        return f"{response.status_code} non-XML"
    for ns in (SOAP12, SOAP11):
        fault = root.find(f"{{{ns}}}Body/{{{ns}}}Fault")
        if fault is None:
            continue
        if ns == SOAP11:
            code = fault.findtext("faultcode") or ""
            return f"{response.status_code} soap11:{code.rsplit(':', 1)[-1]}"
        code = fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value") or ""
        subs = [
            (v.text or "").rsplit(":", 1)[-1]
            for v in fault.iterfind(f".//{{{SOAP12}}}Subcode/{{{SOAP12}}}Value")
        ]
        return " ".join([str(response.status_code), code.rsplit(":", 1)[-1], *subs])
    body = root.find(f"{{{SOAP12}}}Body")
    name = etree.QName(body[0]).localname if body is not None and len(body) else "?"
    return f"{response.status_code} {name}"


def post(
    target: Target,
    key: str,
    body: bytes,
    content_type: str = "application/soap+xml; charset=UTF-8",
) -> str:
    with httpx.Client(verify=target.context(), timeout=IO_TIMEOUT) as client:
        response = client.post(
            target.url(key), content=body, headers={"content-type": content_type}
        )
    return describe(response)


def xml_case(name: str, body: bytes, expected: str, key: str = "iti18") -> Case:
    return Case("hostile XML/SOAP", name, expected, lambda t: post(t, key, body))


def mtom_post(target: Target, body: bytes, content_type: str) -> str:
    return post(target, "iti18", body, content_type)


# ----------------------------------------------------------------------------- hostile XML/SOAP

_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "lol">'
    + b"".join(
        b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">' % ((98 + i,) + (97 + i,) * 8)
        for i in range(9)
    )
    + b"]><l>&j;</l>"
)
_QUADRATIC = (
    b'<?xml version="1.0"?><!DOCTYPE q [<!ENTITY x "'
    + b"x" * 50_000
    + b'">]><q>'
    + b"&x;" * 5_000
    + b"</q>"
)


def _oversize(target: Target) -> str:
    """Announce 2 GiB (over the 1 GiB default) and send little: answered from the headers."""
    host, port = target.host_port()
    raw = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    with raw, target.context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml; charset=UTF-8\r\n"
            b"Content-Length: 2147483648\r\n\r\n" + b"<" * 4096
        )
        response = b""
        for _ in range(1000):  # bounded: the answer is small
            chunk = tls.recv(65536)
            if not chunk:
                break
            response += chunk
            if response.rstrip().endswith(b"Envelope>"):
                break
    head = response.split(b"\r\n", 1)[0].decode(errors="replace")
    status = head.split(" ")[1] if head.startswith("HTTP/1.1 ") else "?"
    return f"{status} Sender" if b"Sender" in response else f"{status} ?"


def hostile_xml_cases() -> list[Case]:
    query = adhoc_query()
    return [
        xml_case(
            "XXE file entity",
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            + envelope("<r>&x;</r>"),
            "400 Sender",
        ),
        xml_case(
            "XXE network entity",
            b'<!DOCTYPE r [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]><r>&x;</r>',
            "400 Sender",
        ),
        xml_case("billion laughs", _LAUGHS, "400 Sender"),
        xml_case("quadratic blowup", _QUADRATIC, "400 Sender"),
        xml_case("deeply nested elements", envelope("<a>" * 5000 + "</a>" * 5000), "400 Sender"),
        xml_case(
            "huge attribute value",
            envelope(f'<a v="{"x" * 200_000}"/>'),
            "400 Sender",
        ),
        Case("hostile XML/SOAP", "oversize body (Content-Length)", "413 Sender", _oversize),
        xml_case(
            "invalid UTF-8", envelope(query).replace(b"Approved", b"Appr\xff\xfeved"), "400 Sender"
        ),
        xml_case("SOAP 1.1 envelope", envelope(query, ns=SOAP11), "500 soap11:VersionMismatch"),
        xml_case("non-SOAP XML body", b"<hello/>", "500 VersionMismatch"),
        xml_case(
            "wrong wsa:Action",
            envelope(query, action="urn:evil:Action"),
            "400 Sender ActionNotSupported",
        ),
        xml_case(
            "action of another transaction",
            envelope(query, action=Action.RAD75),
            "400 Sender ActionNotSupported",
        ),
        xml_case(
            "missing wsa:Action",
            envelope(query, action=None),
            "400 Sender MessageAddressingHeaderRequired",
        ),
        xml_case(
            "duplicated wsa:Action",
            envelope(query, extra_headers=f"<a:Action>{Action.ITI18}</a:Action>"),
            "400 Sender InvalidAddressingHeader",
        ),
    ]


# ----------------------------------------------------------------------------- hostile MTOM

_B = "rel-boundary"
_CT = (
    f'multipart/related; boundary="{_B}"; type="application/xop+xml"; start="<root@rel>"; '
    f'start-info="application/soap+xml"; action="{Action.ITI18}"'
)


def _part(cid: str, content_type: str, data: bytes) -> bytes:
    return (
        f"--{_B}\r\nContent-Type: {content_type}\r\nContent-ID: <{cid}>\r\n\r\n".encode()
        + data
        + b"\r\n"
    )


def _root_part(body: str) -> bytes:
    return _part(
        "root@rel",
        'application/xop+xml; charset=UTF-8; type="application/soap+xml"',
        envelope(body),
    )


def _xop_body(cid: str) -> str:
    return (
        f'<x:RetrieveDocumentSetRequest xmlns:x="{XDSB}"><x:Document>'
        f'<xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" href="cid:{cid}"/>'
        "</x:Document></x:RetrieveDocumentSetRequest>"
    )


def hostile_mtom_cases() -> list[Case]:
    query = adhoc_query()
    end = f"--{_B}--\r\n".encode()
    many = (
        _root_part(query)
        + b"".join(_part(f"p{i}@rel", "application/octet-stream", b"x") for i in range(10_000))
        + end
    )
    big_declared = _root_part(query) + (
        f"--{_B}\r\nContent-Type: application/octet-stream\r\nContent-ID: <a@rel>\r\n"
        "Content-Length: 10\r\n\r\n".encode()
        + b"y" * 100_000
        + b"\r\n"
        + end
    )

    def mtom(name: str, body: bytes, expected: str, ct: str = _CT) -> Case:
        return Case("hostile MTOM", name, expected, lambda t: mtom_post(t, body, ct))

    return [
        mtom(
            "missing boundary",
            _root_part(query) + end,
            "400 Sender",
            ct=_CT.replace(f'boundary="{_B}"; ', ""),
        ),
        mtom(
            "wrong start cid",
            _root_part(query) + end,
            "400 Sender",
            ct=_CT.replace("<root@rel>", "<other@rel>"),
        ),
        mtom("unterminated part", _root_part(query)[:-40], "400 Sender or 413 Sender"),
        mtom("10,000 parts", many, "413 Sender"),
        # A MIME part's own Content-Length does not frame it (the delimiter does, RFC 2046), so
        # the part is read to its delimiter within the limits and the query is answered.
        mtom("part bigger than its declared size", big_declared, "200 AdhocQueryResponse"),
        mtom(
            "xop:Include to a missing part", _root_part(_xop_body("gone@rel")) + end, "400 Sender"
        ),
    ]


# ----------------------------------------------------------------------------- TLS


def handshake(target: Target, ctx: ssl.SSLContext) -> str:
    host, port = target.host_port()
    try:
        with (
            socket.create_connection((host, port), timeout=IO_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # TLS 1.3: a refused client certificate surfaces on the first read, not the handshake.
            tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = tls.recv(1024)
            return "accepted" if data.startswith(b"HTTP/1.1") else "refused"
    except (ssl.SSLError, ConnectionError, OSError):
        return "refused"


def _ctx_with(target: Target, pair: tuple[Path, Path]) -> ssl.SSLContext:
    return client_context(target.ca, pair[0], pair[1])


def _legacy(target: Target, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(target.ca))
    cert, key = target.pair("client")
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # offering the deprecated versions is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


def _weak_ciphers(target: Target) -> ssl.SSLContext:
    ctx = _legacy(target, ssl.TLSVersion.TLSv1_2)
    # Only CBC-SHA1 / RSA key exchange / 3DES suites: no forward secrecy, no AEAD.
    ctx.set_ciphers("AES128-SHA:DES-CBC3-SHA:RC4-SHA:NULL-SHA:@SECLEVEL=0")
    return ctx


def _strong_tls12(target: Target) -> ssl.SSLContext:
    ctx = _legacy(target, ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE+AESGCM")
    return ctx


def _renegotiation(target: Target) -> str:
    """Client-initiated TLS 1.2 renegotiation (a CPU-exhaustion lever): Python's ssl cannot
    start one, so ``openssl s_client`` does, with its ``R`` command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return "openssl not installed"
    host, port = target.host_port()
    cert, key = target.pair("client")
    result = subprocess.run(
        [
            openssl,
            "s_client",
            "-connect",
            f"{host}:{port}",
            "-tls1_2",
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-CAfile",
            str(target.ca),
            "-servername",
            "localhost",
        ],
        input=b"R\n",
        capture_output=True,
        timeout=IO_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    if b"Verification: OK" not in output:
        return "no TLS 1.2 session"
    if b"no renegotiation" in output:
        return "refused"
    return "renegotiated" if b"RENEGOTIATING" in output else "not attempted"


def _slow_handshake(target: Target) -> str:
    """Slowloris on the handshake: the first bytes of a ClientHello, then silence; the server
    must hang up by itself (tls.handshake_timeout) before our own bound."""
    host, port = target.host_port()
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as raw:
        raw.sendall(b"\x16\x03\x01")
        try:
            data = raw.recv(10)
        except TimeoutError:
            return "still open"
        except ConnectionError:
            return "closed by server"
    return "closed by server" if data == b"" else "answered"


def _slow_body(target: Target) -> str:
    """Slowloris on the body: headers announce 1000 bytes, then one byte every 5 s. The server
    must end the request by itself: server.body_timeout bounds each read, the handler
    timeout (server.handler_timeout, 300 s by default) the whole request."""
    host, port = target.host_port()
    raw = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    deadline = time.monotonic() + SLOW_BODY_BOUND
    with raw, target.context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\nContent-Length: 1000\r\n\r\n<"
        )
        tls.settimeout(5)
        while time.monotonic() < deadline:
            try:
                data = tls.recv(4096)
            except TimeoutError:
                try:
                    tls.sendall(b" ")
                except OSError:
                    return "closed by server"
                continue
            except OSError:
                return "closed by server"
            # An answer (the gateway sends "503 handler timed out") or EOF: the server ended it.
            return "closed by server" if not data or data.startswith(b"HTTP/1.1 ") else "?"
    return "still open"


def tls_cases(workdir: Path) -> list[Case]:
    extra = workdir / "reliability-certs"

    def nyv(t: Target) -> str:
        return handshake(
            t, _ctx_with(t, not_yet_valid_client(t.ca, t.ca.with_name("ca.key"), extra))
        )

    def server_only(t: Target) -> str:
        return handshake(t, _ctx_with(t, server_only_client(t.ca, t.ca.with_name("ca.key"), extra)))

    def tls(name: str, expected: str, run: Callable[[Target], str]) -> Case:
        return Case("TLS", name, expected, run)

    cases = [
        tls(
            "trusted client certificate (control)", "accepted", lambda t: handshake(t, t.context())
        ),
        tls("no client certificate", "refused", lambda t: handshake(t, t.context(None))),
        tls(
            "expired client certificate",
            "refused",
            lambda t: handshake(t, t.context("expired_client")),
        ),
        tls("not-yet-valid client certificate", "refused", nyv),
        tls(
            "client certificate from another CA",
            "refused",
            lambda t: handshake(t, t.context("untrusted_client")),
        ),
        tls("certificate without clientAuth key usage", "refused", server_only),
        tls("TLS 1.0", "refused", lambda t: handshake(t, _legacy(t, ssl.TLSVersion.TLSv1))),
        tls("TLS 1.1", "refused", lambda t: handshake(t, _legacy(t, ssl.TLSVersion.TLSv1_1))),
        tls("weak cipher suites only", "refused", lambda t: handshake(t, _weak_ciphers(t))),
        tls(
            "TLS 1.2 with strong suites (control)",
            "accepted",
            lambda t: handshake(t, _strong_tls12(t)),
        ),
        tls("slowloris handshake", "closed by server", _slow_handshake),
    ]
    if shutil.which("openssl") is not None:  # it starts the renegotiation; absent: not run
        cases.append(tls("client-initiated renegotiation", "refused", _renegotiation))
    return cases


def slow_cases() -> list[Case]:
    """Cases that take minutes with the demo's default timeouts (soak / full runs only)."""
    return [Case("TLS", "slow request body", "closed by server", _slow_body)]


# ----------------------------------------------------------------------------- isolation (#16)


def _attribute_bomb(attributes: int, action: str) -> bytes:
    attrs = "".join(f' a{i}="x"' for i in range(attributes))
    return envelope("", action=action).replace(b"<s:Header>", f"<s:Header{attrs}>".encode())


def _stream(target: Target, path: str, body: bytes) -> str:
    """POST ``body`` in pieces, watching for an early answer (a refusal part-way through)."""
    host, port = target.host_port()
    raw = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    response = b""
    with raw, target.context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: application/soap+xml; charset=UTF-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        try:
            for start in range(0, len(body), 256 * 1024):
                tls.sendall(body[start : start + 256 * 1024])
                tls.setblocking(False)
                with contextlib.suppress(ssl.SSLWantReadError, BlockingIOError):
                    response += tls.recv(65536)
                tls.settimeout(IO_TIMEOUT)
                if response:
                    break
        except OSError:
            pass  # the server stopped reading: its answer may already be here
        tls.settimeout(IO_TIMEOUT)
        for _ in range(100):  # bounded: the answer is small
            if response.rstrip().endswith(b"Envelope>"):
                break
            try:
                chunk = tls.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return "no answer"
    status = head.split(b" ")[1].decode()
    return f"{status} Sender" if b"Sender" in rest else f"{status} ?"


def _idle_connections_then_query(target: Target, sources: int = 1) -> str:
    """1,000 connections from other addresses that never send a ClientHello; meanwhile a
    query from ours is answered (per-source cap at accept, pending handshakes bounded: from
    10 addresses each within its cap, the silent ones displace each other)."""
    host, port = target.host_port()
    idle: list[socket.socket] = []
    try:
        for i in range(1000):
            source = "127.0.0.2" if sources == 1 else f"127.0.3.{1 + i % sources}"
            try:
                idle.append(
                    socket.create_connection(
                        (host, port), timeout=IO_TIMEOUT, source_address=(source, 0)
                    )
                )
            except OSError:
                continue
        return post(target, "iti18", envelope(adhoc_query()))
    finally:
        for sock in idle:
            sock.close()


def _slow_head(target: Target) -> str:
    """Slowloris on the request head: one header line a second. The head has one deadline
    (server.header_timeout, 15 s in the demo), not one per read."""
    host, port = target.host_port()
    raw = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    deadline = time.monotonic() + 60
    with raw, target.context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n")
        tls.settimeout(1)
        while time.monotonic() < deadline:
            try:
                tls.sendall(b"X-Slow: 1\r\n")
                data = tls.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return "closed by server"
            return "closed by server" if not data or data.startswith(b"HTTP/1.1 ") else "?"
    return "still open"


def _slow_body_rate(target: Target) -> str:
    """Slowloris on the body: one byte a second is far below server.min_body_rate; the request
    is answered 408 once server.body_grace (10 s in the demo) has passed."""
    host, port = target.host_port()
    raw = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    deadline = time.monotonic() + 60
    with raw, target.context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /ig/iti18 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\nContent-Length: 100000\r\n\r\n<"
        )
        tls.settimeout(1)
        while time.monotonic() < deadline:
            try:
                tls.sendall(b" ")
                data = tls.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return "closed by server"
            return data[:12].decode(errors="replace") if data else "closed by server"
    return "still open"


def _many_author_values(target: Target) -> str:
    """A FindDocuments with 1,000 $XDSDocumentEntryAuthorPerson values: answered by every
    community's registry (SQLite failed on it: "Expression tree is too large")."""
    authors = ",".join(f"'%Nobody {i}%'" for i in range(1000))
    query = adhoc_query().replace(
        "</rim:AdhocQuery>",
        '<rim:Slot name="$XDSDocumentEntryAuthorPerson"><rim:ValueList>'
        f"<rim:Value>({authors})</rim:Value></rim:ValueList></rim:Slot></rim:AdhocQuery>",
    )
    with httpx.Client(verify=target.context(), timeout=IO_TIMEOUT) as client:
        response = client.post(
            target.url("iti18"),
            content=envelope(query),
            headers={"content-type": "application/soap+xml; charset=UTF-8"},
        )
    try:
        root = etree.fromstring(response.content)
    except etree.XMLSyntaxError:
        return f"{response.status_code} non-XML"
    answer = root.find(f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse")
    if answer is None:
        return describe(response)
    status = (answer.get("status") or "").rsplit(":", 1)[-1]
    errors = [e.get("codeContext", "") for e in answer.iter(f"{{{RS}}}RegistryError")]
    internal = any("internal" in e for e in errors)
    return f"{response.status_code} {status}" + (" (internal error)" if internal else "")


def isolation_cases() -> list[Case]:
    """The attacks of issue #16 at full size: each refused cheaply, or served while it runs."""

    def case(name: str, expected: str, run: Callable[[Target], str]) -> Case:
        return Case("isolation", name, expected, run)

    return [
        case(
            "attribute bomb: 60,000 attributes (650 KB query)",
            "400 Sender",
            lambda t: post(t, "iti18", _attribute_bomb(60_000, Action.ITI18)),
        ),
        case(
            "attribute bomb: 200,000 attributes (2.3 MB retrieve)",
            "400 Sender",
            lambda t: post(t, "iti43", _attribute_bomb(200_000, Action.ITI43)),
        ),
        case(
            "element flood: 15.6 MB of empty elements (retrieve)",
            "400 Sender",
            lambda t: _stream(t, "/ig/iti43", envelope("<a/>" * 3_900_000, action=Action.ITI43)),
        ),
        case(
            "query body over max_query_bytes (2 MB)",
            "413 Sender",
            lambda t: _stream(t, "/ig/iti18", envelope(adhoc_query() + " " * 2_000_000)),
        ),
        case(
            "1,000 idle pre-handshake connections, then a query",
            "200 AdhocQueryResponse",
            _idle_connections_then_query,
        ),
        case(
            "1,000 idle pre-handshake connections from 10 addresses, then a query",
            "200 AdhocQueryResponse",
            lambda t: _idle_connections_then_query(t, sources=10),
        ),
        case("1,000 AuthorPerson values in one query", "200 Success", _many_author_values),
    ]


def slow_isolation_cases() -> list[Case]:
    """Isolation cases that wait for a server deadline (seconds): run in threads."""
    return [
        Case("isolation", "header slowloris (a line a second)", "closed by server", _slow_head),
        Case("isolation", "body slowloris (a byte a second)", "HTTP/1.1 408", _slow_body_rate),
    ]


def run_case(case: Case, target: Target) -> CaseResult:
    started = time.monotonic()
    try:
        observed = case.run(target)
    except Exception as exc:  # a crash of the case itself is an observed outcome too
        observed = f"error: {type(exc).__name__}: {exc}"[:200]
    return CaseResult(case, observed, time.monotonic() - started)


def run_cases_concurrently(cases: list[Case], target: Target) -> list[CaseResult]:
    """Run slow cases in threads (each bounded by its own socket timeouts)."""
    results: list[CaseResult | None] = [None] * len(cases)

    def work(i: int) -> None:
        results[i] = run_case(cases[i], target)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SLOW_BODY_BOUND + 60)
    return [
        r if r is not None else CaseResult(c, "error: did not finish", SLOW_BODY_BOUND + 60)
        for r, c in zip(results, cases, strict=True)
    ]
