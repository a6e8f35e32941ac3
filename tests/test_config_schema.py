"""Every problem of a configuration file is one line naming the file, the section (with the
index of an [[array]] entry) and the key, and the reason (issue 19)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from xca_gateway.app.config import load_config, parse_config
from xca_gateway.security.callers import Role
from xca_gateway.settings import ConfigError

REPO = Path(__file__).resolve().parents[1]
NORTH = REPO / "conf" / "north.toml"
ROLES = ", ".join(repr(role.value) for role in Role)


def _base() -> dict[str, Any]:
    return tomllib.loads(NORTH.read_text())


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, NORTH.parent)
    return str(info.value).splitlines()


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            lambda d: d["server"].update(port="8443"),
            "[server] port: expected an integer, got the string '8443'",
        ),
        (lambda d: d["server"].update(port=70000), "[server] port: must be 0..65535, got 70000"),
        (
            lambda d: d["server"].update(port=True),
            "[server] port: expected an integer, got true (a boolean)",
        ),
        (
            lambda d: d["server"].update(max_conections=3),
            "[server] max_conections: unknown key (did you mean max_connections?)",
        ),
        (
            lambda d: d["server"].update(hello_timeout=0),
            "[server] hello_timeout: must be positive, got 0",
        ),
        (lambda d: d.update(bogus={}), "unknown section [bogus]"),
        (lambda d: d.pop("tls"), "[tls]: the section is required"),
        (lambda d: d["tls"].pop("trust_store"), "[tls] trust_store: is required"),
        (
            lambda d: d["tls"].update(minimum_version="1.1"),
            "[tls] minimum_version: must be '1.2' or '1.3', got the string '1.1'",
        ),
        (
            lambda d: d["community"].update(home_community_id="1.2.3"),
            "[community] home_community_id: '1.2.3' is not urn:oid:<OID>",
        ),
        (lambda d: d["peers"][1].update(iti38=3), "[peers[1]] iti38: expected a string, got 3"),
        (
            lambda d: d["peers"][0].update(patient_id_sources=["xref", "mpi"]),
            "[peers[0]] patient_id_sources[1]: must be 'xref', 'pix' or 'xcpd', got the string "
            "'mpi'",
        ),
        (
            lambda d: d["imaging"]["sources"][0].update(
                kind="dimse", host="pacs", port=104, called_ae_title="PACS", mode="c-store"
            ),
            "[imaging.sources[0]] mode: must be 'c-get' or 'c-move', got the string 'c-store'",
        ),
        (
            lambda d: d["imaging"]["sources"][0].update(kind="pacs"),
            "[imaging.sources[0]] kind: must be one of 'filesystem', 'dimse', 'dicomweb', "
            "'rad69', got the string 'pacs'",
        ),
        (
            lambda d: d["imaging"]["sources"][0].update(port=4242),
            "[imaging.sources[0]] port: unknown key",
        ),
        (
            lambda d: d["dicom"].update(ae_title="A" * 17),
            "[dicom] ae_title: 'AAAAAAAAAAAAAAAAA' is not a DICOM AE title (1-16 characters)",
        ),
        (
            lambda d: d.update(policy={"callers": [{"name": "ris", "roles": "ris"}]}),
            f"[policy.callers[0]] roles: must be one of {ROLES}, got 'ris'",
        ),
        (
            lambda d: d.update(xua={"outbound": {"identity": {"name_id": "x", "roles": [3]}}}),
            "[xua.outbound.identity] roles[0]: expected a string or a table, got 3",
        ),
        (
            lambda d: d.update(consent={"peer_modes": {"urn:oid:1.2": "maybe"}}),
            "[consent.peer_modes] urn:oid:1.2: must be 'opt-in' or 'opt-out', got the string "
            "'maybe'",
        ),
    ],
)
def test_one_line_names_section_and_key(change: Any, line: str) -> None:
    data = _base()
    data.setdefault("dicom", {})
    change(data)
    assert _problems(data) == [line]


def test_every_problem_is_reported_each_on_its_line(tmp_path: Path) -> None:
    text = (
        NORTH.read_text()
        .replace("port = 8443", 'port = "8443"')
        .replace("port = 9090", "port = 99999")
    )
    path = tmp_path / "north.toml"
    path.write_text(text + '\n[audit]\nalert_window = -1\n[[audit.destinations]]\nhost = ""\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}: [server] port: expected an integer, got the string '8443'",
        f"{path}: [admin] port: must be 0..65535, got 99999",
        f"{path}: [audit.destinations[0]] host: must not be empty",
        f"{path}: [audit] alert_window: must be at least 0, got -1",
    ]


def test_lone_strings_are_lists_of_one() -> None:
    data = _base()
    data["policy"] = {
        "callers": [{"name": "ris", "roles": "interface-engine", "addresses": "127.0.0.1"}]
    }
    config = parse_config(data, NORTH.parent)
    assert config.policy is not None
    assert config.policy.policy.callers[0].addresses == frozenset({"127.0.0.1"})


def test_config_check_command(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "xca_gateway", "config", "check", str(NORTH)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0
    assert good.stdout.strip() == f"{NORTH}: ok"
    bad = tmp_path / "bad.toml"
    bad.write_text(NORTH.read_text().replace("port = 8443", "port = 8443.0"))
    result = subprocess.run(
        [sys.executable, "-m", "xca_gateway", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"xca-gateway: configuration error: {bad}: [server] port: expected an integer, got 8443.0"
    )
