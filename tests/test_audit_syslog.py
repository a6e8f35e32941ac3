"""RFC 5424 formatting and RFC 5425 octet-counted framing of audit messages (sans-IO)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from xca_gateway.audit import syslog
from xca_gateway.audit.syslog import OctetCountingParser, SyslogError

XML = '<?xml version="1.0" encoding="UTF-8"?><AuditMessage>é</AuditMessage>'.encode()
WHEN = datetime(2026, 1, 15, 10, 22, 33, 123456, tzinfo=UTC)


def _message(outcome: int = 0, **kw: str) -> bytes:
    args = {"hostname": "gw1.example.org", "app_name": "xca-gateway", "procid": "4711", **kw}
    return syslog.format_message(XML, outcome=outcome, timestamp=WHEN, **args)


def test_header_as_ihe_uses_it() -> None:
    assert _message() == (
        b"<85>1 2026-01-15T10:22:33.123456Z gw1.example.org xca-gateway 4711 IHE+RFC-3881 - "
        b"\xef\xbb\xbf" + XML
    )


@pytest.mark.parametrize(("outcome", "pri"), [(0, 85), (4, 84), (8, 83), (12, 82)])
def test_priority_is_authpriv_with_severity_by_outcome(outcome: int, pri: int) -> None:
    parsed = syslog.parse_message(_message(outcome))
    assert parsed.priority == pri
    assert parsed.facility == 10


def test_header_fields_are_sanitised() -> None:
    parsed = syslog.parse_message(
        _message(hostname="", app_name="XCA I Gateway\x00" + "x" * 100, procid="1 2")
    )
    assert parsed.hostname is None
    assert parsed.app_name == ("XCA_I_Gateway_" + "x" * 100)[:48]
    assert parsed.procid == "1_2"


def test_timestamp_is_converted_to_utc() -> None:
    local = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert syslog.format_timestamp(local) == "2026-01-15T10:22:33.123456Z"


def test_parse_round_trip() -> None:
    parsed = syslog.parse_message(_message())
    assert (parsed.version, parsed.msgid, parsed.structured_data) == (1, "IHE+RFC-3881", None)
    assert parsed.timestamp == "2026-01-15T10:22:33.123456Z"
    assert parsed.msg.startswith(syslog.BOM)
    assert parsed.xml == XML


def test_parse_structured_data_with_escapes() -> None:
    raw = b'<13>1 - host app - ID47 [x@1 a="q\\"]" b="2"][y@2] \xef\xbb\xbfhello'
    parsed = syslog.parse_message(raw)
    assert parsed.structured_data == '[x@1 a="q\\"]" b="2"][y@2]'
    assert parsed.xml == b"hello"
    with pytest.raises(SyslogError):
        syslog.parse_message(b'<13>1 - host app - ID47 [x@1 a="unterminated')
    with pytest.raises(SyslogError):
        syslog.parse_message(b"not syslog at all")
    with pytest.raises(SyslogError):
        syslog.parse_message(b"<999>1 - - - - - -")


def test_octet_counting_frame() -> None:
    message = _message()
    framed = syslog.frame(message)
    assert framed == str(len(message)).encode() + b" " + message
    # MSGLEN counts bytes, not characters (é and the BOM are multi-byte).
    assert len(message) > len(message.decode("utf-8"))


def test_incremental_parser_any_split() -> None:
    messages = [_message(o) for o in (0, 4, 8, 12)] + [b"x", b"<85>1 " + b"y" * 40000]
    stream = b"".join(syslog.frame(m) for m in messages)
    rng = random.Random(5424)
    for _ in range(50):
        parser = OctetCountingParser()
        got: list[bytes] = []
        pos = 0
        while pos < len(stream):
            step = rng.choice([1, 2, 3, 7, 100, 5000, 70000])
            got.extend(parser.feed(stream[pos : pos + step]))
            pos += step
        assert got == messages
        assert parser.pending == 0


@pytest.mark.parametrize(
    "garbage", [b"abc ", b"-5 x", b"05 hello", b"123456789012345 x", b"<85>1 no length"]
)
def test_incremental_parser_rejects_bad_framing(garbage: bytes) -> None:
    with pytest.raises(SyslogError):
        OctetCountingParser().feed(garbage)


def test_incremental_parser_limits_message_size() -> None:
    parser = OctetCountingParser(max_message=1000)
    assert parser.feed(b"1000 ") == []
    with pytest.raises(SyslogError):
        OctetCountingParser(max_message=1000).feed(b"1001 ")
