"""``mha demo TEXT``: what each attention head looks at, as heat maps or exported files.

Every format is bounded (``mha.viz.plan``: the terminal's width and 2,000 lines, JSON 32 MiB, HTML
8 MiB, PNG 16 megapixels); what does not fit is left out and one line on stderr says what and how to
choose (--layer, --head, --tokens). ``--view rollout`` and ``--words`` show derived encodings
(``mha.viz.rollout_encoding`` / ``words_encoding``) through the same renderers.
"""

from __future__ import annotations

import os
import shutil
import sys

import click

from ._models import describe, encode, load, model_options
from ._util import note, output_format, output_path, write_output

KINDS = {".txt": "term", ".json": "json", ".html": "html", ".htm": "html", ".png": "png"}


@click.command()
@click.argument("text")
@model_options
@click.option("--layer", "layers", type=int, multiple=True, help="Only this layer (0-based; repeatable).")
@click.option("--head", "heads", type=int, multiple=True, help="Only this head (0-based; repeatable).")
@click.option("--tokens", "window", metavar="A:B", default=None,
              help="Only tokens A to B-1, as a Python slice (0-based; negative from the end), e.g. 0:40, 100: "
                   "or -50:.")
@click.option("--view", type=click.Choice(["heads", "rollout"]), default="heads", show_default=True,
              help="Each head's weights, or attention rollout through each layer (html: the view it opens on).")
@click.option("--words", is_flag=True, help="Word level: WordPiece pieces merged (to a word: sum; from a word: mean).")
@click.option("--top", type=click.IntRange(0, 1000), default=0,
              help="Also list each head's K strongest query -> key links (term, json, html; not png).")
@click.option("--format", "fmt", type=click.Choice(["term", "json", "html", "png"]), default=None,
              help="Terminal heat maps, or a file to share (html: the interactive report). Default: from -o's "
                   "extension (.txt, .json, .html, .png), else term.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None, callback=output_path,
              help="Output file (required for png; the others default to stdout).")
@click.option("--color/--no-color", default=None, help="Colour cells (default: when stdout is a terminal).")
def demo(text, model_name, backend, layers, heads, window, view, words, top, fmt, output, color):
    """Show what each attention head of a model looks at in TEXT.

    \b
    mha demo "The cat sat on the mat."                  heat maps of every head
    mha demo --model minilm --layer 0 --head 2 "..."     one head of a real model
    mha demo --format html -o report.html "..."          the interactive report
    mha demo --view rollout --words "..."                rollout, word by word
    """
    import mha.analysis as ma
    import mha.viz as mv

    fmt = output_format(output, fmt, KINDS, default="term")
    if fmt == "png" and not output:
        raise click.UsageError("--format png needs -o FILE")
    if fmt == "png" and top:
        raise click.BadParameter("lists links as text: in the terminal, JSON or the HTML report, not in a PNG",
                                 param_hint="--top")
    try:  # the slice's form, before any work (whether it keeps a token of the text is known once encoded)
        mv.parse_window(window, 2**62)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--tokens") from None
    if view == "rollout" and heads and fmt != "html":
        raise click.BadParameter("rollout mixes every head of each layer; choose layers only", param_hint="--head")
    model = load(model_name, backend)
    for name, vals, n in (("--layer", layers, model.num_layers), ("--head", heads, model.num_heads)):
        bad = [v for v in vals if not 0 <= v < n]
        if bad:
            raise click.BadParameter(f"{bad[0]} is out of range: {model.name} has {n} "
                                     f"{name[2:]}s, numbered 0 to {n - 1}", param_hint=name)
    enc = encode(model, text)
    constructed = getattr(model, "constructed", False)
    if fmt == "html":
        _working("packing", len(layers or range(model.num_layers)) * len(heads or range(model.num_heads)),
                 len(enc.tokens))
        return _report(mv, enc, model, text, layers, heads, window, view, words, output, constructed, top)
    shown, titles = _shown(mv, enc, view, words)
    width = shutil.get_terminal_size((120, 40)).columns
    pairs = mv.selection(shown.num_layers, shown.num_heads, list(layers) or None,
                         list(heads) or None if view == "heads" else None)
    try:
        plan = mv.plan(fmt, shown.tokens, pairs, window=window, width=width)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--tokens") from None
    roles = ma.head_roles(shown.attentions, shown.tokens) if view == "heads" else None
    data = mv.to_data(shown, text=text, roles=roles, backend=model.backend, pairs=plan.pairs, tokens=plan.tokens,
                      note=plan.note, arrays=fmt != "json", constructed=constructed, titles=titles, top=top)
    if fmt == "term":
        if color is None:  # a file: plain text; NO_COLOR (no-color.org) set to anything: plain text
            color = sys.stdout.isatty() and not output and not os.environ.get("NO_COLOR")
        view_text = describe(model) + "\n" + mv.render_term(data, color=color, width=width, top=top)
        if output:
            write_output(output, lambda f: f.write((view_text + "\n").encode("utf-8")))
        else:
            click.echo(view_text, color=color)
        return
    if fmt != "term":
        _working("drawing" if fmt == "png" else "writing", len(plan.pairs), plan.tokens[1] - plan.tokens[0])
    if fmt == "png":
        try:
            mv.save_png(data, output)
        except (ImportError, ValueError, OSError) as err:  # no matplotlib; a file that cannot be written
            raise click.ClickException(str(err)) from None
        _note(plan.note)
        note(f"wrote {output}")
        return
    _write(mv.to_json(data), output, data.get("note"))


def _shown(mv, enc, view: str, words: bool):
    """(the encoding the panels show, their titles or None): rollout and/or words derived from ``enc``."""
    shown = mv.rollout_encoding(enc) if view == "rollout" else enc
    shown = mv.words_encoding(shown) if words else shown
    titles = {(la, 0): f"rollout L0-{la}" for la in range(enc.num_layers)} if view == "rollout" else None
    return shown, titles


def _report(mv, enc, model, text, layers, heads, window, view, words, output, constructed, top):
    """--format html: the report (model view, head view, rollout; opens on ``view``, at word level with
    ``words``), bounded at 8 MiB."""
    try:
        page = mv.report(enc, text=text, backend=model.backend, constructed=constructed, layers=list(layers) or None,
                         heads=list(heads) or None, tokens=window, view="rollout" if view == "rollout" else "model",
                         words=words, top=top)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--tokens") from None
    _write(page.html, output, page.note)


def _working(what: str, heads: int, tokens: int) -> None:
    """A sign of life on stderr before an export that takes seconds (millions of weights)."""
    if heads * tokens * tokens >= 2_000_000:
        note(f"{what} {heads} heads over {tokens} tokens ...")


def _note(message):
    if message:
        note(f"note: {message}")


def _write(body: str, output, left_out) -> None:
    """``body`` to ``output`` (atomically) or to stdout, with a note on what was left out."""
    if output:
        write_output(output, lambda f: f.write(body.encode("utf-8")))
    else:
        click.echo(body)
    _note(left_out)
