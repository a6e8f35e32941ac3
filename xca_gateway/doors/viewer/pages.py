"""The clinician's pages: the IID launch (RAD-106) and the viewer's static files.

:class:`ViewerPages` is mounted on the web door (``xca_gateway.doors.web``) by the application:
``launch`` as a page (the door has verified the clinician, who is the current caller, so the
federation search, its XUA assertion and its audit records are in their name) and ``assets``
under ``/viewer/`` (files without data; the data needs the clinician's token).

The launch searches the patient's studies in every community through the same federation view
as the door's ``/dicomweb`` handlers: the search grants this clinician the studies it found, so
that the viewer then names a study by its UID alone (QIDO-RS, thumbnails, renderings) without
asking the federation again for each request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Protocol
from urllib.parse import parse_qsl, quote

from jinja2 import Environment, select_autoescape

from xca_gateway.audit import messages as m
from xca_gateway.doors.federation import FederationError, FederationView
from xca_gateway.doors.ports import DoorHost
from xca_gateway.doors.viewer.iid import (
    IidError,
    IidRequest,
    parse_iid,
    select_studies,
    study_rows,
)
from xca_gateway.protocol.http_server import Request, Response
from xca_gateway.security.callers import Principal

log = logging.getLogger(__name__)

VIEWER_PREFIX = "/viewer/"
_MAX_QUERY_FIELDS = 50
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
# Nothing but our own files and images (blob: for decoded renderings); no inline script.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'self'"
)
_SECURITY_HEADERS = [
    ("content-security-policy", _CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
]


class DicomWebHandlers(Protocol):
    """The DICOMweb door whose federation view the pages share."""

    @property
    def view(self) -> FederationView: ...


class PageHost(Protocol):
    """What the pages need of the door that mounts them (the web door)."""

    @property
    def gateway(self) -> DoorHost: ...

    @property
    def dicomweb(self) -> DicomWebHandlers: ...


class LaunchRecorder(Protocol):
    """Audits one launch (the web door's ``record_launch``, bound to the door)."""

    def __call__(
        self,
        request: Request,
        clinician: Principal,
        *,
        patient_id: str,
        study_uids: Sequence[str] = (),
        outcome: m.EventOutcome,
        description: str | None = None,
    ) -> None: ...


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@dataclass(frozen=True)
class LaunchOutcome:
    """What a launch did, for its audit record and its answer."""

    status: int
    patient_id: str
    study_uids: tuple[str, ...]
    outcome: m.EventOutcome
    description: str | None


class ViewerPages:
    """The launch page and the viewer's files for one gateway."""

    def __init__(self, host: PageHost, record_launch: LaunchRecorder | None = None) -> None:
        self.host = host
        self.record_launch = record_launch
        gateway = host.gateway
        self.local_authority = gateway.config.community.patient_id_assigning_authority
        community = gateway.config.community
        names = {community.home_community_id: community.name}
        names.update({p.home_community_id: p.name for p in gateway.config.peers})
        # Manifests may name a community with or without the urn:oid: prefix.
        self.community_names = {
            **names,
            **{k.removeprefix("urn:oid:"): v for k, v in names.items()},
            **{f"urn:oid:{k.removeprefix('urn:oid:')}": v for k, v in names.items()},
        }
        self._env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
        self._launch_template = self._env.from_string(_static("launch.html").decode("utf-8"))
        self._assets = {name: _static(name) for name in _ASSETS}

    # -- /viewer/ files

    async def assets(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(405, [("allow", "GET, HEAD")], b"")
        name = request.path[len(VIEWER_PREFIX) :] if request.path.startswith(VIEWER_PREFIX) else ""
        name = name or "index.html"
        if name not in _ASSETS:
            return Response(404, [("content-type", "text/plain; charset=utf-8")], b"not found\n")
        headers = [
            ("content-type", _ASSETS[name]),
            ("cache-control", "no-cache"),
            *_SECURITY_HEADERS,
        ]
        return Response(200, headers, b"" if request.method == "HEAD" else self._assets[name])

    # -- the IID launch

    async def launch(self, request: Request, clinician: Principal) -> Response:
        """RAD-106 Invoke Image Display: the patient's studies from every community, or
        (requestType=STUDY naming one study) the viewer on that study."""
        community = self.host.gateway.config.community.name
        context: dict[str, object] = {
            "title": "Imaging studies",
            "clinician": clinician.name,
            "community": community,
        }
        try:
            pairs = parse_qsl(
                request.query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS
            )
        except ValueError:
            return self._refused(request, clinician, context, "too many query parameters")
        try:
            asked = parse_iid(pairs, self.local_authority)
        except IidError as exc:
            raw = next((v for k, v in pairs if k == "patientID"), "")
            return self._refused(request, clinician, context, exc.message, raw[:64])
        try:
            found = await self.host.dicomweb.view.studies_of_patient(asked.patient_id)
        except FederationError as exc:
            self._audit(
                request,
                clinician,
                LaunchOutcome(
                    exc.http_status,
                    asked.patient_id,
                    (),
                    m.EventOutcome.SERIOUS_FAILURE,
                    exc.message[:500],
                ),
            )
            context["error"] = f"The federation could not be searched: {exc.message}"
            return self._page(exc.http_status, context)
        rows = select_studies(study_rows(found.studies, self.community_names), asked)
        outcome = self._outcome(asked, [r.study_uid for r in rows], found.warnings)
        self._audit(request, clinician, outcome)
        if asked.request_type == "STUDY" and len(rows) == 1:
            location = f"{VIEWER_PREFIX}?study={quote(rows[0].study_uid)}"
            return Response(303, [("location", location), ("cache-control", "no-store")], b"")
        communities = sorted({c for row in rows for c in row.communities})
        context.update(
            rows=rows,
            communities=communities,
            patient_id=asked.patient_id,
            patient_name=next((r.patient_name for r in rows if r.patient_name), ""),
            warnings=found.warnings[:10],
        )
        return self._page(outcome.status, context)

    @staticmethod
    def _outcome(asked: IidRequest, uids: list[str], warnings: list[str]) -> LaunchOutcome:
        if asked.request_type == "STUDY" and not uids:
            return LaunchOutcome(
                404,
                asked.patient_id,
                (),
                m.EventOutcome.MINOR_FAILURE,
                "no study of this patient matches the request",
            )
        return LaunchOutcome(
            200,
            asked.patient_id,
            tuple(uids),
            m.EventOutcome.MINOR_FAILURE if warnings else m.EventOutcome.SUCCESS,
            "; ".join(warnings)[:500] or None,
        )

    def _refused(
        self,
        request: Request,
        clinician: Principal,
        context: dict[str, object],
        message: str,
        patient_id: str = "",
    ) -> Response:
        self._audit(
            request,
            clinician,
            LaunchOutcome(400, patient_id, (), m.EventOutcome.MINOR_FAILURE, message),
        )
        context["error"] = f"This launch cannot be served: {message}"
        return self._page(400, context)

    def _audit(self, request: Request, clinician: Principal, outcome: LaunchOutcome) -> None:
        if self.record_launch is None:
            return
        try:
            self.record_launch(
                request,
                clinician,
                patient_id=outcome.patient_id,
                study_uids=outcome.study_uids,
                outcome=outcome.outcome,
                description=outcome.description,
            )
        except Exception:  # an audit failure must not lose the clinician's page
            log.exception("the audit of a launch failed")

    def _page(self, status: int, context: dict[str, object]) -> Response:
        context.setdefault("rows", [])
        context.setdefault("communities", [])
        context.setdefault("warnings", [])
        body = self._launch_template.render(**context).encode("utf-8")
        headers = [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            *_SECURITY_HEADERS,
        ]
        return Response(status, headers, body)


class WebPages(PageHost, Protocol):
    """A door that mounts pages (the web door, ``xca_gateway.doors.web.door.WebDoor``)."""

    def add_page(
        self, path_prefix: str, handler: Callable[[Request, Principal], Awaitable[Response]]
    ) -> None: ...

    def add_public(
        self, path_prefix: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> None: ...


LAUNCH_PATH = "/iid"


def install_viewer(door: WebPages, record_launch: LaunchRecorder | None = None) -> ViewerPages:
    """Mount the IID launch (``/iid``, for signed-in clinicians) and the viewer's files
    (``/viewer/``, public: they hold no data) on ``door``."""
    pages = ViewerPages(door, record_launch)
    door.add_page(LAUNCH_PATH, pages.launch)
    door.add_public(VIEWER_PREFIX, pages.assets)
    return pages
