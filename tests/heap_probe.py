"""Page faults per round of relay-sized buffers in a fresh process (``python -m
tests.heap_probe tuned|default``), for tests/test_isolation.py: the allocator's thresholds
are process-wide, so each setting is probed in a process of its own."""

from __future__ import annotations

import resource
import sys

from xca_gateway.app.heap import tune_allocator


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(mode: str) -> None:
    tuned = mode == "tuned" and tune_allocator()
    buffers = [bytearray(2**20) for _ in range(4)]
    del buffers
    before = faults()
    for _ in range(20):
        buffers = [bytearray(2**20) for _ in range(4)]  # zeroed: every page touched
        del buffers
    print(tuned, (faults() - before) / 20)


if __name__ == "__main__":
    main(sys.argv[1])
