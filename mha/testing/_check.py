"""Running the property suite against an implementation: :func:`check` and :func:`run_property`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ._answers import ImplementationError, Malformed
from ._guard import DEFAULT_TIMEOUT, NoAnswer, guard
from .conventions import conventions_of, describe
from .properties import PROPERTIES, Property


@dataclass
class Report:
    """What :func:`check` found. ``results``: (property, "pass" | "fail" | "n/a", detail) in suite order."""

    impl: str
    results: list = field(default_factory=list)
    conventions: dict = field(default_factory=dict)  # the conventions the implementation was held to

    @property
    def failed(self) -> list[str]:
        return [name for name, status, _ in self.results if status == "fail"]

    @property
    def passed(self) -> list[str]:
        return [name for name, status, _ in self.results if status == "pass"]

    def as_dict(self) -> dict:
        return {"impl": self.impl, "conventions": dict(self.conventions),
                "results": [{"property": n, "status": s, "detail": d} for n, s, d in self.results]}

    def __str__(self) -> str:
        """A summary line; each failing property with its message, shrunk example and a line that reruns
        it; then the passing properties and the n/a ones grouped by reason; at most 100 columns a line."""
        from ._report import format_report

        return format_report(self)

    def failure(self, name: str) -> str:
        """Property ``name``'s failure to read: its message and shrunk example (of several distinct
        failures, the first and how many more), and the :func:`run_property` call that replays it."""
        from ._report import failure_text

        return failure_text(self, name)

    def not_applicable(self) -> list[str]:
        """The n/a properties in a few lines: how many need features the implementation does not declare
        (and which), then the others grouped by reason."""
        from ._report import na_lines

        return na_lines(self)


def _settings(max_examples):
    from hypothesis import HealthCheck, settings

    kwargs = dict(deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors,
                                         HealthCheck.filter_too_much])
    if max_examples is not None:
        kwargs["max_examples"] = int(max_examples)
    return settings(**kwargs)


def run_property(impl, prop: Property | str, *, max_examples: int | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, reproduce: str | None = None) -> None:
    """Run one property against ``impl`` under Hypothesis; raises its (shrunk) failure.

    The number of examples defaults to the loaded Hypothesis profile's (see mha.testing.profiles).
    Every example is held to the conventions ``impl`` declares (mha.testing.conventions). Every call
    of ``impl`` must answer within ``timeout`` seconds and every answer must follow the adapter
    protocol (mha.testing._guard: shape, real float dtype, finite where the inputs promise it), or the
    property fails with an :class:`ImplementationError` saying what came back. ``reproduce``: the blob
    a failure's detail carries ("reproduce: ..."; ``str(report)`` prints the call), which replays
    exactly that shrunk example (with the same Hypothesis version).
    """
    from dataclasses import replace

    from hypothesis import given

    prop = PROPERTIES[prop] if isinstance(prop, str) else prop
    impl = guard(impl, timeout)
    conventions = conventions_of(impl)
    reason = prop.not_applicable(impl.features, conventions, impl.dtypes)
    if reason:
        raise ValueError(f"{impl.name} cannot express {prop.name}: {reason}")
    stop = []  # the first call that hung or answered something malformed, and its example

    @_settings(max_examples)
    @given(prop.strategy(impl.features))
    def run(problem):
        if stop:  # nothing more to learn: the remaining examples pass without calling impl
            return
        try:
            prop.check(impl, replace(problem, conventions=conventions))
        except (NoAnswer, Malformed) as err:
            stop[:] = [err, problem]

    run.__name__ = run.__qualname__ = prop.name
    if reproduce is not None:
        import hypothesis

        run = hypothesis.reproduce_failure(hypothesis.__version__, reproduce.encode("ascii"))(run)
    run()
    if stop:
        err, problem = stop
        example = "" if str(err).startswith("not called") else f"; falsifying example: {problem!r}"
        raise ImplementationError(f"{err}{example}")


def _describe(err: BaseException) -> str:
    """The message and the falsifying example; for several distinct failures, each of them."""
    group = getattr(err, "exceptions", None)  # an ExceptionGroup (the backport on Python 3.10)
    if isinstance(group, (tuple, list)) and group:
        return "\n".join(f"[{i + 1}/{len(group)}] {_describe(e)}" for i, e in enumerate(group))
    head = f"{type(err).__name__}: {err}" if not isinstance(err, AssertionError) else str(err)
    notes = getattr(err, "__notes__", [])
    found = [re.search(r"Problem\(.*?\)(?=[,\s]*(#|\)\s*$))", " ".join(n.split())) for n in notes if "Problem(" in n]
    blobs = [m.group(1) for n in notes for m in [re.search(r"@reproduce_failure\('[^']*', b'([^']*)'\)", n)] if m]
    return "\n".join([head.strip()] + [f"falsifying example: {m.group(0)}" for m in found if m]
                     + [f"reproduce: {b}" for b in blobs[:1]])


def check(impl, *, properties=None, max_examples: int | None = None,
          timeout: float | None = DEFAULT_TIMEOUT) -> Report:
    """Run every property ``impl`` can express; returns a :class:`Report`.

    ``impl`` follows the adapter protocol of :mod:`mha.testing.adapters`; its declarations (name,
    features, build, dtypes, notes, conventions) are checked first (TypeError/ValueError naming the
    attribute). Properties whose features ``impl`` does not declare, or that its declared conventions
    exempt it from, are reported "n/a" with the reason; every other property holds it to its declared
    conventions. ``properties`` restricts the run to these names. A failure's detail holds the message
    and the minimal falsifying example. Each call of ``impl`` must answer within ``timeout`` seconds
    (None: no deadline); after one that does not, the remaining properties fail without calling it.
    """
    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {', '.join(PROPERTIES)}")
    import numpy as np

    impl = guard(impl, timeout)
    conventions = conventions_of(impl)
    report = Report(impl.name, conventions=conventions)
    notes = getattr(impl, "notes", {}) or {}
    for name in names:
        prop = PROPERTIES[name]
        reason = prop.not_applicable(impl.features, conventions, impl.dtypes)
        if reason:
            why = [notes[f] for f in sorted(prop.requires | prop.requires_any) if f in notes]
            report.results.append((name, "n/a", reason + (f" ({'; '.join(why)})" if why else "")))
            continue
        try:
            with np.errstate(all="ignore"):  # the suite feeds NaN, inf and huge values on purpose: no warnings
                run_property(impl, prop, max_examples=max_examples, timeout=timeout)
        except Exception as err:  # a property failure or an implementation crash: both are findings
            report.results.append((name, "fail", _describe(err)))
        else:
            report.results.append((name, "pass", ""))
    return report
