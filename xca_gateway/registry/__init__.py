"""The community's XDS Document Registry: embedded (SQLite, PostgreSQL) or remote (ITI-18).

Public API::

    config = parse_registry_config(table, base_dir, data_dir)      # TOML section [registry]
    registry = await open_registry(config, peer_client=gateway.peer_client)
    result = await registry.stored_query(adhoc_query_request)       # ITI-18 semantics
    errors = await registry.submit(submit_objects_request)          # ITI-42; [] = Success
    await registry.close()

``url`` selects the back end: ``sqlite:///relative/or/absolute/path`` (the default, a file in
the data directory), ``postgresql://user@host:port/db`` (several replicas share it), or an
``https://`` ITI-18 endpoint of an existing registry (same as ``remote_iti18``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from lxml import etree
from pydantic import Field

from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.registry.local import LocalRegistry
from xca_gateway.registry.model import QueryResult, RegistryAction
from xca_gateway.registry.postgres_store import PostgresRegistryStore
from xca_gateway.registry.remote import RemoteRegistry
from xca_gateway.registry.sqlite_store import SqliteRegistryStore
from xca_gateway.schema import Count, HttpsUrl, NonEmpty, Oid, Seconds, Section
from xca_gateway.settings import ConfigError, validate_oid
from xca_gateway.xds.ebrs import RegistryError

__all__ = [
    "LocalRegistry",
    "QueryResult",
    "Registry",
    "RegistryAction",
    "RegistryConfig",
    "RegistrySection",
    "RemoteRegistry",
    "open_registry",
    "parse_registry_config",
]


class Registry(Protocol):
    async def stored_query(self, request: etree._Element) -> QueryResult:
        """Run the query:AdhocQueryRequest (ITI-18 semantics) and return its outcome."""
        ...

    async def submit(self, request: etree._Element) -> list[RegistryError]:
        """Register an lcm:SubmitObjectsRequest (ITI-42); [] means Success."""
        ...

    async def knows_patient(self, patient_id: str) -> bool | None:
        """Whether metadata of this patient is registered; None when it cannot be told."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class RegistryConfig:
    url: str
    max_results: int = 1000
    # An existing registry's ITI-18 endpoint: answer from it instead of an embedded store.
    remote_iti18: str | None = None
    # ...and its ITI-42 endpoint, to forward registrations (optional).
    remote_iti42: str | None = None
    remote_timeout: float = 30.0
    # ITI-38 for a patient the registry does not know (ITI38-008): "empty" Success or
    # "error" (XDSUnknownPatientId).
    unknown_patient: str = "empty"
    # Database connections / worker threads of an embedded store.
    pool_size: int = 4
    # Assigning authorities (OIDs) whose patient ids ITI-42 accepts; empty accepts any.
    patient_id_domains: tuple[str, ...] = ()

    @property
    def backend(self) -> str:
        if self.remote_iti18:
            return "remote"
        if self.url.startswith("sqlite:"):
            return "sqlite"
        return "postgresql"

    @property
    def sqlite_path(self) -> Path:
        return Path(self.url[len("sqlite:///") :])


class RegistrySection(Section):
    """The community's XDS Document Registry: embedded (SQLite, the default; PostgreSQL, which
    several replicas can share) or an existing registry reached with ITI-18."""

    url: NonEmpty | None = Field(
        None,
        description=(
            "sqlite:///path (default: <data_dir>/registry.sqlite3), postgresql://user@host/db, or"
            " the https:// ITI-18 endpoint of an existing registry (same as remote_iti18)."
        ),
        examples=["postgresql://xca@127.0.0.1:5432/registry"],
    )
    max_results: Count = Field(1000, description="Most entries one stored query returns.")
    remote_iti18: HttpsUrl | None = Field(
        None,
        description="An existing registry's ITI-18 endpoint: answer from it, not from a store.",
        examples=["https://registry.north.example.org/iti18"],
    )
    remote_iti42: HttpsUrl | None = Field(
        None,
        description="...and its ITI-42 endpoint, to forward registrations.",
        examples=["https://registry.north.example.org/iti42"],
    )
    remote_timeout: Seconds = Field(30.0, description="Seconds for one exchange with it.")
    unknown_patient: Literal["empty", "error"] = Field(
        "empty",
        description=(
            "ITI-38 for a patient the registry does not know (ITI38-008): an empty Success or"
            " an error (XDSUnknownPatientId)."
        ),
    )
    pool_size: Count = Field(
        4, description="Database connections / worker threads of an embedded store."
    )
    patient_id_domains: list[Oid] = Field(
        [], description="Assigning authorities whose patient ids ITI-42 accepts; empty: any."
    )


_KEYS = {
    "url",
    "max_results",
    "remote_iti18",
    "remote_iti42",
    "remote_timeout",
    "unknown_patient",
    "pool_size",
    "patient_id_domains",
}


def parse_registry_config(table: dict[str, Any], base_dir: Path, data_dir: Path) -> RegistryConfig:
    """Read the ``[registry]`` TOML section; relative SQLite paths are relative to base_dir."""
    if not isinstance(table, dict):
        raise ConfigError("[registry] must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"[registry] unknown key(s): {', '.join(sorted(unknown))}")

    def text(key: str) -> str | None:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"registry.{key} must be a non-empty string")
        return value.strip() if isinstance(value, str) else None

    def number(key: str, default: float, kind: type) -> Any:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"registry.{key} must be a positive number")
        if kind is int and not isinstance(value, int):
            raise ConfigError(f"registry.{key} must be an integer")
        return kind(value)

    url = text("url") or f"sqlite:///{(data_dir / 'registry.sqlite3').resolve()}"
    remote_iti18 = text("remote_iti18")
    remote_iti42 = text("remote_iti42")
    if url.startswith("https://"):
        if remote_iti18 and remote_iti18 != url:
            raise ConfigError("registry.url and registry.remote_iti18 name different registries")
        remote_iti18 = url
    elif url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ConfigError("registry.url: use sqlite:///path/to/registry.sqlite3")
        path = Path(url[len("sqlite:///") :]).expanduser()
        if not path.is_absolute():
            path = (base_dir / path).resolve()
        url = f"sqlite:///{path}"
    elif not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "registry.url must be sqlite:///..., postgresql://... or an https:// ITI-18 endpoint"
        )
    for key, value in (("remote_iti18", remote_iti18), ("remote_iti42", remote_iti42)):
        if value is not None and not value.startswith("https://"):
            raise ConfigError(f"registry.{key} must be an https:// URL (mutual TLS)")
    unknown_patient = text("unknown_patient") or "empty"
    if unknown_patient not in ("empty", "error"):
        raise ConfigError('registry.unknown_patient must be "empty" or "error"')
    domains = table.get("patient_id_domains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise ConfigError("registry.patient_id_domains must be a list of OIDs")
    for domain in domains:
        validate_oid(domain, "registry.patient_id_domains")
    return RegistryConfig(
        url=url,
        max_results=number("max_results", 1000, int),
        remote_iti18=remote_iti18,
        remote_iti42=remote_iti42,
        remote_timeout=number("remote_timeout", 30.0, float),
        unknown_patient=unknown_patient,
        pool_size=number("pool_size", 4, int),
        patient_id_domains=tuple(domains),
    )


async def open_registry(
    config: RegistryConfig, *, peer_client: PeerClient | None = None
) -> Registry:
    """Open the configured registry (creating an embedded store's schema if needed)."""
    if config.backend == "remote":
        if peer_client is None:
            raise ConfigError("a remote registry needs the gateway's peer client")
        assert config.remote_iti18 is not None
        return RemoteRegistry(
            config.remote_iti18,
            peer_client,
            iti42_url=config.remote_iti42,
            timeout=config.remote_timeout,
        )
    if config.backend == "sqlite":
        sqlite_store = await asyncio.to_thread(
            SqliteRegistryStore, config.sqlite_path, workers=config.pool_size
        )
        return LocalRegistry(
            sqlite_store,
            max_results=config.max_results,
            patient_id_domains=config.patient_id_domains,
        )
    postgres_store = await asyncio.to_thread(
        PostgresRegistryStore, config.url, workers=config.pool_size
    )
    return LocalRegistry(
        postgres_store, max_results=config.max_results, patient_id_domains=config.patient_id_domains
    )
