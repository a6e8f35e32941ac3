"""Durable, append-only audit spool: every record is on disk (fsync'd) before it is sent.

Layout of the spool directory::

    00000000000000000001.seg   segment files, named by the sequence number of their first record
    00000000000000004097.seg
    acks/<destination>.ack     per destination: the last sequence number it has acknowledged

A segment starts with an 8-byte magic and holds records framed as
``length (u32) | crc32 (u32) | seq (u64) | payload``, big-endian; the CRC covers length, seq and
payload. Sequence numbers start at 1 and are contiguous across segments.

Crash safety: a batch is written with one ``write`` and made durable with one ``fsync`` (group
commit); only then does it count as committed and become visible to readers. A crash in the
middle of a write leaves a torn tail in the last segment, which :meth:`Spool.open` detects (short
header, short payload, bad CRC or out-of-sequence number) and truncates. Acknowledgements are
written to a temporary file, fsync'd and renamed over the old one, so an ack file is always
whole. Segments are deleted once every configured destination has durably acknowledged all of
their records, never the segment being written.

Bounds: appends that would take the spool past ``max_bytes`` are refused (the caller counts
them); crossing ``warn_bytes`` raises :attr:`Spool.alarm` well before that.

Pure file I/O and threads, no asyncio: the writer thread appends, sender threads read and ack.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"XCAAUD01"
_HEADER = struct.Struct(">IIQ")
HEADER_SIZE = _HEADER.size
_ACK = struct.Struct(">QI")
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
DESTINATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A record larger than this is corruption, not data (audit messages are kilobytes).
MAX_RECORD = 16 * 1024 * 1024


class SpoolError(Exception):
    pass


class SpoolFull(SpoolError):
    pass


@dataclass(frozen=True)
class Record:
    seq: int
    payload: bytes


@dataclass
class _Segment:
    first_seq: int
    path: Path
    # Committed bytes (header included): what readers may read.
    size: int


def _crc(length: int, seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack(">IQ", length, seq)))


def encode_record(seq: int, payload: bytes) -> bytes:
    length = len(payload)
    return _HEADER.pack(length, _crc(length, seq, payload), seq) + payload


def _segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"{first_seq:020d}.seg"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scan(path: Path, first_seq: int) -> tuple[int, int, str | None]:
    """Walk a segment's records: (end offset of the last good record, next seq, why it stopped
    early or None at a clean end)."""
    with path.open("rb") as fh:
        data = fh.read()
    if len(data) < len(MAGIC):
        return 0, first_seq, "segment header torn"
    if data[: len(MAGIC)] != MAGIC:
        return 0, first_seq, "not a spool segment (bad magic)"
    offset = len(MAGIC)
    seq = first_seq
    while offset < len(data):
        if offset + HEADER_SIZE > len(data):
            return offset, seq, "torn record header"
        length, crc, rec_seq = _HEADER.unpack_from(data, offset)
        end = offset + HEADER_SIZE + length
        if length > MAX_RECORD:
            return offset, seq, f"implausible record length {length}"
        if end > len(data):
            return offset, seq, "torn record payload"
        payload = data[offset + HEADER_SIZE : end]
        if rec_seq != seq or crc != _crc(length, rec_seq, payload):
            return offset, seq, f"bad record at seq {seq} (crc or sequence mismatch)"
        offset = end
        seq += 1
    return offset, seq, None


class Spool:
    """The spool of one audit trail. Thread-safe: one appending thread, any number of readers."""

    def __init__(
        self,
        directory: Path,
        destinations: Iterable[str],
        *,
        max_bytes: int = 1024 * 1024 * 1024,
        warn_bytes: int | None = None,
        segment_bytes: int = 16 * 1024 * 1024,
        tail_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.directory = directory
        self.destinations = tuple(destinations)
        for name in self.destinations:
            if not DESTINATION_NAME.match(name):
                raise SpoolError(f"invalid destination name {name!r}")
        self.max_bytes = max_bytes
        self.warn_bytes = warn_bytes if warn_bytes is not None else max_bytes * 8 // 10
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        # Serialises ack-file writes (several sender threads may persist at once).
        self._persist_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._next_seq = 1
        self._size = 0
        self._acks: dict[str, int] = {}
        self._persisted_acks: dict[str, int] = {}
        self._fd: int | None = None
        self._alarm = False
        self._closed = False
        # The newest committed records, kept in memory too: a sender keeping up reads them
        # from here, not back from the file (a read and a CRC check per record otherwise).
        self._tail: deque[Record] = deque()
        self._tail_bytes = 0
        self.tail_limit = tail_bytes
        self.truncated_bytes = 0
        self._open()

    # ------------------------------------------------------------------ recovery

    def _open(self) -> None:
        # Audit records name patients: the spool is for this user only.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.directory / "acks").mkdir(mode=0o700, exist_ok=True)
        for leftover in (self.directory / "acks").glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        for name in self.destinations:
            self._acks[name] = self._persisted_acks[name] = self._read_ack(name)

        found = sorted(
            (int(m.group(1)), p)
            for p in self.directory.iterdir()
            if (m := _SEGMENT_NAME.match(p.name))
        )
        if not found:
            # A fresh spool, or one whose segments were all removed: keep numbers increasing.
            start = max(self._acks.values(), default=0) + 1
            self._segments.append(self._create_segment(start))
            self._next_seq = start
        else:
            for first_seq, path in found:
                self._segments.append(_Segment(first_seq, path, path.stat().st_size))
            last = self._segments[-1]
            end, next_seq, problem = _scan(last.path, last.first_seq)
            if problem is not None:
                actual = last.size
                if end == 0:
                    # Torn or foreign header: the segment holds nothing we can trust.
                    with last.path.open("r+b") as fh:
                        fh.truncate(0)
                        fh.write(MAGIC)
                        fh.flush()
                        os.fsync(fh.fileno())
                    end = len(MAGIC)
                else:
                    with last.path.open("r+b") as fh:
                        fh.truncate(end)
                        os.fsync(fh.fileno())
                self.truncated_bytes = max(0, actual - end)
                log.warning(
                    "audit spool %s: %s; truncated %d byte(s) of an unfinished write",
                    last.path,
                    problem,
                    self.truncated_bytes,
                )
            last.size = end
            self._next_seq = next_seq
        self._size = sum(s.size for s in self._segments)
        first = self._segments[0].first_seq
        for name in self.destinations:
            # An ack past the end (spool replaced) or before the start (segments gone) is
            # brought back into range; readers start after it.
            ack = min(max(self._acks[name], first - 1), self._next_seq - 1)
            self._acks[name] = self._persisted_acks[name] = ack
        self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        self._update_alarm()

    def _create_segment(self, first_seq: int) -> _Segment:
        path = _segment_path(self.directory, first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, MAGIC)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.directory)
        return _Segment(first_seq, path, len(MAGIC))

    # ------------------------------------------------------------------ appending

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest committed record (0 when none was ever written)."""
        with self._lock:
            return self._next_seq - 1

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._size

    @property
    def alarm(self) -> bool:
        """True while the spool is above its warning threshold."""
        with self._lock:
            return self._alarm

    def append(self, payloads: Sequence[bytes]) -> int:
        """Append records durably (one write, one fsync). Returns how many were accepted, in
        order; the rest would have passed ``max_bytes``. Raises OSError if the disk fails (the
        segment is then rolled back to its last committed size)."""
        if self._closed:
            raise SpoolError("spool is closed")
        if not payloads:
            return 0
        with self._lock:
            room = self.max_bytes - self._size
            seq = self._next_seq
            active = self._segments[-1]
            rotate = active.size >= self.segment_bytes and active.size > len(MAGIC)
        chunks: list[bytes] = []
        used = 0
        for payload in payloads:
            record = encode_record(seq + len(chunks), payload)
            if used + len(record) > room:
                break
            chunks.append(record)
            used += len(record)
        if not chunks:
            return 0
        if rotate:
            self._rotate(seq)
        data = b"".join(chunks)
        fd = self._fd
        assert fd is not None
        with self._lock:
            before = self._segments[-1].size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            # Leave no half-written batch behind: the next append must follow committed data.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            raise
        with self._lock:
            self._segments[-1].size += len(data)
            self._size += len(data)
            self._next_seq += len(chunks)
            self._update_alarm()
            if self.tail_limit > 0:
                tail = self._tail
                for index, payload in enumerate(payloads[: len(chunks)]):
                    tail.append(Record(seq + index, payload))
                    self._tail_bytes += len(payload)
                while self._tail_bytes > self.tail_limit and tail:
                    self._tail_bytes -= len(tail.popleft().payload)
        return len(chunks)

    def _from_tail(self, next_seq: int, max_records: int, max_bytes: int) -> list[Record] | None:
        """Committed records from ``next_seq`` on, if the in-memory tail still holds it."""
        with self._lock:
            tail = self._tail
            if not tail or next_seq < tail[0].seq or next_seq >= self._next_seq:
                return None
            start = next_seq - tail[0].seq
            records: list[Record] = []
            used = 0
            for index in range(start, min(len(tail), start + max_records)):
                record = tail[index]
                records.append(record)
                used += len(record.payload)
                if used >= max_bytes:
                    break
            return records

    def _rotate(self, first_seq: int) -> None:
        segment = self._create_segment(first_seq)
        old = self._fd
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        if old is not None:
            os.close(old)
        with self._lock:
            self._segments.append(segment)
            self._size += segment.size

    def _update_alarm(self) -> None:
        # Called with the lock held. Hysteresis: clear only once well below the threshold.
        if not self._alarm and self._size >= self.warn_bytes:
            self._alarm = True
            log.warning(
                "audit spool %s holds %d bytes, above the warning threshold %d (limit %d): "
                "an audit record repository is not taking records",
                self.directory,
                self._size,
                self.warn_bytes,
                self.max_bytes,
            )
        elif self._alarm and self._size < self.warn_bytes * 9 // 10:
            self._alarm = False
            log.info("audit spool %s back below its warning threshold", self.directory)

    # ------------------------------------------------------------------ acknowledgements

    def _ack_path(self, name: str) -> Path:
        return self.directory / "acks" / f"{name}.ack"

    def _read_ack(self, name: str) -> int:
        path = self._ack_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        if len(data) != _ACK.size:
            log.error("audit spool: ack file %s is damaged; resending from the start", path)
            return 0
        seq, crc = _ACK.unpack(data)
        if crc != zlib.crc32(data[:8]):
            log.error("audit spool: ack file %s is damaged; resending from the start", path)
            return 0
        return int(seq)

    def acknowledged(self, destination: str) -> int:
        """The last sequence number the destination has acknowledged (0 for none)."""
        with self._lock:
            return self._acks[destination]

    def pending(self, destination: str) -> int:
        with self._lock:
            return self._next_seq - 1 - self._acks[destination]

    def acknowledge(self, destination: str, seq: int) -> None:
        """Record (in memory) that ``destination`` has everything up to ``seq``."""
        with self._lock:
            if seq > self._next_seq - 1:
                raise SpoolError(f"ack {seq} beyond the last record {self._next_seq - 1}")
            if seq > self._acks[destination]:
                self._acks[destination] = seq

    def persist_acks(self) -> None:
        """Make acknowledgements durable, then delete segments every destination is done with."""
        with self._persist_lock:
            self._persist_acks()

    def _persist_acks(self) -> None:
        with self._lock:
            changed = {n: s for n, s in self._acks.items() if s != self._persisted_acks.get(n)}
        for name, seq in changed.items():
            path = self._ack_path(name)
            tmp = path.with_suffix(".tmp")
            packed = struct.pack(">Q", seq)
            data = packed + struct.pack(">I", zlib.crc32(packed))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        if changed:
            _fsync_dir(self.directory / "acks")
            with self._lock:
                self._persisted_acks.update(changed)
        self._collect()

    def _collect(self) -> None:
        with self._lock:
            if not self.destinations:
                return
            done = min(self._persisted_acks[n] for n in self.destinations)
            doomed: list[_Segment] = []
            # A segment is finished when the next one has started; its last record is the
            # next one's first minus one.
            while len(self._segments) > 1 and self._segments[1].first_seq - 1 <= done:
                doomed.append(self._segments.pop(0))
            for segment in doomed:
                self._size -= segment.size
            self._update_alarm()
        for segment in doomed:
            segment.path.unlink(missing_ok=True)
        if doomed:
            _fsync_dir(self.directory)

    # ------------------------------------------------------------------ reading

    def reader(self, destination: str) -> SpoolReader:
        """A reader positioned just after the destination's acknowledged records."""
        return SpoolReader(self, self.acknowledged(destination) + 1)

    def _snapshot(self) -> tuple[list[_Segment], int]:
        with self._lock:
            return [_Segment(s.first_seq, s.path, s.size) for s in self._segments], self._next_seq

    def close(self) -> None:
        if self._closed:
            return
        self.persist_acks()
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SpoolReader:
    """Reads committed records in order, from one position on; ``seek`` rewinds."""

    def __init__(self, spool: Spool, next_seq: int) -> None:
        self._spool = spool
        self._next = next_seq
        self._segment_first: int | None = None
        self._offset = 0
        self.skipped = 0

    @property
    def position(self) -> int:
        """The sequence number the next read starts with."""
        return self._next

    def seek(self, seq: int) -> None:
        self._next = seq
        self._segment_first = None

    def read(self, max_records: int = 512, max_bytes: int = 1024 * 1024) -> list[Record]:
        segments, committed_next = self._spool._snapshot()
        if not segments:
            return []
        if self._next < segments[0].first_seq:
            # Records below the oldest segment were deleted (acknowledged everywhere).
            self._next = segments[0].first_seq
            self._segment_first = None
        recent = self._spool._from_tail(self._next, max_records, max_bytes)
        if recent:
            self._next = recent[-1].seq + 1
            # The file position no longer matches: found again if a later read needs the file.
            self._segment_first = None
            return recent
        records: list[Record] = []
        used = 0
        while self._next < committed_next and len(records) < max_records and used < max_bytes:
            index = self._locate(segments)
            segment = segments[index]
            if self._offset >= segment.size:
                if index + 1 >= len(segments):
                    break
                nxt = segments[index + 1]
                if nxt.first_seq != self._next:
                    log.error(
                        "audit spool: segment %s ends at seq %d, next starts at %d; skipping",
                        segment.path,
                        self._next - 1,
                        nxt.first_seq,
                    )
                    self.skipped += max(0, nxt.first_seq - self._next)
                    self._next = nxt.first_seq
                self._segment_first = nxt.first_seq
                self._offset = len(MAGIC)
                continue
            batch = self._read_from(segment, max_records - len(records), max_bytes - used)
            if not batch:
                # Damaged data: give up on the rest of this segment.
                self._offset = segment.size
                continue
            records.extend(batch)
            used += sum(len(r.payload) for r in batch)
        return records

    def _locate(self, segments: list[_Segment]) -> int:
        """Index of the segment holding ``self._next``; positions the offset on first use."""
        if self._segment_first is not None:
            for i, s in enumerate(segments):
                if s.first_seq == self._segment_first:
                    return i
        index = 0
        for i, s in enumerate(segments):
            if s.first_seq <= self._next:
                index = i
        segment = segments[index]
        self._segment_first = segment.first_seq
        self._offset = len(MAGIC)
        self._skip_to(segment)
        return index

    def _skip_to(self, segment: _Segment) -> None:
        """Walk record headers from the segment start up to ``self._next``."""
        seq = segment.first_seq
        with segment.path.open("rb") as fh:
            while seq < self._next and self._offset + HEADER_SIZE <= segment.size:
                fh.seek(self._offset)
                header = fh.read(HEADER_SIZE)
                if len(header) < HEADER_SIZE:
                    break
                length, _crc_value, rec_seq = _HEADER.unpack(header)
                if rec_seq != seq:
                    break
                self._offset += HEADER_SIZE + length
                seq += 1
        if seq < self._next:
            # The wanted record is not in this segment (damaged): continue after it.
            self._offset = segment.size

    def _read_from(self, segment: _Segment, max_records: int, max_bytes: int) -> list[Record]:
        records: list[Record] = []
        used = 0
        end = segment.size
        with segment.path.open("rb", buffering=0) as fh:
            fh.seek(self._offset)
            # One read for the batch (at least one whole record), parsed in memory.
            want = min(end - self._offset, max(max_bytes, 64 * 1024))
            data = fh.read(want)
            pos = 0
            while len(records) < max_records and self._offset < end:
                if pos + HEADER_SIZE > len(data):
                    if records:
                        break
                    data = data[pos:] + fh.read(HEADER_SIZE)
                    pos = 0
                    if len(data) < HEADER_SIZE:
                        break
                length, crc, rec_seq = _HEADER.unpack_from(data, pos)
                if length > MAX_RECORD or self._offset + HEADER_SIZE + length > end:
                    self._damaged(segment, "record length out of range")
                    return records
                if pos + HEADER_SIZE + length > len(data):
                    if records:
                        break
                    data = data[pos:] + fh.read(HEADER_SIZE + length - (len(data) - pos))
                    pos = 0
                payload = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
                if crc != _crc(length, rec_seq, payload) or rec_seq < self._next:
                    self._damaged(segment, f"bad record at seq {self._next}")
                    return records
                if rec_seq > self._next:
                    # A whole, valid record further on: resynchronise after a damaged stretch.
                    log.error(
                        "audit spool %s: records %d..%d are missing",
                        segment.path,
                        self._next,
                        rec_seq - 1,
                    )
                    self.skipped += rec_seq - self._next
                    self._next = rec_seq
                records.append(Record(rec_seq, payload))
                pos += HEADER_SIZE + length
                self._offset += HEADER_SIZE + length
                self._next += 1
                used += length
                if used >= max_bytes:
                    break
        return records

    def _damaged(self, segment: _Segment, why: str) -> None:
        log.error("audit spool %s: %s; skipping the rest of the segment", segment.path, why)
