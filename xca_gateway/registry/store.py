"""The registry store interface.

A store persists registry objects (canonical XML plus indexed columns) and answers the filters
of :mod:`xca_gateway.registry.model`. It knows nothing about stored query ids or SOAP: the
stored query executor composes these primitives. Registering a submission is one transaction
in which the store reads what the registration rules need (:class:`RegistryContext`), calls
:func:`~xca_gateway.registry.submit.plan_registration`, and writes the result, or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from xca_gateway.registry.model import AssociationFilter, ObjectFilter, StoredObject
from xca_gateway.registry.submit import RegistrationPlan, Submission


class RegistryStore(Protocol):
    async def select(
        self, flt: ObjectFilter, *, limit: int | None = None, with_xml: bool = True
    ) -> list[StoredObject]:
        """DocumentEntries, SubmissionSets or Folders matching ``flt``, oldest first."""
        ...

    async def associations(
        self, flt: AssociationFilter, *, limit: int | None = None, with_xml: bool = True
    ) -> list[StoredObject]:
        """Associations matching ``flt``, oldest first."""
        ...

    async def register(self, submission: Submission) -> RegistrationPlan:
        """Apply the registration rules and store the submission atomically.

        Raises :class:`~xca_gateway.registry.submit.SubmissionRejected`; then nothing changed.
        """
        ...

    async def register_many(self, submissions: Sequence[Submission]) -> None:
        """Register several submissions in one transaction (bulk loads); all or nothing."""
        ...

    async def knows_patient(self, patient_id: str) -> bool:
        """Whether any object of this patient is registered."""
        ...

    async def counts(self) -> dict[str, int]:
        """Number of registry objects per kind."""
        ...

    async def close(self) -> None: ...
