"""Gateway configuration: one TOML file per community (see ``conf/gateway.toml``).

Each subsystem owns its section (its dataclass and parser); this module composes them into one
:class:`GatewayConfig`. Relative paths in the file are resolved against the file's own directory,
so a configuration directory can be moved as a whole."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from xca_gateway.audit.config import AuditSection, parse_audit_config
from xca_gateway.doors.dicomweb import parse_dicomweb_front_config
from xca_gateway.doors.dicomweb.config import DicomWebSection
from xca_gateway.doors.dimse import DicomSection, parse_dicom_front_config
from xca_gateway.doors.hl7_prefetch import PrefetchSection, parse_prefetch_config
from xca_gateway.doors.web.config import WebSection, parse_web_config
from xca_gateway.imaging.config import ImagingSection, parse_imaging_config
from xca_gateway.initiating.patient_mapping import (
    PatientMappingConfig,
    PatientMappingSection,
    parse_patient_mapping_config,
)
from xca_gateway.registry import RegistrySection, parse_registry_config
from xca_gateway.repository import RepositorySection, parse_repository_config
from xca_gateway.schema import Section, error_lines
from xca_gateway.security.consent.service import ConsentSection, parse_consent_config
from xca_gateway.security.policy import PolicySection, parse_policy_config
from xca_gateway.security.xua import XuaSection, parse_xua_config
from xca_gateway.settings import (
    AdminConfig,
    AdminSection,
    CommunityConfig,
    CommunitySection,
    ConfigError,
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
    SharedConfig,
    SharedSection,
    StorageConfig,
    StorageSection,
    TlsConfig,
    TlsSection,
    is_loopback_host,
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


class GatewayFile(Section):
    """The configuration file of one community gateway (xca-gateway serve --config FILE).
    Relative paths are resolved against the file's own directory."""

    community: CommunitySection = Field(description=CommunitySection.__doc__)
    server: ServerSection = Field(ServerSection(), description=ServerSection.__doc__)
    tls: TlsSection = Field(description=TlsSection.__doc__)
    limits: LimitsSection = Field(LimitsSection(), description=LimitsSection.__doc__)
    admin: AdminSection = Field(AdminSection(), description=AdminSection.__doc__)
    outbound: OutboundSection = Field(OutboundSection(), description=OutboundSection.__doc__)
    storage: StorageSection = Field(StorageSection(), description=StorageSection.__doc__)
    diagnostics: DiagnosticsSection = Field(
        DiagnosticsSection(), description=DiagnosticsSection.__doc__
    )
    initiating: InitiatingSection = Field(
        InitiatingSection(), description=InitiatingSection.__doc__
    )
    patient_mapping: PatientMappingSection = Field(
        PatientMappingSection(), description=PatientMappingSection.__doc__
    )
    registry: RegistrySection = Field(RegistrySection(), description=RegistrySection.__doc__)
    repository: RepositorySection | None = Field(None, description=RepositorySection.__doc__)
    imaging: ImagingSection = Field(ImagingSection(), description=ImagingSection.__doc__)
    audit: AuditSection = Field(AuditSection(), description=AuditSection.__doc__)
    xua: XuaSection = Field(XuaSection(), description=XuaSection.__doc__)
    policy: PolicySection | None = Field(None, description=PolicySection.__doc__)
    consent: ConsentSection = Field(ConsentSection(), description=ConsentSection.__doc__)
    dicom: DicomSection | None = Field(None, description=DicomSection.__doc__)
    dicomweb: DicomWebSection | None = Field(None, description=DicomWebSection.__doc__)
    prefetch: PrefetchSection | None = Field(None, description=PrefetchSection.__doc__)
    web: WebSection | None = Field(None, description=WebSection.__doc__)
    shared: SharedSection = Field(SharedSection(), description=SharedSection.__doc__)
    peers: list[PeerSection] = Field([], description=PeerSection.__doc__)


def validate_file(data: Any) -> GatewayFile:
    """The whole file through the schema: every problem, one line each (section and key)."""
    try:
        return GatewayFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(error_lines(exc, data, GatewayFile))) from None


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


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    return value if isinstance(value, dict) else {}


def parse_config(data: dict[str, Any], base_dir: Path, path: Path | None = None) -> GatewayConfig:
    schema = validate_file(data)

    community = CommunityConfig(**schema.community.model_dump())
    tls = TlsConfig(
        **{
            **schema.tls.model_dump(),
            "certificate": _path(base_dir, schema.tls.certificate, "tls.certificate"),
            "private_key": _path(base_dir, schema.tls.private_key, "tls.private_key"),
            "trust_store": _path(base_dir, schema.tls.trust_store, "tls.trust_store"),
            "crl_file": (
                _path(base_dir, schema.tls.crl_file, "tls.crl_file")
                if schema.tls.crl_file is not None
                else None
            ),
        }
    )
    limits = LimitsConfig(
        **{
            **schema.limits.model_dump(),
            "spool_dir": (
                _path(base_dir, schema.limits.spool_dir, "limits.spool_dir")
                if schema.limits.spool_dir is not None
                else None
            ),
        }
    )
    admin = AdminConfig(**schema.admin.model_dump())
    _check_loopback(admin.host, "admin.host")
    storage = StorageConfig(_path(base_dir, schema.storage.data_dir, "storage.data_dir"))

    peers = tuple(
        PeerConfig(**{**peer.model_dump(), "patient_id_sources": tuple(peer.patient_id_sources)})
        for peer in schema.peers
    )
    seen: set[str] = {community.home_community_id}
    for index, peer in enumerate(peers):
        if peer.home_community_id in seen:
            raise ConfigError(
                f"[peers[{index}]] home_community_id: {peer.home_community_id} is listed twice"
                " (or is our own)"
            )
        seen.add(peer.home_community_id)

    initiating = InitiatingConfig(**schema.initiating.model_dump())

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

    server = _check_proxy(ServerConfig(**schema.server.model_dump()))
    shared = SharedConfig(**schema.shared.model_dump())

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
        outbound=OutboundConfig(**schema.outbound.model_dump()),
        peers=peers,
        diagnostics=DiagnosticsConfig(**schema.diagnostics.model_dump()),
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
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None
