"""The [registry] configuration section and opening the configured back end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from xca_gateway.registry import (
    LocalRegistry,
    RemoteRegistry,
    open_registry,
    parse_registry_config,
)
from xca_gateway.settings import ConfigError


def test_defaults_to_a_sqlite_file_in_the_data_directory(tmp_path: Path) -> None:
    config = parse_registry_config({}, tmp_path / "conf", tmp_path / "data")
    assert config.backend == "sqlite"
    assert config.sqlite_path == (tmp_path / "data" / "registry.sqlite3").resolve()
    assert config.url == f"sqlite:///{config.sqlite_path}"
    assert (config.max_results, config.unknown_patient, config.remote_iti18) == (
        1000,
        "empty",
        None,
    )


def test_relative_sqlite_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = parse_registry_config({"url": "sqlite:///db/r.sqlite3"}, tmp_path, tmp_path / "data")
    assert config.sqlite_path == tmp_path / "db" / "r.sqlite3"
    absolute = parse_registry_config(
        {"url": f"sqlite:///{tmp_path}/x.db"}, Path("/elsewhere"), tmp_path
    )
    assert absolute.sqlite_path == tmp_path / "x.db"


def test_postgresql_and_remote(tmp_path: Path) -> None:
    pg = parse_registry_config(
        {"url": "postgresql://reg@db:5432/registry", "pool_size": 8}, tmp_path, tmp_path
    )
    assert pg.backend == "postgresql" and pg.pool_size == 8
    remote = parse_registry_config(
        {"remote_iti18": "https://reg.example:8443/iti18"}, tmp_path, tmp_path
    )
    assert remote.backend == "remote"
    by_url = parse_registry_config({"url": "https://reg.example:8443/iti18"}, tmp_path, tmp_path)
    assert by_url.backend == "remote" and by_url.remote_iti18 == "https://reg.example:8443/iti18"


@pytest.mark.parametrize(
    "table",
    [
        {"bogus": 1},
        {"url": "mysql://x"},
        {"url": "sqlite:"},
        {"url": ""},
        {"max_results": 0},
        {"max_results": 1.5},
        {"max_results": True},
        {"unknown_patient": "maybe"},
        {"remote_iti18": "http://plain.example/iti18"},
        {"url": "https://a.example/iti18", "remote_iti18": "https://b.example/iti18"},
        {"patient_id_domains": "1.2.3"},
        {"patient_id_domains": ["not-an-oid"]},
        {"remote_timeout": -1},
    ],
)
def test_invalid_settings(tmp_path: Path, table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_registry_config(table, tmp_path, tmp_path)


async def test_open_the_configured_registry(tmp_path: Path) -> None:
    registry = await open_registry(parse_registry_config({}, tmp_path, tmp_path / "data"))
    try:
        assert isinstance(registry, LocalRegistry)
        assert (tmp_path / "data" / "registry.sqlite3").exists()
        assert await registry.knows_patient("P^^^&1.2.3&ISO") is False
    finally:
        await registry.close()
    # Reopening keeps the schema and data.
    again = await open_registry(parse_registry_config({}, tmp_path, tmp_path / "data"))
    await again.close()
    remote = parse_registry_config({"remote_iti18": "https://r.example/iti18"}, tmp_path, tmp_path)
    with pytest.raises(ConfigError):
        await open_registry(remote)


def test_a_remote_registry_knows_no_patients() -> None:
    registry = RemoteRegistry("https://r.example/iti18", peer_client=None)  # type: ignore[arg-type]
    assert asyncio.run(registry.knows_patient("x")) is None
