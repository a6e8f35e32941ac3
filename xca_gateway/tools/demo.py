"""``xca-gateway demo``: N peered communities on loopback, one gateway process each.

The launcher binds every listening socket itself (so ports chosen by the OS are known before any
configuration is written, with no bind-then-close race), writes one TOML configuration per
community naming the others as peers, and starts ``xca-gateway serve`` per community with its
sockets inherited. Children die with the launcher (PR_SET_PDEATHSIG), so a killed demo leaves no
stray processes either.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from xca_gateway.app.serve import LISTEN_FDS_ENV
from xca_gateway.arr.app import prepare_demo
from xca_gateway.security.dev_pki import init_dev_pki, issue_client_certificate
from xca_gateway.security.operators import write_operator_token_file
from xca_gateway.tools.auth_server import (
    AuthServerState,
    Client,
    demo_clinicians,
    write_state,
)
from xca_gateway.tools.dicom_samples import (
    DEFAULT_PATIENTS,
    generate_community_samples,
    local_patient_id,
)
from xca_gateway.tools.import_manifests import import_with_config, registry_from_config
from xca_gateway.tools.replicas import (
    Backend,
    Haproxy,
    PrivatePostgres,
    ReplicaSetupError,
    haproxy_config,
    replica_config_toml,
)

log = logging.getLogger(__name__)

COMMUNITY_NAMES = ("north", "south", "east", "west", "central", "coast", "valley", "highland")

# Demo identifiers live under the IHE Connectathon testing arc (1.3.6.1.4.1.21367.13).
_ARC = "1.3.6.1.4.1.21367.13"
READY_TIMEOUT = 60.0
STOP_GRACE = 10.0


@dataclass(frozen=True)
class DemoCommunity:
    index: int
    name: str

    @property
    def home_community_id(self) -> str:
        return f"urn:oid:{_ARC}.70.{self.index + 1}"

    @property
    def assigning_authority(self) -> str:
        return f"{_ARC}.20.{1000 * (self.index + 1)}"

    @property
    def repository_unique_id(self) -> str:
        return f"{_ARC}.80.{self.index + 1}"

    @property
    def imaging_source_id(self) -> str:
        return f"{_ARC}.81.{self.index + 1}"

    @property
    def ae_title(self) -> str:
        return f"XCA-{self.name.upper()}"[:16]

    @property
    def uid_root(self) -> str:
        return f"{_ARC}.90.{self.index + 1}"

    @property
    def calling_ae_title(self) -> str:
        """The AE title this community's local consumer (a PACS workstation) calls with."""
        return f"{self.name.upper()}-VIEWER"[:16]

    @property
    def gateway_dns_name(self) -> str:
        """How peers recognise this community's gateway certificate (its DNS SAN)."""
        return f"{self.name}.xca-gateway.test"


# The demo's X-Assertion Provider (ITI-40): one identity provider for the demo region, bound
# to every demo community. Its signing pair is a development certificate like the others.
XUA_ISSUER = "https://idp.demo.xca-gateway.test"
# The operator of each community's consent admin API (token in <workdir>/<community>/operators).
DEMO_OPERATOR = "demo-operator"
# The attributes every demo assertion carries (the responding gateways require them).
XUA_PURPOSE_OF_USE = {
    "code": "TREATMENT",
    "code_system": "2.16.840.1.113883.3.18.7.1",
    "display_name": "Treatment",
}
XUA_ROLE = {
    "code": "158965000",
    "code_system": "2.16.840.1.113883.6.96",
    "display_name": "Medical practitioner",
}


@dataclass(frozen=True)
class DemoIdentities:
    """Certificate pairs (paths) of the roles a demo community hands out."""

    local_consumer: tuple[str, str]
    local_repository: tuple[str, str]
    gateway: tuple[str, str]
    xua_idp: tuple[str, str]

    def to_json(self) -> dict[str, dict[str, str]]:
        """endpoints.json "identities" of one community (docs/contract.md)."""
        return {
            "localConsumer": self.pair_json(self.local_consumer),
            "localRepository": self.pair_json(self.local_repository),
            "gateway": self.pair_json(self.gateway),
        }

    @staticmethod
    def pair_json(pair: tuple[str, str]) -> dict[str, str]:
        return {"cert": pair[0], "key": pair[1]}


def community_names(count: int) -> list[str]:
    if count < 1:
        raise ValueError("at least one community is needed")
    names = list(COMMUNITY_NAMES[:count])
    names += [f"community{i + 1}" for i in range(len(names), count)]
    return names


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def community_config_toml(
    community: DemoCommunity,
    *,
    certs_dir: str,
    data_dir: str,
    https_port: int,
    admin_port: int,
    peers: list[tuple[DemoCommunity, str]],
    diagnostics_echo: bool = False,
    xref_csv: str | None = None,
    dicom_port: int = 0,
    dicomweb_port: int = 0,
    identities: DemoIdentities | None = None,
    policy: str | None = None,
    web: DemoWeb | None = None,
) -> str:
    """The TOML configuration of one demo community; ``peers`` gives each peer's base URL.

    With ``identities`` the community runs the secured configuration a real HIE would: deny
    by default with every caller named by its certificate, XUA required on /xca/* with the
    demo's identity provider, the initiating side issuing assertions for the local caller,
    patient consent on. Without, only the demo client and the peers are listed (tests).
    ``policy``: a ``[policy]`` section (TOML) naming the callers instead (benchmarks).
    """
    lines = [
        f"# {community.name}: generated by xca-gateway demo; see conf/gateway.toml for all options",
        "",
        "[community]",
        f"name = {_q(community.name)}",
        f"home_community_id = {_q(community.home_community_id)}",
        f"patient_id_assigning_authority = {_q(community.assigning_authority)}",
        "",
        "[server]",
        'host = "127.0.0.1"',
        f"port = {https_port}",
        "",
        "[tls]",
        f"certificate = {_q(f'{certs_dir}/{community.name}.pem')}",
        f"private_key = {_q(f'{certs_dir}/{community.name}.key')}",
        f"trust_store = {_q(f'{certs_dir}/ca.pem')}",
        "",
        "[admin]",
        'host = "127.0.0.1"',
        f"port = {admin_port}",
        "",
        "[storage]",
        f"data_dir = {_q(data_dir)}",
        "",
        "# The community's XDS repository (imaging manifests, KOS) and imaging source.",
        "[repository]",
        f"repository_unique_id = {_q(community.repository_unique_id)}",
        "",
        "[repository.manifest]",
        f"imaging_source_id = {_q(community.imaging_source_id)}",
        "",
        "[[imaging.sources]]",
        f"repository_unique_id = {_q(community.imaging_source_id)}",
        'kind = "filesystem"',
        "",
        "# The DICOM front door: C-FIND / C-GET / C-MOVE over the federation (DICOM TLS).",
        "[dicom]",
        f"ae_title = {_q(community.ae_title)}",
        'host = "127.0.0.1"',
        f"port = {dicom_port}",
        "tls = true",
        "",
        "# The DICOMweb front door: QIDO-RS / WADO-RS over the federation (mutual TLS).",
        "[dicomweb]",
        'host = "127.0.0.1"',
        f"port = {dicomweb_port}",
        "",
    ]
    if diagnostics_echo:
        lines += ["[diagnostics]", "echo = true", ""]
    if xref_csv:
        lines += ["[patient_mapping]", f"xref_csv = {_q(xref_csv)}", ""]
    lines += [policy] if policy is not None else _policy_toml(community, peers, identities)
    if web is not None:
        lines += web.toml(community)
    if identities is not None:
        lines += _xua_toml(community, peers, identities)
        lines += [
            "# Patient consent (opt-out by default): `xca-gateway consent` changes it; the",
            "# admin port's /consent API takes the operator token in `operators` (mode 0600).",
            "[consent]",
            "enabled = true",
            'default_mode = "opt-out"',
            'admin_token_file = "operators"',
            "",
        ]
    for peer, base_url in peers:
        lines += [
            "[[peers]]",
            f"name = {_q(peer.name)}",
            f"home_community_id = {_q(peer.home_community_id)}",
            f"iti38 = {_q(base_url + '/xca/iti38')}",
            f"iti39 = {_q(base_url + '/xca/iti39')}",
            f"rad75 = {_q(base_url + '/xca/rad75')}",
            f"patient_id_assigning_authority = {_q(peer.assigning_authority)}",
            "",
        ]
    return "\n".join(lines)


@dataclass(frozen=True)
class DemoWeb:
    """A community's web door and the demo authorization server whose clinicians it admits."""

    issuer: str  # the authorization server's base URL (its "iss")
    base_url: str  # the web door's (its "aud" too)
    port: int

    def toml(self, community: DemoCommunity) -> list[str]:
        issuer = self.issuer
        return [
            "# The web door: clinicians in a browser, with IUA tokens of the demo's",
            "# authorization server (endpoints.json authorizationServer, clinicians).",
            "[web]",
            "enabled = true",
            'host = "127.0.0.1"',
            f"port = {self.port}",
            "",
            "[web.iua]",
            f"issuer = {_q(issuer)}",
            f"jwks_uri = {_q(issuer + '/jwks')}",
            f"authorization_endpoint = {_q(issuer + '/authorize')}",
            f"token_endpoint = {_q(issuer + '/token')}",
            f"client_id = {_q(community.name + '-web')}",
            f"audience = {_q(self.base_url)}",
            'scopes = ["dicomweb.read"]',
            "",
            "# The authorization server's users are this community's clinicians.",
            "[[policy.callers]]",
            'name = "demo clinicians"',
            'roles = ["clinician"]',
            f"token_issuers = [{_q(issuer)}]",
            "",
        ]


def _policy_toml(
    community: DemoCommunity,
    peers: list[tuple[DemoCommunity, str]],
    identities: DemoIdentities | None,
) -> list[str]:
    lines = [
        "# Who may call what (deny-by-default): every caller is named by its certificate and",
        "# gets roles; a certificate from the trust store alone gets nothing.",
        "[policy]",
        'default = "deny"',
        "",
        '# The demo\'s shared consumer (endpoints.json "client"), listed by every community.',
        "[[policy.callers]]",
        'name = "demo-client"',
        'roles = ["local-consumer"]',
        'certificate_uris = ["urn:xca-gateway:client:consumer"]',
        "",
    ]
    if identities is not None:
        lines += [
            "# This community's EHR / viewer / PACS workstation: /ig/*, DICOMweb, DIMSE.",
            "[[policy.callers]]",
            f"name = {_q(community.name + '-consumer')}",
            'roles = ["local-consumer"]',
            f"certificate_uris = [{_q('urn:xca-gateway:client:' + community.name + '-consumer')}]",
            f"ae_titles = [{_q(community.calling_ae_title)}]",
            "",
            "# This community's XDS repository: registers documents (ITI-42), reads locally.",
            "[[policy.callers]]",
            f"name = {_q(community.name + '-repository')}",
            'roles = ["local-repository"]',
            "certificate_uris = "
            f"[{_q('urn:xca-gateway:client:' + community.name + '-repository')}]",
            "",
        ]
    for peer, _ in peers:
        lines += [
            "[[policy.peers]]",
            f"name = {_q(peer.name)}",
            f"home_community_id = {_q(peer.home_community_id)}",
            f"certificate_dns_names = [{_q(peer.gateway_dns_name)}]",
            "",
        ]
    return lines


def _toml_table(values: dict[str, str]) -> str:
    return "{ " + ", ".join(f"{k} = {_q(v)}" for k, v in values.items()) + " }"


def _xua_toml(
    community: DemoCommunity,
    peers: list[tuple[DemoCommunity, str]],
    identities: DemoIdentities,
) -> list[str]:
    idp_cert, idp_key = identities.xua_idp
    communities = ", ".join(_q(p.home_community_id) for p, _ in peers)
    return [
        "# XUA (ITI-40): required from every peer on /xca/*; the demo identity provider may",
        "# vouch for users of the peer communities only.",
        "[xua]",
        "enabled = true",
        "",
        "[[xua.trusted_issuers]]",
        f"issuer = {_q(XUA_ISSUER)}",
        f"certificates = [{_q(idp_cert)}]",
        f"communities = [{communities}]",
        "",
        "# Outbound: forward the local caller's assertion, else issue one naming the verified",
        "# local caller (signed with the demo identity provider's key).",
        "[xua.outbound]",
        'mode = "passthrough_or_issue"',
        'identity_source = "caller"',
        f"issuer = {_q(XUA_ISSUER)}",
        f"signing_key = {_q(idp_key)}",
        f"signing_certificate = {_q(idp_cert)}",
        'audience = "endpoint"',
        "",
        "[xua.outbound.identity]",
        f"name_id = {_q(community.name + '-gateway')}",
        f"subject_id = {_q(community.name + ' gateway')}",
        f"organization = {_q('Community ' + community.name)}",
        f"organization_id = {_q(community.home_community_id)}",
        f"home_community_id = {_q(community.home_community_id)}",
        f"roles = [{_toml_table(XUA_ROLE)}]",
        f"purposes_of_use = [{_toml_table(XUA_PURPOSE_OF_USE)}]",
        "",
    ]


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the launcher dies, however it dies.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _seed(community: DemoCommunity, data_dir: Path) -> list[dict[str, str]]:
    """Sample studies at the community's imaging source; returns samplePatients entries."""

    images = data_dir / "images"
    marker = data_dir / "samples.json"
    if not marker.exists():
        studies = generate_community_samples(
            images,
            community_index=community.index,
            community_name=community.name,
            issuer_oid=community.assigning_authority,
            uid_root=community.uid_root,
        )
        listing = [
            {
                "patientId": s.patient_id,
                "issuer": s.issuer_oid,
                "studyInstanceUid": s.study_instance_uid,
                "accessionNumber": s.accession_number,
                "studyDate": s.study_date,
                "modality": s.modality,
                # Explicit VR Little Endian, or RLE Lossless for the compressed study.
                "transferSyntaxUid": s.transfer_syntax_uid,
                "files": [str(f) for f in s.files],
            }
            for s in studies
        ]
        _write_atomic(marker, json.dumps({"studies": listing}, indent=2))
    return [
        {
            "id": f"{local_patient_id(community.index, i)}^^^&{community.assigning_authority}&ISO",
            "crossCommunityKey": patient.cross_community_key,
        }
        for i, patient in enumerate(DEFAULT_PATIENTS)
    ]


def _register_samples(config_path: Path, images: Path) -> None:
    """Register the sample studies: KOS manifests in the repository, metadata in the registry,
    patients in the directory (idempotent: a restarted demo skips what is registered)."""
    import asyncio

    report = asyncio.run(
        import_with_config(config_path, [images], registry_from_config, progress=False)
    )
    if report.failed:
        raise RuntimeError(f"sample import failed for {config_path}: {report.summary()}")


def _ready(admin_url: str) -> bool:
    if admin_url.startswith("https://"):
        # Our own child's UI port: any HTTP answer means it serves (the socket was bound by
        # us, so a bare TCP connect would succeed before the child even runs).
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(admin_url + "/", timeout=1.0, context=ctx):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(admin_url + "/readyz", timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Demo:
    def __init__(self, workdir: Path, count: int, base_port: int, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.workdir = workdir.resolve()
        # N > 1: each community is N gateways behind one HAProxy on its public port, sharing
        # a private PostgreSQL cluster the demo starts (initdb in the workdir).
        self.replicas = replicas
        self.postgres: PrivatePostgres | None = None
        self.balancers: list[Haproxy] = []
        self._public_sockets: list[socket.socket] = []
        # community name -> its replicas' (config, https socket, admin socket)
        self.replica_sockets: dict[str, list[tuple[Path, socket.socket, socket.socket]]] = {}
        self.communities = [DemoCommunity(i, n) for i, n in enumerate(community_names(count))]
        self.base_port = base_port
        self.processes: list[subprocess.Popen[bytes]] = []
        self.endpoints_file = self.workdir / "endpoints.json"
        self.arr: Any = None  # the demo's Audit Record Repository (xca_gateway.arr)
        self.auth_dir = self.workdir / "auth"
        self.auth_socket: socket.socket | None = None
        self.auth_pair: Any = None
        self.web_sockets: dict[str, socket.socket] = {}

    def prepare(
        self,
    ) -> tuple[dict[str, Any], list[tuple[DemoCommunity, socket.socket, socket.socket]]]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.endpoints_file.unlink(missing_ok=True)
        pki = init_dev_pki(
            self.workdir / "certs", [*(c.name for c in self.communities), "arr", "auth"]
        )
        idp = issue_client_certificate(pki, "demo-idp")
        identities = {}
        for c in self.communities:
            consumer = issue_client_certificate(pki, f"{c.name}-consumer")
            repository = issue_client_certificate(pki, f"{c.name}-repository")
            gateway = pki.communities[c.name]
            identities[c.name] = DemoIdentities(
                local_consumer=(str(consumer.cert), str(consumer.key)),
                local_repository=(str(repository.cert), str(repository.key)),
                gateway=(str(gateway.cert), str(gateway.key)),
                xua_idp=(str(idp.cert), str(idp.key)),
            )
        bound = []
        for c in self.communities:
            https_port = self.base_port + 10 * c.index if self.base_port else 0
            admin_port = https_port + 1 if self.base_port else 0
            bound.append((c, _bind(https_port), _bind(admin_port)))
            self.web_sockets[c.name] = _bind(https_port + 4 if self.base_port else 0)
        base_urls = {c.name: f"https://127.0.0.1:{h.getsockname()[1]}" for c, h, _ in bound}
        # The demo authorization server (IUA): its clinicians sign in at each web door.
        self.auth_socket = _bind(
            self.base_port + 10 * len(self.communities) + 8 if self.base_port else 0
        )
        issuer = f"https://127.0.0.1:{self.auth_socket.getsockname()[1]}"
        webs = {
            c.name: DemoWeb(
                issuer,
                f"https://127.0.0.1:{self.web_sockets[c.name].getsockname()[1]}",
                self.web_sockets[c.name].getsockname()[1],
            )
            for c in self.communities
        }
        clinicians = demo_clinicians([c.name for c in self.communities], self.auth_dir)
        write_state(
            self.auth_dir,
            AuthServerState(
                issuer=issuer,
                clinicians=tuple(clinicians),
                clients=tuple(
                    Client(
                        f"{c.name}-web",
                        (webs[c.name].base_url + "/oauth/callback",),
                        webs[c.name].base_url,
                    )
                    for c in self.communities
                ),
            ),
        )
        self.auth_pair = pki.communities["auth"]
        samples = {}
        for c in self.communities:
            (self.workdir / c.name / "data").mkdir(parents=True, exist_ok=True)
            samples[c.name] = _seed(c, self.workdir / c.name / "data")
        # The demo's master patient index: the same person's ids in every community.
        xref = self.workdir / "xref.csv"
        people: dict[str, list[str]] = {}
        for c in self.communities:
            for patient in samples[c.name]:
                people.setdefault(patient["crossCommunityKey"], []).append(patient["id"])
        lines = [f"# {key}\n" + ",".join(ids) for key, ids in people.items()]
        _write_atomic(
            xref,
            "# one person per line: their patient id in every community\n"
            + "\n".join(lines)
            + "\n",
        )
        # One Audit Record Repository for the region; every community audits to it.

        arr_pair = pki.communities["arr"]
        self.arr = prepare_demo(
            self.workdir / "arr",
            certificate=arr_pair.cert,
            private_key=arr_pair.key,
            trust_store=pki.ca,
            communities={c.home_community_id: c.name for c in self.communities},
            xref_csv=xref,
            base_port=self.base_port + 10 * len(self.communities) if self.base_port else 0,
            # Deny by default: the gateways are its audit sources, bound to their
            # <community>-gateway AuditSourceIDs, and an auditConsumer certificate searches.
            pki=pki,
        )
        if self.replicas > 1:
            self.postgres = PrivatePostgres(self.workdir / "postgres")
            self.postgres.start()
        communities_json = []
        for c, https, admin in bound:
            cdir = self.workdir / c.name
            cdir.mkdir(exist_ok=True)
            peers = [(p, base_urls[p.name]) for p in self.communities if p is not c]
            config = community_config_toml(
                c,
                certs_dir=str(self.workdir / "certs"),
                data_dir=str(cdir / "data"),
                https_port=https.getsockname()[1],
                admin_port=admin.getsockname()[1],
                peers=peers,
                xref_csv=str(xref),
                dicom_port=self.base_port + 10 * c.index + 2 if self.base_port else 0,
                dicomweb_port=self.base_port + 10 * c.index + 3 if self.base_port else 0,
                identities=identities[c.name],
                web=webs[c.name],
            )
            config += "\n" + self.arr.audit_destinations_toml(f"{c.name}-gateway")
            _write_atomic(cdir / "gateway.toml", config)
            operators = cdir / "operators"
            if not operators.exists():  # a restarted demo keeps the token it handed out
                write_operator_token_file(operators, DEMO_OPERATOR)
            admin_url = f"http://127.0.0.1:{admin.getsockname()[1]}"
            replica_admins: list[str] = []
            if self.replicas > 1:
                replica_admins = self._prepare_replicas(c, cdir, config, https, base_urls[c.name])
                admin_url = replica_admins[0]
            else:
                _register_samples(cdir / "gateway.toml", cdir / "data" / "images")
            base = base_urls[c.name]
            communities_json.append(
                {
                    "name": c.name,
                    "homeCommunityId": c.home_community_id,
                    "patientIdAssigningAuthority": c.assigning_authority,
                    "samplePatients": samples[c.name],
                    "endpoints": {
                        "iti38": f"{base}/xca/iti38",
                        "iti39": f"{base}/xca/iti39",
                        "rad75": f"{base}/xca/rad75",
                        "iti18": f"{base}/ig/iti18",
                        "iti43": f"{base}/ig/iti43",
                        "rad69": f"{base}/ig/rad69",
                    },
                    "admin": admin_url,
                    # The consent admin API: Authorization: Bearer <token from tokenFile>.
                    "consentAdmin": {
                        "url": f"{admin_url}/consent",
                        "operator": DEMO_OPERATOR,
                        "tokenFile": str(operators),
                    },
                    "identities": identities[c.name].to_json(),
                    # The web door (browsers, IUA tokens): the IID launch (RAD-106) and data.
                    "webUrl": webs[c.name].base_url,
                    "launchUrl": webs[c.name].base_url
                    + "/iid?requestType=PATIENT&patientID={patientID}",
                    "viewer": {"launch": webs[c.name].base_url + "/iid"},
                    **({"replicas": replica_admins} if replica_admins else {}),
                }
            )
        pj = pki.to_json()
        endpoints = {
            "ca": pj["ca"],
            "client": pj["client"],
            "untrusted_client": pj["untrusted_client"],
            "expired_client": pj["expired_client"],
            "communities": communities_json,
            "xua": {
                "issuer": XUA_ISSUER,
                "certificate": str(idp.cert),
                "key": str(idp.key),
                "attributes": {
                    "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse": XUA_PURPOSE_OF_USE,
                    "urn:oasis:names:tc:xacml:2.0:subject:role": XUA_ROLE,
                    "urn:oasis:names:tc:xspa:1.0:subject:organization": "Community <name>",
                    "urn:oasis:names:tc:xspa:1.0:subject:organization-id": "<homeCommunityId>",
                    "urn:ihe:iti:xca:2010:homeCommunityId": "<homeCommunityId>",
                    "urn:oasis:names:tc:xspa:1.0:subject:subject-id": "<user name>",
                },
            },
            "auditRepository": self.arr.endpoints_json(),
            "authorizationServer": {
                "issuer": issuer,
                "authorizationEndpoint": issuer + "/authorize",
                "tokenEndpoint": issuer + "/token",
                "jwksUri": issuer + "/jwks",
            },
            "clinicians": [c.to_json() for c in clinicians],
        }
        return endpoints, bound

    def _prepare_replicas(
        self,
        community: DemoCommunity,
        cdir: Path,
        config: str,
        public: socket.socket,
        public_url: str,
    ) -> list[str]:
        """The community's N replica configurations and its HAProxy configuration; returns
        the replicas' admin URLs. The public socket (bound already) goes to HAProxy."""
        assert self.postgres is not None
        database = self.postgres.database_url(community.name)
        backends: list[Backend] = []
        replicas: list[tuple[Path, socket.socket, socket.socket]] = []
        for i in range(1, self.replicas + 1):
            rdir = cdir / f"replica-{i}"
            rdir.mkdir(exist_ok=True)
            https, admin = _bind(0), _bind(0)
            https_port, admin_port = https.getsockname()[1], admin.getsockname()[1]
            # Front-door ports are per replica: any free port (each replica reports its own).
            text = re.sub(
                r"(?m)^(\[(?:dicom|dicomweb|web)\]\n(?:(?!\[).*\n)*?)port = \d+$",
                r"\1port = 0",
                config,
            )
            text = replica_config_toml(
                text,
                https_port=https_port,
                admin_port=admin_port,
                data_dir=rdir / "data",
                database_url=database,
                public_base_url=public_url,
                shared_images=cdir / "data" / "images",
                shared_repository=cdir / "data" / "repository",
            )
            # Beside the community's own file: its relative paths (operator tokens, XUA
            # material) resolve against the same directory.
            path = cdir / f"replica-{i}.toml"
            _write_atomic(path, text)
            replicas.append((path, https, admin))
            backends.append(Backend(f"replica-{i}", https_port, admin_port))
        # The registry and repository are the replicas' shared ones: register once.
        _register_samples(replicas[0][0], cdir / "data" / "images")
        self.replica_sockets[community.name] = replicas
        haproxy_cfg = cdir / "haproxy.cfg"
        _write_atomic(
            haproxy_cfg,
            haproxy_config(public.getsockname()[1], backends, public_fd=public.fileno()),
        )
        self.balancers.append(
            Haproxy(haproxy_cfg, public.getsockname()[1], pass_fds=(public.fileno(),))
        )
        return [f"http://127.0.0.1:{b.admin_port}" for b in backends]

    def _start_gateway(
        self,
        config: Path,
        https: socket.socket,
        admin: socket.socket,
        log_path: Path,
        *,
        web: socket.socket | None = None,
    ) -> None:
        env = dict(os.environ)
        fds = {"https": https, "admin": admin, **({"web": web} if web is not None else {})}
        env[LISTEN_FDS_ENV] = ",".join(f"{name}={sock.fileno()}" for name, sock in fds.items())
        log_file = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "xca_gateway", "serve", "--config", str(config)],
            env=env,
            pass_fds=tuple(sock.fileno() for sock in fds.values()),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log_file.close()
        self.processes.append(process)

    def start(self, bound: list[tuple[DemoCommunity, socket.socket, socket.socket]]) -> None:
        if self.arr is not None:
            log_file = (self.workdir / "arr" / "arr.log").open("ab")
            self.processes.append(
                subprocess.Popen(
                    self.arr.command(),
                    env={**os.environ, **self.arr.environment()},
                    pass_fds=self.arr.pass_fds(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            )
            log_file.close()
            self.arr.close_sockets()
        if self.auth_socket is not None:
            log_file = (self.auth_dir / "auth-server.log").open("ab")
            fd = self.auth_socket.fileno()
            self.processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "xca_gateway.tools.auth_server",
                        "--dir",
                        str(self.auth_dir),
                        "--certificate",
                        str(self.auth_pair.cert),
                        "--private-key",
                        str(self.auth_pair.key),
                        "--fd",
                        str(fd),
                    ],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            )
            log_file.close()
            self.auth_socket.close()
        for c, https, admin in bound:
            web = self.web_sockets[c.name]
            replicas = self.replica_sockets.get(c.name)
            if not replicas:
                cdir = self.workdir / c.name
                self._start_gateway(
                    cdir / "gateway.toml", https, admin, cdir / "gateway.log", web=web
                )
                continue
            # The web door's socket goes to the first replica (the others take any port).
            for index, (config, r_https, r_admin) in enumerate(replicas):
                self._start_gateway(
                    config,
                    r_https,
                    r_admin,
                    config.with_suffix(".log"),
                    web=web if index == 0 else None,
                )
                r_https.close()
                r_admin.close()
        self._public_sockets = [https for _, https, _ in bound]
        for c, https, admin in bound:
            admin.close()
            self.web_sockets[c.name].close()
            if not self.balancers:
                https.close()

    def start_balancers(self) -> None:
        """HAProxy in front of each community, once its replicas are ready: it takes servers
        as up when it starts, and the public sockets it inherits were listening (connections
        queued) all along."""
        for balancer in self.balancers:
            balancer.start()
            if balancer.process is not None:
                self.processes.append(balancer.process)
        for https in self._public_sockets:
            https.close()

    def wait_ready(self, endpoints: dict[str, Any]) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = [
            url for c in endpoints["communities"] for url in c.get("replicas") or [c["admin"]]
        ]
        if self.arr is not None:
            pending.append(self.arr.ui_url)
        if endpoints.get("authorizationServer"):
            pending.append(endpoints["authorizationServer"]["issuer"])
        while pending and time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    log.error("a gateway exited during start-up (code %s)", process.returncode)
                    return False
            pending = [url for url in pending if not _ready(url)]
            if pending:
                time.sleep(0.1)
        return not pending

    def add_dicom_ports(self, endpoints: dict[str, Any]) -> None:
        """The DICOM and DICOMweb front doors' ports of each community, as its gateway
        reports them."""
        for community in endpoints["communities"]:
            try:
                with urllib.request.urlopen(community["admin"] + "/readyz", timeout=5) as r:
                    ports = json.loads(r.read()).get("ports", {})
            except (OSError, ValueError):
                continue
            if "dicom" in ports:
                demo_community = DemoCommunity(0, community["name"])
                community["dicom"] = {
                    "aeTitle": demo_community.ae_title,
                    "host": "127.0.0.1",
                    "port": ports["dicom"],
                    # contract.md: DICOM TLS, and the AE title the local consumer calls with.
                    "tls": True,
                    "callingAeTitle": demo_community.calling_ae_title,
                }
            if "dicomweb" in ports:
                # contract.md: the QIDO-RS/WADO-RS service root, a URL string.
                community["dicomweb"] = f"https://127.0.0.1:{ports['dicomweb']}/dicomweb"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self.postgres is not None:
            self.postgres.stop()
        self.endpoints_file.unlink(missing_ok=True)


class WorkdirInUse(Exception):
    """Another demo holds the workdir (its databases, spools and endpoints.json)."""


def lock_workdir(workdir: Path) -> int:
    """An exclusive lock on ``workdir/.demo.lock`` (flock: released by the kernel when this
    process ends, however it ends); the file records the holder's pid. Returns the open file
    descriptor, which must stay open while the demo runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / ".demo.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirInUse(
            f"{workdir.resolve()} is in use by another demo (pid {holder}); stop it, or give "
            "another --workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def banner(endpoints: dict[str, Any], endpoints_file: Path) -> str:
    """What to open and what to try first, printed once the demo is ready."""
    lines = [
        f"xca-gateway demo: {len(endpoints['communities'])} communities ready; {endpoints_file}"
    ]
    lines.append("  operator pages (peers, breakers, audit, certificates):")
    lines += [f"    {c['name']:<8} {c['admin']}/" for c in endpoints["communities"]]
    arr = endpoints.get("auditRepository") or {}
    if arr.get("ui"):
        officer = arr.get("officer") or {}
        lines.append(f"  audit review UI (security officer): {arr['ui']}/login")
        lines.append(
            f"    officer login: {officer.get('username', '?')} / {officer.get('password', '?')}"
            ' (endpoints.json "auditRepository.officer")'
        )
        if officer.get("ca"):
            lines.append(
                f"    browser: trust the demo CA {officer['ca']}; to sign in by certificate "
                f"at {arr.get('uiCertificate', arr['ui'])}/login import {officer.get('pkcs12')} "
                "(password: auditRepository.officer.pkcs12Password)"
            )
    first = endpoints["communities"][0]
    patient = (first.get("samplePatients") or [{}])[0].get("id", "ID")
    clinicians = endpoints.get("clinicians") or []
    if clinicians and first.get("viewer"):
        query = urlencode({"requestType": "PATIENT", "patientID": patient})
        lines.append("  clinicians (IID launch and viewer in a browser; trust the demo CA):")
        lines.append(f"    {first['viewer']['launch']}?{query}")
        lines += [f"    {c['community']:<8} {c['username']} / {c['password']}" for c in clinicians]
    lines.append("  try:")
    lines.append(
        f"    xca-gateway query --endpoints {endpoints_file} --community {first['name']} "
        f"--patient {patient.split('^')[0]}"
    )
    lines.append("  Ctrl-C stops every process the demo started.")
    return "\n".join(lines)


def run_demo(workdir: Path, *, communities: int = 3, base_port: int = 0, replicas: int = 1) -> int:
    try:
        lock = lock_workdir(workdir)
    except WorkdirInUse as exc:
        print(f"xca-gateway demo: {exc}", file=sys.stderr)
        return 2
    try:
        return _run_demo(workdir, communities=communities, base_port=base_port, replicas=replicas)
    finally:
        os.close(lock)


def _run_demo(workdir: Path, *, communities: int, base_port: int, replicas: int = 1) -> int:
    demo = Demo(workdir, communities, base_port, replicas)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        try:
            endpoints, bound = demo.prepare()
        except (ReplicaSetupError, subprocess.CalledProcessError) as exc:
            print(f"xca-gateway demo: cannot start the replicas' services: {exc}", file=sys.stderr)
            return 1
        demo.start(bound)
        if not demo.wait_ready(endpoints):
            print(
                "xca-gateway demo: gateways did not become ready; see */gateway.log",
                file=sys.stderr,
            )
            return 1
        try:
            demo.start_balancers()
        except ReplicaSetupError as exc:
            print(f"xca-gateway demo: cannot start HAProxy: {exc}", file=sys.stderr)
            return 1
        demo.add_dicom_ports(endpoints)
        _write_atomic(demo.endpoints_file, json.dumps(endpoints, indent=2) + "\n")
        print(banner(endpoints, demo.endpoints_file))
        sys.stdout.flush()
        while not stop_requested:
            for process in demo.processes:
                if process.poll() is not None:
                    code = process.returncode
                    print(f"xca-gateway demo: a gateway exited (code {code})", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        demo.stop()
