"""Checked settings objects (``mha_cpu.options``, ``mha_mlx.options``): every assignment is validated
with the project's error standard, and ``with options.override(name=value, ...):`` sets several at once
(all checked before any changes) and restores them on exit, as ``np.errstate`` does.

A backend subclasses :class:`Settings`, names itself in ``_name`` and lists its settings in ``_spec``:
name -> (default, kind, low, what it means), kind "int" (an int >= low), "int?" (the same or None),
"float" (a finite float >= low), "bool", or a tuple of the allowed strings. Settings are process-wide:
an override holds a lock, so two threads' overrides never interleave (calls that run meanwhile see it).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading


class Settings:
    _name = "options"
    _spec: dict = {}
    __slots__ = ()
    _lock = threading.RLock()

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
        object.__setattr__(self, name, self._checked(name, value))

    def _checked(self, name: str, value):
        _default, kind, low, meaning = self._spec[name]
        where = f"{self._name}.{name}"
        if isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"{where} must be one of {', '.join(map(repr, kind))}, got {value!r} ({meaning})")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{where} must be True or False, got {value!r} ({type(value).__name__})")
            return value
        if value is None and kind == "int?":
            return None
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise TypeError(f"{where} must be a finite float >= {low}, got {value!r} ({type(value).__name__})")
            if value < low:
                raise ValueError(f"{where} must be a finite float >= {low}, got {value} ({meaning})")
            return float(value)
        expected = f"an int >= {low}" + (" or None" if kind == "int?" else "")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")
        if value < low:
            raise ValueError(f"{where} must be {expected}, got {value} ({meaning})")
        return int(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._spec) + ")"

    @contextlib.contextmanager
    def override(self, **values):
        """``with settings.override(name=value, ...):`` the values for the block, checked first (an unknown
        name or a bad value raises before anything changes), the previous ones restored on exit."""
        for name, value in values.items():
            if name not in self._spec:
                raise TypeError(f"{self._name} has no setting {name!r}; the settings are {', '.join(self._spec)}")
            self._checked(name, value)
        with self._lock:
            saved = {n: getattr(self, n) for n in values}
            try:
                for n, v in values.items():
                    setattr(self, n, v)
                yield self
            finally:
                for n, v in saved.items():
                    object.__setattr__(self, n, v)

    def copy(self):
        return type(self)(**{n: getattr(self, n) for n in self._spec})

    def restore(self, other) -> None:
        for n in self._spec:
            setattr(self, n, getattr(other, n))
