"""Small helpers shared by the commands: one-line errors, optional extras."""

from __future__ import annotations

import importlib
import os
import sys
import time

import click

EXTRAS = {"hypothesis": "testing", "tokenizers": "text", "matplotlib": "plot", "mlx": "mlx", "torch": "dev"}


def require(module: str, what: str):
    """Import ``module`` or stop with one line naming the extra that provides it (exit 1)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        how = f"pip install 'mha-twin[{extra}]'" if extra and extra != "dev" else f"pip install {top}"
        raise click.ClickException(f"{what} needs {top}, which is not installed: {how}") from None


class Progress:
    """Progress of a long step on stderr: a bar on a terminal; elsewhere (a log, a pipe) a line
    "label: k/total" at most every ``every`` seconds and one when it ends, so that a run of tens of
    seconds is never silent. ``update(n)`` advances it; use as a context manager."""

    def __init__(self, total: int, label: str, every: float = 5.0):
        self.total, self.label, self.every, self.done = max(1, int(total)), label, every, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            self.bar = click.progressbar(length=self.total, label=label, file=sys.stderr)
        else:
            note(f"{label}: 0/{self.total} ...")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            note(f"{self.label}: {self.done}/{self.total} ({self.last - self.start:.0f} s)")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif exc[0] is None:
            note(f"{self.label}: done in {time.monotonic() - self.start:.1f} s")
        return False


def note(message: str) -> None:
    """A note for the person at the terminal (stderr), never mixed into results."""
    click.echo(message, err=True)


def output_path(ctx, param, value):
    """Click callback for ``-o``: a folder, or a file in a missing folder, is a usage error at once,
    before any work."""
    if value is not None:
        from mha.io import check_writable

        try:
            check_writable(value)
        except (ValueError, OSError) as err:
            raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return value


def output_format(output, fmt, kinds: dict, *, default: str | None = None, option: str = "-o"):
    """The format to write ``output`` in, checked before any work: ``kinds`` maps file extensions (".json")
    to formats. With ``fmt`` None, the extension chooses (``default`` for a name without one, e.g.
    /dev/stdout); an extension that is not in ``kinds``, or one that names another format than ``fmt``,
    is a usage error (``-o report.pdf`` silently wrote another format under that name)."""
    if output is None:
        return fmt or default
    ext = os.path.splitext(str(output))[1].lower()
    known = _either(list(kinds))
    if ext and ext not in kinds:
        raise click.BadParameter(f"{str(output)!r}: cannot write {ext} files; name it {known}"
                                 + (" (or give no extension)" if default else ""), param_hint=option)
    if not ext and default is None:
        raise click.BadParameter(f"{str(output)!r}: name the file {known}", param_hint=option)
    chosen = kinds.get(ext, default)
    if fmt is not None and ext and chosen != fmt:
        raise click.BadParameter(f"{str(output)!r} is a {ext} name but --format is {fmt}: name it "
                                 f"{_either([e for e, k in kinds.items() if k == fmt])}, or drop --format",
                                 param_hint=option)
    return fmt or chosen


def _either(names: list) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def plural(n: int, word: str) -> str:
    """'1 layer', '6 layers'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def write_output(path, write) -> None:
    """``write(fileobj)`` to ``path`` atomically (``mha.io.atomic_write``), failures as one line."""
    from mha.io import atomic_write

    try:
        atomic_write(path, write)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    note(f"wrote {path}")
