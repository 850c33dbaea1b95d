"""Typed option sets (dataclasses) built from `{name: value}` dicts, e.g. CLI `key=value`."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, get_type_hints

from prunekit.errors import PrunekitError

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass
class Options:
    """A dataclass of options; subclasses add typed fields with defaults.

    `ranges` bounds numeric fields: `{"blocksize": ">= 1", "percdamp": "> 0"}` (several
    bounds separated by commas, e.g. `">= 0, < 1"`).
    """

    ranges: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Options:
        """Build from `{name: value}` (values may be strings from the CLI), checking names,
        types and ranges."""
        if not isinstance(options, dict):
            raise PrunekitError(f"options must be a mapping of name to value, got {options!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        values = {}
        for key, raw in options.items():
            if key not in fields:
                valid = ", ".join(fields) or "(none)"
                raise PrunekitError(f"unknown option {key!r}; valid: {valid}")
            values[key] = _coerce(key, raw, hints[key])
        for key, bounds in cls.ranges.items():
            value = values.get(key, fields[key].default)
            for bound in bounds.split(","):
                op, _, limit = bound.strip().partition(" ")
                if not _COMPARE[op](value, float(limit)):
                    raise PrunekitError(f"option {key!r} must be {bounds}, got {value!r}")
        return cls(**values)


def _coerce(key: str, raw: Any, hint: Any) -> Any:
    kind = hint if isinstance(hint, type) else None
    if not isinstance(raw, str):
        return _checked_type(key, raw, kind)
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise PrunekitError(f"option {key!r} needs a {kind.__name__}, got {raw!r}") from None
    return raw


def _checked_type(key: str, value: Any, kind: type | None) -> Any:
    """A non-string value (Python API, YAML) of the field's type, or a one-line error."""
    if kind is None:
        return value
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, kind) and not isinstance(value, bool)
    )
    if not ok:
        raise PrunekitError(f"option {key!r} needs a {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def parse_pairs(text: str, separator: str = ",") -> dict[str, str]:
    """`"a=1,b=x"` -> `{"a": "1", "b": "x"}` (dashes in keys become underscores)."""
    options = {}
    for pair in (p.strip() for p in text.split(separator)):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"option {pair!r} must look like key=value")
        options[key.strip().replace("-", "_")] = value.strip()
    return options
