"""Communities seeded as the demo seeds them, for tests that run real gateways over them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import policy_toml
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.dicom_samples import SampleStudy, generate_community_samples
from xca_gateway.tools.import_manifests import import_with_config, registry_from_config

ARC = "1.3.6.1.4.1.21367.13"


def seed_community(
    tmp: Path, pki: DevPki, name: str, index: int, extra: str = ""
) -> tuple[Path, list[SampleStudy]]:
    """A community as the demo builds it: sample studies imported into registry/repository."""

    pair = pki.communities[name]
    data = tmp / name
    studies = generate_community_samples(
        data / "images",
        community_index=index,
        community_name=name,
        issuer_oid=f"{ARC}.20.{1000 * (index + 1)}",
        uid_root=f"{ARC}.90.{index + 1}",
    )
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[community]
name = "{name}"
home_community_id = "urn:oid:{ARC}.70.{index + 1}"
patient_id_assigning_authority = "{ARC}.20.{1000 * (index + 1)}"

[server]
host = "127.0.0.1"
port = 0

[admin]
host = "127.0.0.1"
port = 0

[tls]
certificate = "{pair.cert}"
private_key = "{pair.key}"
trust_store = "{pki.ca}"

[storage]
data_dir = "{data}"

[repository]
repository_unique_id = "{ARC}.80.{index + 1}"

[repository.manifest]
imaging_source_id = "{ARC}.81.{index + 1}"

[[imaging.sources]]
repository_unique_id = "{ARC}.81.{index + 1}"
kind = "filesystem"
{extra}
{policy_toml() if "[policy]" not in extra else ""}
"""
    )
    report = asyncio.run(
        import_with_config(path, [data / "images"], registry_from_config, progress=False)
    )
    assert not report.failed, report.summary()
    return path, studies
