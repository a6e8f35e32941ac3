"""The durable audit spool: ordering, crash recovery (torn writes), acknowledgements, rotation,
deletion and the disk bound. Plain files, no network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from xca_gateway.audit.spool import HEADER_SIZE, MAGIC, Spool, SpoolError, encode_record


def _payloads(start: int, count: int, size: int = 100) -> list[bytes]:
    return [f"record-{i:06d}-".encode().ljust(size, b".") for i in range(start, start + count)]


def _read_all(spool: Spool, destination: str = "arr") -> list[bytes]:
    reader = spool.reader(destination)
    out: list[bytes] = []
    while batch := reader.read(max_records=7, max_bytes=1000):
        out.extend(r.payload for r in batch)
    return out


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_append_and_read_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"])
    assert spool.append(_payloads(0, 10)) == 10
    assert spool.append(_payloads(10, 5)) == 5
    assert (spool.last_seq, spool.pending("arr")) == (15, 15)
    reader = spool.reader("arr")
    records = reader.read(max_records=100)
    assert [r.seq for r in records] == list(range(1, 16))
    assert [r.payload for r in records] == _payloads(0, 15)
    assert reader.read() == []
    spool.close()
    # Sequence numbers continue across a restart.
    again = Spool(tmp_path, ["arr"])
    assert again.append([b"next"]) == 1
    assert again.last_seq == 16
    assert _read_all(again)[-1] == b"next"
    again.close()


def _torn(tmp_path: Path, cut: int) -> tuple[list[bytes], Path]:
    spool = Spool(tmp_path, ["arr"])
    kept = _payloads(0, 5)
    spool.append(kept)
    spool.close()
    (segment,) = _segments(tmp_path)
    # An unfinished sixth write: only ``cut`` bytes of it reached the disk.
    partial = encode_record(6, b"the torn record" * 10)[:cut]
    with segment.open("ab") as fh:
        fh.write(partial)
    return kept, segment


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 20])
def test_recovery_truncates_a_torn_tail(tmp_path: Path, cut: int) -> None:
    kept, segment = _torn(tmp_path, cut)
    size_before = segment.stat().st_size
    spool = Spool(tmp_path, ["arr"])
    assert spool.truncated_bytes == cut
    assert segment.stat().st_size == size_before - cut
    assert spool.last_seq == 5
    assert _read_all(spool) == kept
    # New records follow the last good one, and read back whole.
    spool.append([b"after-crash"])
    assert _read_all(spool) == [*kept, b"after-crash"]
    spool.close()


def test_recovery_drops_a_record_with_a_bad_checksum(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"])
    spool.append(_payloads(0, 4))
    spool.close()
    (segment,) = _segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last record's payload
    segment.write_bytes(bytes(data))
    spool = Spool(tmp_path, ["arr"])
    assert spool.last_seq == 3
    assert _read_all(spool) == _payloads(0, 3)
    spool.close()


def test_recovery_repairs_a_segment_torn_at_creation(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"], segment_bytes=300, max_bytes=100_000)
    spool.append(_payloads(0, 3))
    spool.close()
    # A crash right after creating the next segment file, before its header was written.
    (tmp_path / f"{4:020d}.seg").write_bytes(MAGIC[:3])
    spool = Spool(tmp_path, ["arr"], segment_bytes=300, max_bytes=100_000)
    assert spool.last_seq == 3
    spool.append([b"x"])
    assert _read_all(spool) == [*_payloads(0, 3), b"x"]
    spool.close()


def test_acknowledgements_persist_across_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr", "backup"])
    spool.append(_payloads(0, 10))
    spool.acknowledge("arr", 6)
    spool.persist_acks()
    spool.acknowledge("arr", 8)  # not persisted: a crash now resends 7 and 8, no more
    spool.acknowledge("backup", 2)
    # Simulate a crash: no close(), so nothing more is written.
    crashed = Spool(tmp_path, ["arr", "backup"])
    assert crashed.acknowledged("arr") == 6
    assert crashed.acknowledged("backup") == 0
    assert [r.seq for r in crashed.reader("arr").read()] == [7, 8, 9, 10]
    crashed.acknowledge("backup", 10)
    crashed.close()  # close persists
    assert Spool(tmp_path, ["arr", "backup"]).acknowledged("backup") == 10


def test_acknowledging_past_the_end_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"])
    spool.append([b"a"])
    with pytest.raises(SpoolError):
        spool.acknowledge("arr", 2)


def test_damaged_ack_file_means_resend_not_loss(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"])
    spool.append(_payloads(0, 3))
    spool.acknowledge("arr", 3)
    spool.close()
    (tmp_path / "acks" / "arr.ack").write_bytes(b"\x00garbage\x00\x00\x00\x00")
    spool = Spool(tmp_path, ["arr"])
    assert spool.acknowledged("arr") == 0
    assert _read_all(spool) == _payloads(0, 3)


def test_rotation_and_deletion_once_every_destination_acknowledged(tmp_path: Path) -> None:
    # Each batch of six is bigger than a segment: one segment per batch.
    spool = Spool(tmp_path, ["arr", "udp"], segment_bytes=500, max_bytes=1_000_000)
    for i in range(0, 60, 6):
        spool.append(_payloads(i, 6))
    segments = _segments(tmp_path)
    assert len(segments) == 10
    spool.acknowledge("arr", 60)
    spool.persist_acks()
    # "udp" has acknowledged nothing: everything stays.
    assert _segments(tmp_path) == segments
    spool.acknowledge("udp", 30)
    spool.persist_acks()
    remaining = _segments(tmp_path)
    assert remaining == segments[5:]
    assert spool.size_bytes == sum(p.stat().st_size for p in remaining)
    # A reader for the lagging destination still gets every record after its ack.
    assert _read_all(spool, "udp") == _payloads(30, 30)
    spool.acknowledge("udp", 60)
    spool.persist_acks()
    # The segment being written is never deleted.
    assert _segments(tmp_path) == segments[-1:]
    spool.close()
    assert Spool(tmp_path, ["arr", "udp"]).last_seq == 60


def test_disk_bound_refuses_and_alarm_warns_before(tmp_path: Path) -> None:
    record = len(encode_record(1, _payloads(0, 1)[0]))
    spool = Spool(
        tmp_path,
        ["arr"],
        segment_bytes=record * 4,
        max_bytes=len(MAGIC) * 6 + record * 20,
        warn_bytes=record * 10,
    )
    assert spool.append(_payloads(0, 8)) == 8
    assert not spool.alarm
    assert spool.append(_payloads(8, 4)) == 4
    assert spool.alarm
    accepted = spool.append(_payloads(12, 20))
    assert 0 < accepted < 20
    assert spool.size_bytes <= spool.max_bytes
    assert spool.append(_payloads(99, 1)) == 0
    total = 12 + accepted
    assert _read_all(spool) == _payloads(0, total)
    # Once the repository has everything, the spool shrinks and the alarm clears.
    spool.acknowledge("arr", total)
    spool.persist_acks()
    assert not spool.alarm
    assert spool.append(_payloads(total, 1)) == 1
    spool.close()


def test_reader_seek_rewinds_to_the_last_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"], segment_bytes=500, max_bytes=1_000_000)
    spool.append(_payloads(0, 20))
    reader = spool.reader("arr")
    assert len(reader.read(max_records=15)) == 15
    reader.seek(4)
    assert [r.seq for r in reader.read(max_records=3)] == [4, 5, 6]
    reader.seek(19)
    assert [r.seq for r in reader.read()] == [19, 20]


def test_new_destination_gets_what_is_spooled(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"])
    spool.append(_payloads(0, 5))
    spool.acknowledge("arr", 5)
    spool.close()
    spool = Spool(tmp_path, ["arr", "second"])
    assert spool.pending("arr") == 0
    assert _read_all(spool, "second") == _payloads(0, 5)


def test_invalid_destination_names(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        Spool(tmp_path, ["../escape"])


def test_concurrent_reader_sees_only_whole_committed_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["arr"], segment_bytes=4096, max_bytes=10_000_000)
    total = 3000
    done = threading.Event()

    def write() -> None:
        for i in range(0, total, 30):
            spool.append(_payloads(i, 30, size=50))
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reader = spool.reader("arr")
    got: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        batch = reader.read(max_records=50)
        got.extend(r.payload for r in batch)
        if done.is_set() and not batch:
            break
        if not batch:
            time.sleep(0.001)
    writer.join(30)
    assert got == _payloads(0, total, size=50)


_CRASH_WRITER = r"""
import sys
from pathlib import Path
from xca_gateway.audit.spool import Spool

spool = Spool(Path(sys.argv[1]), ["arr"], segment_bytes=20000, max_bytes=100_000_000)
i = 0
while True:
    batch = [b"crash-record-%08d" % (i + k) * 20 for k in range(17)]
    spool.append(batch)
    i += len(batch)
    # Only what append() returned for is promised; report it.
    print(i, flush=True)
"""


def test_sigkill_during_appends_loses_no_committed_record(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _CRASH_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert process.stdout is not None
    committed = 0
    try:
        for line in process.stdout:
            committed = int(line)
            if committed >= 3000:
                break
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        process.stdout.close()
    assert committed >= 3000
    spool = Spool(tmp_path, ["arr"], segment_bytes=20000, max_bytes=100_000_000)
    got = _read_all(spool)
    assert len(got) >= committed
    assert got == [b"crash-record-%08d" % i * 20 for i in range(len(got))]
    spool.close()
