"""Running a repository on its own event loop thread (tests, benchmarks, embedding).

Synchronous callers (httpx clients, raw sockets, a browser driver) then talk to it over real
sockets while the test body stays plain code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from xca_gateway.arr.app import ArrConfig, AuditRecordRepository, parse_arr_config
from xca_gateway.arr.store import AuditStore
from xca_gateway.security.dev_pki import COMMUNITY_DOMAIN, DevPki

_T = TypeVar("_T")


def dev_access(pki: DevPki) -> dict[str, Any]:
    """An ``[arr.access]`` table for tests: the PKI's ``client`` is an audit consumer, every
    community certificate and (UDP) the loopback addresses 127.0.0.1 and 127.0.0.2 audit sources
    that may report as any AuditSourceID (tests of bindings and refusals pass their own)."""
    callers: list[dict[str, Any]] = [
        {
            "name": "development audit consumer",
            "roles": ["audit-consumer"],
            "certificate_uris": ["urn:xca-gateway:client:consumer"],
        }
    ]
    if pki.communities:
        callers.append(
            {
                "name": "development audit sources",
                "roles": ["audit-source"],
                "certificate_dns_names": [f"{n}.{COMMUNITY_DOMAIN}" for n in pki.communities],
                "audit_source_ids": ["*"],
            }
        )
    callers.append(
        {
            "name": "development UDP senders",
            "roles": ["audit-source"],
            "addresses": ["127.0.0.1", "127.0.0.2"],
            "audit_source_ids": ["*"],
        }
    )
    return {"callers": callers}


def dev_config(pki: DevPki, workdir: Path, name: str = "arr", **sections: Any) -> ArrConfig:
    """A loopback configuration on free ports with the development PKI's ``name`` certificate
    and :func:`dev_access` (unless ``access=`` replaces it)."""
    pair = pki.communities[name]
    table: dict[str, Any] = {
        "database": str(workdir / "arr.sqlite3"),
        "audit_source_id": "arr-test",
        "tls": {
            "certificate": str(pair.cert),
            "private_key": str(pair.key),
            "trust_store": str(pki.ca),
            "handshake_timeout": 5.0,
        },
        # Parsing in-process keeps tests light (no worker processes to spawn).
        "syslog": {"tls_port": 0, "udp_enabled": True, "udp_port": 0, "parse_workers": 0},
        "https": {"port": 0},
        "access": dev_access(pki),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(table.get(key), dict) and key != "access":
            table[key] = {**table[key], **value}
        else:
            table[key] = value
    return parse_arr_config(table, workdir)


class RepositoryThread:
    """``with RepositoryThread(config) as arr:`` runs the repository until the block ends."""

    def __init__(self, config: ArrConfig, store: AuditStore | None = None) -> None:
        self.config = config
        self._store = store
        self.loop = asyncio.new_event_loop()
        self.repository: AuditRecordRepository | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 60.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> AuditRecordRepository:
        self._thread.start()

        async def start() -> AuditRecordRepository:
            repository = AuditRecordRepository(self.config, self._store)
            await repository.start()
            return repository

        self.repository = self.run(start())
        return self.repository

    def flush(self) -> None:
        assert self.repository is not None
        self.run(self.repository.flush())

    def __exit__(self, *exc: object) -> None:
        if self.repository is not None:
            self.run(self.repository.stop())

        async def cancel_leftovers() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        self.run(cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
