"""``mha demo TEXT``: what each attention head looks at, as heat maps or exported files."""

from __future__ import annotations

import shutil
import sys

import click

from ._models import encode, load, model_options
from ._util import note, output_path, write_output


@click.command()
@click.argument("text")
@model_options
@click.option("--layer", "layers", type=int, multiple=True, help="Only this layer (0-based; repeatable).")
@click.option("--head", "heads", type=int, multiple=True, help="Only this head (0-based; repeatable).")
@click.option("--top", type=click.IntRange(0, 1000), default=0, help="Also list the K strongest query -> key links.")
@click.option("--format", "fmt", type=click.Choice(["term", "json", "html", "png"]), default="term",
              show_default=True, help="Terminal heat maps, or a file to share.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None, callback=output_path,
              help="Output file (required for png; the others default to stdout).")
@click.option("--color/--no-color", default=None, help="Colour cells (default: when stdout is a terminal).")
def demo(text, model_name, backend, layers, heads, top, fmt, output, color):
    """Show what each attention head of a model looks at in TEXT.

    \b
    mha demo "The cat sat on the mat."                  heat maps of every head
    mha demo --model minilm --layer 0 --head 2 "..."     one head of a real model
    mha demo --format html -o heads.html "..."           an interactive head view
    """
    import mha.analysis as ma
    import mha.viz as mv

    if fmt == "png" and not output:
        raise click.UsageError("--format png needs -o FILE")
    model = load(model_name, backend)
    for name, vals, n in (("--layer", layers, model.num_layers), ("--head", heads, model.num_heads)):
        bad = [v for v in vals if not 0 <= v < n]
        if bad:
            raise click.BadParameter(f"{bad[0]} is out of range: {model.name} has {n} "
                                     f"{name[2:]}s, numbered 0 to {n - 1}", param_hint=name)
    enc = encode(model, text)
    roles = ma.head_roles(enc.attentions, enc.tokens)
    data = mv.to_data(enc, text=text, roles=roles, backend=model.backend, layers=list(layers) or None,
                      heads=list(heads) or None, constructed=getattr(model, "constructed", False))
    if fmt == "term":
        use_color = (sys.stdout.isatty() and not output) if color is None else color  # a file: plain text
        shown = mv.render_term(data, color=use_color, width=shutil.get_terminal_size((120, 40)).columns, top=top)
        if output:
            write_output(output, lambda f: f.write((shown + "\n").encode("utf-8")))
        else:
            click.echo(shown, color=use_color)
        return
    if fmt == "png":
        try:
            mv.save_png(data, output)
        except ImportError as err:
            raise click.ClickException(str(err)) from None
        note(f"wrote {output}")
        return
    body = mv.to_json(data) if fmt == "json" else mv.render_html(data)
    if output:
        from mha.io import atomic_write

        atomic_write(output, lambda f: f.write(body.encode("utf-8")))
        note(f"wrote {output}")
    else:
        click.echo(body)
