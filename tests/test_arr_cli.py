"""The repository's commands as an operator runs them: ``arr add-officer`` and ``arr serve``
(through ``python -m xca_gateway.arr``, the same parser ``xca-gateway arr`` uses)."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from xca_gateway.arr.access import parse_access
from xca_gateway.arr.app import arr_config_toml, load_arr_config, prepare_demo
from xca_gateway.arr.store import SqliteAuditStore
from xca_gateway.audit import parse_audit_config
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.callers import Identity, Role
from xca_gateway.security.dev_pki import DevPki, init_dev_pki
from xca_gateway.settings import ConfigError, TlsConfig


@pytest.fixture(scope="module")
def cli_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("arr-cli-pki"), ["arr"])


def write_config(pki: DevPki, tmp_path: Path, *, udp: bool = False) -> Path:
    path = tmp_path / "arr.toml"
    udp_sender = {
        "name": "legacy UDP sender",
        "roles": ["audit-source"],
        "addresses": ["127.0.0.1"],
        "audit_source_ids": ["cli"],
    }
    path.write_text(
        arr_config_toml(
            certificate=str(pki.communities["arr"].cert),
            private_key=str(pki.communities["arr"].key),
            trust_store=str(pki.ca),
            database="data/arr.sqlite3",  # relative to the file
            communities={"urn:oid:1.2.3": "north"},
            callers=[
                {
                    "name": "auditor",
                    "roles": ["audit-consumer"],
                    "certificate_uris": ["urn:xca-gateway:client:consumer"],
                },
                *([udp_sender] if udp else []),
            ],
            syslog_udp_port=0 if udp else None,
        ),
        encoding="utf-8",
    )
    return path


def arr_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xca_gateway.arr", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_and_configuration_errors(tmp_path: Path) -> None:
    result = arr_cli("--help")
    assert result.returncode == 0 and "serve" in result.stdout and "add-officer" in result.stdout
    for action in ("serve", "add-officer"):
        assert "--config" in arr_cli(action, "--help").stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[arr]\nsurprise = 1\n")
    result = arr_cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "Traceback" not in result.stderr
    missing = arr_cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_add_officer(cli_pki: DevPki, tmp_path: Path) -> None:
    config_path = write_config(cli_pki, tmp_path)
    ok = arr_cli(
        "add-officer",
        "--config",
        str(config_path),
        "--username",
        "ines",
        "--password-stdin",
        stdin="a long enough password\n",
    )
    assert ok.returncode == 0, ok.stderr
    short = arr_cli(
        "add-officer",
        "--config",
        str(config_path),
        "--username",
        "x",
        "--password-stdin",
        stdin="short\n",
    )
    assert short.returncode == 2 and "at least" in short.stderr
    cert = arr_cli(
        "add-officer",
        "--config",
        str(config_path),
        "--username",
        "carla",
        "--certificate",
        str(cli_pki.client.cert),
    )
    assert cert.returncode == 0, cert.stderr
    config = load_arr_config(config_path)
    assert config.database == tmp_path / "data" / "arr.sqlite3"
    store = SqliteAuditStore(config.database)
    try:
        ines = store.officer("ines")
        assert ines is not None and ines.password_hash and ines.password_hash.startswith("scrypt$")
        assert "a long enough password" not in ines.password_hash
        carla = store.officer("carla")
        assert carla is not None and carla.password_hash is None
        assert carla.certificate_fingerprint and len(carla.certificate_fingerprint) == 64
    finally:
        store.close()


def test_serve_runs_until_sigterm(cli_pki: DevPki, tmp_path: Path) -> None:
    config_path = write_config(cli_pki, tmp_path, udp=True)
    assert (
        arr_cli(
            "add-officer",
            "--config",
            str(config_path),
            "--username",
            "ines",
            "--password-stdin",
            stdin="a long enough password\n",
        ).returncode
        == 0
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway.arr", "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        endpoints = json.loads(line)
        assert set(endpoints) == {"fhir", "ui", "syslogTls", "syslogUdp"}
        host, port = endpoints["syslogUdp"].rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            # Not a listed address: refused (and audited once, not stored).
            stranger.bind(("127.0.0.3", 0))
            for _ in range(3):
                stranger.sendto(b"<85>1 - forged - - - not xml either", (host, int(port)))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"<85>1 - cli test - - - not xml at all", (host, int(port)))
        anonymous = ssl.create_default_context(cafile=str(cli_pki.ca))
        with httpx.Client(verify=anonymous, timeout=10) as client:
            deadline = time.monotonic() + 20
            health = client.get(endpoints["ui"] + "/healthz").json()
            while health["counters"].get("stored", 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
                health = client.get(endpoints["ui"] + "/healthz").json()
            # The listed sender's garbage (flagged) and one Security Alert for the stranger.
            assert health["counters"]["stored_flagged"] == 1
            assert health["counters"]["refused{sender}"] == 3
            assert health["counters"]["refused_callers{syslog}"] == 1
            page = client.get(endpoints["ui"] + "/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token is not None
            signed_in = client.post(
                endpoints["ui"] + "/login",
                data={
                    "csrf": token.group(1),
                    "username": "ines",
                    "password": "a long enough password",
                },
            )
            assert signed_in.status_code == 303
        ctx = client_context(cli_pki.ca, cli_pki.client.cert, cli_pki.client.key)
        with httpx.Client(verify=ctx, timeout=10) as client:
            bundle = client.get(endpoints["fhir"] + "/AuditEvent", params={"date": "ge2000"}).json()
            assert any(e["resource"]["type"]["code"] == "unparsed" for e in bundle["entry"])
            assert not any(b"forged" in str(e).encode() for e in bundle["entry"])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_demo_support_runs_a_repository_the_gateways_audit_to(tmp_path: Path) -> None:
    """What ``xca-gateway demo`` does with :func:`prepare_demo`: sockets bound by the launcher
    and inherited, the officer created, the gateways' [audit] section pointing at it."""
    import asyncio
    import os
    import tomllib

    pki = init_dev_pki(tmp_path / "certs", ["north", "arr"])
    plan = prepare_demo(
        tmp_path / "arr",
        certificate=pki.communities["arr"].cert,
        private_key=pki.communities["arr"].key,
        trust_store=pki.ca,
        communities={"urn:oid:1.3.6.1.4.1.21367.13.70.1": "north"},
        pki=pki,
    )
    process = subprocess.Popen(
        plan.command(),
        env={**os.environ, **plan.environment()},
        pass_fds=plan.pass_fds(),
        stdout=subprocess.PIPE,
    )
    plan.close_sockets()
    try:
        assert process.stdout is not None
        assert json.loads(process.stdout.readline())["ui"] == plan.ui_url
        entry = plan.endpoints_json()
        # The secured configuration: no UDP syslog; officers' browsers on their own listener
        # (certificate sign-in on the mutual-TLS one), metrics beside.
        assert set(entry) == {
            "syslogTls",
            "fhir",
            "ui",
            "uiCertificate",
            "metrics",
            "officer",
            "auditConsumer",
        }
        assert entry["ui"] != entry["uiCertificate"]
        assert entry["fhir"] == entry["uiCertificate"] + "/fhir"
        assert {"ca", "pkcs12", "pkcs12Password"} <= set(entry["officer"])
        auditor = entry["auditConsumer"]
        assert auditor["cert"] == str(pki.dir / "audit-consumer.pem")
        north = pki.communities["north"]
        tls = TlsConfig(certificate=north.cert, private_key=north.key, trust_store=pki.ca)
        table = tomllib.loads(plan.audit_destinations_toml("north-gateway"))["audit"]
        config = parse_audit_config(table, tmp_path, tmp_path / "north", tls)

        async def audit() -> None:
            trail = AuditTrail(config)
            await trail.start()
            await trail.flush()
            await trail.wait_delivered(20)
            await trail.stop()

        asyncio.run(audit())
        # The demo client is a local consumer, not an audit consumer.
        ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
        with httpx.Client(verify=ctx, timeout=10) as client:
            refused = client.get(entry["fhir"] + "/AuditEvent", params={"date": "ge2020"})
            assert refused.status_code == 403, refused.text
        ctx = client_context(pki.ca, Path(auditor["cert"]), Path(auditor["key"]))
        with httpx.Client(verify=ctx, timeout=10) as client:
            deadline = time.monotonic() + 20
            total = 0
            while total < 2 and time.monotonic() < deadline:
                bundle = client.get(
                    entry["fhir"] + "/AuditEvent",
                    params={"date": "ge2020", "source": "north-gateway"},
                ).json()
                total = bundle.get("total", 0)
                time.sleep(0.1)
        assert total == 2  # Application Start and Stop
        anonymous = ssl.create_default_context(cafile=str(pki.ca))
        with httpx.Client(verify=anonymous, timeout=10) as client:
            page = client.get(entry["ui"] + "/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token is not None
            response = client.post(
                entry["ui"] + "/login",
                data={"csrf": token.group(1), **entry["officer"]},
            )
            assert response.status_code == 303 and response.headers["location"] == "/events"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_access_configuration_uses_the_caller_entry_keys(tmp_path: Path) -> None:
    """[[arr.access.callers]] takes the keys of [[policy.callers]] (one parser) plus
    audit_source_ids; mistakes are configuration errors, not a repository open to all."""

    access = parse_access(
        {
            "callers": [
                {
                    "name": "north",
                    "roles": ["audit-source"],
                    "certificate_dns_names": ["north.example"],
                    "audit_source_ids": ["north-gateway"],
                },
                {
                    "name": "relay",
                    "roles": ["audit-source"],
                    "certificate_subjects": ["CN=relay"],
                    "audit_source_ids": ["*"],
                },
                {"name": "legacy", "roles": ["audit-source"], "addresses": ["127.0.0.5"]},
                {
                    "name": "siem",
                    "roles": ["audit-consumer"],
                    "certificate_fingerprints": ["AB:cd"],
                },
            ]
        }
    )
    north = Identity("127.0.0.1", "CN=north", "00", san_dns=("north.example",))
    assert access.bound_source_ids(north) == frozenset({"north-gateway"})
    assert access.bound_source_ids(Identity("127.0.0.1", "CN=relay", "01")) is None
    assert access.bound_source_ids(Identity("127.0.0.5")) == frozenset()
    assert access.udp_senders == frozenset({"127.0.0.5"})
    siem = access.directory().identify(Identity("127.0.0.1", "CN=x", "abcd"))
    assert siem is not None and siem.roles == {Role.AUDIT_CONSUMER}
    for bad in (
        {
            "callers": [
                {
                    "name": "x",
                    "roles": ["audit-consumer"],
                    "addresses": ["127.0.0.1"],
                    "audit_source_ids": ["x"],
                }
            ]
        },
        {"callers": [{"name": "x", "roles": ["auditor"], "addresses": ["127.0.0.1"]}]},
        {"callers": [{"name": "x", "roles": ["audit-source"]}]},
        {
            "callers": [
                {"name": "x", "roles": ["audit-source"], "addresses": "127.0.0.1", "surprise": 1}
            ]
        },
        {"default": "allow"},
    ):
        with pytest.raises(ConfigError):
            parse_access(bad)
    path = tmp_path / "arr.toml"
    path.write_text(
        arr_config_toml(
            certificate="a.pem",
            private_key="a.key",
            trust_store="ca.pem",
            database="x.sqlite3",
            callers=[
                {"name": "siem", "roles": ["audit-consumer"], "certificate_subjects": ["CN=s"]}
            ],
        )
    )
    assert load_arr_config(path).access.directory().rules[0].name == "siem"
