"""The bounded load phase: concurrent ITI-18 queries and RAD-69 study retrievals.

Every worker stops by itself at the deadline; each finished operation is counted, timed and
checked (HTTP 200 and a Success status, every instance received), so the audit records it
must have produced can be derived from the counts.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reliability.cases import Target
from xca_gateway.consumer.imaging import (
    Consumer,
    Manifest,
    find_manifests_request,
    imaging_request_from_kos,
)
from xca_gateway.imaging.request import RetrieveImagingDocumentSetRequest
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.xds.ebrs import parse_registry_errors

TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


@dataclass
class Tally:
    kind: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Answered, but not (wholly) successful: audited by the gateway, yet an error for the run.
    answered_with_errors: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(p) - 1]


@dataclass(frozen=True)
class Study:
    """The study the retrieval workers fetch, and who holds it."""

    manifest: Manifest
    request: RetrieveImagingDocumentSetRequest
    holder: str  # community name


def alice(target: Target, index: int = 0) -> str:
    patients = target.community(index)["samplePatients"]
    return str(next(p["id"] for p in patients if p["crossCommunityKey"] == "alice"))


def gateway_base(target: Target, index: int = 0) -> str:
    return target.url("iti18", index).rsplit("/ig/", 1)[0]


def client(target: Target, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        verify=target.context(),
        timeout=httpx.Timeout(120, connect=30),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def prepare_study(target: Target) -> Study:
    """Find alice's manifests from the first community and pick one held by another one."""
    homes = {c["homeCommunityId"]: c["name"] for c in target.endpoints["communities"]}
    local = target.community(0)["homeCommunityId"]
    async with client(target, 2) as http:
        consumer = Consumer(http, gateway_base(target), progress=False)
        manifests, _ = await consumer.find_manifests(alice(target))
        remote = [m for m in manifests if m.home_community_id != local] or manifests
        if not remote:
            raise RuntimeError("the demo has no imaging manifest for alice")
        manifest = remote[0]
        kos = await consumer.fetch_manifest(manifest)
    request = imaging_request_from_kos(kos, manifest.home_community_id, TRANSFER_SYNTAXES)
    return Study(manifest, request, homes[manifest.home_community_id])


async def _query_worker(consumer: Consumer, patient: str, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            # _soap, not find_manifests: the response status is needed, not just manifests.
            payload, _ = await consumer._soap(
                "/ig/iti18", find_manifests_request(patient), Action.ITI18
            )
            status = payload.get("status", "")
            if status != ResponseStatus.SUCCESS:
                tally.answered_with_errors += 1
                codes = sorted(
                    {
                        f"{e.error_code} ({e.code_context[:80]})"
                        for e in parse_registry_errors(payload)
                    }
                )
                tally.errors.append(f"{status.rsplit(':', 1)[-1]}: {'; '.join(codes)}"[:300])
                continue
        except Exception as exc:  # every failure is counted, none stops the phase
            tally.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        tally.latencies.append(time.monotonic() - started)


async def _retrieve_worker(
    consumer: Consumer, study: Study, out: Path, deadline: float, tally: Tally
) -> None:
    expected = len(study.request.documents)
    while time.monotonic() < deadline:
        started = time.monotonic()
        target_dir = out / uuid.uuid4().hex
        try:
            written, errors = await consumer.retrieve_instances(study.request, target_dir)
            if errors or len(written) != expected:
                tally.errors.append(f"{len(written)}/{expected} instances, {len(errors)} errors")
                continue
        except Exception as exc:
            tally.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        finally:
            shutil.rmtree(target_dir, ignore_errors=True)
        tally.latencies.append(time.monotonic() - started)


async def run_load(
    target: Target,
    study: Study,
    *,
    seconds: float,
    queries: int,
    retrievals: int,
    scratch: Path,
) -> tuple[Tally, Tally]:
    deadline = time.monotonic() + seconds
    query_tally, retrieve_tally = Tally("ITI-18 query"), Tally("RAD-69 study retrieval")
    patient = alice(target)
    async with client(target, queries) as q_http, client(target, max(1, retrievals)) as r_http:
        q_consumer = Consumer(q_http, gateway_base(target), progress=False)
        r_consumer = Consumer(r_http, gateway_base(target), progress=False)
        workers = [
            _query_worker(q_consumer, patient, deadline, query_tally) for _ in range(queries)
        ] + [
            _retrieve_worker(r_consumer, study, scratch, deadline, retrieve_tally)
            for _ in range(retrievals)
        ]
        await asyncio.gather(*workers)
    return query_tally, retrieve_tally
