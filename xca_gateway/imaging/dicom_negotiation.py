"""Transfer syntax negotiation for the DIMSE doors: which syntax to accept, ask for, send in.

C-GET and C-MOVE are byte-faithful where the peer allows it: an instance goes out in the
transfer syntax it is stored in when the peer accepted that syntax for its SOP class (the
source passes it through untouched and the dataset is sent as read, never re-encoded from
decoded values), else in a syntax the peer accepted that it can be converted to losslessly,
else that sub-operation fails with the reason. As C-GET acceptor the door accepts, per
presentation context, the first syntax the SCU proposes that it can pass on (compressed ones
included); as C-MOVE requestor it proposes native and the common compressed syntaxes for each
SOP class of the retrieve, and asks the federation for what the destination accepted.

:func:`take_requestor_order` applies the acceptor rule to a pynetdicom association at
EVT_REQUESTED; the imaging sources' C-MOVE storage SCP uses it too, so that what a PACS sends
is received in the syntax it proposed first (usually the one it stores).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydicom.uid import AllTransferSyntaxes, ExplicitVRBigEndian

if TYPE_CHECKING:
    from pynetdicom.presentation import PresentationContext

from xca_gateway.imaging import transfer_syntax as ts

__all__ = [
    "MOVE_COMPRESSED_SYNTAXES",
    "NATIVE_SYNTAXES",
    "STORAGE_SYNTAXES",
    "move_contexts",
    "outgoing_syntax",
    "request_syntaxes",
    "requestor_order",
    "syntaxes_by_sop_class",
    "take_requestor_order",
]

# What a retrieve asks the federation for when the receiving side's syntaxes are not known.
NATIVE_SYNTAXES = (ts.EXPLICIT_VR_LITTLE_ENDIAN, ts.IMPLICIT_VR_LITTLE_ENDIAN)

# Every syntax an instance can be passed on in (the retired big endian one aside: pynetdicom
# cannot convert to it, and nothing stores it), native ones first.
STORAGE_SYNTAXES: tuple[str, ...] = (
    *NATIVE_SYNTAXES,
    *(
        str(uid)
        for uid in AllTransferSyntaxes
        if str(uid) not in (*NATIVE_SYNTAXES, str(ExplicitVRBigEndian))
    ),
)
# Compressed syntaxes a C-MOVE proposes (one presentation context each) beside the native ones.
MOVE_COMPRESSED_SYNTAXES = (
    ts.RLE_LOSSLESS,
    ts.JPEG_LS_LOSSLESS,
    ts.JPEG_2000_LOSSLESS,
    ts.JPEG_LOSSLESS_SV1,
    ts.JPEG_LOSSLESS,
    ts.HTJ2K_LOSSLESS,
    ts.JPEG_BASELINE,
    ts.JPEG_EXTENDED,
    ts.JPEG_LS_NEAR_LOSSLESS,
    ts.JPEG_2000,
)
MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1-255


def requestor_order(
    proposed: Iterable[tuple[str, Sequence[str]]], passable: Collection[str]
) -> dict[str, list[str]]:
    """Per abstract syntax, the transfer syntaxes a requestor proposed (in its order, the
    first presentation context first) that can be passed on: the order the acceptor takes
    them in, so that each context is accepted with the requestor's first choice."""
    order: dict[str, list[str]] = {}
    for abstract_syntax, syntaxes in proposed:
        wanted = order.setdefault(str(abstract_syntax), [])
        for syntax in syntaxes:
            if str(syntax) in passable and str(syntax) not in wanted:
                wanted.append(str(syntax))
    return order


def syntaxes_by_sop_class(contexts: Iterable[Any]) -> dict[str, list[str]]:
    """SOP Class UID -> the transfer syntaxes of the accepted storage presentation contexts
    (pynetdicom ``PresentationContext``s) in which we send C-STOREs, in context ID order."""
    accepted: dict[str, list[str]] = {}
    for context in sorted(contexts, key=lambda c: c.context_id or 0):
        if not context.as_scu or not context.transfer_syntax:
            continue
        syntaxes = accepted.setdefault(str(context.abstract_syntax), [])
        if str(context.transfer_syntax[0]) not in syntaxes:
            syntaxes.append(str(context.transfer_syntax[0]))
    return accepted


def request_syntaxes(
    accepted: Mapping[str, Sequence[str]], sop_classes: Iterable[str]
) -> tuple[str, ...]:
    """The TransferSyntaxUIDList of the RAD-69 for instances of ``sop_classes``: what the peer
    accepted for them (the source returns an instance as stored when that is listed)."""
    wanted: list[str] = []
    for sop_class in sop_classes:
        for syntax in accepted.get(sop_class, ()):
            if syntax not in wanted:
                wanted.append(syntax)
    return tuple(wanted) or NATIVE_SYNTAXES


def outgoing_syntax(stored: str, accepted: Sequence[str]) -> str | None:
    """The syntax to send an instance stored in ``stored`` in, given what the peer accepted
    for its SOP class: as stored if accepted (or, native, in another accepted native syntax,
    which pynetdicom re-encodes losslessly), else a lossless conversion, else None."""
    if stored in accepted:
        return stored
    if stored in ts.NATIVE and any(a in ts.NATIVE for a in accepted):
        return stored
    return ts.choose_target(stored, accepted)


def move_contexts(sop_classes: Iterable[str]) -> list[PresentationContext]:
    """The presentation contexts a C-MOVE proposes to its destination: per SOP class one with
    the native syntaxes and one per common compressed syntax (these while they fit in 128)."""
    # local: pynetdicom (~7 MB of RSS) loads only where DIMSE is used (a C-MOVE here)
    from pynetdicom import build_context

    classes = list(dict.fromkeys(sop_classes))
    contexts = [build_context(c, list(NATIVE_SYNTAXES)) for c in classes]
    for syntax in MOVE_COMPRESSED_SYNTAXES:
        if len(contexts) + len(classes) > MAX_PRESENTATION_CONTEXTS:
            break
        contexts.extend(build_context(c, [syntax]) for c in classes)
    return contexts[:MAX_PRESENTATION_CONTEXTS]


def take_requestor_order(assoc: Any, passable: Collection[str] = STORAGE_SYNTAXES) -> None:
    """At EVT_REQUESTED (before negotiation): accept each presentation context of ``assoc``
    with the first syntax the requestor proposed in it that is ``passable`` (and supported);
    pynetdicom takes the acceptor's order, so this association's copy of the supported
    contexts gets the requestor's."""
    proposed = assoc.requestor.primitive.presentation_context_definition_list or []
    order = requestor_order(((c.abstract_syntax, c.transfer_syntax) for c in proposed), passable)
    for context in assoc.acceptor.supported_contexts:
        supported = {str(s) for s in context.transfer_syntax}
        wanted = [s for s in order.get(str(context.abstract_syntax), ()) if s in supported]
        if wanted:
            context.transfer_syntax = wanted
