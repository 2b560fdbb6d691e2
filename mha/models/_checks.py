"""Checking a checkpoint's tensors against the config that describes them, for every model loader.

A config that declares fewer layers than the weights hold, a tensor the model does not know, one it
needs and lacks, or a shape that disagrees with the config's sizes: each is a ``ValueError`` listing
every such key (with expected and received shapes), never a model that loads silently wrong.
"""

from __future__ import annotations

import re

_SHOWN = 6  # keys listed per kind before "(and N more)"


def _listed(keys) -> str:
    keys = sorted(keys, key=_natural)
    more = f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return "[" + ", ".join(repr(k) for k in keys[:_SHOWN]) + "]" + more


def _natural(key: str):
    """Sort key reading runs of digits as numbers (layer 10 after layer 9)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def layer_indices(names, pattern: str) -> list[int]:
    """The sorted distinct layer indices in ``names``, read by ``pattern`` (a regex whose first group
    is the index, matched at the start of a name, e.g. ``r"encoder\\.layer\\.(\\d+)\\."``)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def check_tensors(where, tensors: dict, expected: dict, *, ignored=(), layers=None, config="config.json") -> None:
    """Raise ``ValueError`` naming ``where`` unless ``tensors`` ({name: array}) holds every name of
    ``expected`` ({name: shape}) with that shape, and nothing else but names matching one of the
    regexes ``ignored`` (parts of a checkpoint a model does not use: a pooler, a language-model head).

    ``layers``: ``(declared, field, pattern)``, the number of layers ``config`` declares in ``field``
    and the regex (first group: the index) that finds layer indices in names; a disagreement with the
    layers the weights hold is reported first, by count (the most common way a config and its weights
    part: a config edited or copied from a smaller model).
    """
    skip = [re.compile(p) for p in ignored]
    problems = []
    if layers is not None:
        declared, field, pattern = layers
        held = layer_indices(tensors, pattern)
        if held and held != list(range(declared)):
            span = f"{held[0]}-{held[-1]}" if held == list(range(held[0], held[-1] + 1)) else str(held)
            problems.append(f"{config} declares {field}={declared} but the weights hold {len(held)} layers "
                            f"({span})")
    unexpected = [k for k in tensors if k not in expected and not any(r.match(k) for r in skip)]
    missing = [k for k in expected if k not in tensors]
    wrong = [f"{k}: expected {tuple(expected[k])}, got {tuple(tensors[k].shape)}"
             for k in sorted(expected, key=_natural) if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if wrong:
        more = f" (and {len(wrong) - _SHOWN} more)" if len(wrong) > _SHOWN else ""
        problems.append("wrong shapes: " + "; ".join(wrong[:_SHOWN]) + more)
    if problems:
        raise ValueError(f"{where}: the weights do not fit {config}: " + "; ".join(problems))
