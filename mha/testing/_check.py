"""Running the property suite against an implementation: :func:`check` and :func:`run_property`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
        na = [(n, d) for n, s, d in self.results if s == "n/a"]
        lines = [f"{self.impl}: {len(self.passed)} pass, {len(self.failed)} FAIL, {len(na)} n/a"
                 + (f" (conventions: {describe(self.conventions)})" if self.conventions else "")]
        for name, status, detail in self.results:
            if status == "fail":
                lines += _wrap(f"FAIL {name}: {_first_failure(detail)}", "  ")
                lines += _wrap(f"rerun: {rerun_call(name, detail)}", "    ")
        if self.passed:
            lines += _wrap("pass: " + ", ".join(self.passed), "  ")
        needs = sorted({f for _, reason in na if reason.startswith("needs ")
                        for f in re.split(r",\s*|\s+or\s+", reason[6:].split(" (")[0])})
        if needs:
            count = sum(reason.startswith("needs ") for _, reason in na)
            lines += _wrap(f"n/a: {count} need features {self.impl} does not declare ({', '.join(needs)})", "  ")
        by_reason: dict = {}
        for name, reason in na:
            if not reason.startswith("needs "):
                by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            lines += _wrap(f"n/a ({reason}): {', '.join(names)}", "  ")
        if self.failed:
            lines += _wrap("rerun a failure: from mha.testing import run_property; then the line under it", "  ")
        return "\n".join(lines)


_BLOB = re.compile(r"^reproduce: (\S+)$", re.M)


def _first_failure(detail: str) -> str:
    """The message and shrunk example of a failure's detail; of several distinct failures, the first,
    with how many more there are."""
    text = _BLOB.sub("", detail).strip()
    parts = re.split(r"\n*\[\d+/(\d+)\] ", "\n" + text)
    if len(parts) > 2:  # "", count, first, count, second, ...
        text = parts[2].strip() + f"\n(and {int(parts[1]) - 1} more distinct failures: see report.results)"
    text = re.sub(r"np\.(?:float|int|bool_?)\w*\(([^()]*)\)", r"\1", text)  # numpy 2's reprs, for reading
    text = re.sub(r"(?<![\w.])-?\d+\.\d{6,}(?:e[-+]?\d+)?", lambda m: f"{float(m.group()):.6g}", text)
    return text.replace("\nfalsifying example: ", "\nexample: ")


def rerun_call(name: str, detail: str = "") -> str:
    """The call of :func:`run_property` that reruns property ``name`` on the implementation ``impl``:
    with the exact shrunk example when ``detail`` (a failure's) carries Hypothesis' reproduce blob."""
    blob = _BLOB.search(detail or "")
    return f"run_property(impl, {name!r}" + (f", reproduce={blob.group(1)!r})" if blob else ")")


def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    """``text`` folded to ``width`` columns, each line (and each of its own lines) indented."""
    import textwrap

    out = []
    for k, line in enumerate(text.splitlines() or [""]):
        first = indent + ("  " if k else "")
        out += textwrap.wrap(line, width, initial_indent=first, subsequent_indent=indent + "    ",
                             break_on_hyphens=False) or [first]
    return out


def _settings(max_examples):
    from hypothesis import HealthCheck, settings

    kwargs = dict(deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors,
                                         HealthCheck.filter_too_much])
    if max_examples is not None:
        kwargs["max_examples"] = int(max_examples)
    return settings(**kwargs)


def run_property(impl, prop: Property | str, *, max_examples: int | None = None, reproduce: str | None = None) -> None:
    """Run one property against ``impl`` under Hypothesis; raises its (shrunk) failure.

    The number of examples defaults to the loaded Hypothesis profile's (see mha.testing.profiles).
    Every example is held to the conventions ``impl`` declares (mha.testing.conventions).
    ``reproduce``: the blob a failure's detail carries ("reproduce: ..."; ``str(report)`` prints the
    call), which replays exactly that shrunk example (with the same Hypothesis version).
    """
    from dataclasses import replace

    from hypothesis import given

    prop = PROPERTIES[prop] if isinstance(prop, str) else prop
    conventions = conventions_of(impl)
    reason = prop.not_applicable(impl.features, conventions)
    if reason:
        raise ValueError(f"{getattr(impl, 'name', impl)!s} cannot express {prop.name}: {reason}")

    @_settings(max_examples)
    @given(prop.strategy(frozenset(impl.features)))
    def run(problem):
        prop.check(impl, replace(problem, conventions=conventions))

    run.__name__ = run.__qualname__ = prop.name
    if reproduce is not None:
        import hypothesis

        run = hypothesis.reproduce_failure(hypothesis.__version__, reproduce.encode("ascii"))(run)
    run()


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


def check(impl, *, properties=None, max_examples: int | None = None) -> Report:
    """Run every property ``impl`` can express; returns a :class:`Report`.

    ``impl`` follows the adapter protocol of :mod:`mha.testing.adapters`. Properties whose features
    ``impl`` does not declare, or that its declared conventions exempt it from, are reported "n/a" with
    the reason; every other property holds it to its declared conventions. ``properties`` restricts the
    run to these names. A failure's detail holds the message and the minimal falsifying example.
    """
    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {', '.join(PROPERTIES)}")
    import numpy as np

    conventions = conventions_of(impl)
    report = Report(getattr(impl, "name", type(impl).__name__), conventions=conventions)
    notes = getattr(impl, "notes", {}) or {}
    for name in names:
        prop = PROPERTIES[name]
        reason = prop.not_applicable(impl.features, conventions)
        if reason:
            why = [notes[f] for f in sorted(prop.requires | prop.requires_any) if f in notes]
            report.results.append((name, "n/a", reason + (f" ({'; '.join(why)})" if why else "")))
            continue
        try:
            with np.errstate(all="ignore"):  # the suite feeds NaN, inf and huge values on purpose: no warnings
                run_property(impl, prop, max_examples=max_examples)
        except Exception as err:  # a property failure or an implementation crash: both are findings
            report.results.append((name, "fail", _describe(err)))
        else:
            report.results.append((name, "pass", ""))
    return report
