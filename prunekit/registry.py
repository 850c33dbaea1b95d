"""A named registry of classes (methods, weight updates, allocations)."""

from __future__ import annotations

from typing import Generic, TypeVar

from prunekit.errors import choice_error

T = TypeVar("T", bound=type)


class Registry(dict[str, T], Generic[T]):
    """`{name: class}` filled by the `register` class decorator; `lookup` fails clearly."""

    def __init__(self, kind: str, extra_valid: tuple[str, ...] = ()):
        super().__init__()
        self.kind = kind
        self.extra_valid = extra_valid

    def register(self, cls: T) -> T:
        """Class decorator: make `cls` available by its `name`."""
        if cls.name in self:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice")
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> T:
        """The class registered as `name`, or a one-line error listing the valid names."""
        if name not in self:
            raise choice_error(self.kind, name, [*self.extra_valid, *sorted(self)])
        return self[name]
