"""A small name -> factory registry, one per design axis (norms, placements, backends, ...).

A registry is a read-only mapping: iterating it yields the registered names, so
``"rmsnorm" in tformer.NORMS`` and ``sorted(tformer.NORMS)`` both work, and adding an entry
is one decorated class or function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Maps names to factories; an unknown name raises ``ConfigError`` listing the choices."""

    def __init__(self, kind: str, field: str | None = None):
        self.kind = kind
        self.field = field or kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get_or_raise(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(
                f"{self.field}={name!r} is not a known {self.kind}; valid choices: "
                + ", ".join(repr(n) for n in self._entries)
            )
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get_or_raise(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"
