"""``benchmarks/relay_floor.py`` runs end to end: real TLS sockets with the dev PKI's
certificates on both sides, the bare Python relay and nginx's stream module relaying the same
bytes, each relay's CPU per GB and their ratio printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def test_relay_floor_relays_every_byte_through_both_relays() -> None:
    if not STREAM_MODULE.exists():
        pytest.skip("nginx's stream module is not installed (libnginx-mod-stream)")
    command = [sys.executable, str(ROOT / "benchmarks" / "relay_floor.py")]
    out = subprocess.run(
        [*command, "--size", "96M", "--repeat", "2"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    # A short read through either relay raises ("relayed N of M bytes"): exit code 1.
    assert out.returncode == 0, out.stderr[-2000:]
    costs = dict(re.findall(r"^(python|nginx)\s+CPU-s/GB (\d+\.\d+)", out.stdout, re.M))
    assert set(costs) == {"python", "nginx"}, out.stdout
    assert all(float(value) > 0 for value in costs.values())
    assert re.search(r"floor ratio python / nginx: \d+\.\d+", out.stdout), out.stdout
