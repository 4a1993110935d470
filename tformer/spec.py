"""``Spec``: the one frozen, serializable description a model class keeps of itself.

Every saveable class (blocks, stacks, models) holds ``self.spec``, a frozen dataclass whose fields
are exactly its constructor's arguments, so ``cls.from_spec(model.spec)`` rebuilds it and
``tformer.save`` / ``tformer.load`` read and write nothing else. ``to_dict`` gives plain JSON data
(nested ``BlockConfig`` / ``LayerContext`` as dicts, tuples as lists); ``from_dict`` reverses it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _nested_class(hint) -> type | None:
    """The dataclass a type hint names (``BlockConfig``, ``LayerContext | None``), if any."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


@dataclass(frozen=True)
class Spec:
    """Base of the per-class specs; subclasses list the constructor's arguments as fields.

    Lists (per-layer placements) are stored as tuples, so a spec stays hashable-by-value and compares
    equal however the caller passed them.
    """

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> Spec:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}; fields: {', '.join(sorted(names))}")
        values = {}
        for name, value in data.items():
            nested = _nested_class(hints[name])
            values[name] = nested(**value) if nested is not None and isinstance(value, dict) else value
        return cls(**values)

    def kwargs(self) -> dict:
        """The constructor arguments, shallow (nested configs stay objects)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class BuiltFromSpec:
    """Mixin of the saveable classes: ``cls.from_spec(spec)`` calls the constructor with the spec's fields."""

    @classmethod
    def from_spec(cls, spec: Spec):
        return cls(**spec.kwargs())
