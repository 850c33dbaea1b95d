"""Typed option sets (dataclasses) built from `{name: value}` dicts, e.g. CLI `key=value`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, get_type_hints

from prunekit.errors import PrunekitError


@dataclass
class Options:
    """A dataclass of options; subclasses add typed fields with defaults."""

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Options:
        """Build from `{name: value}` (values may be strings from the CLI), checking names."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        values = {}
        for key, raw in options.items():
            if key not in fields:
                valid = ", ".join(fields) or "(none)"
                raise PrunekitError(f"unknown option {key!r}; valid: {valid}")
            values[key] = _coerce(key, raw, hints[key])
        return cls(**values)


def _coerce(key: str, raw: Any, hint: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = hint if isinstance(hint, type) else None
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
