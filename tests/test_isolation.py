"""No request stalls another: the attacks of issue #16 at small sizes, against real gateways.

The benchmark (``benchmarks/isolation.py``) measures the same attacks at full size against a
legitimate client's latency; here each is a regression test of the defence's behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from lxml import etree

from tests.test_server import ADHOC_QUERY, consumer, fault_of, post, soap12
from xca_gateway.gateway import Gateway
from xca_gateway.namespaces import Action
from xca_gateway.pki import DevPki
from xca_gateway.xmlsafe import (
    INLINE_PARSE_BYTES,
    XmlLimits,
    XmlRejected,
    count_markup,
    parse_xml,
    parse_xml_async,
)

# ------------------------------------------------------------------------ XML, linear time


def attribute_bomb(attributes: int) -> bytes:
    """The first element of the envelope carries ``attributes`` attributes."""
    attrs = " ".join(f'a{i}="x"' for i in range(attributes))
    return soap12(Action.ITI18, ADHOC_QUERY).replace(
        b"<s:Envelope ", f"<s:Envelope {attrs} ".encode()
    )


def element_flood(elements: int) -> bytes:
    return soap12(Action.ITI18, "<a/>" * elements)


def test_attributes_per_element_are_bounded() -> None:
    limits = XmlLimits(max_attributes=10)
    assert (
        parse_xml(b"<r " + b" ".join(b'a%d="x"' % i for i in range(10)) + b"/>", limits) is not None
    )
    with pytest.raises(XmlRejected, match="more than 10 attributes"):
        parse_xml(b"<r><e " + b" ".join(b'a%d="x"' % i for i in range(11)) + b"/></r>", limits)


def test_an_attribute_bomb_of_60000_attributes_is_refused() -> None:
    # lxml's attrib.values() took seconds on this (quadratic); the XPath count is linear.
    with pytest.raises(XmlRejected, match="more than 256 attributes"):
        parse_xml(attribute_bomb(60_000))


def test_an_element_flood_is_refused_from_its_markup_count() -> None:
    limits = XmlLimits(max_elements=1000)
    assert parse_xml(element_flood(990), limits) is not None
    with pytest.raises(XmlRejected, match="more than 1000 elements"):
        parse_xml(element_flood(1001), limits)


def test_markup_count_bounds_elements_attributes_and_declarations() -> None:
    count = count_markup(b'<a xmlns="urn:x" b="1"><c/><!-- n --></a>')
    assert count.elements == 3  # a, c and the comment: an upper bound of the elements
    assert count.equals == 2
    assert count.xmlns == 1


def test_many_distinct_namespace_declarations_are_refused() -> None:
    limits = XmlLimits(max_namespaces=100)
    declarations = " ".join(f'xmlns:p{i}="urn:x:{i}"' for i in range(101))
    with pytest.raises(XmlRejected, match="more than 100 namespaces"):
        parse_xml(f"<r {declarations}/>".encode(), limits)
    # The same declaration repeated on many elements (as some SOAP stacks write) is fine.
    repeated = "".join('<p:e xmlns:p="urn:x"/>' for _ in range(500))
    assert len(parse_xml(f"<r>{repeated}</r>".encode(), limits)) == 500


def test_text_depth_and_attribute_size_limits_hold_on_every_node() -> None:
    limits = XmlLimits(max_text_bytes=100, max_depth=5, max_attribute_bytes=50)
    with pytest.raises(XmlRejected, match="text node too large"):
        parse_xml(b"<r><a/>" + b"x" * 101 + b"</r>", limits)  # a tail, not an element's text
    with pytest.raises(XmlRejected, match="deeper than 5"):
        parse_xml(b"<a>" * 6 + b"</a>" * 6, limits)
    assert parse_xml(b"<a>" * 5 + b"</a>" * 5, limits) is not None
    with pytest.raises(XmlRejected, match="attribute value too large"):
        parse_xml(b'<r><e v="' + b"x" * 51 + b'"/></r>', limits)


def test_large_documents_are_parsed_off_the_loop_with_the_same_result() -> None:
    data = element_flood(INLINE_PARSE_BYTES // 4 + 10)
    assert len(data) > INLINE_PARSE_BYTES
    root = asyncio.run(parse_xml_async(data))
    assert etree.tostring(root) == etree.tostring(parse_xml(data))
    with pytest.raises(XmlRejected, match="more than 256 attributes"):
        asyncio.run(parse_xml_async(attribute_bomb(20_000)))
    with pytest.raises(XmlRejected, match="more than 100 elements"):
        asyncio.run(parse_xml_async(data, XmlLimits(max_elements=100)))


def test_attribute_bomb_gets_a_sender_fault_and_others_are_served(
    gateway: Gateway, pki: DevPki
) -> None:
    urls = gateway.endpoint_urls()
    with consumer(pki) as client:
        response = post(client, urls["iti18"], attribute_bomb(20_000))
        assert response.status_code == 400
        code, _, reason = fault_of(response)
        assert code.endswith(":Sender")
        assert "more than 256 attributes" in reason
        assert post(client, urls["iti18"], soap12(Action.ITI18, ADHOC_QUERY)).status_code == 200


def test_element_flood_gets_a_sender_fault(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", limits={"max_xml_elements": 500})
    with consumer(pki) as client:
        response = post(client, gateway.endpoint_urls()["iti18"], element_flood(1000))
    assert response.status_code == 400
    assert "more than 500 elements" in fault_of(response)[2]


def test_query_endpoints_take_small_bodies_and_retrieves_large_ones(
    gateway_factory: Callable[..., Gateway], pki: DevPki
) -> None:
    gateway = gateway_factory("alpha", limits={"max_query_bytes": 20_000})
    urls = gateway.endpoint_urls()
    big = soap12(Action.ITI18, ADHOC_QUERY + " " * 30_000)
    with consumer(pki) as client:
        for key in ("iti18", "iti38"):
            response = post(client, urls[key], big.replace(Action.ITI18.encode(), b"x"))
            assert response.status_code == 413, key
            assert "exceeds the limit of 20000" in fault_of(response)[2]
        # A retrieve endpoint reads the same body (and answers it: here, a wrong action).
        response = post(client, urls["iti43"], big)
    assert response.status_code == 400
    assert "ActionNotSupported" in " ".join(fault_of(response)[1])
