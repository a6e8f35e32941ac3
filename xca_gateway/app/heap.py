"""Giving memory back after a flood: glibc keeps freed heap pages for the next allocation.

A flood of connections or of large bodies makes the gateway allocate many small objects at
once; once they are freed the memory is free *inside* the process (glibc's arenas), not given
back, so RSS stays at the flood's peak for ever. :func:`keep_heap_trimmed` looks at RSS every
few seconds and, when it has grown well past where it last settled, asks glibc to return its
free pages (``malloc_trim``), off the event loop.
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


def _glibc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
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
