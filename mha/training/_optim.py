r"""Adam with decoupled weight decay and gradient clipping, on numpy parameters.

For each parameter :math:`\theta` with gradient :math:`g` at step t (1-based), after clipping every
gradient by the global norm (:math:`g \leftarrow g \min(1, c / \lVert g \rVert_2)`, the norm over all
parameters together, when ``clip_norm`` = c is set):

.. math::

    m \leftarrow \beta_1 m + (1 - \beta_1) g,\quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2,\quad
    \theta \leftarrow \theta - \eta_t \Big(\frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}
    + \lambda \theta\Big)

with :math:`\eta_t` the learning rate (a number or a function of t) and :math:`\lambda` the weight decay
(AdamW's decoupled form: the decay does not pass through the moments; :math:`\lambda = 0` is Adam).
Parameters are an :class:`mha.AttentionWeights` (its weights and biases) or a mapping of names to arrays,
nested mappings allowed; the gradients come in the same structure (``mha.vjp``'s ``g.weights`` for a
layer). Updates are returned as a new structure of the same kind; the moments live in the optimiser,
float64 whatever the parameters' dtype.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np

from .._weights import AttentionWeights


def _flat(tree, prefix: str = "") -> dict:
    """{dotted name: array} of an AttentionWeights or a (nested) mapping of arrays; None entries skipped."""
    if isinstance(tree, AttentionWeights):
        tree = tree.to_dict()
    if not hasattr(tree, "items"):
        raise TypeError(f"parameters must be an mha.AttentionWeights or a mapping of names to arrays, got "
                        f"{type(tree).__name__}")
    out = {}
    for name, a in tree.items():
        key = f"{prefix}{name}"
        if a is None:
            continue
        if isinstance(a, AttentionWeights) or hasattr(a, "items"):
            out.update(_flat(a, key + "."))
        else:
            out[key] = a
    return out


def _rebuild(tree, values: dict, prefix: str = ""):
    """``tree`` with its arrays replaced by ``values`` (by dotted name)."""
    if isinstance(tree, AttentionWeights):
        d = {n: None if a is None else values[f"{prefix}{n}"] for n, a in tree.to_dict().items()}
        return AttentionWeights(**d, num_heads=tree.num_heads, num_kv_heads=tree.num_kv_heads)
    return {n: (None if a is None else _rebuild(a, values, f"{prefix}{n}.")
                if isinstance(a, AttentionWeights) or hasattr(a, "items") else values[f"{prefix}{n}"])
            for n, a in tree.items()}


def global_norm(grads) -> float:
    """The 2-norm of all gradients together (an AttentionWeights or a mapping of arrays)."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in _flat(grads).values()))


class Adam:
    """Adam / AdamW on numpy parameters (see the module docstring).

    Args:
        learning_rate: eta, a positive number or a function step -> number (step counts from 1).
        betas: (beta1, beta2) in [0, 1).
        eps: epsilon > 0, added to the root of the second moment.
        weight_decay: lambda >= 0, decoupled (AdamW).
        clip_norm: c > 0 to clip the gradients' global norm to c before the update, or None.

    Attributes:
        step: updates made so far; last_norm: the global norm of the last gradients, before clipping.
    """

    def __init__(self, learning_rate=1e-3, *, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 clip_norm: float | None = None):
        if not callable(learning_rate):
            _positive("learning_rate", learning_rate)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        _positive("eps", eps)
        if not isinstance(weight_decay, numbers.Real) or isinstance(weight_decay, bool) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if clip_norm is not None:
            _positive("clip_norm", clip_norm)
        self.learning_rate: float | Callable = learning_rate
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay = float(weight_decay)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.step = 0
        self.last_norm = float("nan")
        self._m: dict = {}
        self._v: dict = {}

    def update(self, params, grads):
        """One step: the updated parameters, a new structure of the kind of ``params``.

        Raises ValueError before changing anything when ``grads`` does not have the parameters' names
        and shapes, holds NaN or inf, or when the parameters change shape between steps."""
        p, g = _flat(params), _flat(grads)
        if set(p) != set(g):
            raise ValueError(f"grads must have the parameters' names: missing {sorted(set(p) - set(g))}, "
                             f"unexpected {sorted(set(g) - set(p))}")
        for n in p:
            if np.shape(g[n]) != np.shape(p[n]):
                raise ValueError(f"gradient of {n} has shape {np.shape(g[n])}, the parameter {np.shape(p[n])}")
            if n in self._m and self._m[n].shape != np.shape(p[n]):
                raise ValueError(f"parameter {n} changed shape from {self._m[n].shape} to {np.shape(p[n])} "
                                 f"since the last step; use a new optimiser")
            if not np.all(np.isfinite(g[n])):
                raise ValueError(f"gradient of {n} holds NaN or inf; nothing was updated")
        norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in g.values()))
        factor = 1.0 if self.clip_norm is None or norm <= self.clip_norm else self.clip_norm / norm
        self.step += 1
        t, (b1, b2) = self.step, self.betas
        lr = float(self.learning_rate(t)) if callable(self.learning_rate) else self.learning_rate
        out = {}
        for n, a in p.items():
            grad = np.asarray(g[n], np.float64) * factor
            m = self._m[n] = b1 * self._m.get(n, 0.0) + (1 - b1) * grad
            v = self._v[n] = b2 * self._v.get(n, 0.0) + (1 - b2) * grad * grad
            theta = np.asarray(a, np.float64)
            step = m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + self.eps) + self.weight_decay * theta
            out[n] = (theta - lr * step).astype(np.asarray(a).dtype)
        self.last_norm = norm
        return _rebuild(params, out)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
