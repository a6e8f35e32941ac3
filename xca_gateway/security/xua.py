"""XUA (ITI-40 Provide X-User Assertion): SAML 2.0 assertions in the WS-Security header (sans-IO).

Both sides of ITI-40 live here:

* X-Service User (our initiating gateway calling a peer): :func:`issue_assertion` builds and signs
  an assertion (enveloped XML-DSig, exclusive C14N, RSA-SHA256, Reference ``#ID``) carrying the
  XSPA/IHE attributes, :func:`wsse_security_header` wraps it for the SOAP header, and
  :class:`XuaOutbound` decides per call whether to issue one or pass the local consumer's through.
* X-Service Provider (our responding gateway): :func:`validate_assertion` checks the assertion in
  a request header as ITI TF-2 3.40.4.1.3 and SAML 2.0 Core §2.5/§2.7 require and raises
  :class:`XuaError` carrying the WS-Security fault code (WSS 1.1 SOAP Message Security §12) on
  any failure.

Signature wrapping is defeated by construction: we take the one ``saml:Assertion`` that is a
direct child of the one ``wsse:Security`` header, require its ``ds:Signature`` to be its direct
child with a single Reference to *its own* ID, refuse any other element in the message carrying
that ID, and read every value from the XML that signxml returns as verified, never from the
received tree.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import heapq
import logging
import re
import threading
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree
from pydantic import Field
from signxml import (  # type: ignore[attr-defined]
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureConstructionMethod,
    SignatureMethod,
    XMLSigner,
    XMLVerifier,
)
from signxml.exceptions import (
    InvalidCertificate,
    InvalidDigest,
    InvalidInput,
    InvalidSignature,
    SignXMLException,
)
from signxml.verifier import SignatureConfiguration

from xca_gateway.audit.messages import CodedValue, HumanRequestor
from xca_gateway.protocol.namespaces import SOAP12, WSSE
from xca_gateway.protocol.soap import SoapFault
from xca_gateway.protocol.soap_service import SoapRequest
from xca_gateway.schema import (
    NonEmpty,
    NonNegativeSeconds,
    OneOrMany,
    PathText,
    Range,
    Seconds,
    Section,
    Strings,
)
from xca_gateway.security.callers import Role, current_caller

log = logging.getLogger(__name__)

SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

NAMEID_UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
NAMEID_X509_SUBJECT = "urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName"
CM_BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
CM_HOLDER_OF_KEY = "urn:oasis:names:tc:SAML:2.0:cm:holder-of-key"
CM_SENDER_VOUCHES = "urn:oasis:names:tc:SAML:2.0:cm:sender-vouches"
AC_X509 = "urn:oasis:names:tc:SAML:2.0:ac:classes:X509"
AC_UNSPECIFIED = "urn:oasis:names:tc:SAML:2.0:ac:classes:unspecified"

_ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
_ALLOWED_TRANSFORMS = frozenset({_ENVELOPED, _EXC_C14N})
_SIGNATURE_METHODS = frozenset(
    {
        SignatureMethod.RSA_SHA256,
        SignatureMethod.RSA_SHA384,
        SignatureMethod.RSA_SHA512,
        SignatureMethod.ECDSA_SHA256,
        SignatureMethod.ECDSA_SHA384,
        SignatureMethod.ECDSA_SHA512,
    }
)
_DIGEST_ALGORITHMS = frozenset(
    {DigestAlgorithm.SHA256, DigestAlgorithm.SHA384, DigestAlgorithm.SHA512}
)


class XuaAttribute:
    """``saml:Attribute/@Name`` values of XSPA-SAML and IHE (ITI TF-2 3.40.4.1.2)."""

    SUBJECT_ID = "urn:oasis:names:tc:xspa:1.0:subject:subject-id"
    ORGANIZATION = "urn:oasis:names:tc:xspa:1.0:subject:organization"
    ORGANIZATION_ID = "urn:oasis:names:tc:xspa:1.0:subject:organization-id"
    HOME_COMMUNITY_ID = "urn:ihe:iti:xca:2010:homeCommunityId"
    PURPOSE_OF_USE = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"
    ROLE = "urn:oasis:names:tc:xacml:2.0:subject:role"
    RESOURCE_ID = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"


# What a responding gateway asks for by default: who (subject, organization, community), in
# which role and why. The patient (resource-id) is optional: not every query names one.
DEFAULT_REQUIRED_ATTRIBUTES: tuple[str, ...] = (
    XuaAttribute.SUBJECT_ID,
    XuaAttribute.ORGANIZATION,
    XuaAttribute.ORGANIZATION_ID,
    XuaAttribute.HOME_COMMUNITY_ID,
    XuaAttribute.ROLE,
    XuaAttribute.PURPOSE_OF_USE,
)


class WsseFault:
    """WS-Security 1.1 fault codes (SOAP Message Security §12), as ``wsse:`` QNames."""

    # "An error was discovered processing the <wsse:Security> header."
    INVALID_SECURITY = "wsse:InvalidSecurity"
    # "An invalid security token was provided."
    INVALID_SECURITY_TOKEN = "wsse:InvalidSecurityToken"
    # "The security token could not be authenticated or authorized."
    FAILED_AUTHENTICATION = "wsse:FailedAuthentication"
    # "The signature or decryption was invalid."
    FAILED_CHECK = "wsse:FailedCheck"
    # "Referenced security token could not be retrieved."
    SECURITY_TOKEN_UNAVAILABLE = "wsse:SecurityTokenUnavailable"


_FAULT_STRINGS = {
    WsseFault.INVALID_SECURITY: "An error was discovered processing the <wsse:Security> header",
    WsseFault.INVALID_SECURITY_TOKEN: "An invalid security token was provided",
    WsseFault.FAILED_AUTHENTICATION: "The security token could not be authenticated or authorized",
    WsseFault.FAILED_CHECK: "The signature or decryption was invalid",
    WsseFault.SECURITY_TOKEN_UNAVAILABLE: "Referenced security token could not be retrieved",
}


class XuaError(Exception):
    """An assertion was refused. ``fault_code`` is a :class:`WsseFault` QName (``wsse:...``).

    ``reason`` says what was wrong, for the fault text and the audit record; ``assertion`` is the
    parsed (possibly unverified) assertion when it could be read, so that the audit can still
    name the claimed user.
    """

    def __init__(self, fault_code: str, reason: str, assertion: XuaAssertion | None = None):
        super().__init__(reason)
        self.fault_code = fault_code
        self.reason = reason
        self.assertion = assertion

    @property
    def local_name(self) -> str:
        return self.fault_code.partition(":")[2]


def to_soap_fault(error: XuaError) -> SoapFault:
    """A SOAP 1.2 Sender fault with the WS-Security code as subcode (WSS 1.1 §12)."""
    text = _FAULT_STRINGS.get(error.fault_code, "WS-Security processing failed")
    return SoapFault.sender(f"{text}: {error.reason}", subcode=(WSSE, error.local_name))


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Ce:
    """An HL7 v3 coded element (CE) as XSPA carries roles and purposes of use."""

    code: str
    code_system: str | None = None
    display_name: str | None = None
    code_system_name: str | None = None

    def matches(self, pattern: str) -> bool:
        """``code`` or ``codeSystem|code`` (the FHIR token form used in our configuration)."""
        system, sep, code = pattern.rpartition("|")
        if not sep:
            return self.code == pattern
        return self.code == code and (not system or self.code_system == system)

    @property
    def token(self) -> str:
        return f"{self.code_system}|{self.code}" if self.code_system else self.code


@dataclass(frozen=True)
class XuaIdentity:
    """Whom an assertion we issue speaks for (the X-Service User's principal)."""

    name_id: str
    name_id_format: str = NAMEID_UNSPECIFIED
    sp_provided_id: str | None = None
    # SAML NameQualifier: the domain that named the subject (a person's IUA token issuer).
    name_qualifier: str | None = None
    subject_id: str | None = None
    organization: str | None = None
    organization_id: str | None = None
    home_community_id: str | None = None
    roles: tuple[Ce, ...] = ()
    purposes_of_use: tuple[Ce, ...] = ()
    resource_id: str | None = None
    authn_context_class: str = AC_X509
    authn_instant: datetime | None = None
    subject_confirmation_method: str = CM_BEARER


@dataclass(frozen=True)
class XuaAssertion:
    """A SAML 2.0 assertion as read from the signed XML (ITI-40)."""

    id: str
    issuer: str
    issue_instant: datetime
    name_id: str
    name_id_format: str | None
    sp_provided_id: str | None
    subject_confirmation_methods: tuple[str, ...]
    audiences: tuple[str, ...]
    not_before: datetime | None
    not_on_or_after: datetime | None
    authn_instant: datetime | None
    authn_context_class_ref: str | None
    subject_id: str | None = None
    organization: str | None = None
    organization_id: str | None = None
    home_community_id: str | None = None
    roles: tuple[Ce, ...] = ()
    purposes_of_use: tuple[Ce, ...] = ()
    resource_id: str | None = None
    # Every attribute by Name, as text values (coded values as their code).
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # SHA-256 fingerprint (hex) of the certificate the signature verified with; None if unsigned.
    signer_fingerprint: str | None = None
    # NameID/@NameQualifier: the domain that named the subject (a person's IUA token issuer).
    name_qualifier: str | None = None

    @property
    def user_name(self) -> str:
        return audit_user_name(self)

    def has_attribute(self, name: str) -> bool:
        return bool(self.attributes.get(name))


def audit_user_id(assertion: XuaAssertion) -> str:
    """``alias<user@issuer>`` exactly as ITI TF-2 3.40.4.2 spells it (IPF-XUA too): alias the
    NameID's SPProvidedID, user the NameID, issuer the assertion's Issuer."""
    return f"{assertion.sp_provided_id or ''}<{assertion.name_id}@{assertion.issuer}>"


def audit_user_name(assertion: XuaAssertion) -> str:
    """``alias<user@issuer>``: the ATNA UserName of an XUA user (ITI TF-2 3.40.4.2).

    When the NameID has a NameQualifier, the subject was named by that domain (a clinician's
    IUA token issuer, qualified so by the initiating gateway that issued the assertion for
    them) and the assertion's Issuer only vouches for it: ``user@NameQualifier`` is then who
    the person is, with the subject-id attribute (their name) as the alias when there is no
    SPProvidedID. This is the form the initiating side's records give the same person
    (``Principal.audit_user_name``: ``name<sub@iss>``), so the officer finds one person on both
    sides; the spec's exact form stays in the UserID (:func:`audit_user_id`)."""
    if assertion.name_qualifier:
        alias = assertion.sp_provided_id or assertion.subject_id or ""
        return f"{alias}<{assertion.name_id}@{assertion.name_qualifier}>"
    return audit_user_id(assertion)


def audit_requestor(assertion: XuaAssertion) -> HumanRequestor:
    """The human-requestor ActiveParticipant of the audit module, roles included."""
    return HumanRequestor(
        audit_user_id(assertion),
        audit_user_name(assertion),
        tuple(_audit_code(c) for c in assertion.roles),
    )


def audit_purposes_of_use(assertion: XuaAssertion) -> tuple[CodedValue, ...]:
    """EventIdentification/PurposeOfUse values (as IPF fills them from XUA)."""
    return tuple(_audit_code(c) for c in assertion.purposes_of_use)


def _audit_code(ce: Ce) -> CodedValue:
    return CodedValue(
        ce.code,
        ce.code_system_name or ce.code_system or "",
        ce.display_name or ce.code,
        ce.display_name,
    )


# --------------------------------------------------------------------------- time


_DATETIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$")


def parse_saml_datetime(value: str) -> datetime:
    """xs:dateTime with an explicit zone (SAML core 1.3.3 says UTC); ValueError otherwise."""
    match = _DATETIME.match(value.strip())
    if not match:
        raise ValueError(f"not an xs:dateTime with time zone: {value!r}")
    base, fraction, zone = match.groups()
    text = base + (f".{(fraction + '000000')[:6]}" if fraction else "")
    text += "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(text).astimezone(UTC)


def format_saml_datetime(value: datetime) -> str:
    value = value.astimezone(UTC)
    millis = value.microsecond // 1000
    return value.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


# --------------------------------------------------------------------------- issuing


def new_assertion_id() -> str:
    # xs:ID must be an NCName: it may not start with a digit.
    return f"_{uuid.uuid4().hex}"


def _attribute(parent: etree._Element, name: str) -> etree._Element:
    attribute = etree.SubElement(parent, f"{{{SAML}}}Attribute")
    attribute.set("Name", name)
    attribute.set("NameFormat", "urn:oasis:names:tc:SAML:2.0:attrname-format:uri")
    return attribute


def _text_attribute(parent: etree._Element, name: str, value: str | None) -> None:
    if value:
        etree.SubElement(_attribute(parent, name), f"{{{SAML}}}AttributeValue").text = value


# The CE's own default namespace: exclusive C14N then renders it on the element itself, so the
# signed form does not depend on where the assertion is embedded.
_HL7_NSMAP: Any = {None: HL7, "xsi": XSI}


def _coded_attribute(parent: etree._Element, name: str, tag: str, values: Sequence[Ce]) -> None:
    if not values:
        return
    attribute = _attribute(parent, name)
    for ce in values:
        value = etree.SubElement(attribute, f"{{{SAML}}}AttributeValue")
        coded = etree.SubElement(value, f"{{{HL7}}}{tag}", nsmap=_HL7_NSMAP)
        coded.set(f"{{{XSI}}}type", "CE")
        coded.set("code", ce.code)
        if ce.code_system:
            coded.set("codeSystem", ce.code_system)
        if ce.code_system_name:
            coded.set("codeSystemName", ce.code_system_name)
        if ce.display_name:
            coded.set("displayName", ce.display_name)


def build_assertion(
    identity: XuaIdentity,
    *,
    issuer: str,
    audience: str | Sequence[str],
    lifetime: timedelta,
    now: datetime | None = None,
    assertion_id: str | None = None,
) -> etree._Element:
    """The unsigned assertion, with a signature placeholder where SAML wants it (after Issuer)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    instant = format_saml_datetime(now)
    assertion = etree.Element(f"{{{SAML}}}Assertion", nsmap={"saml": SAML})
    assertion.set("ID", assertion_id or new_assertion_id())
    assertion.set("IssueInstant", instant)
    assertion.set("Version", "2.0")
    etree.SubElement(assertion, f"{{{SAML}}}Issuer").text = issuer
    placeholder = etree.SubElement(assertion, f"{{{DS}}}Signature", nsmap={"ds": DS})
    placeholder.set("Id", "placeholder")

    subject = etree.SubElement(assertion, f"{{{SAML}}}Subject")
    name_id = etree.SubElement(subject, f"{{{SAML}}}NameID")
    name_id.set("Format", identity.name_id_format)
    if identity.name_qualifier:
        name_id.set("NameQualifier", identity.name_qualifier)
    if identity.sp_provided_id:
        name_id.set("SPProvidedID", identity.sp_provided_id)
    name_id.text = identity.name_id
    confirmation = etree.SubElement(subject, f"{{{SAML}}}SubjectConfirmation")
    confirmation.set("Method", identity.subject_confirmation_method)

    conditions = etree.SubElement(assertion, f"{{{SAML}}}Conditions")
    # ITI40-013: NotBefore equals the issue instant.
    conditions.set("NotBefore", instant)
    conditions.set("NotOnOrAfter", format_saml_datetime(now + lifetime))
    restriction = etree.SubElement(conditions, f"{{{SAML}}}AudienceRestriction")
    for uri in [audience] if isinstance(audience, str) else audience:
        etree.SubElement(restriction, f"{{{SAML}}}Audience").text = uri

    authn = etree.SubElement(assertion, f"{{{SAML}}}AuthnStatement")
    authn.set("AuthnInstant", format_saml_datetime(identity.authn_instant or now))
    context = etree.SubElement(authn, f"{{{SAML}}}AuthnContext")
    etree.SubElement(context, f"{{{SAML}}}AuthnContextClassRef").text = identity.authn_context_class

    statement = etree.SubElement(assertion, f"{{{SAML}}}AttributeStatement")
    _text_attribute(statement, XuaAttribute.SUBJECT_ID, identity.subject_id)
    _text_attribute(statement, XuaAttribute.ORGANIZATION, identity.organization)
    _text_attribute(statement, XuaAttribute.ORGANIZATION_ID, identity.organization_id)
    _text_attribute(statement, XuaAttribute.HOME_COMMUNITY_ID, identity.home_community_id)
    _coded_attribute(statement, XuaAttribute.ROLE, "Role", identity.roles)
    _coded_attribute(
        statement, XuaAttribute.PURPOSE_OF_USE, "PurposeOfUse", identity.purposes_of_use
    )
    _text_attribute(statement, XuaAttribute.RESOURCE_ID, identity.resource_id)
    if len(statement) == 0:
        assertion.remove(statement)
    return assertion


SigningKey = bytes | str | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_signing_key(key_pem: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """Parse a PEM key once: parsing (with RSA key checks) costs far more than signing."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("XUA signing key must be RSA or EC")
    return key


def sign_assertion(
    assertion: etree._Element, *, key_pem: SigningKey, cert_pem: bytes | str
) -> etree._Element:
    """Enveloped XML-DSig over the assertion (exc-c14n, RSA-SHA256, Reference ``#ID``)."""
    signer = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm=SignatureMethod.RSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
    )
    cert = cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem
    signed: etree._Element = signer.sign(
        assertion,
        key=key_pem,
        cert=cert,
        reference_uri=f"#{assertion.get('ID')}",
        id_attribute="ID",
    )
    return signed


def issue_assertion(
    identity: XuaIdentity,
    *,
    issuer: str,
    audience: str | Sequence[str],
    key_pem: SigningKey,
    cert_pem: bytes | str,
    lifetime: timedelta = timedelta(minutes=5),
    now: datetime | None = None,
    assertion_id: str | None = None,
) -> etree._Element:
    """A signed XUA assertion for ``identity``, valid for ``lifetime`` from ``now``."""
    assertion = build_assertion(
        identity,
        issuer=issuer,
        audience=audience,
        lifetime=lifetime,
        now=now,
        assertion_id=assertion_id,
    )
    return sign_assertion(assertion, key_pem=key_pem, cert_pem=cert_pem)


def wsse_security_header(
    assertion: etree._Element, *, must_understand: bool = True
) -> etree._Element:
    """``wsse:Security`` carrying ``assertion`` (moved into it; pass a copy to keep yours)."""
    security = etree.Element(f"{{{WSSE}}}Security", nsmap={"wsse": WSSE})
    if must_understand:
        security.set(f"{{{SOAP12}}}mustUnderstand", "true")
    security.append(assertion)
    return security


# --------------------------------------------------------------------------- replay cache


class ReplayCheckUnavailable(Exception):
    """A shared replay cache could not be asked (its database is unreachable)."""


class ReplayGuard(Protocol):
    """Where assertion IDs are remembered: this process (:class:`ReplayCache`) or the database
    the replicas share (:class:`xca_gateway.security.replay_store.PostgresReplayCache`)."""

    def check_and_add(
        self, issuer: str, assertion_id: str, expires: datetime, now: datetime
    ) -> bool: ...


@runtime_checkable
class AsyncReplayGuard(ReplayGuard, Protocol):
    """A replay cache behind I/O (a shared database): async callers await this instead of
    blocking the event loop on :meth:`check_and_add`."""

    async def check_and_add_async(
        self, issuer: str, assertion_id: str, expires: datetime, now: datetime
    ) -> bool: ...


class ReplayCache:
    """Assertion IDs seen, each kept until its assertion expires; bounded in size.

    Thread-safe. When full, the entry that would expire first is dropped (and a warning logged):
    a bounded cache cannot promise more, so keep ``max_entries`` above the number of assertions
    accepted per assertion lifetime.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._expiry: dict[tuple[str, str], datetime] = {}
        self._heap: list[tuple[datetime, tuple[str, str]]] = []
        self._lock = threading.Lock()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: datetime) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires:
                del self._expiry[key]

    def check_and_add(
        self, issuer: str, assertion_id: str, expires: datetime, now: datetime
    ) -> bool:
        """Record the assertion; False if it was seen before and has not expired."""
        key = (issuer, assertion_id)
        with self._lock:
            self._purge(now)
            if key in self._expiry:
                return False
            while len(self._expiry) >= self.max_entries and self._heap:
                old_expires, old_key = heapq.heappop(self._heap)
                if self._expiry.get(old_key) == old_expires:
                    del self._expiry[old_key]
                    self.evicted += 1
                    if self.evicted == 1 or self.evicted % 10_000 == 0:
                        log.warning(
                            "XUA replay cache full (%d entries): evicting unexpired assertion ids",
                            self.max_entries,
                        )
            self._expiry[key] = expires
            heapq.heappush(self._heap, (expires, key))
            return True


# --------------------------------------------------------------------------- validation


def _elements(parent: etree._Element, ns: str, local: str) -> list[etree._Element]:
    return list(parent.iterchildren(f"{{{ns}}}{local}"))


def _is_element(node: etree._Element) -> bool:
    tag: Any = node.tag
    return isinstance(tag, str)


def _targets_us(block: etree._Element) -> bool:
    role = block.get(f"{{{SOAP12}}}role")
    return role in (None, "", f"{SOAP12}/role/ultimateReceiver", f"{SOAP12}/role/next")


def find_assertion(envelope_header: etree._Element | None) -> etree._Element | None:
    """The SAML 2.0 assertion of the request's ``wsse:Security`` header, if there is one.

    Raises :class:`XuaError` (``wsse:InvalidSecurity``) for an ambiguous header: more than one
    Security block for us, or more than one assertion in it. Only a *direct* child of the
    Security header counts: an assertion nested deeper is never the token.
    """
    if envelope_header is None:
        return None
    blocks = [b for b in _elements(envelope_header, WSSE, "Security") if _targets_us(b)]
    if not blocks:
        return None
    if len(blocks) > 1:
        raise XuaError(WsseFault.INVALID_SECURITY, "more than one wsse:Security header")
    assertions = _elements(blocks[0], SAML, "Assertion")
    if len(assertions) > 1:
        raise XuaError(WsseFault.INVALID_SECURITY, "more than one SAML assertion in wsse:Security")
    return assertions[0] if assertions else None


def _cert(value: str | bytes | x509.Certificate) -> x509.Certificate:
    if isinstance(value, x509.Certificate):
        return value
    data = value.encode() if isinstance(value, str) else value
    return x509.load_pem_x509_certificate(data)


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file (an issuer may publish several during a key roll-over)."""
    return list(x509.load_pem_x509_certificates(path.read_bytes()))


def _text(element: etree._Element | None) -> str | None:
    if element is None:
        return None
    text = "".join(t for t in element.itertext() if isinstance(t, str)).strip()
    return text or None


def _time_attr(element: etree._Element, name: str, *, required: bool) -> datetime | None:
    value = element.get(name)
    if value is None:
        if required:
            raise XuaError(
                WsseFault.INVALID_SECURITY_TOKEN,
                f"{etree.QName(element).localname}/@{name} is missing",
            )
        return None
    try:
        return parse_saml_datetime(value)
    except ValueError:
        raise XuaError(
            WsseFault.INVALID_SECURITY_TOKEN,
            f"{etree.QName(element).localname}/@{name} is not a valid xs:dateTime",
        ) from None


def _coded_values(value: etree._Element) -> list[Ce]:
    """CE values of an AttributeValue: HL7 child elements (XSPA) or attributes on itself."""
    found = []
    for child in value:
        if _is_element(child) and child.get("code"):
            found.append(
                Ce(
                    child.get("code", ""),
                    child.get("codeSystem"),
                    child.get("displayName"),
                    child.get("codeSystemName"),
                )
            )
    if not found and value.get("code"):
        found.append(
            Ce(
                value.get("code", ""),
                value.get("codeSystem"),
                value.get("displayName"),
                value.get("codeSystemName"),
            )
        )
    return found


def parse_assertion(element: etree._Element) -> XuaAssertion:
    """Read an assertion's content; raises ``wsse:InvalidSecurityToken`` if it is malformed.

    Parsing proves nothing about who wrote it: :func:`validate_assertion` parses only the XML
    that the signature covers.
    """
    if element.tag != f"{{{SAML}}}Assertion":
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "not a SAML 2.0 assertion")
    if element.get("Version") != "2.0":
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "assertion Version must be 2.0")
    assertion_id = element.get("ID")
    if not assertion_id:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "assertion has no ID")
    issue_instant = _time_attr(element, "IssueInstant", required=True)
    assert issue_instant is not None
    issuer = _text(element.find(f"{{{SAML}}}Issuer"))
    if not issuer:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "assertion has no Issuer")

    subject = element.find(f"{{{SAML}}}Subject")
    name_id_el = subject.find(f"{{{SAML}}}NameID") if subject is not None else None
    name_id = _text(name_id_el)
    if subject is None or name_id_el is None or not name_id:
        if subject is not None and subject.find(f"{{{SAML}}}EncryptedID") is not None:
            raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "encrypted NameID is not supported")
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "assertion has no Subject/NameID")
    methods = tuple(c.get("Method", "") for c in _elements(subject, SAML, "SubjectConfirmation"))
    if not methods:
        # ITI40-011: SubjectConfirmation is required.
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "assertion has no SubjectConfirmation")

    conditions = element.find(f"{{{SAML}}}Conditions")
    not_before = not_on_or_after = None
    audiences: list[str] = []
    if conditions is not None:
        not_before = _time_attr(conditions, "NotBefore", required=False)
        not_on_or_after = _time_attr(conditions, "NotOnOrAfter", required=False)
        for restriction in _elements(conditions, SAML, "AudienceRestriction"):
            audiences.extend(a for a in map(_text, restriction) if a)

    authn = element.find(f"{{{SAML}}}AuthnStatement")
    authn_instant = authn_class = None
    if authn is not None:
        authn_instant = _time_attr(authn, "AuthnInstant", required=False)
        context = authn.find(f"{{{SAML}}}AuthnContext")
        if context is not None:
            authn_class = _text(context.find(f"{{{SAML}}}AuthnContextClassRef")) or _text(
                context.find(f"{{{SAML}}}AuthnContextDeclRef")
            )

    texts: dict[str, list[str]] = {}
    coded: dict[str, list[Ce]] = {}
    for statement in _elements(element, SAML, "AttributeStatement"):
        for attribute in _elements(statement, SAML, "Attribute"):
            name = attribute.get("Name", "")
            for value in _elements(attribute, SAML, "AttributeValue"):
                codes = _coded_values(value)
                if codes:
                    coded.setdefault(name, []).extend(codes)
                    texts.setdefault(name, []).extend(c.code for c in codes)
                elif (text := _text(value)) is not None:
                    texts.setdefault(name, []).append(text)

    def first(name: str) -> str | None:
        values = texts.get(name)
        return values[0] if values else None

    return XuaAssertion(
        id=assertion_id,
        issuer=issuer,
        issue_instant=issue_instant,
        name_id=name_id,
        name_id_format=name_id_el.get("Format"),
        sp_provided_id=name_id_el.get("SPProvidedID") or None,
        name_qualifier=name_id_el.get("NameQualifier") or None,
        subject_confirmation_methods=methods,
        audiences=tuple(audiences),
        not_before=not_before,
        not_on_or_after=not_on_or_after,
        authn_instant=authn_instant,
        authn_context_class_ref=authn_class,
        subject_id=first(XuaAttribute.SUBJECT_ID),
        organization=first(XuaAttribute.ORGANIZATION),
        organization_id=first(XuaAttribute.ORGANIZATION_ID),
        home_community_id=first(XuaAttribute.HOME_COMMUNITY_ID),
        roles=tuple(coded.get(XuaAttribute.ROLE, ())),
        purposes_of_use=tuple(coded.get(XuaAttribute.PURPOSE_OF_USE, ())),
        resource_id=first(XuaAttribute.RESOURCE_ID),
        attributes={k: tuple(v) for k, v in texts.items()},
    )


def _quiet_parse(element: etree._Element) -> XuaAssertion | None:
    try:
        return parse_assertion(element)
    except XuaError:
        return None


def _check_signature_shape(element: etree._Element, assertion_id: str) -> None:
    """The one Signature is ours: direct child, one Reference to this ID, harmless transforms."""
    claimed = _quiet_parse(element)
    signatures = _elements(element, DS, "Signature")
    if not signatures:
        raise XuaError(WsseFault.FAILED_AUTHENTICATION, "assertion is not signed", claimed)
    if len(signatures) > 1:
        raise XuaError(WsseFault.FAILED_AUTHENTICATION, "assertion has several signatures", claimed)
    references = signatures[0].findall(f"{{{DS}}}SignedInfo/{{{DS}}}Reference")
    if len(references) != 1:
        raise XuaError(
            WsseFault.FAILED_AUTHENTICATION, "signature must have exactly one Reference", claimed
        )
    if references[0].get("URI") != f"#{assertion_id}":
        raise XuaError(
            WsseFault.FAILED_AUTHENTICATION,
            "the signature does not reference this assertion",
            claimed,
        )
    for transform in references[0].iterfind(f"{{{DS}}}Transforms/{{{DS}}}Transform"):
        if transform.get("Algorithm") not in _ALLOWED_TRANSFORMS:
            raise XuaError(
                WsseFault.FAILED_AUTHENTICATION,
                f"signature transform not accepted: {transform.get('Algorithm')}",
                claimed,
            )


def _check_unique_id(element: etree._Element, assertion_id: str) -> None:
    """No other element of the whole message may carry the assertion's ID (wrapping attacks)."""
    root = element.getroottree().getroot()
    same = root.xpath(
        "//*[@*[local-name()='ID' or local-name()='Id' or local-name()='id'] = $value]",
        value=assertion_id,
    )
    if not isinstance(same, list) or len(same) != 1 or same[0] is not element:
        raise XuaError(
            WsseFault.FAILED_AUTHENTICATION,
            f"the assertion ID {assertion_id!r} appears more than once in the message",
            _quiet_parse(element),
        )


def _verify_signature(
    element: etree._Element,
    candidates: Sequence[x509.Certificate],
    now: datetime,
) -> tuple[etree._Element, x509.Certificate]:
    """Verify with each trusted certificate; return the signed XML and the certificate used."""
    # A standalone copy: exclusive C14N makes the digest independent of the SOAP envelope, and
    # the verifier then cannot resolve the reference to anything outside this assertion.
    data = etree.tostring(element)
    config = SignatureConfiguration(
        location="./",
        expect_references=1,
        signature_methods=_SIGNATURE_METHODS,
        digest_algorithms=_DIGEST_ALGORITHMS,
        verification_time=now,
        # We give the certificate; a KeyValue next to it is not consulted.
        ignore_ambiguous_key_info=True,
    )
    claimed = _quiet_parse(element)
    last: Exception | None = None
    for cert in candidates:
        try:
            result = XMLVerifier().verify(
                data, x509_cert=cert, id_attribute="ID", expect_config=config
            )
        except InvalidDigest:
            # The signature value checks out with a trusted key, the content does not: tampered.
            raise XuaError(
                WsseFault.FAILED_CHECK, "the assertion was modified after it was signed", claimed
            ) from None
        except InvalidCertificate as exc:
            last = exc
            continue
        except InvalidSignature as exc:
            last = exc
            continue
        except (InvalidInput, SignXMLException, ValueError) as exc:
            raise XuaError(
                WsseFault.FAILED_AUTHENTICATION, f"signature cannot be verified: {exc}", claimed
            ) from None
        signed = result.signed_xml  # type: ignore[union-attr]
        if signed is None:
            raise XuaError(WsseFault.FAILED_AUTHENTICATION, "signed content is not XML", claimed)
        return signed, cert
    detail = f" ({last})" if isinstance(last, InvalidCertificate) else ""
    issuer = claimed.issuer if claimed else "?"
    raise XuaError(
        WsseFault.FAILED_AUTHENTICATION,
        f"the signature does not verify with a trusted certificate of issuer {issuer}{detail}",
        claimed,
    )


def _check_holder_of_key(signed: etree._Element, peer_certificate_der: bytes | None) -> bool:
    """Holder-of-key: the confirmation key must be the TLS client's certificate."""
    if peer_certificate_der is None:
        return False
    for cert_el in signed.iterfind(
        f"{{{SAML}}}Subject/{{{SAML}}}SubjectConfirmation/{{{SAML}}}SubjectConfirmationData"
        f"/{{{DS}}}KeyInfo/{{{DS}}}X509Data/{{{DS}}}X509Certificate"
    ):
        try:
            der = base64.b64decode("".join((cert_el.text or "").split()), validate=True)
        except ValueError:
            continue
        if der == peer_certificate_der:
            return True
    return False


def _check_subject_confirmation(
    signed: etree._Element,
    accepted_methods: Collection[str],
    now: datetime,
    skew: timedelta,
    peer_certificate_der: bytes | None,
) -> None:
    subject = signed.find(f"{{{SAML}}}Subject")
    assert subject is not None  # parse_assertion checked
    problems = []
    for confirmation in _elements(subject, SAML, "SubjectConfirmation"):
        method = confirmation.get("Method", "")
        if method not in accepted_methods:
            problems.append(f"method {method} not accepted")
            continue
        data = confirmation.find(f"{{{SAML}}}SubjectConfirmationData")
        if data is not None:
            nb = _time_attr(data, "NotBefore", required=False)
            noa = _time_attr(data, "NotOnOrAfter", required=False)
            if nb is not None and now + skew < nb:
                problems.append("SubjectConfirmationData not yet valid")
                continue
            if noa is not None and now - skew >= noa:
                problems.append("SubjectConfirmationData expired")
                continue
        if method == CM_HOLDER_OF_KEY and not _check_holder_of_key(signed, peer_certificate_der):
            problems.append("holder-of-key confirmation key is not the TLS client certificate")
            continue
        return
    raise XuaError(
        WsseFault.INVALID_SECURITY_TOKEN,
        "no acceptable SubjectConfirmation: " + "; ".join(problems),
    )


_KNOWN_CONDITIONS = frozenset(
    {f"{{{SAML}}}AudienceRestriction", f"{{{SAML}}}OneTimeUse", f"{{{SAML}}}ProxyRestriction"}
)


def validate_assertion(
    envelope_header: etree._Element | None,
    *,
    trusted_issuers: Mapping[str, Sequence[str | bytes | x509.Certificate]],
    audience: str | Collection[str],
    clock_skew: timedelta = timedelta(minutes=1),
    now: datetime | None = None,
    replay_cache: ReplayGuard | None = None,
    required_attributes: Collection[str] = DEFAULT_REQUIRED_ATTRIBUTES,
    max_lifetime: timedelta | None = None,
    subject_confirmation_methods: Collection[str] = (
        CM_BEARER,
        CM_HOLDER_OF_KEY,
        CM_SENDER_VOUCHES,
    ),
    peer_certificate_der: bytes | None = None,
) -> XuaAssertion:
    """Validate the XUA assertion of a request's SOAP header; raise :class:`XuaError` if refused.

    ``trusted_issuers`` maps each X-Assertion Provider (``saml:Issuer``) to the certificates its
    signatures may verify with. ``audience`` is what this service answers to (one URI or
    several); every AudienceRestriction must name one of them. The replay cache, if given, is
    only updated for assertions that passed every other check.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    element = find_assertion(envelope_header)
    if element is None:
        if envelope_header is None or not any(
            _targets_us(b) for b in _elements(envelope_header, WSSE, "Security")
        ):
            raise XuaError(WsseFault.INVALID_SECURITY, "no wsse:Security header in the request")
        raise XuaError(
            WsseFault.SECURITY_TOKEN_UNAVAILABLE, "wsse:Security carries no SAML 2.0 assertion"
        )
    assertion_id = element.get("ID")
    if not assertion_id:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "assertion has no ID")

    # 1. Signature: shape, uniqueness of the ID, trusted issuer, cryptography.
    _check_signature_shape(element, assertion_id)
    _check_unique_id(element, assertion_id)
    claimed_issuer = _text(element.find(f"{{{SAML}}}Issuer"))
    if not claimed_issuer:
        raise XuaError(WsseFault.INVALID_SECURITY_TOKEN, "assertion has no Issuer")
    if claimed_issuer not in trusted_issuers:
        raise XuaError(
            WsseFault.FAILED_AUTHENTICATION,
            f"issuer {claimed_issuer!r} is not a trusted X-Assertion Provider",
            _quiet_parse(element),
        )
    try:
        candidates = [_cert(c) for c in trusted_issuers[claimed_issuer]]
    except ValueError as exc:  # a configuration problem, not the peer's
        raise XuaError(
            WsseFault.FAILED_AUTHENTICATION, f"trusted certificate unusable: {exc}"
        ) from None
    signed, signer = _verify_signature(element, candidates, now)

    # 2. From here on only the signed XML is read.
    if signed.tag != f"{{{SAML}}}Assertion" or signed.get("ID") != assertion_id:
        raise XuaError(WsseFault.FAILED_AUTHENTICATION, "the signed element is not the assertion")
    assertion = parse_assertion(signed)
    if assertion.issuer != claimed_issuer:  # pragma: no cover - same element, defence in depth
        raise XuaError(WsseFault.FAILED_AUTHENTICATION, "issuer changed under the signature")
    assertion = replace(assertion, signer_fingerprint=signer.fingerprint(hashes.SHA256()).hex())

    def refuse(fault: str, reason: str) -> XuaError:
        return XuaError(fault, reason, assertion)

    # 3. Time (ITI40-013), with skew.
    if assertion.issue_instant > now + clock_skew:
        raise refuse(WsseFault.INVALID_SECURITY_TOKEN, "assertion IssueInstant is in the future")
    conditions = signed.find(f"{{{SAML}}}Conditions")
    if conditions is None or assertion.not_before is None or assertion.not_on_or_after is None:
        raise refuse(
            WsseFault.INVALID_SECURITY_TOKEN,
            "assertion Conditions must carry NotBefore and NotOnOrAfter",
        )
    if now + clock_skew < assertion.not_before:
        raise refuse(WsseFault.INVALID_SECURITY_TOKEN, "assertion is not yet valid")
    if now - clock_skew >= assertion.not_on_or_after:
        raise refuse(WsseFault.INVALID_SECURITY_TOKEN, "assertion has expired")
    if assertion.not_on_or_after <= assertion.not_before:
        raise refuse(WsseFault.INVALID_SECURITY_TOKEN, "assertion validity window is empty")
    if max_lifetime is not None and assertion.not_on_or_after - assertion.not_before > max_lifetime:
        raise refuse(
            WsseFault.INVALID_SECURITY_TOKEN,
            f"assertion lifetime exceeds the accepted maximum of {max_lifetime}",
        )
    for condition in conditions:
        if _is_element(condition) and condition.tag not in _KNOWN_CONDITIONS:
            # SAML core 2.5.1.5: an unknown condition makes the assertion Indeterminate.
            raise refuse(
                WsseFault.INVALID_SECURITY_TOKEN,
                f"unsupported condition {etree.QName(condition).localname}",
            )

    # 4. Audience (ITI40-014): each AudienceRestriction must name us.
    accepted = {audience} if isinstance(audience, str) else set(audience)
    restrictions = _elements(conditions, SAML, "AudienceRestriction")
    if not restrictions:
        raise refuse(WsseFault.INVALID_SECURITY_TOKEN, "assertion has no AudienceRestriction")
    for restriction in restrictions:
        if not accepted & {_text(a) for a in _elements(restriction, SAML, "Audience")}:
            raise refuse(
                WsseFault.INVALID_SECURITY_TOKEN, "assertion is not intended for this service"
            )

    # 5. Subject confirmation and authentication statement (ITI40-011, ITI40-019).
    try:
        _check_subject_confirmation(
            signed, subject_confirmation_methods, now, clock_skew, peer_certificate_der
        )
    except XuaError as exc:
        raise refuse(exc.fault_code, exc.reason) from None
    if assertion.authn_context_class_ref is None:
        raise refuse(
            WsseFault.INVALID_SECURITY_TOKEN,
            "assertion has no AuthnStatement with an AuthnContext class or declaration",
        )

    # 6. Attributes required by this X-Service Provider.
    missing = [name for name in required_attributes if not assertion.has_attribute(name)]
    if missing:
        raise refuse(
            WsseFault.INVALID_SECURITY_TOKEN,
            f"required attribute(s) missing: {', '.join(missing)}",
        )

    # 7. Replay, last: only a fully valid assertion occupies the cache.
    if replay_cache is not None:
        try:
            fresh = replay_cache.check_and_add(*replay_key(assertion, clock_skew, now))
        except ReplayCheckUnavailable as exc:
            raise replay_unavailable(assertion, exc) from None
        if not fresh:
            raise replayed(assertion)
    return assertion


def replay_key(
    assertion: XuaAssertion, clock_skew: timedelta, now: datetime
) -> tuple[str, str, datetime, datetime]:
    """What a replay cache records: issuer, ID, kept until expiry (+ skew), at ``now``."""
    assert assertion.not_on_or_after is not None  # validated before the replay step
    return assertion.issuer, assertion.id, assertion.not_on_or_after + clock_skew, now


def replay_unavailable(assertion: XuaAssertion, exc: Exception) -> XuaError:
    # Fail closed: an assertion whose first use cannot be recorded is not accepted.
    return XuaError(WsseFault.INVALID_SECURITY, f"replay check unavailable: {exc}", assertion)


def replayed(assertion: XuaAssertion) -> XuaError:
    return XuaError(
        WsseFault.FAILED_AUTHENTICATION, "assertion has already been used (replay)", assertion
    )


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrustedIssuer:
    issuer: str
    certificates: tuple[Path, ...]
    # homeCommunityIds of the peers whose users this provider may vouch for; empty = any peer
    # (one affinity-domain identity provider).
    communities: tuple[str, ...] = ()

    def may_vouch_for(self, home_community_id: str | None) -> bool:
        return not self.communities or home_community_id in self.communities


@dataclass(frozen=True)
class XuaOutboundConfig:
    # off: no assertion; passthrough: forward the local consumer's assertion (none if it has
    # none); issue: sign our own; passthrough_or_issue: forward if present, else issue.
    mode: Literal["off", "passthrough", "issue", "passthrough_or_issue"] = "off"
    # saml:Issuer of assertions we sign; default: the gateway's base URL.
    issuer: str | None = None
    lifetime: float = 300.0
    # Default: the gateway's TLS key and certificate.
    signing_key: Path | None = None
    signing_certificate: Path | None = None
    # "endpoint": the peer's endpoint URL; "home_community_id": the peer's homeCommunityId;
    # anything else: that URI (an affinity-domain wide audience).
    audience: str = "endpoint"
    # Where the identity of issued assertions comes from: the [xua.outbound.identity] table;
    # X-XUA-* HTTP headers of a trusted local consumer (falling back to the table); or
    # "caller": the verified local caller the gateway acts for (its certificate subject as the
    # NameID, its policy name as subject-id; the table gives organization, roles, purpose).
    identity_source: Literal["config", "header", "caller"] = "config"
    # Local consumers allowed to state the user in HTTP headers: certificate SHA-256
    # fingerprints (hex) or subjects (RFC 4514).
    trusted_header_clients: tuple[str, ...] = ()
    identity: XuaIdentity | None = None


@dataclass(frozen=True)
class XuaConfig:
    """The ``[xua]`` section."""

    # Validate assertions of inbound requests (responding side). Whether one is *required* is
    # access policy, per peer ([policy] require_xua).
    enabled: bool = False
    # URIs this responding gateway answers to; empty = the gateway's base URL and endpoints.
    audiences: tuple[str, ...] = ()
    trusted_issuers: tuple[TrustedIssuer, ...] = ()
    clock_skew: float = 60.0
    max_lifetime: float | None = 8 * 3600.0
    reject_replay: bool = True
    replay_cache_size: int = 100_000
    required_attributes: tuple[str, ...] = DEFAULT_REQUIRED_ATTRIBUTES
    subject_confirmation_methods: tuple[str, ...] = (CM_BEARER, CM_HOLDER_OF_KEY, CM_SENDER_VOUCHES)
    outbound: XuaOutboundConfig = field(default_factory=XuaOutboundConfig)


class XuaConfigError(ValueError):
    pass


class CeSection(Section):
    """A coded value (CE) of an assertion attribute."""

    INLINE = True

    code: NonEmpty = Field(description="The code.")
    code_system: NonEmpty | None = Field(None, description="Its code system (OID).")
    display_name: NonEmpty | None = Field(None, description="Its display name.")
    code_system_name: NonEmpty | None = Field(None, description="Its code system's name.")


class XuaIdentitySection(Section):
    """Whom the assertions we issue speak for (the X-Service User)."""

    name_id: NonEmpty = Field(description="Subject NameID.", examples=["dr.smith"])
    name_id_format: NonEmpty = Field(NAMEID_UNSPECIFIED, description="Its format.")
    sp_provided_id: NonEmpty | None = Field(None, description="SPProvidedID.", examples=["north"])
    subject_id: NonEmpty | None = Field(
        None, description="subject-id attribute.", examples=["Dr. Jane Smith"]
    )
    organization: NonEmpty | None = Field(
        None, description="organization attribute.", examples=["North Hospital"]
    )
    organization_id: NonEmpty | None = Field(
        None,
        description="organization-id attribute.",
        examples=["urn:oid:1.3.6.1.4.1.21367.13.40.1"],
    )
    home_community_id: NonEmpty | None = Field(
        None,
        description="homeCommunityId attribute.",
        examples=["urn:oid:1.3.6.1.4.1.21367.13.70.1"],
    )
    roles: list[str | CeSection] = Field(
        [],
        description="Subject roles: 'system|code' strings or {code, code_system, display_name}.",
        examples=[["2.16.840.1.113883.6.96|309343006"]],
    )
    purposes_of_use: list[str | CeSection] = Field(
        [],
        description="Purposes of use, the same way.",
        examples=[["2.16.840.1.113883.3.18.7.1|TREATMENT"]],
    )
    resource_id: NonEmpty | None = Field(None, description="resource-id attribute.", examples=["x"])
    authn_context_class: NonEmpty = Field(AC_X509, description="AuthnContextClassRef.")
    subject_confirmation_method: NonEmpty = Field(
        CM_BEARER, description="SubjectConfirmation method."
    )


class XuaOutboundSection(Section):
    """Outbound XUA on ITI-38/39 and RAD-75: no assertion, the consumer's assertion forwarded,
    or one we sign for the identity below, the trusted headers or the verified caller."""

    mode: Literal["off", "passthrough", "issue", "passthrough_or_issue"] = Field(
        "off",
        description=(
            "off; passthrough (forward the consumer's assertion); issue (sign our own);"
            " passthrough_or_issue (forward if present, else issue)."
        ),
    )
    issuer: NonEmpty | None = Field(
        None,
        description="saml:Issuer of assertions we sign (default: our base URL).",
        examples=["https://gw.north.example.org:8443"],
    )
    lifetime: Seconds = Field(300.0, description="Seconds an issued assertion is valid.")
    signing_key: PathText | None = Field(
        None, description="Signing key (default: the [tls] key).", examples=["../certs/north.key"]
    )
    signing_certificate: PathText | None = Field(
        None,
        description="Its certificate (default: the [tls] certificate).",
        examples=["../certs/north.pem"],
    )
    audience: NonEmpty = Field(
        "endpoint",
        description=(
            "endpoint: the peer's endpoint URL; home_community_id: the peer's homeCommunityId;"
            " anything else: that URI."
        ),
    )
    identity_source: Literal["config", "header", "caller"] = Field(
        "config",
        description=(
            "Whom issued assertions speak for: the identity table; X-XUA-* headers of a trusted"
            " local consumer (falling back to the table); the verified local caller."
        ),
    )
    trusted_header_clients: Strings = Field(
        [],
        description="Consumers that may state the user in headers: certificate SHA-256 or subject.",
    )
    identity: XuaIdentitySection | None = Field(
        None, description="The identity of issued assertions."
    )


class TrustedIssuerSection(Section):
    """An identity provider whose assertions we accept."""

    issuer: NonEmpty = Field(
        description="Its saml:Issuer.", examples=["https://idp.south.example.org"]
    )
    certificates: Annotated[list[PathText], Field(min_length=1), OneOrMany()] = Field(
        description="Its signing certificates (PEM files).", examples=[["../certs/south-idp.pem"]]
    )
    communities: Strings = Field(
        [],
        description="homeCommunityIds of the peers whose users it may vouch for (empty: any).",
    )


class XuaSection(Section):
    """XUA (ITI-40): validate the SAML assertions of peers' requests (whether one is required
    is access policy, [policy] require_xua), and add assertions to ours."""

    enabled: bool = Field(False, description="Validate assertions of inbound requests.")
    audiences: Strings = Field(
        [],
        description="URIs we answer to (default: our base URL and endpoints).",
        examples=[["https://gw.north.example.org:8443/xca/iti38"]],
    )
    trusted_issuers: list[TrustedIssuerSection] = Field(
        [], description="Identity providers we trust."
    )
    clock_skew: NonNegativeSeconds = Field(60.0, description="Seconds of clock skew tolerated.")
    max_lifetime: Seconds = Field(
        8 * 3600.0, description="Longest validity an assertion may state."
    )
    reject_replay: bool = Field(True, description="Refuse an assertion seen before.")
    replay_cache_size: Annotated[int, Range(1)] = Field(
        100_000, description="Assertions remembered for that."
    )
    required_attributes: Strings = Field(
        list(DEFAULT_REQUIRED_ATTRIBUTES), description="Attributes an assertion must carry."
    )
    subject_confirmation_methods: Strings = Field(
        [CM_BEARER, CM_HOLDER_OF_KEY, CM_SENDER_VOUCHES],
        description="SubjectConfirmation methods accepted.",
    )
    outbound: XuaOutboundSection = Field(
        XuaOutboundSection(), description="XUA on our outbound requests."
    )


def _path(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str):
        raise XuaConfigError(f"{what} must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def parse_ce(value: Any, what: str) -> Ce:
    """A coded value from TOML: ``{code, code_system, display_name}`` or ``"system|code"``."""
    if isinstance(value, str):
        system, sep, code = value.rpartition("|")
        if not code:
            raise XuaConfigError(f"{what}: empty code")
        return Ce(code, system or None) if sep else Ce(value)
    if isinstance(value, dict):
        unknown = set(value) - {"code", "code_system", "display_name", "code_system_name"}
        if unknown or not isinstance(value.get("code"), str):
            raise XuaConfigError(f"{what}: needs code (and optional code_system, display_name)")
        return Ce(
            value["code"],
            value.get("code_system"),
            value.get("display_name"),
            value.get("code_system_name"),
        )
    raise XuaConfigError(f"{what}: a coded value is a table or a 'system|code' string")


def _identity(table: dict[str, Any]) -> XuaIdentity:
    known = {
        "name_id",
        "name_id_format",
        "sp_provided_id",
        "subject_id",
        "organization",
        "organization_id",
        "home_community_id",
        "roles",
        "purposes_of_use",
        "resource_id",
        "authn_context_class",
        "subject_confirmation_method",
    }
    unknown = set(table) - known
    if unknown:
        raise XuaConfigError(
            f"[xua.outbound.identity] unknown key(s): {', '.join(sorted(unknown))}"
        )
    if not isinstance(table.get("name_id"), str) or not table["name_id"]:
        raise XuaConfigError("[xua.outbound.identity] name_id is required")
    values = {k: v for k, v in table.items() if k not in ("roles", "purposes_of_use")}
    return XuaIdentity(
        **values,
        roles=tuple(parse_ce(r, "xua.outbound.identity.roles") for r in table.get("roles", [])),
        purposes_of_use=tuple(
            parse_ce(p, "xua.outbound.identity.purposes_of_use")
            for p in table.get("purposes_of_use", [])
        ),
    )


def parse_xua_config(table: dict[str, Any], base_dir: Path) -> XuaConfig:
    """Parse the ``[xua]`` table; relative paths are resolved against ``base_dir``."""
    table = dict(table)
    outbound_t = dict(table.pop("outbound", {}))
    issuers_t = table.pop("trusted_issuers", [])
    known = set(XuaConfig.__dataclass_fields__) - {"outbound", "trusted_issuers"}
    unknown = set(table) - known
    if unknown:
        raise XuaConfigError(f"[xua] unknown key(s): {', '.join(sorted(unknown))}")
    issuers = []
    if not isinstance(issuers_t, list):
        raise XuaConfigError("[[xua.trusted_issuers]] must be an array of tables")
    for entry in issuers_t:
        if not isinstance(entry, dict) or not isinstance(entry.get("issuer"), str):
            raise XuaConfigError("[[xua.trusted_issuers]] needs issuer and certificates")
        certs = entry.get("certificates", [])
        if isinstance(certs, str):
            certs = [certs]
        if not certs:
            raise XuaConfigError(f"trusted issuer {entry['issuer']}: no certificates")
        extra = set(entry) - {"issuer", "certificates", "communities"}
        if extra:
            raise XuaConfigError(
                f"trusted issuer {entry['issuer']}: unknown key(s): {', '.join(sorted(extra))}"
            )
        communities = entry.get("communities", [])
        if isinstance(communities, str):
            communities = [communities]
        if not isinstance(communities, list) or not all(
            isinstance(c, str) and c.startswith("urn:oid:") for c in communities
        ):
            raise XuaConfigError(
                f"trusted issuer {entry['issuer']}: communities must be urn:oid: homeCommunityIds"
            )
        issuers.append(
            TrustedIssuer(
                entry["issuer"],
                tuple(_path(base_dir, c, "xua.trusted_issuers.certificates") for c in certs),
                tuple(communities),
            )
        )
    for key in ("audiences", "required_attributes", "subject_confirmation_methods"):
        if key in table:
            table[key] = tuple(table[key])
    identity_t = outbound_t.pop("identity", None)
    for key in ("signing_key", "signing_certificate"):
        if key in outbound_t:
            outbound_t[key] = _path(base_dir, outbound_t[key], f"xua.outbound.{key}")
    if "trusted_header_clients" in outbound_t:
        outbound_t["trusted_header_clients"] = tuple(outbound_t["trusted_header_clients"])
    unknown = set(outbound_t) - set(XuaOutboundConfig.__dataclass_fields__)
    if unknown:
        raise XuaConfigError(f"[xua.outbound] unknown key(s): {', '.join(sorted(unknown))}")
    outbound = XuaOutboundConfig(
        **outbound_t, identity=_identity(identity_t) if identity_t is not None else None
    )
    if outbound.mode not in ("off", "passthrough", "issue", "passthrough_or_issue"):
        raise XuaConfigError(f"xua.outbound.mode: unknown mode {outbound.mode!r}")
    if outbound.identity_source not in ("config", "header", "caller"):
        raise XuaConfigError("xua.outbound.identity_source must be 'config', 'header' or 'caller'")
    if outbound.mode in ("issue", "passthrough_or_issue") and (
        outbound.identity is None and outbound.identity_source == "config"
    ):
        raise XuaConfigError("[xua.outbound.identity] is required to issue assertions")
    try:
        config = XuaConfig(**table, trusted_issuers=tuple(issuers), outbound=outbound)
    except TypeError as exc:
        raise XuaConfigError(f"[xua] {exc}") from None
    if config.enabled and not config.trusted_issuers:
        raise XuaConfigError("[xua] enabled needs at least one [[xua.trusted_issuers]]")
    if config.clock_skew < 0 or outbound.lifetime <= 0:
        raise XuaConfigError("[xua] clock_skew must be >= 0 and outbound.lifetime > 0")
    return config


# --------------------------------------------------------------------------- inbound service


class XuaValidator:
    """The responding side's validator built from :class:`XuaConfig` (certificates loaded once)."""

    def __init__(
        self,
        config: XuaConfig,
        *,
        default_audiences: Iterable[str] = (),
        replay_cache: ReplayGuard | None = None,
    ) -> None:
        self.config = config
        self.audiences = tuple(config.audiences) or tuple(default_audiences)
        if config.enabled and not self.audiences:
            raise XuaConfigError("[xua] audiences is empty and no default was given")
        self.trusted: dict[str, list[x509.Certificate]] = {}
        for issuer in config.trusted_issuers:
            certs = self.trusted.setdefault(issuer.issuer, [])
            for path in issuer.certificates:
                certs.extend(load_certificates(path))
        # A shared store (replicas) when given; else this process's own memory.
        self.replay_cache: ReplayGuard | None = None
        if config.reject_replay:
            self.replay_cache = (
                replay_cache if replay_cache is not None else ReplayCache(config.replay_cache_size)
            )

    def trusted_issuer(self, issuer: str) -> TrustedIssuer | None:
        """The configured entry of an identity provider (which communities it may vouch for)."""
        entries = [t for t in self.config.trusted_issuers if t.issuer == issuer]
        if not entries:
            return None
        if len(entries) == 1:
            return entries[0]
        # The same issuer listed twice: it may vouch for the union of what each entry names.
        if any(not t.communities for t in entries):
            return TrustedIssuer(issuer, ())
        return TrustedIssuer(issuer, (), tuple(c for t in entries for c in t.communities))

    def validate(
        self,
        envelope_header: etree._Element | None,
        *,
        peer_certificate_der: bytes | None = None,
        now: datetime | None = None,
    ) -> XuaAssertion:
        return self._validate(envelope_header, peer_certificate_der, now, self.replay_cache)

    async def validate_async(
        self,
        envelope_header: etree._Element | None,
        *,
        peer_certificate_der: bytes | None = None,
        now: datetime | None = None,
    ) -> XuaAssertion:
        """:meth:`validate` for the event loop: a replay cache behind I/O (the replicas'
        shared database) is awaited, never waited on."""
        cache = self.replay_cache
        if not isinstance(cache, AsyncReplayGuard):
            return self._validate(envelope_header, peer_certificate_der, now, cache)
        now = (now or datetime.now(UTC)).astimezone(UTC)
        assertion = self._validate(envelope_header, peer_certificate_der, now, None)
        key = replay_key(assertion, timedelta(seconds=self.config.clock_skew), now)
        try:
            fresh = await cache.check_and_add_async(*key)
        except ReplayCheckUnavailable as exc:
            raise replay_unavailable(assertion, exc) from None
        if not fresh:
            raise replayed(assertion)
        return assertion

    def _validate(
        self,
        envelope_header: etree._Element | None,
        peer_certificate_der: bytes | None,
        now: datetime | None,
        replay_cache: ReplayGuard | None,
    ) -> XuaAssertion:
        cfg = self.config
        return validate_assertion(
            envelope_header,
            trusted_issuers=self.trusted,
            audience=self.audiences,
            clock_skew=timedelta(seconds=cfg.clock_skew),
            now=now,
            replay_cache=replay_cache,
            required_attributes=cfg.required_attributes,
            max_lifetime=(
                timedelta(seconds=cfg.max_lifetime) if cfg.max_lifetime is not None else None
            ),
            subject_confirmation_methods=cfg.subject_confirmation_methods,
            peer_certificate_der=peer_certificate_der,
        )


# --------------------------------------------------------------------------- outbound service


HEADER_NAME_ID = "x-xua-nameid"
HEADER_SP_PROVIDED_ID = "x-xua-spprovidedid"
HEADER_SUBJECT_ID = "x-xua-subject-id"
HEADER_ORGANIZATION = "x-xua-organization"
HEADER_ORGANIZATION_ID = "x-xua-organization-id"
HEADER_ROLE = "x-xua-role"
HEADER_PURPOSE_OF_USE = "x-xua-purposeofuse"
HEADER_RESOURCE_ID = "x-xua-resource-id"


def _header_values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    values: list[str] = []
    for key, value in headers:
        if key.lower() == name:
            values.extend(v.strip() for v in value.split(",") if v.strip())
    return values


def identity_from_headers(
    headers: Sequence[tuple[str, str]], fallback: XuaIdentity | None
) -> XuaIdentity | None:
    """The user a trusted local consumer names in ``X-XUA-*`` HTTP headers (None if absent).

    Codes are ``codeSystem|code`` tokens; the fallback (configured identity) supplies whatever
    the headers leave out, typically the organization and the community.
    """
    name_ids = _header_values(headers, HEADER_NAME_ID)
    if not name_ids:
        return None

    def one(name: str, default: str | None) -> str | None:
        values = _header_values(headers, name)
        return values[0] if values else default

    roles = tuple(parse_ce(v, HEADER_ROLE) for v in _header_values(headers, HEADER_ROLE))
    purposes = tuple(
        parse_ce(v, HEADER_PURPOSE_OF_USE) for v in _header_values(headers, HEADER_PURPOSE_OF_USE)
    )
    base = fallback or XuaIdentity(name_id=name_ids[0])
    return XuaIdentity(
        name_id=name_ids[0],
        name_id_format=base.name_id_format,
        sp_provided_id=one(HEADER_SP_PROVIDED_ID, None),
        subject_id=one(HEADER_SUBJECT_ID, None),
        organization=one(HEADER_ORGANIZATION, base.organization),
        organization_id=one(HEADER_ORGANIZATION_ID, base.organization_id),
        home_community_id=base.home_community_id,
        roles=roles or base.roles,
        purposes_of_use=purposes or base.purposes_of_use,
        resource_id=one(HEADER_RESOURCE_ID, None),
        authn_context_class=base.authn_context_class,
        subject_confirmation_method=base.subject_confirmation_method,
    )


class XuaOutbound:
    """X-Service User side: the ``wsse:Security`` header block for each call to a peer."""

    def __init__(
        self,
        config: XuaOutboundConfig,
        *,
        issuer: str,
        key_pem: bytes,
        cert_pem: bytes,
        home_community_id: str | None = None,
    ) -> None:
        self.config = config
        self.issuer = config.issuer or issuer
        self.key: SigningKey = load_signing_key(key_pem) if key_pem else key_pem
        self.cert_pem = cert_pem
        identity = config.identity
        if identity is not None and identity.home_community_id is None and home_community_id:
            identity = replace(identity, home_community_id=home_community_id)
        self.identity = identity

    @classmethod
    def from_config(
        cls,
        config: XuaOutboundConfig,
        *,
        tls_key: Path,
        tls_certificate: Path,
        base_url: str,
        home_community_id: str,
    ) -> XuaOutbound:
        """Sign with the configured key, else the gateway's TLS key; issuer default: base URL."""
        return cls(
            config,
            issuer=base_url,
            key_pem=(config.signing_key or tls_key).read_bytes(),
            cert_pem=(config.signing_certificate or tls_certificate).read_bytes(),
            home_community_id=home_community_id,
        )

    def audience_for(self, endpoint_url: str, peer_home_community_id: str | None) -> str:
        if self.config.audience == "endpoint":
            return endpoint_url
        if self.config.audience == "home_community_id":
            return peer_home_community_id or endpoint_url
        return self.config.audience

    def _trusted_header_client(self, request: SoapRequest) -> bool:
        cert = request.peer.certificate
        if cert is None:
            return False
        trusted = {t.lower().replace(":", "") for t in self.config.trusted_header_clients}
        return cert.fingerprint_sha256.lower() in trusted or cert.subject in set(
            self.config.trusted_header_clients
        )

    def identity_for(self, request: SoapRequest | None) -> XuaIdentity | None:
        if (
            self.config.identity_source == "header"
            and request is not None
            and self._trusted_header_client(request)
        ):
            from_headers = identity_from_headers(request.http.headers, self.identity)
            if from_headers is not None:
                return from_headers
        if self.config.identity_source == "caller":
            # Never a confused deputy: the assertion names the local system the request came
            # from (verified by TLS and the access policy), not the gateway.
            principal = current_caller()
            if principal is not None and principal.is_person:
                # A clinician at the web door: the token's subject as the NameID, qualified
                # by the authorization server that named them, their name as subject-id.
                base = self.identity or XuaIdentity(name_id=principal.user_id)
                return replace(
                    base,
                    name_id=principal.user_id,
                    name_id_format=NAMEID_UNSPECIFIED,
                    name_qualifier=principal.identity.token_issuer,
                    subject_id=principal.name,
                    # How the authorization server authenticated them is its business.
                    authn_context_class=AC_UNSPECIFIED,
                )
            if principal is not None and not principal.has(Role.PEER_GATEWAY):
                base = self.identity or XuaIdentity(name_id=principal.user_id)
                return replace(
                    base,
                    name_id=principal.user_id,
                    name_id_format=(
                        NAMEID_X509_SUBJECT
                        if principal.identity.certificate_subject
                        else NAMEID_UNSPECIFIED
                    ),
                    subject_id=principal.name,
                )
        return self.identity

    def security_headers(
        self,
        request: SoapRequest | None,
        *,
        endpoint_url: str,
        peer_home_community_id: str | None = None,
        now: datetime | None = None,
    ) -> list[etree._Element]:
        """Header blocks for one outbound call (empty when no assertion is to be sent).

        ``request`` is the local consumer's request that caused the call (ITI-18/43, RAD-69),
        or None for calls of the gateway's own (probes).
        """
        mode = self.config.mode
        if mode == "off":
            return []
        if mode in ("passthrough", "passthrough_or_issue") and request is not None:
            # Relaying keeps the Subject unchanged (ITI40-010): forward the assertion as is.
            original = find_assertion(request.envelope.header)
            if original is not None:
                return [wsse_security_header(copy.deepcopy(original))]
        if mode == "passthrough":
            return []
        identity = self.identity_for(request)
        if identity is None:
            return []
        assertion = issue_assertion(
            identity,
            issuer=self.issuer,
            audience=self.audience_for(endpoint_url, peer_home_community_id),
            key_pem=self.key,
            cert_pem=self.cert_pem,
            lifetime=timedelta(seconds=self.config.lifetime),
            now=now,
        )
        return [wsse_security_header(assertion)]


def certificate_fingerprint(pem: bytes) -> str:
    """SHA-256 fingerprint (hex) of a PEM certificate, as policy files name certificates."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()
