"""Checked settings objects (``mha_cpu.options``, ``mha_mlx.options``): every assignment is validated
with the project's error standard, and a backend's settings can be copied and restored (its
``small_blocks`` test aid does).

A backend subclasses :class:`Settings`, names itself in ``_name`` and lists its settings in ``_spec``:
name -> (default, kind, low, what it means), kind "int" (an int >= low), "int?" (the same or None) or
"bool".
"""

from __future__ import annotations

import numbers


class Settings:
    _name = "options"
    _spec: dict = {}
    __slots__ = ()

    def __init__(self, **values):
        unknown = set(values) - set(self._spec)
        if unknown:
            raise TypeError(f"{self._name} has no setting {sorted(unknown)[0]!r}; the settings are "
                            f"{', '.join(self._spec)}")
        for name, (default, *_rest) in self._spec.items():
            setattr(self, name, values.get(name, default))

    def __setattr__(self, name, value):
        if name not in self._spec:
            raise AttributeError(f"{self._name} has no setting {name!r}; the settings are {', '.join(self._spec)}")
        _default, kind, low, meaning = self._spec[name]
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{self._name}.{name} must be True or False, got {value!r} ({type(value).__name__})")
            return object.__setattr__(self, name, value)
        optional = kind == "int?"
        if value is None and optional:
            return object.__setattr__(self, name, None)
        expected = f"an int >= {low}" + (" or None" if optional else "")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{self._name}.{name} must be {expected}, got {value!r} ({type(value).__name__})")
        if value < low:
            raise ValueError(f"{self._name}.{name} must be {expected}, got {value} ({meaning})")
        object.__setattr__(self, name, int(value))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._spec) + ")"

    def copy(self):
        return type(self)(**{n: getattr(self, n) for n in self._spec})

    def restore(self, other) -> None:
        for n in self._spec:
            setattr(self, n, getattr(other, n))
