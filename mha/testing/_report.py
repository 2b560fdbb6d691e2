"""Printing :class:`mha.testing.Report`: what a person reads after :func:`mha.testing.check`.

Each failing property shows its message (the offending values: where, got, expected), the shrunk
example (shapes, masks) and the :func:`mha.testing.run_property` call that replays exactly that example
(Hypothesis' reproduce blob, which the failure's detail carries as its last line, "reproduce: ...").
Lines are folded at 100 columns; numpy 2's ``np.float64(...)`` reprs are shown as plain numbers.
"""

from __future__ import annotations

import re
import textwrap

WIDTH = 100
_BLOB = re.compile(r"^reproduce: (\S+)$", re.M)


def format_report(report) -> str:
    """The text of ``str(report)``."""
    na = [n for n, s, _ in report.results if s == "n/a"]
    conv = ""
    if report.conventions:
        from .conventions import describe

        conv = f" (conventions: {describe(report.conventions)})"
    lines = [f"{report.impl}: {len(report.passed)} pass, {len(report.failed)} FAIL, {len(na)} n/a{conv}"]
    for name in report.failed:
        lines += wrap(f"FAIL {name}: {report.failure(name)}", "  ")
    if report.passed:
        lines += wrap("pass: " + ", ".join(report.passed), "  ")
    for line in report.not_applicable():
        lines += wrap(f"n/a: {line}", "  ")
    if report.failed:
        lines += wrap("to rerun a failure: from mha.testing import run_property, then its rerun line", "  ")
    return "\n".join(lines)


def failure_text(report, name: str) -> str:
    """Message, example and rerun call of the failure of property ``name`` (see Report.failure)."""
    detail = next((d for n, s, d in report.results if n == name and s == "fail"), None)
    if detail is None:
        raise ValueError(f"{report.impl} did not fail {name!r}; failed: {', '.join(report.failed) or 'none'}")
    text = _BLOB.sub("", detail).strip()
    parts = re.split(r"\n*\[\d+/(\d+)\] ", "\n" + text)
    if len(parts) > 2:  # "", count, first, count, second, ...
        text = parts[2].strip() + f"\n(and {int(parts[1]) - 1} more distinct failures)"
    text = re.sub(r"np\.(?:float|int|bool_?)\w*\(([^()]*)\)", r"\1", text)  # numpy 2's scalar reprs
    text = re.sub(r"(?<![\w.])-?\d+\.\d{6,}(?:e[-+]?\d+)?", lambda m: f"{float(m.group()):.6g}", text)
    text = text.replace("\nfalsifying example: ", "\nexample: ")
    blob = _BLOB.search(detail)
    return text + f"\nrerun: run_property(impl, {name!r}" + (f", reproduce={blob.group(1)!r})" if blob else ")")


def na_lines(report) -> list[str]:
    """The n/a properties of ``report`` in a few lines (see Report.not_applicable)."""
    na = [(n, d) for n, s, d in report.results if s == "n/a"]
    needing = [d for _, d in na if d.startswith("needs ")]
    out = []
    if needing:
        feats = sorted({f for d in needing for f in re.split(r",\s*|\s+or\s+", d[6:].split(" (")[0])})
        out.append(f"{len(needing)} need features {report.impl} does not declare ({', '.join(feats)})")
    by_reason: dict = {}
    for name, reason in na:
        if not reason.startswith("needs "):
            by_reason.setdefault(reason, []).append(name)
    out += [f"{', '.join(names)} ({reason})" for reason, names in by_reason.items()]
    return out


def wrap(text: str, indent: str, width: int = WIDTH) -> list[str]:
    """``text`` folded to ``width`` columns: its first line at ``indent``, its other lines two spaces
    further in, continuation lines four."""
    out = []
    for k, line in enumerate(text.splitlines() or [""]):
        first = indent + ("  " if k else "")
        out += textwrap.wrap(line, width, initial_indent=first, subsequent_indent=indent + "    ",
                             break_on_hyphens=False) or [first]
    return out
