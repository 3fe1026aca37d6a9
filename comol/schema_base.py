"""The machinery of the config schema (comol/schema.py): a strict pydantic base class, the field types used by
every group, and the translation of pydantic's errors into comol's one-line ``key=value is invalid: expected ...``.

Why pydantic v2 and not Hydra structured configs: two groups are registries whose fields depend on a value
(``adapter`` on ``adapter.name``: a dataclass per registered adapter; ``dataset`` on ``dataset.source``;
``eval`` on ``eval.task``). OmegaConf structured configs cannot dispatch on a field (a group has one
dataclass), their numeric types coerce ``"1e8"`` silently and they carry no ranges; pydantic has tagged
unions, ranges, ``strict`` types (``true`` is not an integer, ``"maybe"`` is not a boolean, ``1e8`` is not an
integer), validates the whole tree at once, reports every problem with its location, and keeps the help
text (``Field(description=...)``) beside the type. The composed Hydra config stays the source of values;
the schema only checks it (``comol.schema.validate_config``).

The text after "expected" is written from the field's type and bounds (``expected_text``), so a range is
stated once, where the field is declared; a field can override it with ``json_schema_extra={"expected":...}``.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Iterable, Literal, Mapping, Union, get_args, get_origin

import annotated_types as at
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from comol.errors import ConfigError

NoneType = type(None)


class Schema(BaseModel):
    """A group of config keys: strict types (no silent coercion), unknown keys refused."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)


# ----------------------------------------------------------------------------------------------- field types

def Key(description: str, expected: str | None = None, **kw: Any) -> Any:  # noqa: N802 - a Field factory
    """``Field`` with help text (``python run.py --help``) and an optional hand-written "expected" phrase."""
    extra = {"expected": expected} if expected else None
    return Field(description=description, json_schema_extra=extra, **kw)


PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2 ** 32 - 1)]          # what lightning.seed_everything accepts
Finite = Annotated[float, Field(allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]   # dropout-like: [0, 1)
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]      # (0, 1]
UnitInterval = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # [0, 1]
NonEmptyStr = Annotated[str, Field(min_length=1)]


# ----------------------------------------------------------------------------------------------- "expected ..."

def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bounds(metadata: Iterable[Any]) -> tuple[dict[str, Any], bool, int | None]:
    """(ge/gt/le/lt found in the metadata, finite only, min_length)."""
    out: dict[str, Any] = {}
    finite, min_len = False, None
    for m in metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(m, name, None) is not None and isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt, at.Interval)):
                out[name] = getattr(m, name)
        if getattr(m, "allow_inf_nan", None) is False:
            finite = True
        if isinstance(m, at.MinLen):
            min_len = m.min_length
    return out, finite, min_len


def _range(b: Mapping[str, Any]) -> str:
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _literal(values: tuple) -> str:
    shown = [repr(v) if isinstance(v, str) else "null" if v is None else str(v).lower() if isinstance(v, bool)
             else str(v) for v in values]
    return shown[0] if len(shown) == 1 else ("one of " + ", ".join(shown) if len(shown) > 2 else " or ".join(shown))


def expected_text(tp: Any, metadata: Iterable[Any] = ()) -> str:
    """What a value of type ``tp`` (with the bounds in ``metadata``) must be, in words."""
    metadata = list(metadata)
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        meta = [x for m in meta for x in (m.metadata if isinstance(m, FieldInfo) else [m])]
        return expected_text(base, [*metadata, *meta])
    if tp is NoneType:
        return "null"
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        parts = [expected_text(a) for a in args if a is not NoneType]
        return " or ".join(parts + (["null"] if NoneType in args else []))
    if origin is Literal:
        return _literal(get_args(tp))
    b, finite, min_len = _bounds(metadata)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _range(b)
    if tp is float:
        return ("a finite number" if finite and not b else "a number") + _range(b)
    if tp is str:
        return "a non-empty string" if min_len else "a string"
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        size = f" of {min_len}" if min_len and any(isinstance(m, at.MaxLen) and m.max_length == min_len
                                                  for m in metadata) else ""
        return f"a list{size}" + ("" if item is Any else f" (each {expected_text(item)})")
    if origin is dict:
        return "a mapping" + ("" if not min_len else " with at least one entry")
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"a mapping with keys {', '.join(public_fields(tp))}"
    return "a valid value"


def field_expected(info: FieldInfo) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("expected") or expected_text(info.annotation, info.metadata)


def public_fields(cls: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in cls.model_fields.items()]


# ----------------------------------------------------------------------------------------------- errors

class SchemaError(ConfigError):
    """One or more config values are invalid. ``problems``: one line each; the message is the first (plus a
    count of the others: every one of them is printed or logged by whoever catches this)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        more = len(self.problems) - 1
        super().__init__(self.problems[0] + (f" (and {more} more problem{'s' * (more > 1)}: "
                                              f"{'; '.join(p.split(' ', 1)[0] for p in self.problems[1:])})"
                                              if more else ""))


def plain_config(node: Any) -> Any:
    """``node`` as plain Python values: an OmegaConf node resolved to dicts/lists, any other mapping copied to a
    dict, anything else (a scalar, None) as it is. An interpolation or ``???`` that cannot resolve is one line."""
    if OmegaConf.is_config(node):
        try:
            return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "config"
            reason = str(e).splitlines()[0]
            raise SchemaError([f"{key} cannot be resolved: {reason}"]) from None
    return dict(node) if isinstance(node, Mapping) else node


def show(value: Any, width: int = 80) -> str:
    """A value as it goes into a one-line message."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def invalid(key: str, value: Any, expected: str) -> str:
    return f"{key}={show(value)} is invalid: expected {expected}"


def _unwrap(tp: Any) -> Any:
    """The type inside Annotated[...] / Optional[...] (for walking an error location)."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType) and len([a for a in get_args(tp) if a is not NoneType]) == 1:
            tp = next(a for a in get_args(tp) if a is not NoneType)
        else:
            return tp


def _models_of(tp: Any) -> list[type[BaseModel]]:
    if get_origin(tp) in (Union, types.UnionType):
        return [a for a in map(_unwrap, get_args(tp)) if isinstance(a, type) and issubclass(a, BaseModel)]
    return []


def _field(cls: type[BaseModel], item: Any) -> tuple[str, FieldInfo] | None:
    for name, info in cls.model_fields.items():
        if item in (name, info.alias):
            return info.alias or name, info
    return None


def _tag_of(cls: type[BaseModel], tag: Any) -> bool:
    for info in cls.model_fields.values():
        if get_origin(info.annotation) is Literal and tag in get_args(info.annotation):
            return True
    return tag == cls.__name__


def locate(root: type[BaseModel], loc: tuple, prefix: str = "") -> tuple[str, Any, FieldInfo | None, type | None]:
    """(dotted key, type, FieldInfo of the last field, model holding it) of a pydantic error location.
    Union branch labels and tags in ``loc`` are skipped; dict keys and list indices become key parts."""
    parts = [prefix] if prefix else []
    tp: Any = root
    info: FieldInfo | None = None
    owner: type | None = None
    for item in loc:
        u = _unwrap(tp)
        if isinstance(u, type) and issubclass(u, BaseModel):
            found = _field(u, item)
            if found is None:
                continue
            name, info = found
            owner = u
            parts.append(name)
            tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        elif (models := _models_of(u)) and any(_tag_of(m, item) for m in models):
            tp = next(m for m in models if _tag_of(m, item))
        elif get_origin(u) is dict and isinstance(item, str):
            parts.append(item)
            tp, info = get_args(u)[1] if get_args(u) else Any, None
        elif get_origin(u) is list and isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            tp, info = get_args(u)[0] if get_args(u) else Any, None
    return ".".join(parts), tp, info, owner


def problem_line(root: type[BaseModel], err: Mapping[str, Any], prefix: str = "") -> str:
    """One line for one pydantic error: ``key=value is invalid: expected ...`` (or the validator's own line)."""
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and isinstance(ctx.get("error"), ConfigError):
        return str(ctx["error"])
    key, tp, info, owner = locate(root, loc, prefix)
    if kind == "extra_forbidden":
        holder = _unwrap(tp)
        known = public_fields(holder) if isinstance(holder, type) and issubclass(holder, BaseModel) else []
        return (f"{key + '.' if key else ''}{loc[-1]} is not a key of {key or 'the config'}"
                + (f"; known keys: {', '.join(known)}" if known else ""))
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "")).strip("'")
        tags = " or ".join(t.strip() for t in str(ctx.get("expected_tags", "")).split(","))
        full = f"{key}.{disc}" if key else disc
        if kind == "union_tag_not_found":
            return f"{full} is missing: expected {tags}"
        return invalid(full, ctx.get("tag"), tags)
    expected = field_expected(info) if info is not None else expected_text(tp)
    if kind == "missing":
        return f"{key} is missing: expected {expected}"
    if kind in ("value_error", "assertion_error"):
        return f"{key}={show(err.get('input'))} is invalid: {err['msg'].removeprefix('Value error, ')}"
    return invalid(key, err.get("input"), expected)


def problems_of(root: type[BaseModel], error: ValidationError, prefix: str = "") -> list[str]:
    """Every problem of a ValidationError, one line each, one per key (a union reports each branch: the
    first line of a key stands for all)."""
    lines: dict[str, str] = {}
    for err in error.errors(include_url=False):
        line = problem_line(root, err, prefix)
        lines.setdefault(line.split("=", 1)[0].split(" ", 1)[0], line)
    return list(lines.values())


def check(cls: type[BaseModel], values: Any, prefix: str = "") -> BaseModel:
    """``cls.model_validate(values)``, or a SchemaError listing every problem (keys under ``prefix``)."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise SchemaError(problems_of(cls, e, prefix)) from None
