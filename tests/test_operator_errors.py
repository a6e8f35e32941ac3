"""Operator mistakes get one line naming the file (or key, or port) and the reason: no
``[Errno 2]`` without a name, no raw OpenSSL codes, no empty "failed: ", no traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import policy_toml
from xca_gateway.security.dev_pki import DevPki


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xca_gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error, which must be the only line on stderr."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def gateway_toml(
    tmp: Path, pki: DevPki, *, cert: Path, key: Path, port: int = 0, admin_port: int = 0
) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[community]
name = "alpha"
home_community_id = "urn:oid:1.3.6.1.4.1.21367.13.70.1"
patient_id_assigning_authority = "1.3.6.1.4.1.21367.13.20.1000"

[server]
host = "127.0.0.1"
port = {port}

[admin]
host = "127.0.0.1"
port = {admin_port}

[tls]
certificate = "{cert}"
private_key = "{key}"
trust_store = "{pki.ca}"

[storage]
data_dir = "{tmp / "data"}"

{policy_toml()}
"""
    )
    return path


# ----------------------------------------------------------------------------- serve


def test_serve_names_a_missing_certificate_file(pki: DevPki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "alpha.pem"
    config = gateway_toml(tmp_path, pki, cert=missing, key=pki.communities["alpha"].key)
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert one_line(result) == (
        f"xca-gateway: {config}: [tls] certificate {missing}: file not found"
    )


def test_serve_names_a_certificate_that_is_a_directory(pki: DevPki, tmp_path: Path) -> None:
    # (Tests run as root, for whom file permissions do not refuse a read; a directory where a
    # file should be is the unreadable file every user can reproduce.)
    config = gateway_toml(tmp_path, pki, cert=tmp_path, key=pki.communities["alpha"].key)
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert one_line(result).endswith(f"[tls] certificate {tmp_path}: is a directory, not a file")


def test_serve_says_certificate_and_key_do_not_match(pki: DevPki, tmp_path: Path) -> None:
    cert, key = pki.communities["alpha"].cert, pki.communities["beta"].key
    config = gateway_toml(tmp_path, pki, cert=cert, key=key)
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    line = one_line(result)
    assert line == (
        f"xca-gateway: {config}: [tls] certificate {cert} and private key {key} do not match "
        "(the key is not the certificate's)"
    )
    assert "KEY_VALUES_MISMATCH" not in line


def test_serve_says_the_certificate_has_expired(pki: DevPki, tmp_path: Path) -> None:
    expired = pki.expired_client
    config = gateway_toml(tmp_path, pki, cert=expired.cert, key=expired.key)
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    line = one_line(result)
    assert f"[tls] certificate {expired.cert} expired on " in line
    assert line.endswith(" UTC")


def test_serve_says_which_port_is_in_use(pki: DevPki, tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        pair = pki.communities["alpha"]
        config = gateway_toml(tmp_path, pki, cert=pair.cert, key=pair.key, admin_port=port)
        result = run_cli("serve", "--config", str(config))
    finally:
        busy.close()
    assert result.returncode == 2
    assert one_line(result) == (
        f"xca-gateway: {config}: [admin] port = {port}: 127.0.0.1:{port} already in use "
        "(another process listens there)"
    )


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ('port = "8443"', "expected an integer, got the string '8443'"),
        ("port = 70000", "must be 0..65535, got 70000"),
        ("port = true", "expected an integer, got true (a boolean)"),
    ],
)
def test_serve_refuses_a_port_of_the_wrong_type(
    pki: DevPki, tmp_path: Path, written: str, reason: str
) -> None:
    pair = pki.communities["alpha"]
    config = gateway_toml(tmp_path, pki, cert=pair.cert, key=pair.key)
    config.write_text(config.read_text().replace("port = 0", written, 1))
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert one_line(result) == (
        f"xca-gateway: configuration error: {config}: [server] port: {reason}"
    )


def test_log_level_is_checked() -> None:
    result = run_cli("--log-level", "bogus", "serve", "--config", "x.toml")
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr


# ----------------------------------------------------------------------------- consumer tools


@pytest.fixture
def endpoints(pki: DevPki, tmp_path: Path) -> Iterator[Path]:
    """An endpoints.json whose gateway is not running (a port nothing listens on)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    base = f"https://127.0.0.1:{port}"
    path = tmp_path / "endpoints.json"
    path.write_text(
        json.dumps(
            {
                "ca": str(pki.ca),
                "client": pki.client.to_json(),
                "communities": [
                    {
                        "name": name,
                        "homeCommunityId": f"urn:oid:1.3.6.1.4.1.21367.13.70.{i}",
                        "patientIdAssigningAuthority": f"1.3.6.1.4.1.21367.13.20.{i}000",
                        "endpoints": {
                            key: f"{base}{p}"
                            for key, p in (
                                ("iti18", "/ig/iti18"),
                                ("iti43", "/ig/iti43"),
                                ("rad69", "/ig/rad69"),
                                ("iti38", "/xca/iti38"),
                            )
                        },
                    }
                    for i, name in ((1, "north"), (2, "south"))
                ],
            }
        )
    )
    yield path


def test_retrieve_study_names_an_unknown_community(endpoints: Path, tmp_path: Path) -> None:
    result = run_cli(
        "retrieve-study",
        "--endpoints",
        str(endpoints),
        "--community",
        "nosuch",
        "--patient",
        "C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2
    assert one_line(result) == (
        f"xca-gateway: retrieve-study: {endpoints}: no community 'nosuch' (it lists: north, south)"
    )


@pytest.mark.parametrize("command", ["query", "retrieve-study", "import-priors"])
def test_consumer_commands_name_a_missing_endpoints_file(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "endpoints.json"
    extra = {
        "query": [],
        "retrieve-study": ["--out", str(tmp_path)],
        "import-priors": ["--pacs", "127.0.0.1:4242", "--pacs-ae", "PACS"],
    }[command]
    result = run_cli(
        command,
        "--endpoints",
        str(missing),
        "--patient",
        "C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
        *extra,
    )
    assert result.returncode == 2
    line = one_line(result)
    assert f"{missing}: file not found (is the demo running?" in line


def test_query_names_an_expired_client_certificate(
    endpoints: Path, pki: DevPki, tmp_path: Path
) -> None:
    data = json.loads(endpoints.read_text())
    data["client"] = pki.expired_client.to_json()
    endpoints.write_text(json.dumps(data))
    result = run_cli("query", "--endpoints", str(endpoints), "--patient", "C01-1001")
    assert result.returncode == 2
    assert f"client certificate {pki.expired_client.cert} expired on " in one_line(result)


def test_query_names_a_missing_key(endpoints: Path, pki: DevPki, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    data = json.loads(endpoints.read_text())
    data["client"] = {"cert": str(pki.client.cert), "key": str(key)}
    endpoints.write_text(json.dumps(data))
    result = run_cli("query", "--endpoints", str(endpoints), "--patient", "C01-1001")
    assert result.returncode == 2
    assert one_line(result) == f"xca-gateway query: private key {key}: file not found"


def test_unreachable_gateway_is_said_before_anything_is_written(
    endpoints: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "retrieve-study",
        "--endpoints",
        str(endpoints),
        "--community",
        "north",
        "--patient",
        "C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
        "--out",
        str(out),
    )
    assert result.returncode == 1
    line = one_line(result)
    assert "connection refused: nothing listens on 127.0.0.1:" in line
    assert "/ig/rad69" in line
    assert not out.exists()
    query = run_cli("query", "--endpoints", str(endpoints), "--patient", "C01-1001")
    assert query.returncode == 1
    assert "connection refused" in one_line(query)


def test_identity_the_file_does_not_have(endpoints: Path) -> None:
    result = run_cli(
        "query", "--endpoints", str(endpoints), "--identity", "localConsumer", "--patient", "X"
    )
    assert result.returncode == 2
    assert "has no identities (--identity localConsumer)" in one_line(result)


def test_endpoints_file_that_is_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "endpoints.json"
    bad.write_text("{not json")
    result = run_cli("query", "--endpoints", str(bad), "--patient", "X")
    assert result.returncode == 2
    assert f"{bad}: not JSON" in one_line(result)
