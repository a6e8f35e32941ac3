"""The embedded document registry: stored queries and registrations over a store.

:class:`LocalRegistry` parses the request (pure), plans it (pure), runs the plan against the
store, and shapes the answer. The composite queries (GetAll, GetSubmissionSetAndContents, ...)
are a few store calls each; every call is bounded by ``max_results + 1`` rows, so an overly
broad query ends in XDSTooManyResults without reading the whole registry.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import replace

from lxml import etree

from xca_gateway.protocol.namespaces import RIM, ResponseStatus
from xca_gateway.registry.model import (
    AssociationFilter,
    Kind,
    ObjectFilter,
    QueryResult,
    StoredObject,
    load_element,
)
from xca_gateway.registry.store import RegistryStore
from xca_gateway.registry.stored_query import (
    ContentsPlan,
    FindPlan,
    FoldersForDocumentPlan,
    GetAllPlan,
    GetAssociationsPlan,
    GetObjectsPlan,
    GetSubmissionSetsPlan,
    QueryPlan,
    RelatedDocumentsPlan,
    StoredQueryError,
    parse_stored_query,
    plan_query,
)
from xca_gateway.registry.submit import SubmissionRejected, parse_submission
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode
from xca_gateway.xds.ebrs import RegistryError, status_for

log = logging.getLogger(__name__)

# Building more answer elements than this happens off the event loop.
_BUILD_INLINE_LIMIT = 100


class _QueryFailed(Exception):
    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.code_context)
        self.error = error


class LocalRegistry:
    """A Registry over a :class:`RegistryStore` (SQLite or PostgreSQL)."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        max_results: int = 1000,
        patient_id_domains: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.max_results = max_results
        self.patient_id_domains = tuple(patient_id_domains)

    # -------------------------------------------------------------------------- ITI-18

    async def stored_query(self, request: etree._Element) -> QueryResult:
        try:
            query = parse_stored_query(request)
        except StoredQueryError as exc:
            return QueryResult(ResponseStatus.FAILURE, exc.errors)
        leaf_class = query.return_type == "LeafClass"
        try:
            found = await self._execute(plan_query(query), with_xml=leaf_class)
        except _QueryFailed as exc:
            return QueryResult(ResponseStatus.FAILURE, [*query.warnings, exc.error])
        except Exception as exc:
            return QueryResult(ResponseStatus.FAILURE, [*query.warnings, _internal(exc, "query")])
        if len(found) > _BUILD_INLINE_LIMIT:
            objects = await asyncio.to_thread(_answer_elements, found, leaf_class)
        else:
            objects = _answer_elements(found, leaf_class)
        return QueryResult(
            status_for(query.warnings, results=len(objects)), query.warnings, objects
        )

    async def _execute(self, plan: QueryPlan, *, with_xml: bool) -> list[StoredObject]:
        store, limit = self.store, self.max_results + 1
        result: list[StoredObject]
        if isinstance(plan, FindPlan):
            result = self._bounded(await store.select(plan.filter, limit=limit, with_xml=with_xml))
        elif isinstance(plan, GetAllPlan):
            documents = self._bounded(
                await store.select(plan.documents, limit=limit, with_xml=with_xml)
            )
            packages = self._bounded(
                await store.select(plan.submission_sets, limit=limit, with_xml=with_xml)
            )
            folders = self._bounded(
                await store.select(plan.folders, limit=limit, with_xml=with_xml)
            )
            objects = [*documents, *packages, *folders]
            self._bounded(objects)
            ids = {o.uuid for o in objects}
            candidates = self._bounded(
                await store.associations(
                    AssociationFilter(sources=tuple(sorted(ids))), limit=limit, with_xml=with_xml
                )
            )
            result = [*objects, *_associations_between(candidates, ids)]
        elif isinstance(plan, GetObjectsPlan):
            objects = self._bounded(await store.select(plan.filter, limit=limit, with_xml=with_xml))
            result = list(objects)
            if plan.with_associations and objects:
                result += self._bounded(
                    await store.associations(
                        AssociationFilter(either=tuple(o.uuid for o in objects)),
                        limit=limit,
                        with_xml=with_xml,
                    )
                )
        elif isinstance(plan, GetAssociationsPlan):
            result = self._bounded(
                await store.associations(plan.filter, limit=limit, with_xml=with_xml)
            )
        elif isinstance(plan, GetSubmissionSetsPlan):
            memberships = self._bounded(
                await store.associations(
                    AssociationFilter(targets=plan.member_uuids, types=(ebrim.HAS_MEMBER,)),
                    limit=limit,
                    with_xml=with_xml,
                )
            )
            sources = tuple(sorted({a.source_uuid for a in memberships if a.source_uuid}))
            packages = await store.select(
                replace(_SUBMISSION_SETS, uuids=sources), limit=limit, with_xml=with_xml
            )
            package_ids = {p.uuid for p in packages}
            result = [*packages, *(a for a in memberships if a.source_uuid in package_ids)]
        elif isinstance(plan, ContentsPlan):
            result = await self._contents(plan, limit, with_xml)
        elif isinstance(plan, FoldersForDocumentPlan):
            documents = await store.select(plan.document, limit=limit, with_xml=False)
            result = []
            if documents:
                memberships = self._bounded(
                    await store.associations(
                        AssociationFilter(
                            targets=tuple(d.uuid for d in documents), types=(ebrim.HAS_MEMBER,)
                        ),
                        limit=limit,
                        with_xml=False,
                    )
                )
                sources = tuple(sorted({a.source_uuid for a in memberships if a.source_uuid}))
                result = await store.select(
                    replace(_FOLDERS, uuids=sources), limit=limit, with_xml=with_xml
                )
        elif isinstance(plan, RelatedDocumentsPlan):
            result = await self._related(plan, limit, with_xml)
        else:  # pragma: no cover - the union is exhaustive
            raise AssertionError(plan)
        self._bounded(result)
        _check_single_patient(result)
        return sorted(result, key=lambda o: o.seq)

    async def _contents(self, plan: ContentsPlan, limit: int, with_xml: bool) -> list[StoredObject]:
        store = self.store
        containers = await store.select(plan.container, limit=2, with_xml=with_xml)
        if not containers:
            return []
        container = containers[0]
        memberships = self._bounded(
            await store.associations(
                AssociationFilter(sources=(container.uuid,), types=(ebrim.HAS_MEMBER,)),
                limit=limit,
                with_xml=with_xml,
            )
        )
        member_ids = tuple(sorted({a.target_uuid for a in memberships if a.target_uuid}))
        documents = self._bounded(
            await store.select(
                replace(plan.documents, uuids=member_ids), limit=limit, with_xml=with_xml
            )
        )
        folders: list[StoredObject] = []
        inner: list[StoredObject] = []
        if plan.include_folders:
            folders = self._bounded(
                await store.select(
                    replace(_FOLDERS, uuids=member_ids), limit=limit, with_xml=with_xml
                )
            )
            # Folder-DocumentEntry associations that the SubmissionSet holds (HasMember).
            present = {o.uuid for o in (*documents, *folders)}
            inner = [
                a
                for a in self._bounded(
                    await store.associations(
                        AssociationFilter(uuids=member_ids), limit=limit, with_xml=with_xml
                    )
                )
                if a.source_uuid in present and a.target_uuid in present
            ]
        returned = {o.uuid for o in (*documents, *folders, *inner)}
        kept = [a for a in memberships if a.target_uuid in returned]
        return [container, *folders, *documents, *inner, *kept]

    async def _related(
        self, plan: RelatedDocumentsPlan, limit: int, with_xml: bool
    ) -> list[StoredObject]:
        store = self.store
        documents = await store.select(plan.document, limit=2, with_xml=with_xml)
        if not documents:
            return []
        origin = documents[0]
        associations = self._bounded(
            await store.associations(
                AssociationFilter(either=(origin.uuid,), types=plan.association_types),
                limit=limit,
                with_xml=with_xml,
            )
        )
        others = {
            (a.target_uuid if a.source_uuid == origin.uuid else a.source_uuid) or ""
            for a in associations
        }
        others.discard(origin.uuid)
        related = self._bounded(
            await store.select(
                replace(plan.related, uuids=tuple(sorted(others))), limit=limit, with_xml=with_xml
            )
        )
        related_ids = {r.uuid for r in related}
        kept = [
            a for a in associations if a.source_uuid in related_ids or a.target_uuid in related_ids
        ]
        if not kept:
            return []
        return [origin, *related, *kept]

    def _bounded(self, objects: list[StoredObject]) -> list[StoredObject]:
        if len(objects) > self.max_results:
            raise _QueryFailed(
                RegistryError(
                    ErrorCode.TOO_MANY_RESULTS,
                    f"the query matches more than {self.max_results} registry objects; "
                    "narrow it down",
                )
            )
        return objects

    # -------------------------------------------------------------------------- ITI-42

    async def submit(self, request: etree._Element) -> list[RegistryError]:
        try:
            submission = await asyncio.to_thread(
                parse_submission, request, patient_id_domains=self.patient_id_domains
            )
            await self.store.register(submission)
        except SubmissionRejected as exc:
            return exc.errors
        except Exception as exc:
            return [_internal(exc, "registration")]
        return []

    async def knows_patient(self, patient_id: str) -> bool | None:
        return await self.store.knows_patient(patient_id)

    async def close(self) -> None:
        await self.store.close()


_SUBMISSION_SETS = ObjectFilter(Kind.SUBMISSION_SET)
_FOLDERS = ObjectFilter(Kind.FOLDER)


def _answer_elements(found: Iterable[StoredObject], leaf_class: bool) -> list[etree._Element]:
    elements = []
    for obj in found:
        if leaf_class and obj.xml is not None:
            element = load_element(obj.xml)
            # The status column is authoritative: deprecation does not rewrite the XML.
            element.set("status", obj.status)
        else:
            element = etree.Element(f"{{{RIM}}}ObjectRef", nsmap={"rim": RIM}, id=obj.uuid)
        elements.append(element)
    return elements


def _associations_between(candidates: list[StoredObject], ids: set[str]) -> list[StoredObject]:
    """Associations among ``ids``, and those (SubmissionSet HasMember) that hold one of them."""
    direct = [a for a in candidates if a.target_uuid in ids]
    direct_ids = {a.uuid for a in direct}
    return direct + [a for a in candidates if a.target_uuid in direct_ids]


def _check_single_patient(objects: list[StoredObject]) -> None:
    patients = {o.patient_id for o in objects if o.kind is not Kind.ASSOCIATION and o.patient_id}
    if len(patients) > 1:
        raise _QueryFailed(
            RegistryError(
                ErrorCode.RESULT_NOT_SINGLE_PATIENT,
                "the query would return metadata of more than one patient",
            )
        )


def _internal(exc: Exception, what: str) -> RegistryError:
    locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
    # psycopg_pool.PoolTimeout: every database connection is in use.
    if locked or type(exc).__name__ == "PoolTimeout":
        return RegistryError(ErrorCode.REGISTRY_BUSY, f"the registry is busy; retry the {what}")
    log.exception("registry %s failed", what)
    return RegistryError(ErrorCode.REGISTRY_ERROR, f"internal registry error during the {what}")
