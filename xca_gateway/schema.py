"""The building blocks of the configuration schema (issue 19): one pydantic model per section.

Each subsystem owns the model of its section (``class XxxSection(Section)`` next to the code
that uses it); :mod:`xca_gateway.app.config` composes them into the model of the whole file,
validates every file through it before anything is built, and turns pydantic's errors into one
line each naming the section and key (:func:`error_lines`). The same models generate the
commented reference ``conf/gateway.toml``, the README's configuration table and
``docs/gateway.schema.json`` (:mod:`xca_gateway.app.config_reference`).

TOML has types, so the models are strict: a port written ``"8443"`` is a string, not a port;
``true`` is not a number. Ranges and patterns carry the message an operator reads.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema


class Section(BaseModel):
    """A table of the configuration file (its docstring is the section's description)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    # Written as an inline table (``key = { ... }``) in the reference, not as its own section.
    INLINE: ClassVar[bool] = False


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Range:
    """Bounds of a number (``lo <= v <= hi``, or ``v > 0`` with ``positive``), checked with a
    message that says the range, and written into the JSON Schema."""

    lo: float | None = None
    hi: float | None = None
    positive: bool = False

    def describe(self) -> str:
        if self.positive:
            return "> 0" if self.hi is None else f"> 0, <= {_number(self.hi)}"
        if self.lo is not None and self.hi is not None:
            return f"{_number(self.lo)}..{_number(self.hi)}"
        if self.lo is not None:
            return f">= {_number(self.lo)}"
        return f"<= {_number(self.hi or 0)}"

    def _check(self, value: float) -> float:
        low_ok = value > 0 if self.positive else self.lo is None or value >= self.lo
        if low_ok and (self.hi is None or value <= self.hi):
            return value
        if self.positive and self.hi is None:
            reason = "must be positive"
        elif self.lo is not None and self.hi is None:
            reason = f"must be at least {_number(self.lo)}"
        else:
            reason = f"must be {self.describe()}"
        raise PydanticCustomError(
            "range", "{reason}, got {value}", {"reason": reason, "value": _number(value)}
        )

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        result = handler(schema)
        if self.positive:
            result["exclusiveMinimum"] = 0
        elif self.lo is not None:
            result["minimum"] = self.lo
        if self.hi is not None:
            result["maximum"] = self.hi
        return result


@dataclass(frozen=True)
class Matches:
    """A string of a given form (``what`` names it in the error), with its JSON Schema pattern."""

    pattern: str
    what: str

    def _check(self, value: str) -> str:
        if re.fullmatch(self.pattern, value) is None:
            raise PydanticCustomError(
                "form", "{value} is not {what}", {"value": repr(value), "what": self.what}
            )
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        result = handler(schema)
        result["pattern"] = f"^(?:{self.pattern})$"
        return result


@dataclass(frozen=True)
class OneOf:
    """A string from a set that lives in code (an enum's values), as a JSON Schema enum."""

    values: tuple[str, ...]

    def _check(self, value: str) -> str:
        if value not in self.values:
            expected = ", ".join(repr(v) for v in self.values)
            raise PydanticCustomError(
                "one_of",
                "must be one of {expected}, got {value}",
                {"expected": expected, "value": repr(value)},
            )
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        result = handler(schema)
        result["enum"] = list(self.values)
        return result


class OneOrMany:
    """A list that may also be written as one lone string (``roles = "pacs"``)."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(
            lambda value: [value] if isinstance(value, str) else value, handler(source)
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        inner = handler(schema)
        item = inner.get("items", {"type": "string"}) if isinstance(inner, dict) else {}
        return {"anyOf": [item, inner]}


# The shared vocabulary of the sections.
OID_PATTERN = r"[0-2](\.(0|[1-9][0-9]*))+"
Port = Annotated[int, Range(0, 65535)]  # 0: any free port, for listeners
PeerPort = Annotated[int, Range(1, 65535)]  # a port to connect to
Seconds = Annotated[float, Range(positive=True)]
NonNegativeSeconds = Annotated[float, Range(0)]
Rate = Annotated[float, Range(positive=True)]  # per second
Count = Annotated[int, Range(1)]
NonNegativeCount = Annotated[int, Range(0)]
Bytes = Annotated[int, Range(1)]
NonEmpty = Annotated[str, Field(min_length=1), Matches(r"(?s).*\S.*", "a non-blank string")]
PathText = Annotated[str, Field(min_length=1), Matches(r"(?s).*\S.*", "a path")]
Oid = Annotated[str, Matches(OID_PATTERN, "an OID")]
HomeCommunityId = Annotated[str, Matches(f"urn:oid:{OID_PATTERN}", "urn:oid:<OID>")]
HttpsUrl = Annotated[str, Matches(r"https://\S+", "an https:// URL")]
HttpUrl = Annotated[str, Matches(r"https?://\S+", "an http(s) URL")]
# PS3.5 AE VR: 1-16 characters, no backslash, not only spaces.
AeTitle = Annotated[
    str, Matches(r"(?=.*[^ ])[\x20-\x5b\x5d-\x7e]{1,16}", "a DICOM AE title (1-16 characters)")
]
# A list of strings that may be written as one string (``roles = "pacs"``).
Strings = Annotated[list[str], OneOrMany()]


# --------------------------------------------------------------------------- error messages


def describe_value(value: Any) -> str:
    """A TOML value as an operator wrote it, for messages."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return repr(value)


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "tuple_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _reason(error: Mapping[str, Any], known: Sequence[str]) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {describe_value(value)}"
    if kind == "int_from_float":
        return f"expected an integer, got {value!r}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"must name at least {ctx.get('min_length', 1)}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        close = difflib.get_close_matches(key, [k for k in known if k != key], n=1)
        return "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '?')}, got {describe_value(value)}"
    if kind == "union_tag_invalid":
        expected = ctx.get("expected_tags", "?")
        return f"must be one of {expected}, got {describe_value(ctx.get('tag'))}"
    if kind == "union_tag_not_found":
        return "is required"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The section models found in ``annotation`` (through lists, dicts, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += _models(arg)
    origin = getattr(annotation, "__origin__", None)
    if getattr(annotation, "__metadata__", None) is not None and origin is not None:
        found += _models(origin)
    return found


def _keys(models: Sequence[type[BaseModel]]) -> list[str]:
    return sorted({name for model in models for name in model.model_fields})


def error_lines(exc: ValidationError, data: Any, model: type[BaseModel]) -> list[str]:
    """One line per problem: ``[section.sub[index]] key: reason`` (``section[index]`` counts
    array entries from 0). The path is read from the data, so the names of union branches
    pydantic adds to its locations (an imaging source's kind) do not show."""
    reasons: dict[tuple[str | int, ...], list[str]] = {}
    for error in exc.errors():
        path: list[str | int] = []
        node: Any = data
        models: list[type[BaseModel]] = [model]
        loc = list(error["loc"])
        for position, part in enumerate(loc):
            last = position == len(loc) - 1
            if isinstance(node, list) and isinstance(part, int):
                path.append(part)
                node = node[part] if part < len(node) else None
            elif isinstance(node, Mapping) and (part in node or last):
                fields = [m.model_fields[str(part)] for m in models if str(part) in m.model_fields]
                models = [inner for f in fields for inner in _models(f.annotation)] or models
                path.append(str(part))
                node = node.get(part)
            else:
                continue  # a union branch's name, not a key of the file
            if isinstance(node, Mapping) and len(models) > 1:
                # Several kinds of table (imaging sources): the one the entry names.
                models = [m for m in models if _is_kind(m, node.get("kind"))] or models
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path.append(str((error.get("ctx") or {}).get("discriminator", "kind")).strip("'"))
        reason = _reason(error, _keys(models))
        key = tuple(path)
        earlier = reasons.get(key)
        if earlier and reason.startswith("expected ") and earlier[-1].startswith("expected "):
            # One value against the branches of a union: "expected a string or a table".
            wanted = earlier[-1].split(", got ")[0]
            earlier[-1] = f"{wanted} or {reason[len('expected ') :]}"
        else:
            reasons.setdefault(key, []).append(reason)
    return [_line(path, reason) for path, found in reasons.items() for reason in found]


def _is_kind(model: type[BaseModel], kind: Any) -> bool:
    field = model.model_fields.get("kind")
    return field is not None and kind in typing.get_args(field.annotation)


def _line(path: Sequence[str | int], reason: str) -> str:
    names: list[str] = []
    for part in path:
        if isinstance(part, int) and names:
            names[-1] += f"[{part}]"
        else:
            names.append(str(part))
    if not names:
        return reason
    if len(names) == 1:
        if reason == "is required":
            return f"[{names[0]}]: the section is required"
        if reason == "unknown key" or reason.startswith("unknown key ("):
            return f"unknown section [{names[0]}]" + reason[len("unknown key") :]
        return f"[{names[0]}]: {reason}"
    return f"[{'.'.join(names[:-1])}] {names[-1]}: {reason}"


def validate_section(
    model: type[BaseModel], data: Any, where: Callable[[str], str] = lambda line: line
) -> BaseModel:
    """Validate ``data`` against ``model``; a :class:`ValueError` with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError("\n".join(where(line) for line in error_lines(exc, data, model))) from None
