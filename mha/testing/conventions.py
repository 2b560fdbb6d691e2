"""Conventions: what an attention implementation may legitimately choose, declared by its adapter.

The property suite separates *bugs* from *conventions that differ by design*. An adapter may declare
``conventions``, a dict with any of these keys (the first value is the default, this project's):

``"causal"``
    ``"bottom_right"``: query i of T sees keys j <= i + S - T (aligned at the end, as in decoding with
    a cache; MLX, this project). ``"top_left"``: j <= i (torch ``is_causal``, Keras ``use_causal_mask``).
    The two agree when T = S.
``"empty_row"`` (a query that may see no key)
    ``"output_bias"``: zero weights, zero context, the output is b_O. ``"nan"``: NaN weights and a
    NaN output row (softmax over all -inf). ``"mean_value"``: uniform weights over *all* S keys, the
    context is the mean of every value, hidden ones included (what a ``finfo.min`` fill gives).
    ``"unspecified"``: any value; the suite checks nothing on such rows (but still every other row).
``"nonfinite"``
    ``"isolated"``: NaN/inf at a hidden key or value never reaches the output; at a visible one it
    makes exactly the rows that see it NaN. ``"propagates"``: no promise; the NaN properties check only
    rows that see no non-finite input at all (rows of other batch elements).
``"sink_weights"`` (implementations with learned sinks, feature "sinks")
    ``"dropped"``: the weights cover the S real keys and each row sums to 1 - its sink's share (this
    project; transformers' eager gpt-oss drops the sink's column alike). ``"column"``: S + 1 columns,
    the last one the sink's share, rows summing to 1.

:func:`conventions_of` reads and checks an adapter's declaration; :func:`with_conventions` wraps an
adapter with other conventions (``mha check --conventions detected`` uses it with
:func:`mha.testing.detect`'s findings).
"""

from __future__ import annotations

CONVENTIONS = {
    "causal": ("bottom_right", "top_left"),
    "empty_row": ("output_bias", "nan", "mean_value", "unspecified"),
    "nonfinite": ("isolated", "propagates"),
}
CONVENTIONS["sink_weights"] = ("dropped", "column")  # what weights an implementation with learned sinks returns
DEFAULTS = {key: values[0] for key, values in CONVENTIONS.items()}
INCONSISTENT = "inconsistent"  # what detect() reports for an implementation that follows none
ERROR = "error"  # what detect() reports when a probe crashed or broke the adapter protocol (no convention)


def validate(conventions, *, argument: str = "conventions") -> dict:
    """The full conventions dict (defaults filled in) for a partial declaration; ValueError/TypeError
    naming ``argument`` for an unknown key or value."""
    if conventions is None:
        return dict(DEFAULTS)
    if not isinstance(conventions, dict):
        raise TypeError(f"{argument} must be a dict such as {{'causal': 'top_left'}}, "
                        f"got {type(conventions).__name__}")
    out = dict(DEFAULTS)
    for key, value in conventions.items():
        if key not in CONVENTIONS:
            raise ValueError(f"{argument}: unknown convention {key!r}; known: {', '.join(CONVENTIONS)}")
        if value not in CONVENTIONS[key]:
            raise ValueError(f"{argument}[{key!r}] must be one of {', '.join(CONVENTIONS[key])}, got {value!r}")
        out[key] = value
    return out


def conventions_of(impl) -> dict:
    """The conventions ``impl`` declares (its ``conventions`` attribute), defaults filled in."""
    return validate(getattr(impl, "conventions", None), argument=f"{getattr(impl, 'name', 'impl')}.conventions")


class _Declared:
    """An adapter seen with other conventions: every attribute is the wrapped adapter's."""

    def __init__(self, impl, conventions: dict):
        self._impl = impl
        self.conventions = conventions

    def __getattr__(self, name):
        return getattr(self._impl, name)


def with_conventions(impl, conventions: dict):
    """``impl`` declaring ``conventions`` instead (missing keys: impl's own declaration). Values
    "inconsistent" or "n/a" (from :func:`mha.testing.detect`) keep the impl's own declaration: the
    suite then shows where the implementation contradicts it; "error" likewise."""
    own = conventions_of(impl)
    chosen = {k: v for k, v in dict(conventions).items() if v not in (INCONSISTENT, ERROR, "n/a")}
    return _Declared(impl, validate({**own, **chosen}))


def describe(conventions: dict) -> str:
    """``causal=top_left, empty_row=nan`` (only the values that differ from the defaults; "defaults")."""
    diff = [f"{k}={v}" for k, v in conventions.items() if DEFAULTS.get(k) != v]
    return ", ".join(diff) if diff else "defaults"
