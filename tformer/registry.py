"""A small name -> factory registry, one per design axis (norms, placements, backends, ...).

A registry is a read-only mapping: iterating it yields the registered names, so
``"rmsnorm" in tformer.NORMS`` and ``sorted(tformer.NORMS)`` both work, and adding an entry
is one decorated class or function. Where an axis also takes a class or a callable instead of a
name (norms and placements, timm's ``get_norm_layer`` pattern), ``resolve`` turns either into the
factory, so a one-off entry need not be registered process-wide.
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
        """Decorator: ``@NORMS.register("mynorm")`` above a class adds it under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} is registered under a non-empty string name, got {name!r}")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def choices(self) -> str:
        return ", ".join(repr(n) for n in self._entries)

    def get_or_raise(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(f"{self.field}={name!r} is not a known {self.kind}; valid choices: {self.choices()}")
        return self._entries[name]

    def resolve(self, spec: object) -> T:
        """A registered name -> its entry; a class or other callable -> itself (used as the factory)."""
        if isinstance(spec, str):
            return self.get_or_raise(spec)
        if callable(spec):
            return spec
        raise ConfigError(
            f"{self.field}={spec!r} must be a registered {self.kind} name ({self.choices()}), "
            f"a class, or a callable"
        )

    def __getitem__(self, name: str) -> T:
        return self.get_or_raise(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"
