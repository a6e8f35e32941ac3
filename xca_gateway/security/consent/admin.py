"""Patient consent for operators: ``xca-gateway consent ...`` and the admin port's ``/consent``
JSON API."""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from xca_gateway.audit import messages as m
from xca_gateway.audit.messages import AuditContext, AuditMessage
from xca_gateway.protocol.http_server import BodyTooLarge, Request, Response
from xca_gateway.protocol.shared_db import SharedDatabase, SharedDatabaseError
from xca_gateway.security.callers import Principal
from xca_gateway.security.consent.postgres_store import PostgresConsentStore
from xca_gateway.security.consent.service import (
    ANY,
    MODES,
    ConsentConfig,
    ConsentError,
    ConsentRule,
    ConsentService,
    ConsentStoreUnavailable,
    normalize_patient_id,
    parse_consent_config,
)
from xca_gateway.security.operators import AdminAccessError, AdminGate, read_operator_token


def _load_from_gateway_config(path: Path) -> ConsentConfig:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConsentError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConsentError(f"{path}: {exc}") from None
    base = path.resolve().parent
    storage = data.get("storage", {})
    data_dir_value = storage.get("data_dir", "data") if isinstance(storage, dict) else "data"
    data_dir = Path(str(data_dir_value)).expanduser()
    data_dir = data_dir if data_dir.is_absolute() else (base / data_dir).resolve()
    return parse_consent_config(dict(data.get("consent", {})), base, data_dir)


def _shared_database(path: Path) -> str | None:
    """``[shared] database`` of the gateway configuration, if it names one."""
    with path.open("rb") as fh:
        shared = tomllib.load(fh).get("shared", {})
    database = shared.get("database") if isinstance(shared, dict) else None
    return database if isinstance(database, str) and database else None


def _rule_json(rule: ConsentRule) -> dict[str, Any]:
    return {k: v for k, v in asdict(rule).items() if v is not None}


def _cli_actor() -> str:
    """Who changed the store directly: the operating-system account (the store's history)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _via_api(args: argparse.Namespace) -> int:
    """``set`` / ``revoke`` through the running gateway's admin API: authenticated with the
    operator's token from ``[consent] admin_token_file``, and audited by the gateway (110110)
    under the operator's name."""

    path = Path(args.config)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        config = _load_from_gateway_config(path)
        if config.admin_token_file is None:
            raise ConsentError(f"{path}: [consent] admin_token_file is not set")
        operator, token = read_operator_token(config.admin_token_file, args.operator)
    except (ConsentError, AdminAccessError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"xca-gateway: {exc}", file=sys.stderr)
        return 2
    admin = data.get("admin", {}) if isinstance(data.get("admin"), dict) else {}
    host = str(admin.get("host", "127.0.0.1"))
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{admin.get('port', 9090)}{_PREFIX}/" + urllib.parse.quote(
        args.patient, safe=""
    )
    body: bytes | None = None
    if args.consent_command == "set":
        method = "PUT"
        fields = {
            "mode": args.mode,
            "community": args.community,
            "class_code": args.class_code,
            "confidentiality_code": args.confidentiality_code,
        }
        if args.note:
            fields["note"] = args.note
        body = json.dumps(fields).encode()
    else:
        method = "DELETE"
        scope = {
            k: v
            for k, v in (
                ("community", args.community),
                ("class_code", args.class_code),
                ("confidentiality_code", args.confidentiality_code),
            )
            if v is not None
        }
        if scope:
            url += "?" + urllib.parse.urlencode(scope)
    request = urllib.request.Request(
        url,
        data=body,
        method=method,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        print(f"xca-gateway: the admin API answered {exc.code}: {detail}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"xca-gateway: cannot reach the admin API at {url}: {exc}", file=sys.stderr)
        return 2
    if args.consent_command == "set":
        print(json.dumps(answer.get("rule", answer)))
    else:
        print(f"{answer.get('revoked', 0)} rule(s) revoked (by {operator})")
    return 0


def cmd_consent(args: argparse.Namespace) -> int:
    if getattr(args, "api", False):
        return _via_api(args)
    try:
        config = _load_from_gateway_config(Path(args.config))
        shared = _shared_database(Path(args.config))
        if shared is not None:
            # Replicas: the rules every replica reads are in the shared database, not in a
            # local file no replica would see.
            service = ConsentService(
                PostgresConsentStore(SharedDatabase(shared, max_size=1), owns_database=True), config
            )
        else:
            service = ConsentService.open(config)
    except (
        ConsentError,
        ConsentStoreUnavailable,
        SharedDatabaseError,
        OSError,
        sqlite3.Error,
    ) as exc:
        print(f"xca-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        action = args.consent_command
        if action == "set":
            rule = service.store.set(
                args.patient,
                args.mode,
                community=args.community,
                class_code=args.class_code,
                confidentiality_code=args.confidentiality_code,
                note=args.note,
                actor=_cli_actor(),
            )
            print(json.dumps(_rule_json(rule)))
        elif action == "revoke":
            count = service.store.revoke(
                args.patient,
                community=args.community,
                class_code=args.class_code,
                confidentiality_code=args.confidentiality_code,
                actor=_cli_actor(),
            )
            print(f"{count} rule(s) revoked")
        elif action == "list":
            rules = (
                service.store.rules_for(args.patient)
                if args.patient
                else service.store.list_rules(limit=args.limit)
            )
            if args.json:
                print(json.dumps([_rule_json(r) for r in rules], indent=2))
            else:
                for r in rules:
                    print(
                        f"{r.patient_id}\t{r.mode}\t{r.community}\t{r.class_code}\t"
                        f"{r.confidentiality_code}\t{r.updated_at}\t{r.note or ''}"
                    )
        elif action == "check":
            codes = [args.confidentiality_code] if args.confidentiality_code else []
            verdict = service.verdicts_for_documents(
                args.patient, args.community, [(args.class_code, codes)]
            )[0]
            print(json.dumps({"allowed": verdict.allowed, "reason": verdict.reason}))
            return 0 if verdict.allowed else 1
        return 0
    except (ConsentError, sqlite3.Error) as exc:
        print(f"xca-gateway: {exc}", file=sys.stderr)
        return 2
    finally:
        service.close()


def add_consent_command(subparsers: Any) -> None:
    """``xca-gateway consent set|revoke|list|check --config FILE ...``."""
    consent = subparsers.add_parser(
        "consent",
        help="manage patient consent to cross-community sharing",
        description="Manage the embedded patient consent store of a community's gateway "
        "(the [consent] section of its configuration). Changes apply to the next request; "
        "the gateway may keep running.",
    )
    actions = consent.add_subparsers(dest="consent_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, metavar="FILE", help="gateway TOML file")

    def api(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--api",
            action="store_true",
            help="make the change through the running gateway's admin API (authenticated with "
            "the operator token from [consent] admin_token_file, audited by the gateway) "
            "instead of writing the store directly",
        )
        p.add_argument(
            "--operator", help="the operator in the token file (default: its only entry)"
        )

    set_p = actions.add_parser("set", help="record an opt-in or opt-out")
    common(set_p)
    set_p.add_argument("--patient", required=True, help="patient id, ID^^^&OID&ISO")
    set_p.add_argument("--mode", required=True, choices=MODES)
    set_p.add_argument(
        "--community", default=ANY, help="requesting homeCommunityId, or * (default) for all"
    )
    set_p.add_argument("--class-code", default=ANY, help="classCode (code or scheme|code), or *")
    set_p.add_argument(
        "--confidentiality-code", default=ANY, help="confidentialityCode (code or scheme|code)"
    )
    set_p.add_argument("--note", help="free text, e.g. the consent document's id")
    api(set_p)
    set_p.set_defaults(func=cmd_consent)

    revoke = actions.add_parser("revoke", help="delete rules (all of the patient's by default)")
    common(revoke)
    revoke.add_argument("--patient", required=True)
    revoke.add_argument("--community")
    revoke.add_argument("--class-code")
    revoke.add_argument("--confidentiality-code")
    api(revoke)
    revoke.set_defaults(func=cmd_consent)

    list_p = actions.add_parser("list", help="show rules")
    common(list_p)
    list_p.add_argument("--patient")
    list_p.add_argument("--limit", type=int, default=1000)
    list_p.add_argument("--json", action="store_true")
    list_p.set_defaults(func=cmd_consent)

    check = actions.add_parser(
        "check", help="would a document be shared? (exit status 0 yes, 1 no)"
    )
    common(check)
    check.add_argument("--patient", required=True)
    check.add_argument("--community", required=True, help="requesting homeCommunityId")
    check.add_argument("--class-code")
    check.add_argument("--confidentiality-code")
    check.set_defaults(func=cmd_consent)


_MAX_BODY = 64 * 1024


_PREFIX = "/consent/patients"


def _json(status: int, body: Any) -> Response:
    return Response(
        status, [("content-type", "application/json")], json.dumps(body).encode() + b"\n"
    )


@dataclass(frozen=True)
class ConsentChange:
    """One rule changed through the admin API: who, which patient, before → after."""

    operator: Principal
    patient_id: str
    before: ConsentRule | None
    after: ConsentRule | None
    # The admin URL the change was made at (the reporting application in the audit record).
    resource: str

    @property
    def action(self) -> Literal["C", "U", "D"]:
        return "C" if self.before is None else "D" if self.after is None else "U"


# RFC 3881 ParticipantObjectDataLifeCycle: Origination/Creation, Amendment, Logical deletion.
_LIFE_CYCLE = {"C": 1, "U": 3, "D": 14}


def _scope(rule: ConsentRule) -> str:
    return (
        f"community={rule.community}; class_code={rule.class_code}; "
        f"confidentiality_code={rule.confidentiality_code}"
    )


def consent_change_audit(
    ctx: AuditContext, change: ConsentChange, *, when: datetime | None = None
) -> AuditMessage:
    """The ATNA record of one consent change: DICOM "Patient Record" (110110).

    Why 110110: a consent directive is part of what the community keeps about the patient, and
    PS3.15 A.5.3.9 audits a patient record being created, modified or deleted, the action code
    (C / U / D) saying which; the patient is the participant object (role Patient, with the
    rule's scope and the mode before and after as details), the operator named by their token
    the requestor, the gateway's admin API the application that made the change.
    """

    rule = change.after or change.before
    assert rule is not None
    details: list[tuple[str, bytes]] = [
        ("ConsentScope", _scope(rule).encode()),
        ("PreviousMode", (change.before.mode if change.before else "none").encode()),
        ("NewMode", (change.after.mode if change.after else "none").encode()),
    ]
    if change.after is not None and change.after.note:
        details.append(("Note", change.after.note.encode()))
    before = change.before.mode if change.before else "no rule"
    after = change.after.mode if change.after else "no rule"
    return m.AuditMessage(
        event=m.EventIdentification(
            event_id=m.CodedValue("110110", "DCM", "Patient Record"),
            action=change.action,
            outcome=m.EventOutcome.SUCCESS,
            date_time=when or datetime.now(UTC),
            outcome_description=(
                f"consent ({_scope(rule)}) {before} -> {after} by {change.operator.name}"
            ),
        ),
        participants=(
            m.ActiveParticipant(
                user_id=change.operator.user_id,
                user_is_requestor=True,
                user_name=change.operator.name,
                network_access_point_id=change.operator.identity.address,
            ),
            m.ActiveParticipant(
                user_id=change.resource,
                user_is_requestor=False,
                alternative_user_id=ctx.process_id,
                network_access_point_id=ctx.host,
                role_id_codes=(m.RoleId.APPLICATION,),
            ),
        ),
        source=ctx.audit_source,
        objects=(
            m.ParticipantObject(
                object_id=change.patient_id,
                id_type_code=m.ParticipantObjectIdType.PATIENT_NUMBER,
                type_code=m.ObjectType.PERSON,
                type_code_role=m.ObjectRole.PATIENT,
                data_life_cycle=_LIFE_CYCLE[change.action],
                details=tuple(details),
            ),
        ),
    )


class ConsentAdminApp:
    """JSON admin API, an ``xca_gateway.protocol.http_server.App`` for the (loopback-only) admin
    port.

    * ``GET /consent/patients[?limit=N&offset=M]``: all rules
    * ``GET /consent/patients/{patient}``: the patient's rules and their history
    * ``PUT /consent/patients/{patient}``: body ``{"mode", "community"?, "class_code"?,
      "confidentiality_code"?, "note"?}``, records (or replaces) a rule
    * ``DELETE /consent/patients/{patient}[?community=&class_code=&confidentiality_code=]``
    * ``GET /consent/decision?patient=&community=[&class_code=&confidentiality_code=]``

    ``{patient}`` is the CX id, percent-encoded (``^`` and ``&`` included). Every request
    passes ``gate`` first (Host header, operator token; see :mod:`xca_gateway.app.admin`); every
    change is reported to ``on_change`` (the gateway audits it) and kept in the store's history
    with the operator's name.
    """

    def __init__(
        self,
        service: ConsentService,
        gate: AdminGate,
        *,
        on_change: Callable[[ConsentChange], None] | None = None,
        base_url: Callable[[], str] = lambda: "",
    ) -> None:
        self.service = service
        self.gate = gate
        self.on_change = on_change
        self.base_url = base_url

    async def __call__(self, request: Request) -> Response:
        resource = self.base_url() + request.path[:200]
        admitted = self.gate.admit(request, resource)
        if isinstance(admitted, Response):
            return admitted
        try:
            return await self._route(request, admitted, resource)
        except BodyTooLarge:
            return _json(413, {"error": f"body larger than {_MAX_BODY} bytes"})
        except ValueError as exc:  # ConsentError included: bad input, never a traceback
            return _json(400, {"error": str(exc)})
        except (sqlite3.Error, ConsentStoreUnavailable) as exc:
            return _json(503, {"error": f"consent store unavailable: {exc}"})

    def _changed(self, change: ConsentChange) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(change)
        except Exception:  # the change is made: a failing report must not undo the answer
            import logging

            logging.getLogger(__name__).exception("reporting a consent change failed")

    async def _route(self, request: Request, operator: Principal, resource: str) -> Response:
        path = request.path.rstrip("/")
        query = urllib.parse.parse_qs(request.query, keep_blank_values=False)

        def param(name: str) -> str | None:
            values = query.get(name)
            return values[0] if values else None

        store = self.service.store
        if path == "/consent/decision":
            if request.method != "GET":
                return _json(405, {"error": "GET only"})
            patient, community = param("patient"), param("community")
            if not patient or not community:
                return _json(400, {"error": "patient and community are required"})
            confs = [c for c in [param("confidentiality_code")] if c]
            verdict = (
                await store.offload(
                    self.service.verdicts_for_documents,
                    patient,
                    community,
                    [(param("class_code"), confs)],
                )
            )[0]
            return _json(200, {"allowed": verdict.allowed, "reason": verdict.reason})
        if path == _PREFIX:
            if request.method != "GET":
                return _json(405, {"error": "GET only"})
            limit = min(int(param("limit") or 1000), 10_000)
            offset = int(param("offset") or 0)
            rules = await store.offload(store.list_rules, limit, offset)
            return _json(200, {"rules": [_rule_json(r) for r in rules]})
        if not path.startswith(_PREFIX + "/"):
            return _json(404, {"error": "not found"})
        patient = urllib.parse.unquote(path[len(_PREFIX) + 1 :])
        if request.method == "GET":
            rules = await store.offload(store.rules_for, patient)
            history = await store.offload(store.history, patient)
            return _json(
                200,
                {
                    "patient": normalize_patient_id(patient),
                    "rules": [_rule_json(r) for r in rules],
                    "history": history,
                },
            )
        if request.method == "PUT":
            body = await request.read(_MAX_BODY)
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                return _json(400, {"error": "body is not JSON"})
            if not isinstance(data, dict) or "mode" not in data:
                return _json(400, {"error": "body must be an object with mode"})
            unknown = set(data) - {
                "mode",
                "community",
                "class_code",
                "confidentiality_code",
                "note",
            }
            if unknown:
                return _json(400, {"error": f"unknown field(s): {', '.join(sorted(unknown))}"})
            if not all(isinstance(v, str) for v in data.values()):
                return _json(400, {"error": "fields must be strings"})
            before, rule = await store.offload(
                lambda: store.change(
                    patient,
                    data["mode"],
                    community=data.get("community", ANY),
                    class_code=data.get("class_code", ANY),
                    confidentiality_code=data.get("confidentiality_code", ANY),
                    note=data.get("note"),
                    actor=operator.name,
                )
            )
            self._changed(ConsentChange(operator, rule.patient_id, before, rule, resource))
            return _json(200, {"rule": _rule_json(rule)})
        if request.method == "DELETE":
            revoked = await store.offload(
                lambda: store.revoke_rules(
                    patient,
                    community=param("community"),
                    class_code=param("class_code"),
                    confidentiality_code=param("confidentiality_code"),
                    actor=operator.name,
                )
            )
            for old in revoked:
                self._changed(ConsentChange(operator, old.patient_id, old, None, resource))
            return _json(200, {"revoked": len(revoked)})
        return Response(
            405, [("allow", "GET, PUT, DELETE"), ("content-type", "application/json")], b"{}\n"
        )
