"""mha.testing: an attention conformance suite anyone can run.

``oracle`` (float64 loop reference) and ``tolerance`` (derived error bounds) need only numpy; the
Hypothesis strategies, the properties and :func:`check` need ``pip install 'mha-twin[testing]'``::

    from mha.testing import check
    from mha.testing.adapters import Adapter

    report = check(Adapter("mine", {"mask", "causal"}, build=my_build))
    print(report)            # property x pass / FAIL (with the minimal falsifying example) / n/a
    report.failed            # names of the properties that failed
"""

from . import oracle, tolerance

__all__ = ["Report", "adapters", "check", "oracle", "profiles", "properties", "run_property", "strategies",
           "tolerance"]


def __getattr__(name):  # Hypothesis is imported only when the suite is used
    import importlib

    if name in ("check", "run_property", "Report"):
        try:
            mod = importlib.import_module("._check", __name__)
        except ImportError as err:
            raise ImportError(f"mha.testing.{name} needs Hypothesis: pip install 'mha-twin[testing]' ({err})") from err
        return getattr(mod, name)
    if name in ("adapters", "properties", "profiles", "strategies"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mha.testing' has no attribute {name!r}")
