"""The benchmarks' gateways and audit record repository run under the deny-by-default caller
model.

Each benchmark that starts a gateway (or the ARR) generates its configuration from a function
this test calls: the configuration must parse, and its ``[policy]`` (``[arr.access]``) must
admit the benchmark's own callers (the real dev PKI certificates the benchmark connects with)
at the doors they call, while the consumer never gets the peer-gateway role. A gateway without
a policy refuses every request with 403, which once broke every benchmark silently.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from xca_gateway.app.config import GatewayConfig, parse_config
from xca_gateway.arr.app import parse_arr_config
from xca_gateway.protocol.http_server import PeerCertificate, PeerInfo
from xca_gateway.protocol.tls import certificate_info
from xca_gateway.security.callers import CallerDirectory, Door, decide
from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.security.guard import identity_from_peer
from xca_gateway.security.policy import AccessPolicy, PeerIdentity, PolicyStore, parse_access_policy

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# The benchmarks whose gateways / repository are checked below (every one that starts one).
COVERED = {
    "fanout",
    "audit_latency",
    "mtom_roundtrip",
    "imaging_bench",
    "arr_bench",
    "isolation",
    "viewer_bench",
    "replicas_bench",
}


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """The benchmark scripts as modules (they import bench_policy from their own directory)."""
    modules: dict[str, ModuleType] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        for name in sorted(COVERED):
            spec = importlib.util.spec_from_file_location(
                f"benchmark_{name}", BENCHMARKS / f"{name}.py"
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            # Dataclasses look their module up while the class is created.
            patch.setitem(sys.modules, spec.name, module)
            spec.loader.exec_module(module)
            modules[name] = module
        yield modules


@pytest.fixture(scope="module")
def bench_pki(bench: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """One dev PKI holding every community certificate the benchmarks use, in ``<work>/certs``
    as the benchmarks lay it out."""
    communities = [
        *bench["fanout"].COMMUNITIES,
        *bench["audit_latency"].COMMUNITIES,
        *bench["mtom_roundtrip"].COMMUNITIES,
        *bench["imaging_bench"].HOMES,
        *bench["arr_bench"].COMMUNITIES,
        *bench["isolation"].COMMUNITIES,
        *bench["viewer_bench"].COMMUNITIES,
        *bench["replicas_bench"].COMMUNITIES,
    ]
    return init_dev_pki(tmp_path_factory.mktemp("bench") / "certs", communities)


def _peer(cert: Path) -> PeerInfo:
    """What a listener learns from a TLS client presenting ``cert``."""
    info = certificate_info(cert.read_bytes())
    return PeerInfo(
        "127.0.0.1",
        50000,
        PeerCertificate(
            subject=info.subject,
            issuer=info.issuer,
            serial_number=info.serial_number,
            fingerprint_sha256=info.fingerprint_sha256,
            san_dns=info.san_dns,
            san_ip=info.san_ip,
            san_uri=info.san_uri,
        ),
    )


def _policy(config: GatewayConfig) -> AccessPolicy:
    # The gateway's own certificate is the one the benchmark issued.
    assert config.tls.certificate.exists() and config.tls.trust_store.exists()
    assert config.policy is not None, "a benchmark gateway without [policy] refuses everyone"
    return PolicyStore.from_config(config.policy, config.path).policy


def _admitted(directory: CallerDirectory, cert: Path, door: Door) -> bool:
    return decide(directory, identity_from_peer(_peer(cert)), door).allowed


def _from_toml(text: str, base: Path) -> GatewayConfig:
    return parse_config(tomllib.loads(text), base)


# A benchmark's gateway process of its own counts as the benchmark (its configuration is there).
PROCESS_OF = {"imaging_gateway": "imaging_bench"}


def test_every_benchmark_that_starts_a_gateway_is_covered() -> None:
    starts_gateway = {
        PROCESS_OF.get(path.stem, path.stem)
        for path in BENCHMARKS.glob("*.py")
        # `python -m xca_gateway[.arr] serve ...` or a Gateway built in-process.
        if re.search(r'"xca_gateway(\.arr)?",|\bGateway\(', path.read_text(encoding="utf-8"))
    }
    assert starts_gateway == COVERED


def test_fanout(bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path) -> None:
    fanout = bench["fanout"]
    peers = [{"home": "urn:oid:1.3.6.1.4.1.21367.13.70.100", "url": "https://127.0.0.1:1/xca"}]
    config = _from_toml(fanout.gateway_config_toml(bench_pki, tmp_path, 1, 2, peers, 5.0), tmp_path)
    gateway = _policy(config).caller_directory()
    client = bench_pki.client.cert
    assert _admitted(gateway, client, Door.INITIATING)
    assert not _admitted(gateway, client, Door.XCA)
    # The farm plays the peers: it admits the initiating gateway (whose certificate the direct
    # calls use too) as a peer gateway, and not the consumer.
    farm = parse_access_policy(fanout.farm_policy()).caller_directory()
    assert _admitted(farm, bench_pki.communities["ig"].cert, Door.XCA)
    assert not _admitted(farm, client, Door.XCA)


@pytest.mark.parametrize("audit_port", [None, 6514])
def test_audit_latency(
    bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path, audit_port: int | None
) -> None:
    module = bench["audit_latency"]
    text = module.gateway_config_toml(bench_pki.dir.parent, "gateway", 1, 2, audit_port)
    config = _from_toml(text, tmp_path)
    policy = _policy(config)
    south = bench_pki.communities[module.REQUESTER.name].cert
    # The benchmark calls /xca/iti38 as a peer gateway (south), not as the consumer.
    assert _admitted(policy.caller_directory(), south, Door.XCA)
    assert policy.decide(PeerIdentity.from_peer(_peer(south)), "ITI-38", None).allowed
    for door in (Door.XCA, Door.INITIATING):
        assert not _admitted(policy.caller_directory(), bench_pki.client.cert, door)


def test_replicas_bench(bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path) -> None:
    module = bench["replicas_bench"]
    text = module.gateway_config_toml(
        bench_pki.dir.parent, "r1", 1, 2, "postgresql://u@127.0.0.1:5432/x", 3
    )
    config = _from_toml(text, tmp_path)
    # A replica: PROXY v2 from the balancer only, the shared database, the balancer's URL.
    assert config.server.proxy_protocol and config.server.proxy_sources == ("127.0.0.1/32",)
    assert config.shared.database == "postgresql://u@127.0.0.1:5432/x"
    assert config.server.public_base_url == "https://127.0.0.1:3"
    policy = _policy(config)
    south = bench_pki.communities[module.REQUESTER.name].cert
    assert _admitted(policy.caller_directory(), south, Door.XCA)
    assert policy.decide(PeerIdentity.from_peer(_peer(south)), "ITI-38", None).allowed
    assert not _admitted(policy.caller_directory(), bench_pki.client.cert, Door.XCA)


def test_mtom_roundtrip(bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path) -> None:
    module = bench["mtom_roundtrip"]
    text = module.gateway_config_toml(bench_pki.dir.parent, 1, 2, 10**6)
    config = _from_toml(text, tmp_path)
    assert config.diagnostics.echo
    directory = _policy(config).caller_directory()
    assert _admitted(directory, bench_pki.client.cert, Door.DIAGNOSTICS)
    assert not _admitted(directory, bench_pki.client.cert, Door.XCA)


def test_imaging_bench(bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path) -> None:
    module = bench["imaging_bench"]
    policies: dict[str, AccessPolicy] = {}
    for name in module.HOMES:
        spec: dict[str, Any] = module.gateway_config(bench_pki, name, 1, tmp_path / name)
        policies[name] = _policy(parse_config(spec, tmp_path))
    client, gateways = bench_pki.client.cert, bench_pki.communities
    # consumer → alpha /ig/rad69 and → gamma /ig/rad69 (direct from the source)
    assert _admitted(policies["alpha"].caller_directory(), client, Door.INITIATING)
    assert _admitted(policies["gamma"].caller_directory(), client, Door.INITIATING)
    # alpha → beta /xca/rad75, as the peer gateway of alpha's community
    beta = policies["beta"]
    assert _admitted(beta.caller_directory(), gateways["alpha"].cert, Door.XCA)
    assert beta.decide(
        PeerIdentity.from_peer(_peer(gateways["alpha"].cert)), "RAD-75", None
    ).allowed
    # beta → gamma /ig/rad69, the responding gateway retrieving from its imaging source
    assert _admitted(policies["gamma"].caller_directory(), gateways["beta"].cert, Door.INITIATING)
    for policy in policies.values():
        assert not _admitted(policy.caller_directory(), client, Door.XCA)


def test_arr_bench(bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path) -> None:
    module = bench["arr_bench"]
    text = module.repository_config_toml(tmp_path, bench_pki)
    config = parse_arr_config(tomllib.loads(text)["arr"], tmp_path)
    assert config.tls.certificate.exists()
    directory = config.access.directory()
    source, client = bench_pki.communities[module.SOURCE].cert, bench_pki.client.cert
    # alpha sends (ITI-20) as the records' AuditSourceID; the consumer searches (ITI-81).
    assert _admitted(directory, source, Door.SYSLOG)
    assert config.access.bound_source_ids(identity_from_peer(_peer(source))) == {
        module.AUDIT_SOURCE_ID
    }
    assert _admitted(directory, client, Door.ITI81)
    assert not _admitted(directory, client, Door.SYSLOG)
    assert not _admitted(directory, source, Door.ITI81)


def test_isolation(bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path) -> None:
    module = bench["isolation"]
    text = module.gateway_config_toml(bench_pki.dir, tmp_path / "data", 1, 2, 3)
    policy = _policy(_from_toml(text, tmp_path))
    directory = policy.caller_directory()
    beta, client = bench_pki.communities["beta"].cert, bench_pki.client.cert
    # The legitimate client is beta's gateway on /xca/iti38; the attackers use the consumer's
    # certificate on /ig/* (a trusted caller), never the peer-gateway role.
    assert _admitted(directory, beta, Door.XCA)
    assert policy.decide(PeerIdentity.from_peer(_peer(beta)), "ITI-38", None).allowed
    assert _admitted(directory, client, Door.INITIATING)
    assert not _admitted(directory, client, Door.XCA)


def test_viewer_bench(bench: dict[str, ModuleType], bench_pki: DevPki, tmp_path: Path) -> None:
    module = bench["viewer_bench"]
    ports = {"alpha": 1, "beta": 2, "dicomweb": 3}
    alpha = _from_toml(module.gateway_config_toml(bench_pki, "alpha", tmp_path, ports), tmp_path)
    beta = _from_toml(module.gateway_config_toml(bench_pki, "beta", tmp_path, ports), tmp_path)
    assert alpha.dicomweb is not None and beta.imaging.sources[0].kind == "dicomweb"
    client, gateways = bench_pki.client.cert, bench_pki.communities
    # the viewer (consumer) -> alpha's DICOMweb door; alpha -> beta /xca/* as its peer gateway
    assert _admitted(_policy(alpha).caller_directory(), client, Door.DICOMWEB)
    assert _admitted(_policy(beta).caller_directory(), gateways["alpha"].cert, Door.XCA)
    assert not _admitted(_policy(beta).caller_directory(), client, Door.XCA)


def test_viewer_bench_renders_from_a_real_orthanc() -> None:
    """The benchmark end to end on a small RLE Lossless study: Orthanc (DICOMweb) behind beta,
    alpha's DICOMweb door renders each image (decoding RLE); both paths answer every image."""
    import os
    import subprocess

    if not (
        os.path.exists("/usr/sbin/Orthanc")
        and os.path.exists("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    ):
        pytest.skip("orthanc-dicomweb is not installed (CI installs it)")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "viewer_bench.py"),
            "--instances",
            "6",
            "--rounds",
            "1",
            "--rle",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "ratio gateway/direct: first image" in done.stdout


def test_xml_per_instance_measures_each_step_over_every_instance() -> None:
    """``benchmarks/xml_per_instance.py`` run small: each of the four XML steps of a relayed
    retrieve handles every instance (the benchmark asserts the counts) and gets a figure."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_xml_per_instance", BENCHMARKS / "xml_per_instance.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    costs = module.measure(40, 1)
    assert set(costs) == {"request", "forward", "root", "response"}
    assert all(us > 0 for us in costs.values())


def test_write_path_streams_every_instance_to_a_real_tls_client() -> None:
    """``benchmarks/write_path.py`` run small: the gateway's server streams the MTOM body to a
    client process over TLS, which checks the terminating chunk; a CPU figure is printed."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "write_path.py"), "--total", "4M", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"write path: 64 x 64K: server CPU s/GB median \d+\.\d+", out.stdout)
