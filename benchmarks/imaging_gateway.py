"""One gateway process of ``imaging_bench.py`` (source, responding or initiating).

A script of its own so that the process imports what a gateway imports and nothing of the
benchmark's client (httpx, psutil, the study generator): its peak RSS is the gateway's. (The
client imports this module for its constants, and with it the gateway: that costs the client
only start-up time.)

    python benchmarks/imaging_gateway.py SPEC.json    # started by imaging_bench.py
    IMAGING_BENCH_PROFILE=/tmp/prof ...               # cProfile each gateway process
    IMAGING_BENCH_TRACEMALLOC=/tmp/dir ...            # what holds memory at the peak
    IMAGING_BENCH_RSS=/tmp/dir ...                    # each new RSS high and the code there
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from xca_gateway.app.config import parse_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.app.heap import tune_allocator
from xca_gateway.imaging.filesystem import FilesystemSource
from xca_gateway.imaging.rad69_source import Rad69Source
from xca_gateway.initiating.imaging import rad69_handler
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap_service import Operation
from xca_gateway.transactions.rad69 import imaging_document_source_handler
from xca_gateway.transactions.rad75 import rad75_handler

REPOSITORY = "1.3.6.1.4.1.21367.13.71.2.1"
HOMES = {
    "alpha": "urn:oid:1.3.6.1.4.1.21367.13.70.1",
    "beta": "urn:oid:1.3.6.1.4.1.21367.13.70.2",
    "gamma": "urn:oid:1.3.6.1.4.1.21367.13.70.3",
}


async def serve(spec: dict[str, Any]) -> None:
    """Child process: one gateway in the role given by ``spec``, until SIGTERM."""
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()  # as xca-gateway serve does
    gateway = Gateway(parse_config(spec["config"], Path(spec["base"])))
    role = spec["role"]
    if role == "source":
        source: Any = FilesystemSource(REPOSITORY, Path(spec["images"]))
        if spec.get("rate"):
            source = _Paced(source, float(spec["rate"]))
        handler = imaging_document_source_handler(
            {REPOSITORY: source}, home_community_id=HOMES["beta"]
        )
        gateway.endpoints["rad69"].add(Operation(Action.RAD69, "RAD-69", handler))
    elif role == "responding":
        source = Rad69Source(
            REPOSITORY,
            spec["source_url"],
            peer_client=gateway.peer_client,
            home_community_id=HOMES["beta"],
        )
        handler = rad75_handler({REPOSITORY: source}, home_community_id=HOMES["beta"])
        gateway.endpoints["rad75"].add(Operation(Action.RAD75, "RAD-75", handler))
    else:
        handler = rad69_handler(
            {},
            home_community_id=HOMES["alpha"],
            peers={HOMES["beta"]: spec["peer_url"]},
            peer_client=gateway.peer_client,
        )
        gateway.endpoints["rad69"].add(Operation(Action.RAD69, "RAD-69", handler))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await gateway.start()
    gc.freeze()  # as xca-gateway serve does: full collections do not walk start-up's objects
    Path(spec["ready"]).write_text(str(os.getpid()))
    samples = os.environ.get("IMAGING_BENCH_RSS")
    if samples:  # developer aid: where the RSS peak is reached (what the loop was running)
        _sample_rss(Path(samples) / f"{spec['role']}.rss", stop)
    traces = os.environ.get("IMAGING_BENCH_TRACEMALLOC")
    if traces:  # developer aid: what holds memory at the peak (largest of periodic snapshots)
        import tracemalloc

        tracemalloc.start(12)
        best = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
            size = tracemalloc.get_traced_memory()[0]
            if size > best:
                best = size
                snapshot = tracemalloc.take_snapshot()
                snapshot.dump(f"{traces}/{spec['role']}.snapshot")
    await stop.wait()
    await gateway.stop()


def _sample_rss(path: Path, stop: asyncio.Event) -> None:
    """Every 10 ms in a thread: the RSS, and at each new high the event loop thread's stack
    (the gateway's frames), written to ``path``."""
    import threading
    import traceback

    main = threading.main_thread().ident
    page = os.sysconf("SC_PAGE_SIZE")

    def run() -> None:
        high = 0
        started = time.monotonic()
        with path.open("w") as out:
            while not stop.is_set():
                with open("/proc/self/statm") as statm:
                    rss = int(statm.read().split()[1]) * page
                if rss > high + 256 * 1024:
                    high = rss
                    frame = sys._current_frames().get(main or 0)
                    stack = [
                        f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                        for f in (traceback.extract_stack(frame) if frame else [])
                        if "xca_gateway" in f.filename
                    ][-6:]
                    where = " < ".join(reversed(stack))
                    out.write(f"{time.monotonic() - started:8.2f} {rss / 1e6:7.1f} {where}\n")
                    out.flush()
                time.sleep(0.01)

    threading.Thread(target=run, name="rss-sampler", daemon=True).start()


class _Paced:
    """An imaging source that delivers at most ``rate`` bytes/s (a PACS/VNA behind its disks
    and network), wrapped around the filesystem source."""

    def __init__(self, inner: Any, rate: float) -> None:
        self.inner, self.rate = inner, rate
        self.repository_unique_id = inner.repository_unique_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open(self, request: Any) -> Any:
        retrieval = await self.inner.open(request)
        rate = self.rate
        started = time.monotonic()
        sent = 0
        original = retrieval.stream

        async def paced(instance: Any) -> Any:
            nonlocal sent
            async for chunk in original(instance):
                sent += len(chunk)
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                yield chunk

        retrieval.stream = paced
        return retrieval


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    profile = os.environ.get("IMAGING_BENCH_PROFILE")
    if profile:  # developer aid: cProfile a gateway process
        import cProfile

        cProfile.runctx(
            "asyncio.run(serve(spec))",
            globals(),
            {"spec": spec, "asyncio": asyncio, "serve": serve},
            f"{profile}.{Path(sys.argv[1]).stem}",
        )
        return
    asyncio.run(serve(spec))


if __name__ == "__main__":
    main()
