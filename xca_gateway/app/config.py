"""Gateway configuration: one TOML file per community (see ``conf/gateway.toml``).

Each subsystem owns its section (its dataclass and parser); this module composes them into one
:class:`GatewayConfig`. Relative paths in the file are resolved against the file's own directory,
so a configuration directory can be moved as a whole."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xca_gateway.audit.config import parse_audit_config
from xca_gateway.doors.dicomweb import parse_dicomweb_front_config
from xca_gateway.doors.dimse import parse_dicom_front_config
from xca_gateway.doors.hl7_prefetch import parse_prefetch_config
from xca_gateway.doors.web.config import parse_web_config
from xca_gateway.imaging.config import parse_imaging_config
from xca_gateway.initiating.patient_mapping import (
    PatientMappingConfig,
    parse_patient_mapping_config,
)
from xca_gateway.registry import parse_registry_config
from xca_gateway.repository import parse_repository_config
from xca_gateway.security.consent.service import parse_consent_config
from xca_gateway.security.policy import parse_policy_config
from xca_gateway.security.xua import parse_xua_config
from xca_gateway.settings import (
    PATIENT_ID_SOURCES,
    AdminConfig,
    CommunityConfig,
    ConfigError,
    DiagnosticsConfig,
    InitiatingConfig,
    LimitsConfig,
    OutboundConfig,
    PeerConfig,
    ServerConfig,
    SharedConfig,
    StorageConfig,
    TlsConfig,
    is_loopback_host,
    validate_home_community_id,
    validate_oid,
)

# Sections whose schema lives with the module that uses them (validated when it starts).
EXTRA_SECTIONS = (
    "registry",
    "repository",
    "imaging",
    "audit",
    "xua",
    "policy",
    "consent",
    "dicom",
    "prefetch",
    "dicomweb",
    "web",
)


def _default_patient_mapping() -> PatientMappingConfig:
    return PatientMappingConfig()


@dataclass(frozen=True)
class GatewayConfig:
    path: Path | None
    community: CommunityConfig
    tls: TlsConfig
    storage: StorageConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    peers: tuple[PeerConfig, ...] = ()
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    initiating: InitiatingConfig = field(default_factory=InitiatingConfig)
    patient_mapping: PatientMappingConfig = field(default_factory=_default_patient_mapping)
    shared: SharedConfig = field(default_factory=SharedConfig)
    # Sections owned by other modules (registry, repository, imaging, audit), parsed there.
    extra: dict[str, Any] = field(default_factory=dict)
    # [registry] (xca_gateway.registry.RegistryConfig): embedded SQLite by default.
    registry: Any = None
    # [repository] (xca_gateway.repository.RepositoryConfig), None when absent.
    repository: Any = None
    # [imaging] (xca_gateway.imaging.ImagingConfig).
    imaging: Any = None
    # [audit] (xca_gateway.audit.config.AuditConfig).
    audit: Any = None
    # [xua] (xca_gateway.security.xua.XuaConfig), [policy]
    # (xca_gateway.security.policy.PolicyConfig, None when
    # absent: then the trust store alone decides who may call), [consent].
    xua: Any = None
    policy: Any = None
    consent: Any = None
    # [dicom] (xca_gateway.doors.dimse.DicomFrontConfig): the DIMSE front door, when present.
    dicom: Any = None
    # [prefetch] (xca_gateway.doors.hl7_prefetch.PrefetchConfig): HL7 v2 auto-prefetch, when
    # present.
    prefetch: Any = None
    # [dicomweb] (xca_gateway.doors.dicomweb.DicomWebFrontConfig): QIDO-RS/WADO-RS, when present.
    dicomweb: Any = None
    # [web] (xca_gateway.doors.web.config.WebConfig): the browser door (IUA tokens), when
    # enabled.
    web: Any = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    @property
    def base_url(self) -> str:
        if self.server.public_base_url:
            return self.server.public_base_url.rstrip("/")
        return f"https://{self.server.host}:{self.server.port}"


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return repr(value)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_problem(value: Any, expected: Any) -> str | None:
    """Why ``value`` (from TOML) does not fit the annotation ``expected``; None if it does.
    TOML has types: a port written "8443" is a string and refused, not silently converted."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(expected) if a is not type(None)]
        problems = [_type_problem(value, a) for a in options]
        return None if any(p is None for p in problems) else problems[0]
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return f"expected an array, got {_describe(value)}"
        inner = next(iter(typing.get_args(expected)), None)
        for item in value:
            problem = _type_problem(item, inner) if inner not in (None, Ellipsis) else None
            if problem is not None:
                return f"in the array: {problem}"
        return None
    if expected is Path:
        ok = isinstance(value, str | Path)
        return None if ok else f"expected a path string, got {_describe(value)}"
    if expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected in (bool, str):
        ok = isinstance(value, expected)
    else:
        return None  # a type this check does not know: the section's own code checks it
    if not ok:
        return f"expected {_TYPE_NAMES[expected]}, got {_describe(value)}"
    if expected in (int, float) and value < 0:
        return f"must not be negative, got {value}"
    return None


def _check_types(cls: type[Any], table: dict[str, Any], section: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        problem = _type_problem(value, hints.get(key))
        if problem is None and key.endswith("port") and isinstance(value, int) and value > 65535:
            problem = f"must be 0..65535, got {value}"
        if problem is not None:
            raise ConfigError(f"[{section}] {key}: {problem}")


def _build(cls: type[Any], table: dict[str, Any], section: str, **extra: Any) -> Any:
    known = set(cls.__dataclass_fields__)
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s): {', '.join(sorted(unknown))}")
    _check_types(cls, table, section)
    try:
        return cls(**{**table, **extra})
    except TypeError as exc:
        raise ConfigError(f"[{section}] {exc}") from None


def _path(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _check_loopback(host: str, what: str) -> None:
    if not is_loopback_host(host):
        raise ConfigError(f"{what} must bind a loopback address (it is plain HTTP), not {host!r}")


def _check_proxy(server: ServerConfig) -> ServerConfig:
    """``proxy_sources`` are networks; a PROXY listener with none would admit no one."""
    sources = tuple(server.proxy_sources)
    for item in sources:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f"[server] proxy_sources: {item!r} is not an address or network"
            ) from None
    if server.proxy_protocol and not sources:
        raise ConfigError("[server] proxy_protocol = true needs proxy_sources (the balancers)")
    return dataclasses.replace(server, proxy_sources=sources)


def parse_config(data: dict[str, Any], base_dir: Path, path: Path | None = None) -> GatewayConfig:
    known_sections = {
        "community",
        "tls",
        "server",
        "limits",
        "admin",
        "outbound",
        "peers",
        "storage",
        "diagnostics",
        "initiating",
        "patient_mapping",
        "shared",
        *EXTRA_SECTIONS,
    }
    unknown = set(data) - known_sections
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")

    community = _build(CommunityConfig, _table(data, "community"), "community")
    validate_home_community_id(community.home_community_id, "community.home_community_id")
    validate_oid(
        community.patient_id_assigning_authority, "community.patient_id_assigning_authority"
    )

    tls_t = dict(_table(data, "tls"))
    for key in ("certificate", "private_key", "trust_store"):
        if key not in tls_t:
            raise ConfigError(f"[tls] {key} is required")
        tls_t[key] = _path(base_dir, tls_t[key], f"tls.{key}")
    if "crl_file" in tls_t:
        tls_t["crl_file"] = _path(base_dir, tls_t["crl_file"], "tls.crl_file")
    tls = _build(TlsConfig, tls_t, "tls")
    if tls.minimum_version not in ("1.2", "1.3"):
        raise ConfigError('tls.minimum_version must be "1.2" or "1.3" (BCP195 TLS 1.2 floor)')
    if not 0 <= tls.session_tickets <= 16:
        raise ConfigError("tls.session_tickets must be between 0 and 16")

    limits_t = dict(_table(data, "limits"))
    if "spool_dir" in limits_t:
        limits_t["spool_dir"] = _path(base_dir, limits_t["spool_dir"], "limits.spool_dir")
    limits = _build(LimitsConfig, limits_t, "limits")

    admin = _build(AdminConfig, _table(data, "admin"), "admin")
    _check_loopback(admin.host, "admin.host")

    storage_t = dict(_table(data, "storage"))
    storage_t["data_dir"] = _path(base_dir, storage_t.get("data_dir", "data"), "storage.data_dir")
    storage = _build(StorageConfig, storage_t, "storage")

    peers_raw = data.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("[[peers]] must be an array of tables")
    peers = tuple(
        _build(
            PeerConfig,
            {**p, "patient_id_sources": tuple(p.get("patient_id_sources", ["xref"]))},
            "peers",
        )
        for p in peers_raw
    )
    seen: set[str] = {community.home_community_id}
    for peer in peers:
        validate_home_community_id(peer.home_community_id, f"peers[{peer.name}].home_community_id")
        if peer.patient_id_assigning_authority is not None:
            validate_oid(
                peer.patient_id_assigning_authority, f"peers[{peer.name}] assigning authority"
            )
        unsupported = set(peer.patient_id_sources) - PATIENT_ID_SOURCES
        if unsupported:
            names = ", ".join(sorted(unsupported))
            raise ConfigError(f"peers[{peer.name}].patient_id_sources: not supported: {names}")
        if peer.home_community_id in seen:
            raise ConfigError(f"duplicate homeCommunityId {peer.home_community_id}")
        seen.add(peer.home_community_id)

    initiating = _build(InitiatingConfig, _table(data, "initiating"), "initiating")
    if initiating.peer_deadline <= 0 or initiating.overall_deadline <= 0:
        raise ConfigError("[initiating] deadlines must be positive")

    patient_mapping = parse_patient_mapping_config(
        _table(data, "patient_mapping"), base_dir, data_dir=storage.data_dir, peers=peers
    )

    registry = parse_registry_config(_table(data, "registry"), base_dir, storage.data_dir)
    repository = parse_repository_config(data.get("repository"), base_dir, storage.data_dir)
    imaging = parse_imaging_config(data.get("imaging", {}), base_dir, storage.data_dir)
    audit = parse_audit_config(_table(data, "audit"), base_dir, storage.data_dir, tls)

    try:
        dicom = (
            parse_dicom_front_config(_table(data, "dicom"), base_dir) if "dicom" in data else None
        )
        dicomweb = (
            parse_dicomweb_front_config(_table(data, "dicomweb"), base_dir)
            if "dicomweb" in data
            else None
        )
        web = parse_web_config(_table(data, "web"), base_dir) if "web" in data else None
        xua = parse_xua_config(_table(data, "xua"), base_dir)
        policy = parse_policy_config(_table(data, "policy"), base_dir) if "policy" in data else None
        consent = parse_consent_config(_table(data, "consent"), base_dir, storage.data_dir)

        prefetch = (
            parse_prefetch_config(_table(data, "prefetch"), base_dir)
            if "prefetch" in data
            else None
        )
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    server = _build(ServerConfig, _table(data, "server"), "server")
    server = _check_proxy(server)
    shared = _build(SharedConfig, _table(data, "shared"), "shared")
    if shared.database is not None and not shared.database.startswith(
        ("postgresql://", "postgres://")
    ):
        raise ConfigError("[shared] database must be a postgresql:// URL")

    return GatewayConfig(
        path=path,
        shared=shared,
        registry=registry,
        repository=repository,
        imaging=imaging,
        audit=audit,
        xua=xua,
        policy=policy,
        consent=consent,
        dicom=dicom,
        prefetch=prefetch,
        dicomweb=dicomweb,
        web=web,
        community=community,
        tls=tls,
        storage=storage,
        server=server,
        limits=limits,
        admin=admin,
        outbound=_build(OutboundConfig, _table(data, "outbound"), "outbound"),
        peers=peers,
        diagnostics=_build(DiagnosticsConfig, _table(data, "diagnostics"), "diagnostics"),
        initiating=initiating,
        patient_mapping=patient_mapping,
        extra={k: data[k] for k in EXTRA_SECTIONS if k in data},
    )


def load_config(path: Path) -> GatewayConfig:
    path = path.resolve()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return parse_config(data, path.parent, path)
    except ConfigError as exc:
        # Every error names the file (and, from the sections, the section and key).
        raise ConfigError(f"{path}: {exc}") from None
