"""XUA (ITI-40): issuing, validating and refusing SAML 2.0 assertions in WS-Security headers."""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree

from xca_gateway.protocol.http_server import PeerCertificate, PeerInfo, Request
from xca_gateway.protocol.namespaces import SOAP12, WSSE
from xca_gateway.protocol.soap import build_envelope, build_fault, parse_envelope, serialize
from xca_gateway.protocol.soap_service import SoapEndpoint, SoapRequest
from xca_gateway.protocol.xmlsafe import parse_xml
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.security.xua import (
    CM_HOLDER_OF_KEY,
    DEFAULT_REQUIRED_ATTRIBUTES,
    DS,
    SAML,
    Ce,
    ReplayCache,
    ReplayCheckUnavailable,
    WsseFault,
    XuaAttribute,
    XuaConfigError,
    XuaError,
    XuaIdentity,
    XuaOutbound,
    XuaOutboundConfig,
    XuaValidator,
    audit_user_name,
    build_assertion,
    find_assertion,
    issue_assertion,
    parse_xua_config,
    sign_assertion,
    to_soap_fault,
    validate_assertion,
    wsse_security_header,
)

ISSUER = "https://idp.beta.example"
AUDIENCE = "https://alpha.example/xca/iti38"
TREATMENT = Ce("TREATMENT", "2.16.840.1.113883.3.18.7.1", "Treatment")
PHYSICIAN = Ce("309343006", "2.16.840.1.113883.6.96", "Physician")
IDENTITY = XuaIdentity(
    name_id="dr.smith",
    subject_id="Dr. Jane Smith",
    organization="Hospital B",
    organization_id="urn:oid:1.2.3.4",
    home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.2",
    roles=(PHYSICIAN,),
    purposes_of_use=(TREATMENT,),
    resource_id="P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
)


class Signer:
    def __init__(self, pki: DevPki, name: str = "beta") -> None:
        pair = pki.communities[name]
        self.key = pair.key.read_bytes()
        self.cert = pair.cert.read_bytes()


@pytest.fixture(scope="module")
def signer(pki: DevPki) -> Signer:
    return Signer(pki)


@pytest.fixture(scope="module")
def rogue(pki: DevPki) -> Signer:
    """A key the validator does not trust for ISSUER (another CA's client certificate)."""
    s = Signer(pki)
    s.key = pki.untrusted_client.key.read_bytes()
    s.cert = pki.untrusted_client.cert.read_bytes()
    return s


def issue(signer: Signer, identity: XuaIdentity = IDENTITY, **kw: Any) -> etree._Element:
    kw.setdefault("issuer", ISSUER)
    kw.setdefault("audience", AUDIENCE)
    return issue_assertion(identity, key_pem=signer.key, cert_pem=signer.cert, **kw)


def on_the_wire(*security_children: etree._Element, extra: list[etree._Element] | None = None):  # type: ignore[no-untyped-def]
    """The SOAP header of a request carrying these assertions, after a serialize/parse trip."""
    security = etree.Element(f"{{{WSSE}}}Security", nsmap={"wsse": WSSE})
    security.set(f"{{{SOAP12}}}mustUnderstand", "true")
    for child in security_children:
        security.append(child)
    payload = etree.Element("{urn:example}Payload")
    env = build_envelope(payload, action="urn:example", extra_headers=[security, *(extra or [])])
    root = parse_xml(serialize(env))
    return root.find(f"{{{SOAP12}}}Header")


def validate(header: etree._Element | None, signer: Signer, **kw: Any):  # type: ignore[no-untyped-def]
    kw.setdefault("trusted_issuers", {ISSUER: [signer.cert]})
    kw.setdefault("audience", AUDIENCE)
    return validate_assertion(header, **kw)


def refused(fn: Callable[[], object]) -> XuaError:
    with pytest.raises(XuaError) as info:
        fn()
    return info.value


# --------------------------------------------------------------------------- accepted


def test_a_signed_assertion_is_accepted_with_every_attribute(signer: Signer) -> None:
    header = on_the_wire(issue(signer))
    assertion = validate(header, signer, replay_cache=ReplayCache())
    assert assertion.issuer == ISSUER
    assert assertion.name_id == "dr.smith"
    assert assertion.audiences == (AUDIENCE,)
    assert assertion.subject_id == "Dr. Jane Smith"
    assert assertion.organization == "Hospital B"
    assert assertion.organization_id == "urn:oid:1.2.3.4"
    assert assertion.home_community_id == "urn:oid:1.3.6.1.4.1.21367.13.70.2"
    assert assertion.roles == (PHYSICIAN,)
    assert assertion.purposes_of_use == (TREATMENT,)
    assert assertion.resource_id == "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    assert assertion.authn_context_class_ref is not None
    assert assertion.not_before == assertion.issue_instant  # ITI40-013
    cert = x509.load_pem_x509_certificate(signer.cert)
    assert assertion.signer_fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert audit_user_name(assertion) == f"<dr.smith@{ISSUER}>"


def test_the_audit_user_name_carries_the_sp_provided_alias(signer: Signer) -> None:
    identity = replace(IDENTITY, sp_provided_id="js")
    assertion = validate(on_the_wire(issue(signer, identity)), signer)
    assert assertion.user_name == f"js<dr.smith@{ISSUER}>"


def test_assertion_layout_follows_saml_and_xspa(signer: Signer) -> None:
    element = issue(signer)
    children = [etree.QName(c).localname for c in element]
    # SAML core schema order: Issuer, Signature, Subject, Conditions, statements.
    assert children == [
        "Issuer",
        "Signature",
        "Subject",
        "Conditions",
        "AuthnStatement",
        "AttributeStatement",
    ]
    signed_info = element.find(f"{{{DS}}}Signature/{{{DS}}}SignedInfo")
    assert signed_info is not None
    reference = signed_info.find(f"{{{DS}}}Reference")
    assert reference is not None and reference.get("URI") == f"#{element.get('ID')}"
    methods = {e.get("Algorithm") for e in signed_info.iter() if e.get("Algorithm")}
    assert "http://www.w3.org/2001/10/xml-exc-c14n#" in methods
    assert "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256" in methods
    role = element.find(
        f".//{{{SAML}}}Attribute[@Name='{XuaAttribute.ROLE}']/{{{SAML}}}AttributeValue"
        "/{urn:hl7-org:v3}Role"
    )
    assert role is not None and role.get("code") == PHYSICIAN.code
    assert role.get("{http://www.w3.org/2001/XMLSchema-instance}type") == "CE"


def test_clock_skew_tolerates_a_slightly_early_assertion(signer: Signer) -> None:
    now = datetime.now(UTC)
    element = issue(signer, now=now + timedelta(seconds=30))
    validate(on_the_wire(element), signer, now=now, clock_skew=timedelta(seconds=60))


# --------------------------------------------------------------------------- refused


def test_expired_assertion_is_refused(signer: Signer) -> None:
    now = datetime.now(UTC)
    element = issue(signer, now=now - timedelta(minutes=10), lifetime=timedelta(minutes=5))
    error = refused(lambda: validate(on_the_wire(element), signer, now=now))
    assert error.fault_code == WsseFault.INVALID_SECURITY_TOKEN
    assert "expired" in error.reason
    # The claimed user is still known, for the audit record.
    assert error.assertion is not None and error.assertion.name_id == "dr.smith"


def test_not_yet_valid_assertion_is_refused(signer: Signer) -> None:
    now = datetime.now(UTC)
    element = issue(signer, now=now + timedelta(minutes=10))
    error = refused(lambda: validate(on_the_wire(element), signer, now=now))
    assert error.fault_code == WsseFault.INVALID_SECURITY_TOKEN


def test_assertion_outliving_the_maximum_lifetime_is_refused(signer: Signer) -> None:
    element = issue(signer, lifetime=timedelta(hours=48))
    error = refused(lambda: validate(on_the_wire(element), signer, max_lifetime=timedelta(hours=8)))
    assert error.fault_code == WsseFault.INVALID_SECURITY_TOKEN
    assert "lifetime" in error.reason


def test_unsigned_assertion_is_refused(signer: Signer) -> None:
    element = build_assertion(
        IDENTITY, issuer=ISSUER, audience=AUDIENCE, lifetime=timedelta(minutes=5)
    )
    placeholder = element.find(f"{{{DS}}}Signature")
    assert placeholder is not None
    element.remove(placeholder)
    error = refused(lambda: validate(on_the_wire(element), signer))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION
    assert "not signed" in error.reason


def test_untrusted_issuer_is_refused(signer: Signer) -> None:
    element = issue(signer, issuer="https://idp.elsewhere.example")
    error = refused(lambda: validate(on_the_wire(element), signer))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION
    assert "not a trusted" in error.reason


def test_signature_by_a_key_not_trusted_for_the_issuer_is_refused(
    signer: Signer, rogue: Signer
) -> None:
    # Claims the trusted issuer, signed with someone else's key (whose cert rides in KeyInfo).
    element = issue(rogue)
    error = refused(lambda: validate(on_the_wire(element), signer))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION
    assert "trusted certificate" in error.reason


def test_another_trusted_issuers_key_does_not_sign_for_this_issuer(
    signer: Signer, pki: DevPki
) -> None:
    gamma = Signer(pki, "gamma")
    element = issue(gamma)  # gamma is trusted, but only for its own issuer name
    trusted = {ISSUER: [signer.cert], "https://idp.gamma.example": [gamma.cert]}
    error = refused(lambda: validate(on_the_wire(element), signer, trusted_issuers=trusted))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION


@pytest.mark.parametrize(
    "path, new_value",
    [
        (
            f".//{{{SAML}}}Attribute[@Name='{XuaAttribute.SUBJECT_ID}']/{{{SAML}}}AttributeValue",
            "Eve",
        ),
        (f".//{{{SAML}}}NameID", "eve"),
        (
            f".//{{{SAML}}}Attribute[@Name='{XuaAttribute.RESOURCE_ID}']/{{{SAML}}}AttributeValue",
            "P2^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
        ),
    ],
)
def test_an_attribute_tampered_with_after_signing_is_refused(
    signer: Signer, path: str, new_value: str
) -> None:
    element = issue(signer)
    target = element.find(path)
    assert target is not None
    target.text = new_value
    error = refused(lambda: validate(on_the_wire(element), signer))
    assert error.fault_code == WsseFault.FAILED_CHECK


def test_a_tampered_role_code_is_refused(signer: Signer) -> None:
    element = issue(signer)
    role = element.find(".//{urn:hl7-org:v3}Role")
    assert role is not None
    role.set("code", "admin")
    assert refused(lambda: validate(on_the_wire(element), signer)).fault_code == (
        WsseFault.FAILED_CHECK
    )


def test_a_replayed_assertion_is_refused(signer: Signer) -> None:
    cache = ReplayCache()
    element = issue(signer)
    validate(on_the_wire(copy.deepcopy(element)), signer, replay_cache=cache)
    error = refused(lambda: validate(on_the_wire(element), signer, replay_cache=cache))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION
    assert "replay" in error.reason
    # A fresh assertion for the same user is fine.
    validate(on_the_wire(issue(signer)), signer, replay_cache=cache)


def test_a_refused_assertion_does_not_occupy_the_replay_cache(signer: Signer) -> None:
    cache = ReplayCache()
    element = issue(signer, audience="https://someone-else.example")
    refused(lambda: validate(on_the_wire(copy.deepcopy(element)), signer, replay_cache=cache))
    assert len(cache) == 0


def test_wrong_audience_is_refused(signer: Signer) -> None:
    element = issue(signer, audience="https://gamma.example/xca/iti38")
    error = refused(lambda: validate(on_the_wire(element), signer))
    assert error.fault_code == WsseFault.INVALID_SECURITY_TOKEN
    assert "not intended" in error.reason


def test_one_of_several_accepted_audiences_is_enough(signer: Signer) -> None:
    element = issue(signer, audience="urn:oid:1.3.6.1.4.1.21367.13.70.1")
    validate(
        on_the_wire(element),
        signer,
        audience={AUDIENCE, "urn:oid:1.3.6.1.4.1.21367.13.70.1"},
    )


def test_missing_required_attributes_are_refused(signer: Signer) -> None:
    identity = replace(IDENTITY, roles=(), purposes_of_use=(), organization=None)
    error = refused(lambda: validate(on_the_wire(issue(signer, identity)), signer))
    assert error.fault_code == WsseFault.INVALID_SECURITY_TOKEN
    for name in (XuaAttribute.ROLE, XuaAttribute.PURPOSE_OF_USE, XuaAttribute.ORGANIZATION):
        assert name in error.reason
    # The same assertion passes a provider that requires less.
    validate(
        on_the_wire(issue(signer, identity)),
        signer,
        required_attributes=[XuaAttribute.SUBJECT_ID],
    )


def test_missing_header_and_missing_token_have_their_own_faults(signer: Signer) -> None:
    env = build_envelope(etree.Element("{urn:example}P"), action="urn:example")
    header = parse_xml(serialize(env)).find(f"{{{SOAP12}}}Header")
    assert refused(lambda: validate(header, signer)).fault_code == WsseFault.INVALID_SECURITY
    assert refused(lambda: validate(None, signer)).fault_code == WsseFault.INVALID_SECURITY
    empty = on_the_wire()
    assert (
        refused(lambda: validate(empty, signer)).fault_code == WsseFault.SECURITY_TOKEN_UNAVAILABLE
    )


def test_an_unknown_condition_makes_the_assertion_unacceptable(signer: Signer) -> None:
    element = build_assertion(
        IDENTITY, issuer=ISSUER, audience=AUDIENCE, lifetime=timedelta(minutes=5)
    )
    conditions = element.find(f"{{{SAML}}}Conditions")
    assert conditions is not None
    etree.SubElement(conditions, "{urn:example}OnlyOnTuesdays")
    signed = sign_assertion(element, key_pem=signer.key, cert_pem=signer.cert)
    error = refused(lambda: validate(on_the_wire(signed), signer))
    assert error.fault_code == WsseFault.INVALID_SECURITY_TOKEN


def _holder_of_key(signer: Signer, cert_pem: bytes) -> etree._Element:
    identity = replace(IDENTITY, subject_confirmation_method=CM_HOLDER_OF_KEY)
    element = build_assertion(
        identity, issuer=ISSUER, audience=AUDIENCE, lifetime=timedelta(minutes=5)
    )
    confirmation = element.find(f"{{{SAML}}}Subject/{{{SAML}}}SubjectConfirmation")
    assert confirmation is not None
    data = etree.SubElement(confirmation, f"{{{SAML}}}SubjectConfirmationData")
    key_info = etree.SubElement(data, f"{{{DS}}}KeyInfo")
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    etree.SubElement(
        etree.SubElement(key_info, f"{{{DS}}}X509Data"), f"{{{DS}}}X509Certificate"
    ).text = base64.b64encode(der).decode()
    return sign_assertion(element, key_pem=signer.key, cert_pem=signer.cert)


def test_holder_of_key_needs_the_tls_client_certificate(signer: Signer, pki: DevPki) -> None:
    beta_der = x509.load_pem_x509_certificate(signer.cert).public_bytes(Encoding.DER)
    element = _holder_of_key(signer, signer.cert)
    validate(on_the_wire(copy.deepcopy(element)), signer, peer_certificate_der=beta_der)
    gamma_der = x509.load_pem_x509_certificate(
        pki.communities["gamma"].cert.read_bytes()
    ).public_bytes(Encoding.DER)
    error = refused(lambda: validate(on_the_wire(element), signer, peer_certificate_der=gamma_der))
    assert error.fault_code == WsseFault.INVALID_SECURITY_TOKEN
    assert "holder-of-key" in error.reason


# --------------------------------------------------------------------------- signature wrapping


def _signature_of(element: etree._Element) -> etree._Element:
    signature = element.find(f"{{{DS}}}Signature")
    assert signature is not None
    return signature


def test_wrapping_an_unsigned_assertion_next_to_the_signed_one_is_refused(signer: Signer) -> None:
    signed = issue(signer)
    evil = build_assertion(
        replace(IDENTITY, name_id="eve"),
        issuer=ISSUER,
        audience=AUDIENCE,
        lifetime=timedelta(minutes=5),
    )
    error = refused(lambda: validate(on_the_wire(evil, signed), signer))
    assert error.fault_code == WsseFault.INVALID_SECURITY


def test_the_signed_assertion_moved_inside_a_forged_one_with_the_same_id_is_refused(
    signer: Signer,
) -> None:
    signed = issue(signer)
    evil = build_assertion(
        replace(IDENTITY, name_id="eve", roles=(Ce("admin"),)),
        issuer=ISSUER,
        audience=AUDIENCE,
        lifetime=timedelta(minutes=5),
        assertion_id=signed.get("ID"),
    )
    placeholder = evil.find(f"{{{DS}}}Signature")
    assert placeholder is not None
    evil.replace(placeholder, copy.deepcopy(_signature_of(signed)))
    advice = etree.Element(f"{{{SAML}}}Advice")
    advice.append(signed)  # the genuine signed assertion, hidden where a verifier may find it
    conditions = evil.find(f"{{{SAML}}}Conditions")
    assert conditions is not None
    conditions.addnext(advice)
    error = refused(lambda: validate(on_the_wire(evil), signer))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION
    assert "more than once" in error.reason


def test_a_forged_assertion_pointing_its_copied_signature_at_the_moved_original_is_refused(
    signer: Signer,
) -> None:
    signed = issue(signer)
    evil = build_assertion(
        replace(IDENTITY, name_id="eve"),
        issuer=ISSUER,
        audience=AUDIENCE,
        lifetime=timedelta(minutes=5),
    )
    placeholder = evil.find(f"{{{DS}}}Signature")
    assert placeholder is not None
    evil.replace(placeholder, copy.deepcopy(_signature_of(signed)))
    # The original moves to another header block, where an ID lookup would still find it.
    elsewhere = etree.Element("{urn:example}Elsewhere")
    elsewhere.append(signed)
    error = refused(lambda: validate(on_the_wire(evil, extra=[elsewhere]), signer))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION
    assert "does not reference this assertion" in error.reason


def test_a_forged_assertion_reusing_id_and_signature_is_refused(signer: Signer) -> None:
    signed = issue(signer)
    evil = build_assertion(
        replace(IDENTITY, name_id="eve"),
        issuer=ISSUER,
        audience=AUDIENCE,
        lifetime=timedelta(minutes=5),
        assertion_id=signed.get("ID"),
    )
    placeholder = evil.find(f"{{{DS}}}Signature")
    assert placeholder is not None
    evil.replace(placeholder, copy.deepcopy(_signature_of(signed)))
    error = refused(lambda: validate(on_the_wire(evil), signer))
    assert error.fault_code == WsseFault.FAILED_CHECK


def test_the_signed_assertion_in_another_header_and_a_forgery_in_security_is_refused(
    signer: Signer,
) -> None:
    signed = issue(signer)
    evil = copy.deepcopy(signed)
    name_id = evil.find(f".//{{{SAML}}}NameID")
    assert name_id is not None
    name_id.text = "eve"
    elsewhere = etree.Element("{urn:example}Elsewhere")
    elsewhere.append(signed)
    error = refused(lambda: validate(on_the_wire(evil, extra=[elsewhere]), signer))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION


def test_a_signature_moved_below_the_assertion_root_does_not_count(signer: Signer) -> None:
    element = issue(signer)
    signature = element.find(f"{{{DS}}}Signature")
    subject = element.find(f"{{{SAML}}}Subject")
    assert signature is not None and subject is not None
    subject.append(signature)
    error = refused(lambda: validate(on_the_wire(element), signer))
    assert error.fault_code == WsseFault.FAILED_AUTHENTICATION


def test_an_assertion_nested_below_security_is_not_the_token(signer: Signer) -> None:
    wrapper = etree.Element("{urn:example}Wrapper")
    wrapper.append(issue(signer))
    header = on_the_wire(wrapper)
    assert find_assertion(header) is None
    error = refused(lambda: validate(header, signer))
    assert error.fault_code == WsseFault.SECURITY_TOKEN_UNAVAILABLE


# --------------------------------------------------------------------------- faults


def test_refusals_become_ws_security_sender_faults(signer: Signer) -> None:
    fault = to_soap_fault(XuaError(WsseFault.FAILED_CHECK, "tampered"))
    assert fault.code == "Sender" and fault.http_status == 400
    assert fault.subcode == (WSSE, "FailedCheck")
    body, _ = build_fault(fault)
    root = etree.fromstring(body)
    value = root.find(f".//{{{SOAP12}}}Subcode/{{{SOAP12}}}Value")
    assert value is not None and value.text is not None
    prefix, _, local = value.text.partition(":")
    assert local == "FailedCheck" and value.nsmap[prefix] == WSSE
    assert "tampered" in (root.findtext(f".//{{{SOAP12}}}Text") or "")


# --------------------------------------------------------------------------- replay cache


def test_replay_cache_forgets_expired_ids_and_stays_bounded() -> None:
    now = datetime.now(UTC)
    cache = ReplayCache(max_entries=3)
    assert cache.check_and_add("i", "a", now + timedelta(seconds=10), now)
    assert not cache.check_and_add("i", "a", now + timedelta(seconds=10), now)
    # The same ID from another issuer is another assertion.
    assert cache.check_and_add("j", "a", now + timedelta(seconds=10), now)
    later = now + timedelta(seconds=11)
    assert cache.check_and_add("i", "a", later + timedelta(seconds=10), later)
    for n in range(10):
        cache.check_and_add("i", f"x{n}", later + timedelta(seconds=20 + n), later)
        assert len(cache) <= 3
    assert cache.evicted > 0


# --------------------------------------------------------------------------- interoperability

XMLSEC1 = shutil.which("xmlsec1")
needs_xmlsec1 = pytest.mark.skipif(XMLSEC1 is None, reason="xmlsec1 is not installed")


def _xmlsec_verify(document: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    assert XMLSEC1 is not None
    return subprocess.run(
        [
            XMLSEC1,
            "--verify",
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            "--trusted-pem",
            str(ca),
            str(document),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_xmlsec1
def test_our_assertions_verify_with_xmlsec1(signer: Signer, pki: DevPki, tmp_path: Path) -> None:
    # The whole SOAP envelope, as a peer receives it: the signature survives the embedding.
    security = wsse_security_header(issue(signer))
    env = build_envelope(
        etree.Element("{urn:example}P"), action="urn:example", extra_headers=[security]
    )
    good = tmp_path / "good.xml"
    good.write_bytes(serialize(env))
    result = _xmlsec_verify(good, pki.ca)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout + result.stderr

    tampered = tmp_path / "tampered.xml"
    tampered.write_bytes(good.read_bytes().replace(b"Hospital B", b"Hospital X"))
    assert _xmlsec_verify(tampered, pki.ca).returncode != 0
    # A CA that did not issue the signing certificate is not trusted by xmlsec1 either.
    assert _xmlsec_verify(good, pki.dir / "untrusted-ca.pem").returncode != 0


@needs_xmlsec1
def test_assertions_signed_by_xmlsec1_validate_here(
    signer: Signer, pki: DevPki, tmp_path: Path
) -> None:
    element = build_assertion(
        IDENTITY, issuer=ISSUER, audience=AUDIENCE, lifetime=timedelta(minutes=5)
    )
    signature = element.find(f"{{{DS}}}Signature")
    assert signature is not None
    del signature.attrib["Id"]
    signed_info = etree.SubElement(signature, f"{{{DS}}}SignedInfo")
    etree.SubElement(
        signed_info,
        f"{{{DS}}}CanonicalizationMethod",
        Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#",
    )
    etree.SubElement(
        signed_info,
        f"{{{DS}}}SignatureMethod",
        Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
    )
    reference = etree.SubElement(signed_info, f"{{{DS}}}Reference", URI=f"#{element.get('ID')}")
    transforms = etree.SubElement(reference, f"{{{DS}}}Transforms")
    for algorithm in (
        "http://www.w3.org/2000/09/xmldsig#enveloped-signature",
        "http://www.w3.org/2001/10/xml-exc-c14n#",
    ):
        etree.SubElement(transforms, f"{{{DS}}}Transform", Algorithm=algorithm)
    etree.SubElement(
        reference, f"{{{DS}}}DigestMethod", Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"
    )
    etree.SubElement(reference, f"{{{DS}}}DigestValue")
    etree.SubElement(signature, f"{{{DS}}}SignatureValue")
    template = tmp_path / "template.xml"
    template.write_bytes(etree.tostring(element))
    output = tmp_path / "signed.xml"
    assert XMLSEC1 is not None
    pair = pki.communities["beta"]
    subprocess.run(
        [
            XMLSEC1,
            "--sign",
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            "--privkey-pem",
            f"{pair.key},{pair.cert}",
            "--output",
            str(output),
            str(template),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    signed = parse_xml(output.read_bytes())
    assertion = validate(on_the_wire(signed), signer)
    assert assertion.name_id == "dr.smith"
    assert assertion.purposes_of_use[0].code == "TREATMENT"


# --------------------------------------------------------------------------- outbound


def test_outbound_issue_mode_signs_for_the_peer_endpoint(signer: Signer) -> None:
    outbound = XuaOutbound(
        XuaOutboundConfig(mode="issue", identity=replace(IDENTITY, home_community_id=None)),
        issuer=ISSUER,
        key_pem=signer.key,
        cert_pem=signer.cert,
        home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.2",
    )
    blocks = outbound.security_headers(None, endpoint_url=AUDIENCE)
    assert len(blocks) == 1 and blocks[0].tag == f"{{{WSSE}}}Security"
    env = build_envelope(
        etree.Element("{urn:example}P"), action="urn:example", extra_headers=blocks
    )
    header = parse_xml(serialize(env)).find(f"{{{SOAP12}}}Header")
    assertion = validate(header, signer)
    # The gateway's own community fills in what the configured identity leaves out.
    assert assertion.home_community_id == "urn:oid:1.3.6.1.4.1.21367.13.70.2"
    off = XuaOutbound(XuaOutboundConfig(), issuer=ISSUER, key_pem=signer.key, cert_pem=signer.cert)
    assert off.security_headers(None, endpoint_url=AUDIENCE) == []


def test_parse_xua_config(tmp_path: Path) -> None:
    config = parse_xua_config(
        {
            "enabled": True,
            "audiences": ["https://gw.example/xca"],
            "clock_skew": 30,
            "trusted_issuers": [{"issuer": ISSUER, "certificates": ["idp.pem"]}],
            "outbound": {
                "mode": "issue",
                "lifetime": 120,
                "identity": {
                    "name_id": "gateway",
                    "roles": ["2.16.840.1.113883.6.96|309343006"],
                    "purposes_of_use": [
                        {"code": "TREATMENT", "code_system": "2.16.840.1.113883.3.18.7.1"}
                    ],
                },
            },
        },
        tmp_path,
    )
    assert config.trusted_issuers[0].certificates == (tmp_path / "idp.pem",)
    assert config.required_attributes == DEFAULT_REQUIRED_ATTRIBUTES
    identity = config.outbound.identity
    assert identity is not None
    assert identity.roles == (Ce("309343006", "2.16.840.1.113883.6.96"),)
    assert identity.purposes_of_use[0].code == "TREATMENT"
    with pytest.raises(XuaConfigError):
        parse_xua_config({"enabled": True}, tmp_path)  # no trusted issuer
    with pytest.raises(XuaConfigError):
        parse_xua_config({"outbound": {"mode": "issue"}}, tmp_path)  # nothing to assert
    with pytest.raises(XuaConfigError):
        parse_xua_config({"bogus": 1}, tmp_path)


def test_validator_loads_issuer_certificates_from_files(signer: Signer, tmp_path: Path) -> None:
    (tmp_path / "idp.pem").write_bytes(signer.cert)
    config = parse_xua_config(
        {"enabled": True, "trusted_issuers": [{"issuer": ISSUER, "certificates": "idp.pem"}]},
        tmp_path,
    )
    validator = XuaValidator(config, default_audiences=[AUDIENCE])
    element = issue(signer)
    assert validator.validate(on_the_wire(copy.deepcopy(element))).name_id == "dr.smith"
    # Replay protection is on by default.
    error = refused(lambda: validator.validate(on_the_wire(element)))
    assert "replay" in error.reason


def _local_request(
    headers: list[tuple[str, str]],
    security: list[etree._Element],
    fingerprint: str = "aa" * 32,
) -> SoapRequest:
    """A local consumer's ITI-18 request as the initiating side sees it."""

    async def no_body() -> AsyncIterator[bytes]:
        empty: tuple[bytes, ...] = ()
        for chunk in empty:
            yield chunk

    env = build_envelope(etree.Element("{urn:example}P"), action="urn:a", extra_headers=security)
    envelope = parse_envelope(parse_xml(serialize(env)))
    peer = PeerInfo("127.0.0.1", 1, PeerCertificate("CN=portal", "CN=ca", 1, fingerprint))
    http = Request("POST", "/ig/iti18", headers, peer, no_body(), "https")
    endpoint = SoapEndpoint("/ig/iti18", "iti18", {})
    return SoapRequest(envelope, {}, peer, endpoint, http)


def test_outbound_passthrough_forwards_the_consumers_assertion_unchanged(signer: Signer) -> None:
    original = issue(signer)
    request = _local_request([], [wsse_security_header(copy.deepcopy(original))])
    outbound = XuaOutbound(
        XuaOutboundConfig(mode="passthrough"), issuer="x", key_pem=b"", cert_pem=b""
    )
    [block] = outbound.security_headers(request, endpoint_url=AUDIENCE)
    forwarded = block.find(f"{{{SAML}}}Assertion")
    assert forwarded is not None
    assert etree.tostring(forwarded, method="c14n", exclusive=True) == etree.tostring(
        original, method="c14n", exclusive=True
    )
    validate(on_the_wire(forwarded), signer)
    # Nothing to forward: passthrough sends nothing, passthrough_or_issue would issue.
    assert outbound.security_headers(_local_request([], []), endpoint_url=AUDIENCE) == []


def test_outbound_issues_for_the_user_named_by_a_trusted_local_consumer(signer: Signer) -> None:
    headers = [
        ("x-xua-nameid", "nurse.jones"),
        ("x-xua-subject-id", "Nurse Jones"),
        ("x-xua-role", "2.16.840.1.113883.6.96|224535009"),
        ("x-xua-purposeofuse", "2.16.840.1.113883.3.18.7.1|EMERGENCY"),
        ("x-xua-resource-id", "P9^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"),
    ]
    config = XuaOutboundConfig(
        mode="passthrough_or_issue",
        identity_source="header",
        trusted_header_clients=("AA:" * 31 + "AA",),
        identity=IDENTITY,
    )
    outbound = XuaOutbound(config, issuer=ISSUER, key_pem=signer.key, cert_pem=signer.cert)
    [block] = outbound.security_headers(_local_request(headers, []), endpoint_url=AUDIENCE)
    env = build_envelope(etree.Element("{urn:example}P"), action="urn:a", extra_headers=[block])
    assertion = validate(parse_xml(serialize(env)).find(f"{{{SOAP12}}}Header"), signer)
    assert assertion.name_id == "nurse.jones"
    assert assertion.roles == (Ce("224535009", "2.16.840.1.113883.6.96"),)
    assert assertion.purposes_of_use[0].code == "EMERGENCY"
    assert assertion.resource_id == "P9^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    # Organization and community come from the configured identity.
    assert assertion.organization == IDENTITY.organization
    # An untrusted consumer's headers are ignored: the configured identity is asserted.
    untrusted = _local_request(headers, [], fingerprint="bb" * 32)
    [block] = outbound.security_headers(untrusted, endpoint_url=AUDIENCE)
    forwarded = block.find(f"{{{SAML}}}Assertion")
    assert forwarded is not None
    name_id = forwarded.find(f".//{{{SAML}}}NameID")
    assert name_id is not None and name_id.text == IDENTITY.name_id


async def test_validate_async_awaits_a_replay_cache_behind_io(
    signer: Signer, tmp_path: Path
) -> None:
    """A shared replay cache is awaited (its blocking method is never called on the event
    loop); one that cannot answer refuses the assertion as InvalidSecurity, naming the user."""

    class SharedCache:
        def __init__(self) -> None:
            self.seen: set[tuple[str, str]] = set()
            self.down = False

        def check_and_add(self, *args: object) -> bool:
            raise AssertionError("blocking replay check called from async code")

        async def check_and_add_async(
            self, issuer: str, assertion_id: str, expires: object, now: object
        ) -> bool:
            if self.down:
                raise ReplayCheckUnavailable("shared database did not answer within 8.0 s")
            fresh = (issuer, assertion_id) not in self.seen
            self.seen.add((issuer, assertion_id))
            return fresh

    (tmp_path / "idp.pem").write_bytes(signer.cert)
    config = parse_xua_config(
        {"enabled": True, "trusted_issuers": [{"issuer": ISSUER, "certificates": "idp.pem"}]},
        tmp_path,
    )
    cache = SharedCache()
    validator = XuaValidator(config, default_audiences=[AUDIENCE], replay_cache=cache)
    element = issue(signer)
    accepted = await validator.validate_async(on_the_wire(copy.deepcopy(element)))
    assert accepted.name_id == "dr.smith" and len(cache.seen) == 1
    with pytest.raises(XuaError) as replay:
        await validator.validate_async(on_the_wire(copy.deepcopy(element)))
    assert replay.value.fault_code == WsseFault.FAILED_AUTHENTICATION
    cache.down = True
    with pytest.raises(XuaError) as unavailable:
        await validator.validate_async(on_the_wire(issue(signer)))
    assert unavailable.value.fault_code == WsseFault.INVALID_SECURITY
    assert "replay check unavailable" in unavailable.value.reason
    assert unavailable.value.assertion is not None  # the audit names the claimed user
