"""The idle timeout of an instance stream: one loop timer per stream, not one per chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from xca_gateway.imaging.sources import InstanceStreamError, with_idle_timeout


async def source(stall: asyncio.Event, chunks: int) -> AsyncIterator[bytes]:
    for _ in range(chunks):
        yield b"x" * 10
    await stall.wait()  # a source that went quiet
    yield b"late"


async def test_a_source_that_goes_quiet_fails_the_stream() -> None:
    stall = asyncio.Event()
    stream = with_idle_timeout(source(stall, 3), 0.05, "instance 1.2.3")
    received = []
    with pytest.raises(InstanceStreamError, match=r"instance 1\.2\.3: no data"):
        async for chunk in stream:
            received.append(chunk)
    assert received == [b"x" * 10] * 3
    # The task itself was not left cancelled: it goes on (e.g. to abort the response).
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)


async def test_a_slow_consumer_is_not_an_idle_source() -> None:
    # Suspended at its yield (the consumer waits, e.g. on a drain) longer than the timeout:
    # only time spent waiting on the source counts.
    stall = asyncio.Event()
    stall.set()
    stream = with_idle_timeout(source(stall, 2), 0.05, "instance")
    received = []
    async for chunk in stream:
        received.append(chunk)
        await asyncio.sleep(0.15)
    assert received == [b"x" * 10, b"x" * 10, b"late"]


async def test_cancelling_the_reader_is_a_cancellation_not_a_timeout() -> None:
    stall = asyncio.Event()

    async def read() -> None:
        async for _ in with_idle_timeout(source(stall, 1), 60.0, "instance"):
            pass

    task = asyncio.ensure_future(read())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
