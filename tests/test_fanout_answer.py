"""A fan-out's answer made of bytes: peers' objects serialised as each answer arrives, the
request envelope serialised once for every peer (pure, no sockets)."""

from __future__ import annotations

import itertools

from lxml import etree

from xca_gateway.protocol.namespaces import QUERY, RIM, SOAP12, Action, ResponseStatus
from xca_gateway.protocol.soap import build_envelope, envelope_template, serialize, serialize_around
from xca_gateway.transactions.iti38 import CommunityAnswer, read_peer_answer, render_objects
from xca_gateway.xds.ebrs import adhoc_query_response

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.2"


def _peer_reply(count: int) -> etree._Element:
    """A peer's ITI-38 reply as the peer client parsed it (envelope and all)."""
    objects = []
    for i in range(count):
        entry = etree.Element(f"{{{RIM}}}ExtrinsicObject", id=f"urn:uuid:{i}", home=HOME)
        slot = etree.SubElement(entry, f"{{{RIM}}}Slot", name="creationTime")
        etree.SubElement(
            etree.SubElement(slot, f"{{{RIM}}}ValueList"), f"{{{RIM}}}Value"
        ).text = "20261205"
        objects.append(entry)
    payload = adhoc_query_response(ResponseStatus.SUCCESS, [], objects)
    envelope = build_envelope(payload, action=Action.ITI38_RESPONSE)
    reparsed = etree.fromstring(serialize(envelope))
    found = reparsed.find(f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse")
    assert found is not None
    return found


def _c14n(element: etree._Element) -> bytes:
    return etree.tostring(element, method="c14n", exclusive=True)


def test_rendered_objects_make_the_same_answer_as_the_merged_tree() -> None:
    rendered, merged = CommunityAnswer(HOME, "beta"), CommunityAnswer(HOME, "beta")
    read_peer_answer(rendered, _peer_reply(3))
    read_peer_answer(merged, _peer_reply(3))
    render_objects(rendered)
    assert rendered.objects == [] and len(rendered.rendered) == 3 and rendered.has_objects
    # Each object declares only the namespace it uses, not the reply's envelope's.
    assert all(b"xmlns:soap" not in r and b'xmlns:rim="' in r for r in rendered.rendered)

    tree = build_envelope(
        adhoc_query_response(ResponseStatus.SUCCESS, [], merged.objects),
        action=Action.ITI18_RESPONSE,
        message_id="urn:uuid:m",
    )
    payload = adhoc_query_response(ResponseStatus.SUCCESS, [], [])
    holder = payload.find(f"{{{RIM}}}RegistryObjectList")
    assert holder is not None
    envelope = build_envelope(payload, action=Action.ITI18_RESPONSE, message_id="urn:uuid:m")
    head, tail = serialize_around(envelope, holder)
    streamed = b"".join(itertools.chain((head,), rendered.rendered, (tail,)))
    assert _c14n(etree.fromstring(streamed)) == _c14n(etree.fromstring(serialize(tree)))


def test_envelope_template_renders_what_build_envelope_serialises() -> None:
    # A consumer's query may hold anything, the template's markers included.
    query = etree.fromstring(
        f'<query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">'
        "<rim:AdhocQuery id='urn:uuid:q'><rim:Slot name='$x'><rim:ValueList>"
        "<rim:Value>urn:xca-gateway:template:to urn:xca-gateway:template:message-id</rim:Value>"
        "</rim:ValueList></rim:Slot></rim:AdhocQuery></query:AdhocQueryRequest>"
    )
    url = "https://peer.example:8443/xca/iti38?a=1&b=<2>"
    expected = serialize(
        build_envelope(
            etree.fromstring(etree.tostring(query)),
            action=Action.ITI38,
            message_id="urn:uuid:1",
            to=url,
            reply_to_anonymous=True,
        )
    )
    template = envelope_template(query, action=Action.ITI38, reply_to_anonymous=True)
    assert template.render(url, "urn:uuid:1") == expected
    assert template.render(url) != template.render(url)  # a new MessageID each time
