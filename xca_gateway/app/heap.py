"""Giving memory back after a flood: glibc keeps freed heap pages for the next allocation.

A flood of connections or of large bodies makes the gateway allocate many small objects at
once; once they are freed the memory is free *inside* the process (glibc's arenas), not given
back, so RSS stays at the flood's peak for ever. :func:`keep_heap_trimmed` looks at RSS every
few seconds and, when it has grown well past where it last settled, asks glibc to return its
free pages (``malloc_trim``), off the event loop.

:func:`tune_allocator` sets glibc's thresholds once at start: a relay allocates and frees
buffers of 256 KiB to a few MiB by the thousand per study; at glibc's defaults such a block is
``mmap``-ed afresh, or the heap's top is handed back and taken again, so buffers cost page
faults and zeroed pages (measured on a 525 MB relay: 7,600-15,600 faults; with the thresholds
below a few hundred; nginx, with its pools, none). The periodic trim still returns what a flood
leaves behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's RSS (Linux: /proc/self/statm; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap and are reused; above it (a 20,000-instance root part,
# a large spooled body) they are mapped and unmapped on their own.
MMAP_THRESHOLD = 4 * 1024 * 1024
# Free memory at the heap's top kept for the next buffers rather than returned at once.
TRIM_THRESHOLD = 32 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_allocator(
    *, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Fixed glibc thresholds (see the module's docstring); False where there is no glibc."""
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either threshold also stops glibc from moving them by itself.
    mapped: int = mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    trimmed: int = mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    return mapped == 1 and trimmed == 1


def _glibc_trim() -> Callable[[], object] | None:
    libc = _glibc()
    if libc is None:
        return None
    try:
        trim = libc.malloc_trim  # glibc only (musl has none)
    except AttributeError:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)  # a CDLL call releases the GIL


async def keep_heap_trimmed(
    *,
    interval: float = 10.0,
    growth: int = 32 * 1024 * 1024,
    trim: Callable[[], object] | None = None,
) -> None:
    """Run until cancelled: trim the heap whenever RSS is ``growth`` bytes above where it
    settled after the last trim (or at start)."""
    trim = trim or _glibc_trim()
    if trim is None:
        return
    settled = resident_bytes()
    while True:
        await asyncio.sleep(interval)
        rss = resident_bytes()
        if rss < settled:
            settled = rss
        elif rss > settled + growth:
            await asyncio.to_thread(trim)
            settled = resident_bytes()
            log.debug("heap trimmed: RSS %d -> %d MB", rss >> 20, settled >> 20)
