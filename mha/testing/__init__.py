"""mha.testing: an attention conformance suite anyone can run.

``oracle`` (float64 loop reference) and ``tolerance`` (derived error bounds) need only numpy; the
Hypothesis strategies, the properties and :func:`check` need ``pip install 'mha-twin[testing]'``::

    from mha.testing import check
    from mha.testing.adapters import Adapter

    report = check(Adapter("mine", {"mask", "causal"}, build=my_build))
    print(report)            # property x pass / FAIL (with the minimal falsifying example) / n/a
    report.failed            # names of the properties that failed

An adapter may declare ``conventions`` (:mod:`mha.testing.conventions`: causal alignment, what a query
that sees no key gets, whether NaN inputs stay isolated); :func:`check` holds it to them, and
:func:`detect` finds which ones an implementation follows::

    from mha.testing import detect
    found = detect(my_adapter)          # {"causal": "top_left", "empty_row": "nan", ...}
    found.examples                      # a minimal example for each non-default value

Every call of an implementation runs under a deadline (``timeout=``, 60 s by default) and every answer is
checked against the protocol (a real float array of the right shape, finite where the inputs promise
it): a broken answer fails with :class:`ImplementationError`, "<impl> returned X, expected (B, T, E)
real float"; see :mod:`mha.testing._guard` for what happens to a call that never returns.
"""

from . import conventions, oracle, tolerance

__all__ = ["Detection", "ImplementationError", "Report", "adapters", "check", "conventions", "detect", "oracle", "profiles", "properties",
           "run_property", "strategies", "tolerance", "zoo"]


def __getattr__(name):  # Hypothesis is imported only when the suite is used
    import importlib

    if name in ("check", "run_property", "Report"):
        try:
            mod = importlib.import_module("._check", __name__)
        except ImportError as err:
            raise ImportError(f"mha.testing.{name} needs Hypothesis: pip install 'mha-twin[testing]' ({err})") from err
        return getattr(mod, name)
    if name in ("detect", "Detection"):
        try:
            mod = importlib.import_module("._detect", __name__)
        except ImportError as err:
            raise ImportError(f"mha.testing.{name} needs Hypothesis: pip install 'mha-twin[testing]' ({err})") from err
        return getattr(mod, name)
    if name == "ImplementationError":
        from ._answers import ImplementationError

        return ImplementationError
    if name in ("adapters", "properties", "profiles", "strategies", "zoo"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mha.testing' has no attribute {name!r}")
