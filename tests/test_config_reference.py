"""The configuration schema generates the reference conf/gateway.toml, the README's table and
docs/gateway.schema.json (issue 19): the committed files are what it generates, they load, and
the models' defaults are the runtime defaults."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticUndefined

from xca_gateway.app import config_reference
from xca_gateway.app.config import GatewayFile, load_config
from xca_gateway.audit.config import (
    AuditConfig,
    AuditDestination,
    AuditDestinationSection,
    AuditSection,
)
from xca_gateway.doors.dicomweb.config import DicomWebFrontConfig, DicomWebSection
from xca_gateway.doors.dimse import DicomFrontConfig, DicomSection
from xca_gateway.doors.hl7_prefetch import PrefetchConfig, PrefetchSection
from xca_gateway.doors.web.config import IuaConfig, IuaSection, WebConfig, WebSection
from xca_gateway.imaging.config import ImagingConfig, ImagingSection
from xca_gateway.initiating.patient_mapping import PatientMappingConfig, PatientMappingSection
from xca_gateway.registry import RegistryConfig, RegistrySection
from xca_gateway.schema import Section
from xca_gateway.security.consent.service import ConsentConfig, ConsentSection
from xca_gateway.security.policy import PolicyConfig, PolicySection
from xca_gateway.security.xua import XuaConfig, XuaOutboundConfig, XuaOutboundSection, XuaSection
from xca_gateway.settings import (
    AdminConfig,
    AdminSection,
    DiagnosticsConfig,
    DiagnosticsSection,
    InitiatingConfig,
    InitiatingSection,
    LimitsConfig,
    LimitsSection,
    OutboundConfig,
    OutboundSection,
    PeerConfig,
    PeerSection,
    ServerConfig,
    ServerSection,
    TlsConfig,
    TlsSection,
)
from xca_gateway.xds.metadata import ManifestOptions, ManifestSection

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("relative", sorted(config_reference.generated(REPO)))
def test_committed_file_is_what_the_schema_generates(relative: Path) -> None:
    expected = config_reference.generated(REPO)[relative]
    actual = (REPO / relative).read_text(encoding="utf-8")
    assert actual == expected, (
        f"{relative} differs from the configuration schema; regenerate it from the repository "
        f"root with `{config_reference.REGENERATE}` (or python -m xca_gateway.app.config_reference)"
    )


def test_check_mode_names_the_stale_file_and_the_command(tmp_path: Path) -> None:
    for relative in config_reference.generated(REPO):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text((REPO / relative).read_text())
    reference = tmp_path / config_reference.REFERENCE
    reference.write_text(reference.read_text().replace("port = 8443", "port = 8444", 1))
    check = [sys.executable, "-m", "xca_gateway", "config", "reference", "--check"]
    result = subprocess.run(
        [*check, "--root", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stdout.strip() == (
        "conf/gateway.toml: differs from the schema; regenerate with `xca-gateway config reference`"
    )
    write = [sys.executable, "-m", "xca_gateway", "config", "reference", "--root", str(tmp_path)]
    assert subprocess.run(write, capture_output=True, text=True, timeout=120).stdout.strip() == (
        "wrote conf/gateway.toml"
    )
    result = subprocess.run(
        [*check, "--root", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout


def test_generated_reference_loads(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "gateway.toml"
    path.write_text(config_reference.reference_toml())
    config = load_config(path)
    assert config.server.port == 8443
    assert config.limits.max_request_bytes == 1024**3
    assert config.tls.certificate == tmp_path / "certs" / "north.pem"
    assert config.dicom is None and config.policy is None and config.peers == ()


def _commented_section(text: str, header: str) -> str:
    """The TOML of one commented-out section of the reference, uncommented."""
    lines = text.splitlines()
    start = lines.index(f"# {header}")
    block = []
    for line in lines[start:]:
        if block and (line.startswith("# [") or (not line.startswith("#") and line)):
            break
        if line.startswith("# ") and (" = " in line or line.startswith("# [")):
            block.append(line[2:])
    return "\n".join(block)


@pytest.mark.parametrize(
    "header",
    ["[dicom]", "[dicomweb]", "[[peers]]", "[[imaging.sources]]", "[[audit.destinations]]"],
)
def test_examples_of_commented_sections_validate(header: str) -> None:
    # What an operator gets by uncommenting a section of the reference passes the schema.
    text = config_reference.reference_toml()
    data = tomllib.loads((REPO / "conf" / "north.toml").read_text())
    section = tomllib.loads(_commented_section(text, header))
    name = header.strip("[]").split(".")[0]
    data[name] = section[name]
    GatewayFile.model_validate(data)


@pytest.mark.parametrize("name", ["north", "south", "east", "gateway"])
def test_configurations_in_conf_load(name: str) -> None:
    config = load_config(REPO / "conf" / f"{name}.toml")
    assert config.community.home_community_id.startswith("urn:oid:")


def test_json_schema_is_the_models_schema() -> None:
    schema = json.loads((REPO / config_reference.JSON_SCHEMA).read_text())
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"community", "tls"}
    server = schema["$defs"]["ServerSection"]["properties"]["port"]
    assert (server["type"], server["minimum"], server["maximum"]) == ("integer", 0, 65535)
    tls = schema["$defs"]["TlsSection"]["properties"]["minimum_version"]
    assert tls["enum"] == ["1.2", "1.3"]


def test_every_key_is_described_and_has_a_default_or_an_example() -> None:
    missing = []

    def walk(model: type[Section], path: str) -> None:
        if not (model.__doc__ or "").strip():
            missing.append(f"{path}: no docstring")
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{path}.{name}: no description")
            tables = config_reference._table_models(field)
            unset = field.default in (None, PydanticUndefined) and not field.examples
            if unset and name != "kind" and not tables:
                missing.append(f"{path}.{name}: neither default nor example")
            for inner in tables:  # inline tables (codes) are values, not sections
                walk(inner, f"{path}.{name}")

    walk(GatewayFile, "")
    assert missing == []


# --------------------------------------------------------------------------- drift guard

_RUNTIME: list[tuple[type[Section], type[Any]]] = [
    (ServerSection, ServerConfig),
    (TlsSection, TlsConfig),
    (LimitsSection, LimitsConfig),
    (AdminSection, AdminConfig),
    (OutboundSection, OutboundConfig),
    (DiagnosticsSection, DiagnosticsConfig),
    (InitiatingSection, InitiatingConfig),
    (PeerSection, PeerConfig),
    (PatientMappingSection, PatientMappingConfig),
    (RegistrySection, RegistryConfig),
    (ManifestSection, ManifestOptions),
    (ImagingSection, ImagingConfig),
    (AuditSection, AuditConfig),
    (XuaSection, XuaConfig),
    (XuaOutboundSection, XuaOutboundConfig),
    (PolicySection, PolicyConfig),
    (ConsentSection, ConsentConfig),
    (DicomSection, DicomFrontConfig),
    (DicomWebSection, DicomWebFrontConfig),
    (PrefetchSection, PrefetchConfig),
    (WebSection, WebConfig),
    (IuaSection, IuaConfig),
]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Section):
        return _plain(value.model_dump())
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize(("section", "runtime"), _RUNTIME, ids=lambda c: c.__name__)
def test_schema_defaults_are_the_runtime_defaults(
    section: type[Section], runtime: type[Any]
) -> None:
    # The dataclasses the gateway runs with stay; their defaults must be what the schema (and
    # so the reference) says. None in the schema means "computed at load" (data directory,
    # host name, the [tls] files): the runtime default is then not compared.
    fields = {f.name: f for f in dataclasses.fields(runtime)}
    differing = []
    for name, field in section.model_fields.items():
        if name not in fields or field.default in (None, PydanticUndefined):
            continue
        own = fields[name]
        if own.default is not dataclasses.MISSING:
            expected = own.default
        elif own.default_factory is not dataclasses.MISSING:
            expected = own.default_factory()
        else:
            continue
        if _plain(field.default) != _plain(expected):
            differing.append(f"{name}: schema {field.default!r}, runtime {expected!r}")
    assert differing == []


def test_audit_destination_defaults() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(AuditDestination)}
    for name in ("check_hostname", "connect_timeout", "write_timeout"):
        assert AuditDestinationSection.model_fields[name].default == fields[name]


@pytest.mark.parametrize(
    ("section", "runtime"),
    [
        (ServerSection, ServerConfig),
        (TlsSection, TlsConfig),
        (LimitsSection, LimitsConfig),
        (AdminSection, AdminConfig),
        (OutboundSection, OutboundConfig),
        (DiagnosticsSection, DiagnosticsConfig),
        (InitiatingSection, InitiatingConfig),
        (PeerSection, PeerConfig),
    ],
    ids=lambda c: c.__name__,
)
def test_core_sections_have_a_key_for_every_runtime_field(
    section: type[Section], runtime: type[Any]
) -> None:
    # These dataclasses are built from their section (ServerConfig(**section.model_dump())): a
    # field added to one must be added to the other (and the reference regenerated).
    assert set(section.model_fields) == {f.name for f in dataclasses.fields(runtime)}
