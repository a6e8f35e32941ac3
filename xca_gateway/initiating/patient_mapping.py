"""Patient-ID mapping for the initiating gateway: the consumer's local id → each peer's id.

Sources are tried per peer in the configured order (``patient_id_sources``):

* ``xref``: the embedded cross-reference table (SQLite), loadable from CSV;
* ``pix``: a PIX Manager, asked with a PIXV3 Query (ITI-45);
* ``xcpd``: the peer's own Responding Gateway, asked with Cross Gateway Patient Discovery
  (ITI-55) using the patient's demographics from the local patient directory.

A peer without a configured assigning authority is taken to share our patient identifier
domain (an affinity-domain-wide MPI), and receives the id unchanged. Answers from PIX and XCPD
are stored in the cross-reference table (unless that would merge two people of one domain), so
the next query for the patient needs no discovery; a miss is remembered briefly in memory, so
an unknown patient does not cost a discovery round trip on every query. When no source knows
the patient the peer is skipped, and :meth:`PatientIdMapper.resolve` says why.

CSV format: one person per line, every identifier of that person in CX form, comma separated;
lines starting with ``#`` are comments::

    C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO,C02-2001^^^&1.3.6.1.4.1.21367.13.20.2000&ISO
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from xca_gateway.patients.directory import MATCH_THRESHOLD, PatientDirectory
from xca_gateway.patients.xref import CrossReferenceTable
from xca_gateway.protocol.peer_client import PeerClient, PeerError
from xca_gateway.schema import HttpsUrl, NonNegativeSeconds, PathText, Range, Seconds, Section
from xca_gateway.settings import ConfigError, PeerConfig
from xca_gateway.transactions import iti45, iti55
from xca_gateway.xds.patient_id import PatientId

log = logging.getLogger(__name__)

SOURCES = frozenset({"xref", "pix", "xcpd"})
# Bound on remembered misses (memory), whatever the query mix.
_MAX_MISSES = 10_000


@dataclass(frozen=True)
class XcpdPeer:
    """Where and whom to ask with XCPD for ids of one peer's identifier domain."""

    name: str
    url: str
    home_community_id: str


@dataclass(frozen=True)
class PeerMapping:
    """The outcome of mapping one patient for one peer."""

    patient_id: PatientId | None
    source: str | None = None  # xref | pix | xcpd | same-domain
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) or "no mapping source knows the patient"


class PatientIdMapper:
    """Map a local patient id to the id a peer community knows the patient by.

    Only ``xref`` needs nothing more; ``pix`` needs ``peer_client`` and ``pix_manager``,
    ``xcpd`` needs ``peer_client``, ``directory`` (our patients' demographics), an entry in
    ``xcpd_peers`` (keyed by the peer's assigning authority), ``home_community_id`` and
    ``local_authority``. A source that lacks what it needs is skipped, with the reason.
    """

    def __init__(
        self,
        xref: CrossReferenceTable | None,
        *,
        peer_client: PeerClient | None = None,
        pix_manager: str | None = None,
        directory: PatientDirectory | None = None,
        xcpd_peers: Mapping[str, XcpdPeer] | None = None,
        home_community_id: str | None = None,
        local_authority: str | None = None,
        deadline: float = 10.0,
        xcpd_minimum_score: int = MATCH_THRESHOLD,
        cache_answers: bool = True,
        negative_cache_seconds: float = 30.0,
    ) -> None:
        self.xref = xref
        self.peer_client = peer_client
        self.pix_manager = pix_manager
        self.directory = directory
        self.xcpd_peers = dict(xcpd_peers or {})
        self.home_community_id = home_community_id
        self.local_authority = local_authority
        self.deadline = deadline
        self.xcpd_minimum_score = xcpd_minimum_score
        self.cache_answers = cache_answers
        self.negative_cache_seconds = negative_cache_seconds
        # (source, patient, authority) → (monotonic expiry, reason) of recent misses.
        self._misses: dict[tuple[str, PatientId, str], tuple[float, str]] = {}

    async def to_peer(
        self, patient: PatientId, peer_authority: str | None, sources: Iterable[str] = ("xref",)
    ) -> PatientId | None:
        return (await self.resolve(patient, peer_authority, sources)).patient_id

    async def resolve(
        self, patient: PatientId, peer_authority: str | None, sources: Iterable[str] = ("xref",)
    ) -> PeerMapping:
        if peer_authority is None or peer_authority == patient.assigning_authority:
            return PeerMapping(patient, "same-domain")
        sources = tuple(sources)
        reasons: list[str] = []
        if self.xref is not None and any(s in ("pix", "xcpd") for s in sources):
            # Earlier PIX / XCPD answers are cached in the table: no new discovery needed.
            cached = await asyncio.to_thread(self.xref.lookup, patient, peer_authority)
            if cached is not None:
                return PeerMapping(cached, "xref")
        for source in sources:
            if source == "xref":
                found, why = await self._from_xref(patient, peer_authority)
            elif source in ("pix", "xcpd"):
                found, why = await self._discover(source, patient, peer_authority)
            else:
                found, why = None, f"{source}: unknown mapping source"
            if found is not None:
                return PeerMapping(found, source, tuple(reasons))
            reasons.append(why)
        return PeerMapping(None, None, tuple(reasons))

    async def _from_xref(self, patient: PatientId, authority: str) -> tuple[PatientId | None, str]:
        if self.xref is None:
            return None, "xref: no cross-reference table"
        found = await asyncio.to_thread(self.xref.lookup, patient, authority)
        return found, f"xref: {patient} has no cross-reference to {authority}"

    async def _discover(
        self, source: str, patient: PatientId, authority: str
    ) -> tuple[PatientId | None, str]:
        key = (source, patient, authority)
        miss = self._misses.get(key)
        if miss is not None:
            if miss[0] > time.monotonic():
                return None, miss[1]
            del self._misses[key]
        try:
            if source == "pix":
                answer = await self._pix(patient, authority)
            else:
                answer = await self._xcpd(patient, authority)
        except PeerError as exc:
            # Not remembered: the next query tries again.
            log.warning("%s lookup of %s for %s failed: %s", source, patient, authority, exc)
            return None, f"{source}: {exc.kind}: {exc.message}"
        except (iti45.PixError, iti55.XcpdError) as exc:
            log.warning("%s lookup of %s for %s failed: %s", source, patient, authority, exc)
            return None, f"{source}: {exc}"
        if answer.patient_id is None:
            if answer.asked and self.negative_cache_seconds > 0:
                now = time.monotonic()
                if len(self._misses) >= _MAX_MISSES:
                    self._misses = {k: v for k, v in self._misses.items() if v[0] > now}
                if len(self._misses) < _MAX_MISSES:
                    self._misses[key] = (now + self.negative_cache_seconds, answer.why)
            return None, answer.why
        if self.xref is not None:
            clash = await asyncio.to_thread(self.xref.conflict, patient, answer.patient_id)
            if clash is not None:
                # The answer names someone our table knows as another person: not safe to use.
                log.warning(
                    "%s answer %s for %s contradicts %s", source, answer.patient_id, patient, clash
                )
                return None, (
                    f"{source}: the answer {answer.patient_id} contradicts the cross-reference "
                    f"table ({clash[0]} is linked with {clash[1]})"
                )
            if self.cache_answers:
                await asyncio.to_thread(self.xref.link, [patient, answer.patient_id])
        return answer.patient_id, ""

    async def _pix(self, patient: PatientId, authority: str) -> _Answer:
        if self.peer_client is None or not self.pix_manager:
            return _Answer(None, "pix: no PIX Manager configured")
        found = await iti45.pix_query(
            self.peer_client,
            self.pix_manager,
            patient,
            authority,
            sender_id=_oid(self.home_community_id),
            deadline=self.deadline,
        )
        why = f"pix: the PIX Manager knows no id of {authority} for {patient}"
        return _Answer(found, why, asked=True)

    async def _xcpd(self, patient: PatientId, authority: str) -> _Answer:
        peer = self.xcpd_peers.get(authority)
        if peer is None or self.peer_client is None or self.home_community_id is None:
            return _Answer(None, "xcpd: no XCPD endpoint configured for this peer")
        if self.directory is None:
            return _Answer(None, "xcpd: no local patient directory")
        demographics = await asyncio.to_thread(self.directory.lookup, patient)
        if demographics is None:
            return _Answer(None, f"xcpd: {patient} is not in the local patient directory")
        found = await iti55.discover(
            self.peer_client,
            peer.url,
            demographics,
            home_community_id=self.home_community_id,
            assigning_authority=self.local_authority or patient.assigning_authority,
            patient_id=patient,
            peer_home_community_id=peer.home_community_id,
            peer_authority=authority,
            peer_name=peer.name,
            deadline=self.deadline,
            minimum_score=self.xcpd_minimum_score,
        )
        why = f"xcpd: {peer.name} found no single confident match for {patient}"
        return _Answer(found, why, asked=True)


@dataclass(frozen=True)
class _Answer:
    patient_id: PatientId | None
    why: str
    asked: bool = False  # a peer was asked: a miss is worth remembering for a while


def _oid(home_community_id: str | None) -> str | None:
    if not home_community_id:
        return None
    return home_community_id.removeprefix("urn:oid:")


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PatientMappingConfig:
    """The ``[patient_mapping]`` section."""

    # CSV file of cross-referenced patient ids, loaded into the embedded table at start-up.
    xref_csv: Path | None = None
    # PIXV3 Query (ITI-45) endpoint of the PIX Manager, for peers with source "pix".
    pix_manager: str | None = None
    # SQLite file of the local patient directory (default: <data_dir>/patients.sqlite3).
    directory: Path | None = None
    # Deadline of one PIX / XCPD exchange; the mapping happens before the ITI-38 goes out.
    deadline: float = 10.0
    # queryMatchObservation below this (when the peer gives one) is not an XCPD answer.
    xcpd_minimum_score: int = MATCH_THRESHOLD
    # How long a PIX / XCPD "not known" is remembered before asking again (0: never).
    negative_cache_seconds: float = 30.0
    # Serve PIXV3 Query (ITI-45) from the cross-reference table at /pix/iti45.
    pix_responder: bool = False
    # Serve XCPD (ITI-55) from the local patient directory at /xca/iti55.
    xcpd_responder: bool = True
    # Record initiating communities' patient ids from matched XCPD requests in the table.
    xcpd_learn_correlations: bool = True
    # Filled in by parse_patient_mapping_config: peer assigning authority → XCPD endpoint.
    xcpd_peers: dict[str, XcpdPeer] = field(default_factory=dict)


class PatientMappingSection(Section):
    """How a consumer's local patient id becomes each peer's id (per peer, see [[peers]]
    patient_id_sources): a cross-reference table loaded from CSV (one person per line, all
    their CX ids), a PIX Manager (ITI-45), XCPD (ITI-55, [[peers]] xcpd); and the XCPD and PIX
    answers we give from our own tables."""

    xref_csv: PathText | None = Field(
        None,
        description="CSV file of cross-referenced patient ids, loaded at start-up.",
        examples=["../data/xref.csv"],
    )
    pix_manager: HttpsUrl | None = Field(
        None,
        description='PIXV3 Query (ITI-45) endpoint, for peers with source "pix".',
        examples=["https://pix.example.org/pix/iti45"],
    )
    directory: PathText | None = Field(
        None,
        description=(
            "SQLite file of the local patient directory (default: <data_dir>/patients.sqlite3)."
        ),
        examples=["../data/north/patients.sqlite3"],
    )
    deadline: Seconds = Field(10.0, description="Deadline of one PIX / XCPD exchange.")
    xcpd_minimum_score: Annotated[int, Range(0, 100)] = Field(
        MATCH_THRESHOLD,
        description="An XCPD match with a lower queryMatchObservation is no answer.",
    )
    negative_cache_seconds: NonNegativeSeconds = Field(
        30.0, description="How long a PIX / XCPD 'not known' is remembered (0: never)."
    )
    pix_responder: bool = Field(
        False, description="Answer PIXV3 queries (ITI-45) at /pix/iti45 from the table."
    )
    xcpd_responder: bool = Field(
        True, description="Answer XCPD (ITI-55) at /xca/iti55 from the patient directory."
    )
    xcpd_learn_correlations: bool = Field(
        True,
        description="Record the ids of initiating communities' matched XCPD requests in the table.",
    )


def parse_patient_mapping_config(
    table: dict[str, Any],
    base_dir: Path,
    *,
    data_dir: Path,
    peers: Sequence[PeerConfig] = (),
) -> PatientMappingConfig:
    """Validate ``[patient_mapping]`` and the peers' mapping sources against it.

    A peer's XCPD endpoint is its ``xcpd`` URL (read with getattr, so this works before and
    after that key exists in :class:`~xca_gateway.settings.PeerConfig`).
    """
    if not isinstance(table, dict):
        raise ConfigError("[patient_mapping] must be a table")
    known = set(PatientMappingConfig.__dataclass_fields__) - {"xcpd_peers"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[patient_mapping] unknown key(s): {', '.join(sorted(unknown))}")
    values = dict(table)
    for key in ("xref_csv", "directory"):
        if key in values:
            if not isinstance(values[key], str):
                raise ConfigError(f"patient_mapping.{key} must be a path string")
            path = Path(values[key]).expanduser()
            values[key] = path if path.is_absolute() else (base_dir / path).resolve()
    values.setdefault("directory", data_dir / "patients.sqlite3")
    pix = values.get("pix_manager")
    if pix is not None and (not isinstance(pix, str) or not pix.startswith("https://")):
        raise ConfigError("patient_mapping.pix_manager must be an https:// URL (mutual TLS)")
    for key in ("deadline", "negative_cache_seconds"):
        value = values.get(key, 1)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"patient_mapping.{key} must be a non-negative number")
    if values.get("deadline", 1) == 0:
        raise ConfigError("patient_mapping.deadline must be positive")
    score = values.get("xcpd_minimum_score", MATCH_THRESHOLD)
    if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= 100:
        raise ConfigError("patient_mapping.xcpd_minimum_score must be an integer 0..100")
    for key in ("pix_responder", "xcpd_responder", "xcpd_learn_correlations"):
        if not isinstance(values.get(key, False), bool):
            raise ConfigError(f"patient_mapping.{key} must be true or false")

    xcpd_peers: dict[str, XcpdPeer] = {}
    for peer in peers:
        where = f"peers[{peer.name}]"
        unsupported = set(peer.patient_id_sources) - SOURCES
        if unsupported:
            names = ", ".join(sorted(unsupported))
            raise ConfigError(f"{where}.patient_id_sources: not supported: {names}")
        url = getattr(peer, "xcpd", None)
        if url is not None and (not isinstance(url, str) or not url.startswith("https://")):
            raise ConfigError(f"{where}.xcpd must be an https:// URL (mutual TLS)")
        if "pix" in peer.patient_id_sources and not pix:
            raise ConfigError(f"{where} uses source pix, but patient_mapping.pix_manager is unset")
        if "xcpd" in peer.patient_id_sources:
            if not url:
                raise ConfigError(f"{where} uses source xcpd, but has no xcpd URL")
            if peer.patient_id_assigning_authority is None:
                raise ConfigError(
                    f"{where} uses source xcpd, but has no patient_id_assigning_authority"
                )
        if url and peer.patient_id_assigning_authority is not None:
            authority = peer.patient_id_assigning_authority
            if authority in xcpd_peers:
                raise ConfigError(
                    f"{where}: another peer already answers XCPD for the assigning authority "
                    f"{authority}"
                )
            xcpd_peers[authority] = XcpdPeer(peer.name, url, peer.home_community_id)
    try:
        return PatientMappingConfig(**values, xcpd_peers=xcpd_peers)
    except TypeError as exc:
        raise ConfigError(f"[patient_mapping] {exc}") from None
