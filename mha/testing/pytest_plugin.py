"""A pytest plugin: the property suite as ordinary test items inside a user's own test run.

    pytest --mha-impl mypackage.attention:make_adapter            # one item per property
    pytest --mha-impl mypackage.attention:make_adapter --mha-examples 20

``--mha-impl`` (repeatable) names a factory, ``module:callable``, returning an adapter (see
mha.testing.adapters; an adapter object or class works too). Each property becomes an item
``mha[<adapter name>]::<property>``: it passes, fails with the minimal falsifying example, or is skipped
with the reason when the adapter's features or declared conventions make it n/a. Registered as the
``pytest11`` entry point ``mha`` when mha-twin is installed with Hypothesis; without ``--mha-impl`` it
adds nothing.
"""

from __future__ import annotations

import importlib

import pytest


def load_factory(spec: str):
    """The adapter named by ``spec`` = "package.module:factory" (the factory is called if callable and
    not already an adapter). ValueError naming --mha-impl for a malformed or missing spec."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"--mha-impl must be of the form package.module:factory, got {spec!r}")
    module, attr = spec.split(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ValueError(f"--mha-impl {spec!r}: cannot import {module!r} ({err})") from None
    except AttributeError:
        raise ValueError(f"--mha-impl {spec!r}: module {module!r} has no {attr!r}") from None
    adapter = obj if (hasattr(obj, "build") and not isinstance(obj, type)) or not callable(obj) else obj()
    for need in ("name", "features", "build"):
        if not hasattr(adapter, need):
            raise ValueError(f"--mha-impl {spec!r} gave {type(adapter).__name__}, not an adapter (no {need!r})")
    return adapter


def pytest_addoption(parser):
    group = parser.getgroup("mha", "attention property suite (mha.testing)")
    group.addoption("--mha-impl", action="append", default=[], metavar="MODULE:FACTORY",
                    help="run the property suite on the adapter this factory returns (repeatable)")
    group.addoption("--mha-examples", type=int, default=None, metavar="N",
                    help="Hypothesis examples per property (default: the loaded profile's)")
    group.addoption("--mha-timeout", type=float, default=60.0, metavar="SECONDS",
                    help="the deadline of each call of the implementation (default 60); a call past it fails "
                         "its property, and the implementation is not called again")


class PropertyItem(pytest.Item):
    """One property of the suite on one adapter."""

    def __init__(self, *, adapter, prop, reason, examples, timeout=60.0, **kwargs):
        super().__init__(**kwargs)
        self.adapter, self.prop, self.reason, self.examples, self.timeout = adapter, prop, reason, examples, timeout

    def runtest(self):
        if self.reason:
            pytest.skip(f"n/a: {self.reason}")
        from ._check import run_property

        run_property(self.adapter, self.prop, max_examples=self.examples, timeout=self.timeout)

    def repr_failure(self, excinfo):
        from ._check import _describe

        return f"{self.name}: {_describe(excinfo.value)}"

    def reportinfo(self):
        return self.path, None, self.name


def pytest_collection_modifyitems(session, config, items):
    specs = config.getoption("--mha-impl")
    if not specs:
        return
    from ._guard import guard
    from .conventions import conventions_of
    from .properties import PROPERTIES

    examples = config.getoption("--mha-examples")
    if examples is not None and examples < 1:
        raise pytest.UsageError(f"--mha-examples must be at least 1, got {examples}")
    timeout = config.getoption("--mha-timeout")
    if not timeout > 0:
        raise pytest.UsageError(f"--mha-timeout must be a positive number of seconds, got {timeout}")
    for spec in specs:
        try:
            adapter = guard(load_factory(spec), timeout)  # its declarations checked once, here
            conventions = conventions_of(adapter)
        except (ValueError, TypeError) as err:
            raise pytest.UsageError(f"--mha-impl {spec!r}: {err}") from None
        for prop in PROPERTIES.values():
            reason = prop.not_applicable(adapter.features, conventions, adapter.dtypes)
            items.append(PropertyItem.from_parent(session, name=f"mha[{adapter.name}]::{prop.name}", adapter=adapter,
                                                  prop=prop, reason=reason, examples=examples, timeout=timeout))
