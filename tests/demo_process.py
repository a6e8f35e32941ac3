"""`xca-gateway demo` as a real process, for the tests that drive the whole demo."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@contextlib.contextmanager
def running_demo(workdir: Path, *, start_timeout: float = 120) -> Iterator[dict[str, Any]]:
    """Start the demo in ``workdir``; yield its endpoints.json (plus ``workdir``); stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway", "demo", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    endpoints = workdir / "endpoints.json"
    try:
        deadline = time.monotonic() + start_timeout
        while not endpoints.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        if not endpoints.exists():
            process.kill()
            out = process.communicate(timeout=10)[0].decode(errors="replace")
            pytest.fail(f"demo did not write endpoints.json:\n{out}")
        data: dict[str, Any] = json.loads(endpoints.read_text())
        data["workdir"] = str(workdir)
        yield data
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
