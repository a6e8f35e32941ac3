"""``xca-gateway serve``: one community's gateway until SIGINT/SIGTERM (socket activation aware)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from pathlib import Path

from xca_gateway.app.config import load_config
from xca_gateway.app.gateway import Gateway, ListenSockets
from xca_gateway.app.heap import keep_heap_trimmed, tune_allocator
from xca_gateway.protocol.credentials import check_key_pair

log = logging.getLogger("xca_gateway")

LISTEN_FDS_ENV = "XCA_GATEWAY_LISTEN_FDS"


def _inherited_sockets() -> dict[str, socket.socket]:
    """Listening sockets passed by a launcher, e.g. ``https=3,admin=4`` (socket activation)."""
    spec = os.environ.pop(LISTEN_FDS_ENV, "")
    sockets: dict[str, socket.socket] = {}
    for item in filter(None, spec.split(",")):
        name, _, fd = item.partition("=")
        sockets[name.strip()] = socket.socket(fileno=int(fd))
    return sockets


async def serve(config_path: Path) -> int:
    tune_allocator()
    config = load_config(config_path)
    # Our own certificate: a missing, mismatched or expired one is said now, in one line,
    # not as an OpenSSL error (or as every peer refusing us later).
    check_key_pair(config.tls.certificate, config.tls.private_key, what="[tls] certificate")
    gateway = Gateway(config)
    inherited = _inherited_sockets()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start(
        ListenSockets(
            https=inherited.get("https"), admin=inherited.get("admin"), web=inherited.get("web")
        )
    )
    # What start-up built (modules, WSDLs, schemas, the configuration) lives as long as the
    # process: out of the collector's sight, a full collection walks what requests made
    # instead of a few hundred thousand more objects (tens of ms of a stalled event loop).
    gc.freeze()
    trimmer = asyncio.create_task(keep_heap_trimmed())
    try:
        await stop.wait()
        # Drain: out of the balancer's rotation, no new connections, requests in flight
        # finish within [server] drain_timeout; stop() then flushes the audit spool.
        await gateway.drain(config.server.drain_timeout)
    finally:
        trimmer.cancel()
        log.info("stopping gateway %s", config.community.name)
        await gateway.stop()
    return 0
