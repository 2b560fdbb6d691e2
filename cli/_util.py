"""Small helpers shared by the commands: one-line errors, optional extras."""

from __future__ import annotations

import importlib

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


def write_output(path, write) -> None:
    """``write(fileobj)`` to ``path`` atomically (``mha.io.atomic_write``), failures as one line."""
    from mha.io import atomic_write

    try:
        atomic_write(path, write)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    note(f"wrote {path}")
