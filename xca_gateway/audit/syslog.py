"""Syslog for ATNA (ITI-20): RFC 5424 messages, RFC 5425 octet-counted framing. Sans-IO.

Header values as DICOM PS3.15 A.6/A.7 and the IHE implementations in the field use them
(IPF ``RFC5424Protocol``, dcm4che ``AuditLogger``): facility authpriv (10), severity by event
outcome, MSGID ``IHE+RFC-3881``, no structured data, and the MSG a UTF-8 BOM followed by the XML
audit message.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime

FACILITY_AUTHPRIV = 10
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"

# Syslog severities by EventOutcomeIndicator, as dcm4che maps them: success is notice, a minor
# failure a warning, a serious one an error, a major one critical.
_SEVERITY_BY_OUTCOME = {0: 5, 4: 4, 8: 3, 12: 2}

# RFC 5424 header field limits (characters of PRINTUSASCII).
_MAX_HOSTNAME = 255
_MAX_APP_NAME = 48
_MAX_PROCID = 128
_MAX_MSGID = 32
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


class SyslogError(ValueError):
    pass


def severity_for_outcome(outcome: int) -> int:
    return _SEVERITY_BY_OUTCOME.get(int(outcome), 3)


def priority(outcome: int, facility: int = FACILITY_AUTHPRIV) -> int:
    return facility * 8 + severity_for_outcome(outcome)


def header_field(value: str | None, limit: int) -> str:
    """A header field: NILVALUE when empty, else printable ASCII (spaces become ``_``)."""
    if not value:
        return "-"
    return _NOT_PRINTUSASCII.sub("_", value)[:limit]


def format_timestamp(value: datetime) -> str:
    """RFC 3339 timestamp with microseconds in UTC (RFC 5424 allows up to six digits)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).replace(tzinfo=None).isoformat("T", "microseconds") + "Z"


def format_message(
    xml: bytes,
    *,
    outcome: int,
    timestamp: datetime,
    hostname: str | None,
    app_name: str | None,
    procid: str | None,
    msgid: str = MSGID,
    facility: int = FACILITY_AUTHPRIV,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying an XML audit message (as bytes, UTF-8)."""
    head = b"<%d>1 " % priority(outcome, facility)
    stamp = format_timestamp(timestamp).encode("ascii")
    return head + stamp + _header_tail(hostname, app_name, procid, msgid) + xml


@functools.lru_cache(maxsize=64)
def _header_tail(
    hostname: str | None, app_name: str | None, procid: str | None, msgid: str
) -> bytes:
    """The header after the timestamp, through the BOM: the same for every message of one
    process (checked and rendered once, not per record)."""
    fields = (
        header_field(hostname, _MAX_HOSTNAME),
        header_field(app_name, _MAX_APP_NAME),
        header_field(procid, _MAX_PROCID),
        header_field(msgid, _MAX_MSGID),
        "-",
    )
    return (" " + " ".join(fields) + " ").encode("ascii") + BOM


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: ``MSGLEN SP SYSLOG-MSG``."""
    return b"%d " % len(message) + message


@dataclass(frozen=True)
class SyslogMessage:
    priority: int
    version: int
    timestamp: str | None
    hostname: str | None
    app_name: str | None
    procid: str | None
    msgid: str | None
    structured_data: str | None
    msg: bytes

    @property
    def facility(self) -> int:
        return self.priority // 8

    @property
    def severity(self) -> int:
        return self.priority % 8

    @property
    def xml(self) -> bytes:
        """MSG without its BOM."""
        return self.msg[len(BOM) :] if self.msg.startswith(BOM) else self.msg


_HEADER = re.compile(rb"^<(\d{1,3})>(\d{1,2}) (\S+) (\S+) (\S+) (\S+) (\S+) ")


def _nil(value: bytes) -> str | None:
    return None if value == b"-" else value.decode("ascii", "replace")


def _structured_data_end(data: bytes, start: int) -> int:
    """Index just past STRUCTURED-DATA starting at ``start`` (NILVALUE or SD-ELEMENTs)."""
    if data[start : start + 1] == b"-":
        return start + 1
    pos = start
    while data[pos : pos + 1] == b"[":
        pos += 1
        in_value = False
        while True:
            if pos >= len(data):
                raise SyslogError("unterminated SD-ELEMENT")
            ch = data[pos : pos + 1]
            if in_value:
                if ch == b"\\":
                    pos += 2
                    continue
                if ch == b'"':
                    in_value = False
            elif ch == b'"':
                in_value = True
            elif ch == b"]":
                pos += 1
                break
            pos += 1
    if pos == start:
        raise SyslogError("STRUCTURED-DATA is neither '-' nor an SD-ELEMENT")
    return pos


def parse_message(data: bytes) -> SyslogMessage:
    """Parse an RFC 5424 SYSLOG-MSG (what a repository does with each frame)."""
    match = _HEADER.match(data)
    if match is None:
        raise SyslogError("not an RFC 5424 header")
    pri = int(match.group(1))
    if pri > 191:
        raise SyslogError(f"PRI {pri} out of range")
    sd_start = match.end()
    sd_end = _structured_data_end(data, sd_start)
    sd = data[sd_start:sd_end]
    rest = data[sd_end:]
    if rest and not rest.startswith(b" "):
        raise SyslogError("no SP after STRUCTURED-DATA")
    return SyslogMessage(
        priority=pri,
        version=int(match.group(2)),
        timestamp=_nil(match.group(3)),
        hostname=_nil(match.group(4)),
        app_name=_nil(match.group(5)),
        procid=_nil(match.group(6)),
        msgid=_nil(match.group(7)),
        structured_data=None if sd == b"-" else sd.decode("utf-8", "replace"),
        msg=rest[1:],
    )


class OctetCountingParser:
    """Incremental RFC 5425 deframer: feed bytes as they arrive, get whole SYSLOG-MSGs back."""

    def __init__(self, max_message: int = 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._need: int | None = None
        self.max_message = max_message

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages: list[bytes] = []
        while True:
            if self._need is None:
                if not self._buffer:
                    break
                space = self._buffer.find(b" ", 0, 12)
                if space < 0:
                    if len(self._buffer) >= 12 or not self._buffer[:12].isdigit():
                        raise SyslogError("bad MSGLEN: expected digits and a space")
                    break
                digits = bytes(self._buffer[:space])
                if not digits.isdigit() or digits.startswith(b"0"):
                    raise SyslogError(f"bad MSGLEN {digits!r}")
                length = int(digits)
                if length > self.max_message:
                    raise SyslogError(f"MSGLEN {length} exceeds {self.max_message}")
                del self._buffer[: space + 1]
                self._need = length
            if len(self._buffer) < self._need:
                break
            messages.append(bytes(self._buffer[: self._need]))
            del self._buffer[: self._need]
            self._need = None
        return messages

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buffer)
