"""mha.testing: an attention conformance suite anyone can run.

``oracle`` (float64 loop reference) and ``tolerance`` (derived error bounds) need only numpy; the
Hypothesis strategies, properties and :func:`check` need ``pip install 'mha-twin[testing]'``.
"""

from . import oracle, tolerance

__all__ = ["oracle", "tolerance"]
