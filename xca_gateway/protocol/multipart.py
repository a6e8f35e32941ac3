"""Pull-style reading of a streamed multipart body (MTOM replies, WADO-RS responses).

Wraps the push parser :class:`xca_gateway.protocol.mtom.MultipartParser` around an async byte
iterator (a relay reply): callers pull one event at a time, so nothing is read from the socket
before it is needed and back-pressure reaches the sender. Part bodies sent base64-encoded
(allowed in MIME, seen from some SOAP stacks) are decoded on the fly. PartData are read-only
memoryviews of the received bytes (see ``MultipartParser.feed_views``).
"""

from __future__ import annotations

import binascii
import collections
from collections.abc import AsyncIterator, Iterable
from typing import cast

from xca_gateway.protocol.http_client import ReadPieces
from xca_gateway.protocol.mtom import (
    Finished,
    MtomError,
    MultipartEvent,
    MultipartParser,
    PartData,
    PartEnd,
    PartHeaders,
    PartStart,
)


class TruncatedMultipart(Exception):
    """The byte stream ended before the multipart close delimiter."""


class _Base64:
    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        data = self._rest + bytes(data).translate(None, b" \t\r\n")
        cut = len(data) - len(data) % 4
        self._rest = data[cut:]
        try:
            return binascii.a2b_base64(data[:cut], strict_mode=True)
        except binascii.Error as exc:
            raise MtomError(f"invalid base64 in MIME part: {exc}") from None

    def close(self) -> None:
        if self._rest:
            raise MtomError("truncated base64 in MIME part")


class MultipartStream:
    """Events of a multipart body, pulled from ``chunks`` on demand. An item of ``chunks`` may
    be a list of pieces (``RelayResponse.aiter_reads``: what one socket read carried), parsed
    as one; a ``ReadPieces`` is searched in place in the receive buffers."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes] | AsyncIterator[list[memoryview]],
        boundary: str,
        *,
        max_parts: int,
    ) -> None:
        self._chunks = chunks
        self._parser = MultipartParser(boundary, max_parts=max_parts)
        self._pending: collections.deque[MultipartEvent] = collections.deque()
        self._b64: _Base64 | None = None
        self.finished = False

    async def next_event(self) -> MultipartEvent:
        """The next event; PartData already decoded. Raises MtomError, TruncatedMultipart."""
        while not self._pending:
            if self.finished:
                return Finished()
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._parser.close()  # raises MtomError if the close delimiter is missing
                raise TruncatedMultipart("multipart body ended early") from None
            if isinstance(chunk, ReadPieces):
                # One piece is searched in place in the receive buffer. A read of several
                # (chunk framing between them) is joined: each PartData costs the relay more
                # Python work downstream than copying the read once.
                if len(chunk.spans) == 1:
                    self._pending.extend(self._parser.feed_spans(chunk.spans))
                else:
                    self._pending.extend(self._parser.feed_views(chunk))
                chunk.release()
                continue
            pieces: Iterable[bytes | memoryview]
            pieces = chunk if isinstance(chunk, list) else (cast(bytes, chunk),)
            self._pending.extend(self._parser.feed_views(pieces))
        return self._deliver(self._pending.popleft())

    def poll(self) -> MultipartEvent | None:
        """The next event if the last read already gave it (no await: one read carries
        several events, and a relay takes each as it comes), else None: then await
        :meth:`next_event`."""
        if self._pending:
            return self._deliver(self._pending.popleft())
        return None

    def _deliver(self, event: MultipartEvent) -> MultipartEvent:
        if isinstance(event, PartData):
            if self._b64 is not None:
                return PartData(self._b64.feed(event.data))
        elif isinstance(event, PartStart):
            encoding = event.headers.headers.get("content-transfer-encoding")
            if encoding is None:
                self._b64 = None  # binary, as MTOM sends it
            else:
                encoding = encoding.strip().lower()
                if encoding == "base64":
                    self._b64 = _Base64()
                elif encoding not in ("binary", "8bit", "7bit"):
                    raise MtomError(f"unsupported Content-Transfer-Encoding {encoding[:40]!r}")
                else:
                    self._b64 = None
        elif isinstance(event, PartEnd):
            if self._b64 is not None:
                self._b64.close()
                self._b64 = None
        elif isinstance(event, Finished):
            self.finished = True
        return event

    async def read_part(self, limit: int) -> bytes:
        """The rest of the current part's body (after its PartStart), at most ``limit`` bytes."""
        data = bytearray()
        while True:
            event = self.poll() or await self.next_event()
            if isinstance(event, PartData):
                data += event.data
                if len(data) > limit:
                    raise MtomError(f"MIME part larger than {limit} bytes")
            elif isinstance(event, PartEnd):
                return bytes(data)
            else:
                raise TruncatedMultipart("MIME part did not end")

    async def drain(self, max_bytes: int) -> None:
        """Read past the close delimiter to the end of ``chunks``, at most ``max_bytes`` more.

        A relay reads what follows the last part it wanted (the close delimiter, the end of
        the HTTP body) so the sender's write completes and the connection can be reused.
        Raises MtomError past ``max_bytes``; TruncatedMultipart if the body ends early."""
        seen = 0
        while not self.finished:
            event = self.poll() or await self.next_event()
            if isinstance(event, PartData):
                seen += len(event.data)
                if seen > max_bytes:
                    raise MtomError(f"more than {max_bytes} bytes after the last part wanted")
        async for chunk in self._chunks:
            seen += sum(len(c) for c in chunk) if isinstance(chunk, list) else len(chunk)
            if seen > max_bytes:
                raise MtomError(f"more than {max_bytes} bytes after the close delimiter")

    async def next_part(self) -> PartHeaders | None:
        """Skip to the next PartStart; None at the close delimiter."""
        while True:
            event = self.poll() or await self.next_event()
            if isinstance(event, PartStart):
                return event.headers
            if isinstance(event, Finished):
                return None
