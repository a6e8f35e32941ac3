"""Sans-IO MTOM/XOP (``multipart/related``) support for SOAP 1.2.

Nothing here touches sockets: the parser and reader are push-style state machines fed with
whatever bytes the transport produced, and the writer is a generator the transport drains.
Both directions stream, so multi-GB imaging payloads never have to sit whole in memory:
incoming attachments are spooled encrypted (``encrypted_spool.EncryptedSpool``) and outgoing
attachment bodies are passed through chunk by chunk.

References: RFC 2045/2046 (MIME, multipart), RFC 2387 (multipart/related), RFC 2392 (cid:),
W3C XOP 1.0 and SOAP 1.2 MTOM.
"""

from __future__ import annotations

import abc
import binascii
import enum
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, cast
from urllib.parse import unquote

from xca_gateway.protocol.encrypted_spool import EncryptedSpool

__all__ = [
    "Attachment",
    "BufferSpan",
    "Finished",
    "MtomError",
    "MtomMessage",
    "MtomRequestReader",
    "MtomWriter",
    "MultipartEvent",
    "MultipartParser",
    "OutgoingPart",
    "PartData",
    "PartEnd",
    "PartHeaders",
    "PartReader",
    "PartStart",
    "cid_from_href",
    "is_mtom",
    "make_content_id",
    "parse_content_type",
]

XOP_MEDIA_TYPE = "application/xop+xml"
SOAP12_MEDIA_TYPE = "application/soap+xml"
MULTIPART_RELATED = "multipart/related"

# RFC 2046 bcharsnospace; used to validate boundaries we generate or are given to write.
_BCHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_ROOT_MEDIA_TYPES = frozenset({XOP_MEDIA_TYPE, SOAP12_MEDIA_TYPE, "text/xml", "application/xml"})
_IDENTITY_ENCODINGS = frozenset({"binary", "8bit", "7bit"})
_MAX_PADDING = 1024  # transport padding after a boundary; real senders use none


class MtomError(ValueError):
    """A protocol violation in an MTOM/multipart message (maps to a SOAP Sender fault)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Header helpers
# --------------------------------------------------------------------------------------------


# RFC 2045 token: printable US-ASCII except SPACE and tspecials. One compiled match instead
# of a per-character loop: part headers are parsed once per relayed instance.
_TOKEN = re.compile(
    "[" + re.escape("".join(chr(c) for c in range(33, 127) if chr(c) not in _TSPECIALS)) + "]+"
)


def _is_token(s: str) -> bool:
    return _TOKEN.fullmatch(s) is not None


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type value into ``(media_type, params)``.

    The media type and parameter names are lower-cased; quoted-string values are unescaped.
    Whitespace, empty parameters (``;;``) and valueless parameters are tolerated; a duplicated
    parameter is refused because two readers could disagree on e.g. which boundary is real.
    """
    s = value
    n = len(s)
    semi = s.find(";")
    mtype = (s if semi < 0 else s[:semi]).strip().lower()
    major, slash, minor = mtype.partition("/")
    if not slash or not _is_token(major) or not _is_token(minor):
        raise MtomError(f"invalid Content-Type {value[:100]!r}")
    params: dict[str, str] = {}
    pos = n if semi < 0 else semi + 1
    while pos < n:
        while pos < n and s[pos] in " \t\r\n;":
            pos += 1
        if pos >= n:
            break
        start = pos
        while pos < n and s[pos] not in "=;":
            pos += 1
        name = s[start:pos].strip().lower()
        if pos >= n or s[pos] == ";":
            continue  # valueless parameter: ignore
        pos += 1
        while pos < n and s[pos] in " \t":
            pos += 1
        if pos < n and s[pos] == '"':
            pos += 1
            chars: list[str] = []
            while pos < n:
                c = s[pos]
                if c == "\\" and pos + 1 < n:
                    chars.append(s[pos + 1])
                    pos += 2
                    continue
                if c == '"':
                    break
                chars.append(c)
                pos += 1
            else:
                raise MtomError("unterminated quoted string in Content-Type")
            pos += 1
            val = "".join(chars)
            while pos < n and s[pos] in " \t\r\n":
                pos += 1
            if pos < n and s[pos] != ";":
                raise MtomError("unexpected characters after quoted Content-Type parameter")
        else:
            start = pos
            while pos < n and s[pos] != ";":
                pos += 1
            val = s[start:pos].strip()
        if not _is_token(name):
            raise MtomError(f"invalid Content-Type parameter name {name[:50]!r}")
        if name in params:
            raise MtomError(f"duplicate Content-Type parameter {name!r}")
        params[name] = val
    return mtype, params


def _quote(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"control character in header parameter {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_HEADER_BREAK = re.compile("[\r\n\0]")


def _check_header_value(value: str) -> str:
    if _HEADER_BREAK.search(value):
        raise ValueError(f"CR/LF/NUL in MIME header value {value!r}")
    return value


def _normalize_cid(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    if len(v) >= 2 and v[0] == "<" and v[-1] == ">":
        v = v[1:-1].strip()
    return v or None


def cid_from_href(href: str) -> str:
    """Content-ID (without ``<>``) referenced by an ``xop:Include/@href`` ``cid:`` URL."""
    h = href.strip()
    if h[:4].lower() == "cid:":
        h = h[4:]
    # RFC 2392: cid URLs are percent-encoded; Content-ID headers are not.
    return unquote(h, encoding="utf-8", errors="strict")


def make_content_id(domain: str = "xca-gateway") -> str:
    """A fresh globally unique Content-ID (without ``<>``)."""
    return f"{uuid.uuid4().hex}@{domain}"


def is_mtom(content_type: str) -> bool:
    """True if a request body must go through :class:`MtomRequestReader`.

    Any ``multipart/related`` body qualifies; the reader then refuses a non-XOP ``type`` with
    a precise reason instead of the body failing later as unparsable XML.
    """
    try:
        mtype, _ = parse_content_type(content_type)
    except MtomError:
        return False
    return mtype == MULTIPART_RELATED


# --------------------------------------------------------------------------------------------
# Streaming multipart parser
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PartHeaders:
    """Headers of one MIME part. ``content_id`` has its ``<>`` stripped."""

    content_id: str | None
    content_type: str
    headers: dict[str, str]  # lower-cased names


class MultipartEvent:
    """Base class of the events returned by :meth:`MultipartParser.feed`."""

    __slots__ = ()


@dataclass(slots=True, frozen=True)
class PartStart(MultipartEvent):
    headers: PartHeaders


@dataclass(slots=True, frozen=True)
class PartData(MultipartEvent):
    # bytes from feed(); a read-only memoryview (bytes-like) from feed_views()
    data: bytes


@dataclass(slots=True, frozen=True)
class PartEnd(MultipartEvent):
    pass


@dataclass(slots=True, frozen=True)
class Finished(MultipartEvent):
    """The close delimiter was seen; anything after it (epilogue) is discarded."""


# Events without fields are immutable: one of each serves every part.
_PART_END = PartEnd()
_FINISHED = Finished()

# A range of a buffer, ``(buffer, start, end)``: searched in place (``find`` with bounds).
BufferSpan = tuple[bytes | bytearray, int, int]


class _State(enum.Enum):
    PREAMBLE = enum.auto()
    AFTER_BOUNDARY = enum.auto()
    HEADERS = enum.auto()
    BODY = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


# Header lines already parsed, by their text (CR included): a relay meets the same few lines
# (Content-Type, Content-Transfer-Encoding) in every part, and this spares their split, case
# folding and token check; Content-ID lines, unique per part, still find their name here.
# Emptied when full: a peer sending ever new lines costs the lookups, not memory.
_HEADER_LINES: dict[str, tuple[str, str]] = {}
_HEADER_NAMES: dict[str, str] = {}
_HEADER_CACHE_MAX = 256
_HEADER_LINE_CHARS = 200


def _header_line(raw: str) -> tuple[str, str]:
    """``(lower-cased name, stripped value)`` of a header line that is not a folded one."""
    parsed = _HEADER_LINES.get(raw)
    if parsed is not None:
        return parsed
    name_raw, sep, val = raw.partition(":")
    name = _HEADER_NAMES.get(name_raw) if sep else None
    if name is None:
        name = name_raw.strip().lower()
        if not sep or _TOKEN.fullmatch(name) is None:
            line = raw.rstrip("\r")
            raise MtomError(f"malformed MIME part header line {line[:80]!r}")
        if len(name_raw) <= _HEADER_LINE_CHARS:
            if len(_HEADER_NAMES) >= _HEADER_CACHE_MAX:
                _HEADER_NAMES.clear()
            _HEADER_NAMES[name_raw] = name
    parsed = (name, val.strip())  # the CR of the line's end goes with the other whitespace
    if name != "content-id" and len(raw) <= _HEADER_LINE_CHARS:
        if len(_HEADER_LINES) >= _HEADER_CACHE_MAX:
            _HEADER_LINES.clear()
        _HEADER_LINES[raw] = parsed
    return parsed


def _parse_header_block(block: bytes | bytearray) -> PartHeaders:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in text.split("\n"):
        if not raw or raw[0] in " \t\r":
            line = raw.rstrip("\r")
            if not line:
                continue
            if line[0] in " \t":  # obsolete folding
                if last is None:
                    raise MtomError("MIME part header starts with a continuation line")
                headers[last] = f"{headers[last]} {line.strip()}"
                continue
        name, val = _header_line(raw)
        if name in headers:
            if name in ("content-id", "content-type", "content-transfer-encoding"):
                raise MtomError(f"duplicate {name} header in MIME part")
            headers[name] = f"{headers[name]}, {val}"
        else:
            headers[name] = val
        last = name
    return PartHeaders(
        content_id=_normalize_cid(headers.get("content-id")),
        content_type=headers.get("content-type", "text/plain"),  # RFC 2046 default
        headers=headers,
    )


class MultipartParser:
    """Push-style ``multipart/*`` body parser.

    ``feed()`` returns events as soon as they can be decided; part data is emitted in pieces
    whose boundaries depend on chunking, but the concatenation does not. Each piece of input
    is searched in place; only bytes that may begin a delimiter (at most ``len(boundary) + 4``,
    inside a body) or an unfinished header block are kept between pieces and stitched to the
    first bytes of the next one, so memory stays bounded and every byte is searched a constant
    number of times.
    """

    def __init__(
        self,
        boundary: str,
        *,
        max_parts: int = 1000,
        max_part_header_bytes: int = 16384,
        max_preamble_bytes: int = 65536,
    ) -> None:
        if not boundary:
            raise MtomError("empty multipart boundary")
        if len(boundary) > 70:
            raise MtomError("multipart boundary longer than 70 characters")
        if any(not 32 <= ord(c) < 127 for c in boundary) or boundary.endswith(" "):
            raise MtomError("invalid characters in multipart boundary")
        self.boundary = boundary
        self.max_parts = max_parts
        self.max_part_header_bytes = max_part_header_bytes
        self.max_preamble_bytes = max_preamble_bytes
        # Searching for LF--boundary (dropping a preceding CR) accepts CRLF and bare LF alike.
        self._delim = b"\n--" + boundary.encode("ascii")
        # Bytes of the next piece stitched to a kept tail: enough to decide a delimiter that
        # begins in the tail (delimiter, "--", CR); more only while the tail cannot be used.
        self._seam = len(self._delim) + 4
        # A virtual leading LF lets a body that starts directly with --boundary match _delim.
        # What is kept between pieces: a delimiter's beginning inside a body, an unfinished
        # header block or boundary line.
        self._buf = b"\n"
        self._state = _State.PREAMBLE
        self._error = ""
        self._parts = 0
        self._preamble_seen = 0
        self._hdr_scanned = 0

    @property
    def finished(self) -> bool:
        return self._state is _State.DONE

    @property
    def part_count(self) -> int:
        return self._parts

    def feed(self, data: bytes | bytearray | memoryview) -> list[MultipartEvent]:
        """Events for ``data``; PartData holds bytes of its own."""
        if isinstance(data, memoryview):
            data = bytes(data)  # a view: searched with bytes.find
        events = self.feed_spans(((data, 0, len(data)),))
        return [PartData(bytes(e.data)) if isinstance(e, PartData) else e for e in events]

    def feed_views(self, pieces: Iterable[bytes | memoryview]) -> list[MultipartEvent]:
        """Events for the concatenation of ``pieces`` (e.g. the body pieces of one socket
        read). PartData holds read-only memoryviews: of the pieces if they are bytes, else of
        one join of them (a view does not tell where it lies in its object, so it cannot be
        searched in place: see :meth:`feed_spans`)."""
        pieces = list(pieces)
        spans: list[BufferSpan] = []
        for piece in pieces:
            if not isinstance(piece, bytes):
                joined = b"".join(pieces)
                return self.feed_spans(((joined, 0, len(joined)),))
            spans.append((piece, 0, len(piece)))
        return self.feed_spans(spans)

    def feed_spans(self, spans: Iterable[BufferSpan]) -> list[MultipartEvent]:
        """Events for the concatenation of ``spans``: ``(buffer, start, end)``, e.g. the body
        ranges of one socket read in the receive buffers. Each range is searched where it lies
        (no join); PartData holds read-only memoryviews of the buffers, so a relay passes a
        part's bytes on without copying them. The caller must not change a buffer's bytes
        while such views are alive."""
        if self._state is _State.ERROR:
            raise MtomError(self._error)
        if self._state is _State.DONE:
            return []  # epilogue
        events: list[MultipartEvent] = []
        try:
            for buf, start, end in spans:
                if start < end:
                    self._feed_span(buf, start, end, events)
                    if self.finished:  # the rest is epilogue
                        break
        except MtomError as exc:
            self._state = _State.ERROR
            self._error = exc.reason
            self._buf = b""
            raise
        if self.finished:
            self._buf = b""
        return events

    def close(self) -> list[MultipartEvent]:
        if self._state is _State.ERROR:
            raise MtomError(self._error)
        if self._state is not _State.DONE:
            self._state = _State.ERROR
            if self._parts == 0:
                self._error = "multipart body has no boundary delimiter"
            else:
                self._error = "multipart body ended without close delimiter"
            self._buf = b""
            raise MtomError(self._error)
        return []

    # -- internals ---------------------------------------------------------------------------

    def _feed_span(
        self, buf: bytes | bytearray, start: int, end: int, events: list[MultipartEvent]
    ) -> None:
        tail = self._buf
        while tail:
            # What was kept is stitched to the first bytes of this span (a small copy): a
            # delimiter or a header block may straddle the two.
            take = min(end - start, max(self._seam, len(tail)))
            seam = tail + buf[start : start + take]
            used = self._run(seam, memoryview(seam), 0, len(seam), events)
            if self._state is _State.DONE:
                return
            if used >= len(tail):  # the rest of the seam is this span's: searched in place
                start += used - len(tail)
                tail = b""
            else:  # still undecided (e.g. a long header block): stitch more
                tail = seam[used:]
                start += take
                if start == end:
                    break
        if start == end:
            self._buf = tail
            return
        view = memoryview(buf)
        if isinstance(buf, bytearray):
            view = view.toreadonly()
        used = self._run(buf, view, start, end, events)
        if self._state is not _State.DONE:
            self._buf = bytes(view[used:end])

    def _delimiter_kind(self, buf: bytes | bytearray, end: int, n: int) -> str | None:
        """Classify what follows a matched ``LF--boundary`` ending at ``end`` (data ends at
        ``n``).

        Returns "close", "part", "none" (boundary was only a prefix of other text), or None when
        more data is needed to decide.
        """
        if end >= n:
            return None
        c = buf[end]
        if c == 0x2D:  # '-'
            if end + 1 >= n:
                return None
            return "close" if buf[end + 1] == 0x2D else "none"
        if c in b" \t\r\n":
            return "part"
        return "none"

    def _hold_from(self, buf: bytes | bytearray, pos: int, n: int) -> int:
        """Where a delimiter (with its CR) may begin in the last bytes of ``buf[pos:n]``, which
        holds no whole delimiter: ``n`` when none can, as with most reads of binary data, so
        nothing is kept back and the next piece is searched in place."""
        delim = self._delim
        i = buf.find(b"\n", max(pos, n - len(delim) + 1), n)
        while i >= 0:
            if buf.startswith(delim[: n - i], i, n):
                return i - 1 if i > pos and buf[i - 1] == 0x0D else i
            i = buf.find(b"\n", i + 1, n)
        return n - 1 if n > pos and buf[n - 1] == 0x0D else n

    def _run(
        self,
        buf: bytes | bytearray,
        mv: memoryview,
        pos: int,
        n: int,
        events: list[MultipartEvent],
    ) -> int:
        """Parse ``buf[pos:n]``; returns where the undecided rest begins."""
        delim = self._delim
        dlen = len(delim)
        while True:
            state = self._state
            if state is _State.BODY:
                idx = buf.find(delim, pos, n)
                while idx >= 0:
                    # What follows LF--boundary (as _delimiter_kind, inline: once per part).
                    end = idx + dlen
                    c = buf[end] if end < n else -1
                    if c == 0x2D:  # '-'
                        after = buf[end + 1] if end + 1 < n else -1
                        kind = None if after < 0 else "close" if after == 0x2D else "none"
                    elif c < 0:
                        kind = None
                    else:
                        kind = "part" if c in b" \t\r\n" else "none"
                    if kind == "none":
                        idx = buf.find(delim, idx + 1, n)
                        continue
                    body_end = idx - 1 if idx > pos and buf[idx - 1] == 0x0D else idx
                    if kind is None:
                        # Delimiter not decidable yet; flush what is certainly body.
                        if body_end > pos:
                            events.append(PartData(cast(bytes, mv[pos:body_end])))
                        return body_end
                    if body_end > pos:
                        events.append(PartData(cast(bytes, mv[pos:body_end])))
                    events.append(_PART_END)
                    pos = end
                    if kind == "close":
                        self._state = _State.DONE
                        events.append(_FINISHED)
                        return n
                    self._state = _State.AFTER_BOUNDARY
                    break
                else:
                    safe = self._hold_from(buf, pos, n)
                    if safe > pos:
                        events.append(PartData(cast(bytes, mv[pos:safe])))
                        return safe
                    return pos
            elif state is _State.AFTER_BOUNDARY:
                nl = buf.find(b"\n", pos, n)
                if nl < 0:
                    pad = bytes(mv[pos:n])
                    if pad.strip(b" \t\r") or n - pos > _MAX_PADDING:
                        raise MtomError("invalid characters after multipart boundary")
                    return pos
                # Mostly the line ends right after the boundary: no padding to look at.
                padded = nl - pos > 1 or (nl > pos and buf[pos] != 0x0D)
                if padded and bytes(mv[pos:nl]).strip(b" \t\r"):
                    raise MtomError("invalid characters after multipart boundary")
                self._parts += 1
                if self._parts > self.max_parts:
                    raise MtomError(f"too many MIME parts (limit {self.max_parts})")
                pos = nl + 1
                self._state = _State.HEADERS
                self._hdr_scanned = 0
            elif state is _State.HEADERS:
                if n == pos or (n - pos == 1 and buf[pos] == 0x0D):
                    return pos
                first = buf[pos]
                if first == 0x0A or (first == 0x0D and buf[pos + 1] == 0x0A):
                    hdr_end, body_start = pos, pos + (1 if first == 0x0A else 2)
                else:
                    scanned = self._hdr_scanned
                    start = pos + scanned - 2 if scanned > 2 else pos
                    limit = pos + self.max_part_header_bytes + 3
                    if limit > n:
                        limit = n
                    i1 = buf.find(b"\n\r\n", start, limit)
                    # A bare-LF end counts only before the CRLF one: not searched for past it
                    # (into the part's body) when headers end in CRLF, as they mostly do.
                    i2 = buf.find(b"\n\n", start, limit if i1 < 0 else i1 + 1)
                    if i1 < 0 and i2 < 0:
                        if n - pos > self.max_part_header_bytes:
                            raise MtomError("MIME part headers too large")
                        self._hdr_scanned = n - pos
                        return pos
                    if i2 >= 0 and (i1 < 0 or i2 < i1):
                        hdr_end, body_start = i2 + 1, i2 + 2
                    else:
                        hdr_end, body_start = i1 + 1, i1 + 3
                if hdr_end - pos > self.max_part_header_bytes:
                    raise MtomError("MIME part headers too large")
                # A slice of the buffer itself (bytes or a bytearray copy), decoded at once.
                events.append(PartStart(_parse_header_block(buf[pos:hdr_end])))
                pos = body_start
                self._state = _State.BODY
            elif state is _State.PREAMBLE:
                idx = buf.find(delim, pos, n)
                while idx >= 0:
                    kind = self._delimiter_kind(buf, idx + len(delim), n)
                    if kind == "none":
                        idx = buf.find(delim, idx + 1, n)
                        continue
                    self._count_preamble(idx - pos)
                    if kind is None:
                        return idx
                    pos = idx + len(delim)
                    if kind == "close":  # no parts at all
                        self._state = _State.DONE
                        events.append(_FINISHED)
                        return n
                    self._state = _State.AFTER_BOUNDARY
                    break
                else:
                    safe = self._hold_from(buf, pos, n)
                    self._count_preamble(safe - pos)
                    return safe
            else:  # pragma: no cover - DONE/ERROR are handled by feed_spans()
                return n

    def _count_preamble(self, nbytes: int) -> None:
        self._preamble_seen += nbytes
        if self._preamble_seen > self.max_preamble_bytes + 1:  # +1: the virtual LF
            raise MtomError("multipart preamble too large")


# --------------------------------------------------------------------------------------------
# Server-side request assembly
# --------------------------------------------------------------------------------------------


@dataclass
class Attachment:
    """A received non-root MIME part, spooled to memory or a temporary file."""

    content_id: str
    content_type: str
    size: int
    file: IO[bytes]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def on_disk(self) -> bool:
        """Whether the spooled file rolled over to disk."""
        return bool(getattr(self.file, "_rolled", True))

    def read_all(self) -> bytes:
        self.file.seek(0)
        data = self.file.read()
        self.file.seek(0)
        return data

    def iter_chunks(self, chunk_size: int = 65536) -> Iterator[bytes]:
        self.file.seek(0)
        while True:
            chunk = self.file.read(chunk_size)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self.file.close()


@dataclass
class MtomMessage:
    root: bytes
    root_content_type: str
    action: str | None
    attachments: dict[str, Attachment]  # key: Content-ID without <>
    root_content_id: str | None = None

    def close(self) -> None:
        for att in self.attachments.values():
            att.close()

    def __enter__(self) -> MtomMessage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Base64Decoder:
    """Incremental base64 decoder tolerant of line breaks (senders may ignore MTOM's binary)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        data = self._rest + data.translate(None, b" \t\r\n")
        cut = len(data) - len(data) % 4
        self._rest = data[cut:]
        try:
            return binascii.a2b_base64(data[:cut], strict_mode=True)
        except binascii.Error as exc:
            raise MtomError(f"invalid base64 in MIME part: {exc}") from None

    def close(self) -> None:
        if self._rest:
            raise MtomError("truncated base64 in MIME part")


class MtomRequestReader:
    """Assemble an MTOM request body fed in arbitrary chunks.

    The root part (the SOAP envelope) is kept in memory up to ``max_root_bytes``; every other
    part is spooled to an :class:`EncryptedSpool` that rolls to disk (an unnamed, AES-GCM
    encrypted file in ``spool_dir``) beyond ``spool_threshold`` bytes. Limits raise
    :class:`MtomError` as soon as they are crossed, and temp files are then closed.
    """

    def __init__(
        self,
        content_type: str,
        *,
        max_root_bytes: int,
        max_part_bytes: int,
        max_total_bytes: int,
        max_parts: int,
        spool_threshold: int = 1 << 20,
        spool_dir: str | None = None,
    ) -> None:
        mtype, params = parse_content_type(content_type)
        if not mtype.startswith("multipart/"):
            raise MtomError(f"not a multipart Content-Type: {mtype!r}")
        if mtype != MULTIPART_RELATED:
            raise MtomError(f"expected multipart/related, got {mtype!r}")
        boundary = params.get("boundary")
        if not boundary:
            raise MtomError("multipart Content-Type without boundary parameter")
        mtom_type = params.get("type")
        # A missing type is tolerated (some stacks omit it); a different one is not XOP.
        if mtom_type is not None and mtom_type.strip().lower() != XOP_MEDIA_TYPE:
            raise MtomError(f"unsupported multipart/related type {mtom_type[:100]!r}")
        self._start = _normalize_cid(params.get("start"))
        self._action: str | None = None
        start_info = params.get("start-info")
        if start_info:
            self._action = parse_content_type(start_info)[1].get("action") or None
        self._outer_action = params.get("action") or None
        self.max_root_bytes = max_root_bytes
        self.max_part_bytes = max_part_bytes
        self.max_total_bytes = max_total_bytes
        self.spool_threshold = spool_threshold
        self.spool_dir = spool_dir
        self._parser = MultipartParser(boundary, max_parts=max_parts)
        self._root: bytearray | None = None
        self._root_headers: PartHeaders | None = None
        self._attachments: dict[str, Attachment] = {}
        self._seen_ids: set[str] = set()
        self._total = 0
        self._nparts = 0
        # Current part sink: the root buffer or an attachment.
        self._in_root = False
        self._cur: Attachment | None = None
        self._b64: _Base64Decoder | None = None
        self._closed = False

    def feed(self, data: bytes) -> None:
        if self._closed:
            raise MtomError("MTOM reader already closed")
        try:
            for ev in self._parser.feed(data):
                self._handle(ev)
        except MtomError:
            self.abort()
            raise

    def close(self) -> MtomMessage:
        if self._closed:
            raise MtomError("MTOM reader already closed")
        try:
            self._parser.close()
            if self._root is None or self._root_headers is None:
                raise MtomError("start part not found" if self._start else "no MIME parts")
        except MtomError:
            self.abort()
            raise
        self._closed = True
        for att in self._attachments.values():
            att.file.seek(0)
        root_ct = self._root_headers.content_type
        action = self._action
        if action is None:
            try:
                action = parse_content_type(root_ct)[1].get("action") or None
            except MtomError:
                action = None
        return MtomMessage(
            root=bytes(self._root),
            root_content_type=root_ct,
            action=action or self._outer_action,
            attachments=self._attachments,
            root_content_id=self._root_headers.content_id,
        )

    def abort(self) -> None:
        """Drop everything received so far (closes temp files). Idempotent."""
        self._closed = True
        for att in self._attachments.values():
            att.close()
        self._attachments = {}
        self._root = None
        self._cur = None

    def _handle(self, ev: MultipartEvent) -> None:
        if isinstance(ev, PartData):
            self._on_data(ev.data)
        elif isinstance(ev, PartStart):
            self._on_start(ev.headers)
        elif isinstance(ev, PartEnd):
            if self._b64 is not None:
                self._b64.close()
                self._b64 = None
            self._in_root = False
            self._cur = None

    def _on_start(self, h: PartHeaders) -> None:
        self._nparts += 1
        cid = h.content_id
        if cid is not None:
            if cid in self._seen_ids:
                raise MtomError(f"duplicate Content-ID <{cid[:100]}>")
            self._seen_ids.add(cid)
        cte = h.headers.get("content-transfer-encoding", "binary").strip().lower()
        if cte == "base64":
            self._b64 = _Base64Decoder()
        elif cte not in _IDENTITY_ENCODINGS:
            raise MtomError(f"unsupported Content-Transfer-Encoding {cte[:50]!r}")
        is_root = cid == self._start if self._start is not None else self._nparts == 1
        if is_root:
            mtype = parse_content_type(h.content_type)[0]
            if mtype not in _ROOT_MEDIA_TYPES:
                raise MtomError(f"unexpected root part Content-Type {mtype!r}")
            self._root = bytearray()
            self._root_headers = h
            self._in_root = True
            return
        if cid is None:
            raise MtomError("non-root MIME part without Content-ID")
        # Patient data: spooled encrypted, on a file with no name (encrypted_spool.py).
        spool = cast(IO[bytes], EncryptedSpool(max_size=self.spool_threshold, dir=self.spool_dir))
        att = Attachment(
            content_id=cid, content_type=h.content_type, size=0, file=spool, headers=h.headers
        )
        self._attachments[cid] = att
        self._cur = att

    def _on_data(self, data: bytes) -> None:
        if self._b64 is not None:
            data = self._b64.feed(data)
            if not data:
                return
        n = len(data)
        self._total += n
        if self._total > self.max_total_bytes:
            raise MtomError(f"MTOM message exceeds {self.max_total_bytes} bytes")
        if self._in_root:
            assert self._root is not None
            if len(self._root) + n > self.max_root_bytes:
                raise MtomError(f"SOAP root part exceeds {self.max_root_bytes} bytes")
            self._root += data
        elif self._cur is not None:
            att = self._cur
            if att.size + n > self.max_part_bytes:
                raise MtomError(
                    f"MIME part <{att.content_id[:100]}> exceeds {self.max_part_bytes} bytes"
                )
            att.file.write(data)
            att.size += n


# --------------------------------------------------------------------------------------------
# Streaming writer
# --------------------------------------------------------------------------------------------


class PartReader(abc.ABC):
    """A part body pulled piece by piece: one coroutine call per piece, where an async
    iterator costs an object per step and, as an async generator, a weak reference of the
    event loop's per generator (a relayed study: a part per instance, pieces of 256 KiB)."""

    __slots__ = ()

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The next piece (bytes-like, never empty); ``b""`` at the end of the body."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Called once the writer is done with the body, read to its end or not."""


@dataclass(slots=True)  # one per instance of a streamed imaging response
class OutgoingPart:
    content_id: str  # without <>
    content_type: str
    body: bytes | Iterable[bytes] | AsyncIterable[bytes] | PartReader
    headers: dict[str, str] = field(default_factory=dict)


_RESERVED_PART_HEADERS = frozenset({"content-type", "content-id", "content-transfer-encoding"})


def _make_boundary() -> str:
    return "MIMEBoundary_" + uuid.uuid4().hex


class MtomWriter:
    """Serialise a SOAP envelope plus attachments as an MTOM ``multipart/related`` body.

    Attachment bodies are streamed through unchanged, one chunk at a time. The caller must
    ensure the boundary does not occur in any body (the default random boundary makes that a
    non-issue).
    """

    def __init__(
        self,
        root_xml: bytes | Iterable[bytes],
        *,
        action: str | None = None,
        boundary: str | None = None,
        root_content_id: str | None = None,
    ) -> None:
        self.boundary = boundary if boundary is not None else _make_boundary()
        b = self.boundary
        if not 1 <= len(b) <= 70 or b.endswith(" ") or any(c not in _BCHARS for c in b):
            raise ValueError(f"invalid multipart boundary {b!r}")
        self.root_xml = root_xml
        self.action = action
        self.root_content_id = _check_header_value(
            _normalize_cid(root_content_id) or make_content_id()
        )
        self._parts: list[OutgoingPart] = []
        self._ids = {self.root_content_id}
        self._lazy: list[Iterable[OutgoingPart]] = []
        self._current: OutgoingPart | None = None  # the lazily made part being written

        start_info = SOAP12_MEDIA_TYPE
        root_ct = f'{XOP_MEDIA_TYPE}; charset=UTF-8; type="{SOAP12_MEDIA_TYPE}"'
        if action is not None:
            start_info += f"; action={_quote(action)}"
            root_ct += f"; action={_quote(action)}"
        self.content_type = (
            f'{MULTIPART_RELATED}; type="{XOP_MEDIA_TYPE}"; '
            f"start={_quote('<' + self.root_content_id + '>')}; "
            f"start-info={_quote(start_info)}; boundary={_quote(b)}"
        )
        head = self._part_head(root_ct, self.root_content_id, {}, first=True)
        # A root given in pieces (written straight to bytes, e.g. 20,000 DocumentResponses)
        # is streamed as it is produced, never joined.
        self._root_chunks: Iterable[bytes] = ()
        if isinstance(root_xml, bytes | bytearray | memoryview):
            self._root_header = head + bytes(root_xml)
        else:
            self._root_header = head
            self._root_chunks = root_xml

    def add_part(self, part: OutgoingPart) -> None:
        self._ids.add(self._check_part(part))
        self._parts.append(part)

    def add_parts(self, parts: Iterable[OutgoingPart]) -> None:
        """Parts made only when the writer gets to them, after those added one by one:
        nothing is kept per part (a response of 20,000 instances). Each is checked as it
        comes; the producer keeps their Content-IDs distinct."""
        self._lazy.append(parts)

    def _each_part(self) -> Iterator[tuple[OutgoingPart, bytes]]:
        """Each part with its head (a lazily made part's Content-ID normalised once)."""
        for part in self._parts:
            yield part, self._head_for(part)
        # The head of a lazily made part without extra headers, up to its Content-ID, by
        # content type: a relayed study's 20,000 parts share one.
        starts: dict[str, bytes] = {}
        for parts in self._lazy:
            for part in parts:
                cid = self._check_part(part)
                if part.headers:
                    head = self._part_head(part.content_type, cid, part.headers)
                else:
                    start = starts.get(part.content_type)
                    if start is None:
                        start = self._head_start(part.content_type)
                        if len(starts) < 16:
                            starts[part.content_type] = start
                    head = start + cid.encode("utf-8") + b">\r\n\r\n"
                self._current = part
                yield part, head

    def _check_part(self, part: OutgoingPart) -> str:
        cid = _normalize_cid(part.content_id)
        if cid is None:
            raise ValueError("empty Content-ID")
        if cid in self._ids:
            raise ValueError(f"duplicate Content-ID {cid!r}")
        _check_header_value(cid)
        _check_header_value(part.content_type)
        for name, value in part.headers.items():
            if name.lower() in _RESERVED_PART_HEADERS or not _is_token(name):
                raise ValueError(f"invalid extra MIME header name {name!r}")
            _check_header_value(value)
        return cid

    def content_length(self) -> int | None:
        """Total body length if every part body is ``bytes`` (else None: use chunked)."""
        if self._root_chunks or self._lazy:
            return None
        total = len(self._root_header) + len(self._close_delimiter())
        for part in self._parts:
            if not isinstance(part.body, bytes | bytearray | memoryview):
                return None
            total += len(self._head_for(part)) + len(part.body)
        return total

    def _root_rest(self) -> Iterator[bytes]:
        chunks, self._root_chunks = self._root_chunks, ()
        for chunk in chunks:
            if chunk:
                yield chunk

    def iter_bytes(self) -> Iterator[bytes]:
        yield self._root_header
        yield from self._root_rest()
        for part, head in self._each_part():
            yield head
            body = part.body
            if isinstance(body, bytes | bytearray | memoryview):
                if body:
                    yield bytes(body)
            elif isinstance(body, AsyncIterable | PartReader):
                raise TypeError(f"part <{part.content_id}> has an async body; use aiter_bytes()")
            else:
                for chunk in body:
                    if chunk:
                        yield chunk if isinstance(chunk, bytes) else bytes(chunk)
        yield self._close_delimiter()

    async def aiter_bytes(
        self, count: Callable[[int], None] | None = None, count_every: int = 1024 * 1024
    ) -> AsyncIterator[bytes]:
        """The body, as its parts' bodies produce it. ``count`` is told the bytes written so
        far in steps of about ``count_every`` (and the rest at the end): a metric, updated as
        the body streams without a call per piece."""
        counted = len(self._root_header)  # written and not told to count yet
        try:
            yield self._root_header
            for chunk in self._root_rest():
                counted += len(chunk)
                yield chunk
            for part, head in self._each_part():
                counted += len(head)
                yield head
                body = part.body
                if isinstance(body, PartReader):
                    # The relay's path: bytes-like pieces (memoryviews of a relayed reply) go
                    # on uncopied, one call each.
                    read = body.read
                    while chunk := await read():
                        counted += len(chunk)
                        yield chunk
                        if counted >= count_every and count is not None:
                            count(counted)
                            counted = 0
                elif isinstance(body, bytes | bytearray | memoryview):
                    if body:
                        counted += len(body)
                        yield bytes(body)
                elif isinstance(body, AsyncIterable):
                    async for chunk in body:
                        if chunk:
                            counted += len(chunk)
                            yield chunk
                else:
                    for chunk in body:
                        if chunk:
                            counted += len(chunk)
                            yield chunk if isinstance(chunk, bytes) else bytes(chunk)
                if counted >= count_every and count is not None:
                    count(counted)
                    counted = 0
            close = self._close_delimiter()
            counted += len(close)
            yield close
        finally:
            if counted and count is not None:
                count(counted)
            # Left early (client gone, a part failed): close every part body now, so sources
            # (files, upstream connections) are released at once rather than by the GC.
            current = [self._current] if self._current is not None else []
            await _close_bodies([*self._parts, *current])

    def _close_delimiter(self) -> bytes:
        return b"\r\n--" + self.boundary.encode("ascii") + b"--\r\n"

    def _head_for(self, part: OutgoingPart) -> bytes:
        cid = _normalize_cid(part.content_id)
        assert cid is not None
        return self._part_head(part.content_type, cid, part.headers, first=False)

    def _head_start(self, content_type: str, *, first: bool = False) -> bytes:
        """A part's head up to its Content-ID's value."""
        lead = "--" if first else "\r\n--"
        return (
            f"{lead}{self.boundary}\r\nContent-Type: {content_type}\r\n"
            "Content-Transfer-Encoding: binary\r\nContent-ID: <"
        ).encode()

    def _part_head(
        self, content_type: str, content_id: str, extra: dict[str, str], *, first: bool = False
    ) -> bytes:
        rest = "".join(f"\r\n{k}: {v}" for k, v in extra.items())
        tail = f"{content_id}>{rest}\r\n\r\n".encode()
        return self._head_start(content_type, first=first) + tail


async def _close_bodies(parts: Iterable[OutgoingPart]) -> None:
    for part in parts:
        body = part.body
        try:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            else:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        except Exception:  # closing is best effort; the response is already over
            continue
