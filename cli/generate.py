"""``mha generate TEXT --model FOLDER``: continue TEXT with a decoder checkpoint, showing what the heads
attended to at each new token (read from the attention of that step over the live cache).

--format term streams one line per new token as it comes: the token, and for each layer its strongest
head's top key (or, with --layer/--head, that head's three strongest keys); --format html writes the
step view (``mha.viz.step_report``, at most 8 MiB); --format json the generation and, per step, each
head's strongest keys. A model without a tokenizer reads TEXT as token ids separated by spaces.
"""

from __future__ import annotations

import json
import sys

import click

from ._models import check_text
from ._util import note, output_format, output_path, write_output

JSON_TOP = 3  # keys per head and step in --format json


def _load(folder: str, backend: str, dtype: str):
    import mha.models as mm

    try:
        model = mm.load(folder, backend=backend, dtype=dtype)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--model") from None
    except ImportError as err:
        raise click.ClickException(str(err)) from None
    if not isinstance(model, mm.DecoderModel):
        raise click.BadParameter(f"{folder} is an encoder ({type(model).__name__}); generate needs a decoder "
                                 f"(llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt2)",
                                 param_hint="--model")
    return model


def _label(token: str) -> str:
    """The token quoted for a terminal: JSON's escapes, and \\uXXXX for what JSON leaves raw but a terminal
    would act on or hide (DEL, C1 controls, line separators, format characters)."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in json.dumps(token, ensure_ascii=False))


def _top(row, k: int):
    """[(position, weight)] of the k largest weights of one row (keys at absolute positions)."""
    import numpy as np

    order = np.argsort(-row, kind="stable")[:k]
    return [(int(j), float(row[j])) for j in order]


def _term_line(step: int, token: str, att, tokens: list, layer, head) -> str:
    """One new token: att (layers, H, T, S) of its step; the query is the step's last row."""
    rows = att[:, :, -1]  # (layers, H, S)
    if layer is None:
        parts = []
        for la in range(rows.shape[0]):
            h = int(rows[la].max(-1).argmax()) if head is None else head
            (j, w), = _top(rows[la, h], 1)
            parts.append(f"L{la}H{h} {_label(tokens[j])}({j}) {w:.2f}")
        shown = " | ".join(parts)
    else:
        h = int(rows[layer].max(-1).argmax()) if head is None else head
        shown = f"L{layer}H{h}: " + "  ".join(f"{_label(tokens[j])}({j}) {w:.2f}" for j, w in _top(rows[layer, h], 3))
    return f"{step:>4} {_label(token):<14} <- {shown}"


@click.command()
@click.argument("text")
@click.option("--model", "folder", required=True, metavar="FOLDER", help="A decoder checkpoint folder (config.json, "
              "*.safetensors, tokenizer.json), or a shipped name (induction).")
@click.option("--backend", type=click.Choice(["auto", "numpy", "mlx"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Compute dtype (float16/bfloat16 need --backend mlx).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(1), default=20, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(1), default=None)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--max-cache", type=click.IntRange(1), default=None, help="A rotating cache of this many positions.")
@click.option("--keep", type=click.IntRange(0), default=0, show_default=True,
              help="With --max-cache: first positions never evicted (attention sinks).")
@click.option("--layer", type=int, default=None, help="Show this layer (0-based) in the terminal.")
@click.option("--head", type=int, default=None, help="Show this head (0-based; default: the strongest).")
@click.option("--format", "fmt", type=click.Choice(["term", "html", "json"]), default=None,
              help="Default: from -o's extension (.html, .json), else term.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None, callback=output_path,
              help="Output file (html and json; default stdout).")
@click.option("--roles/--no-roles", default=True, show_default=True,
              help="--format html: add the head-role table (mha heads on 16 repeated random sequences; docs/heads.md).")
def generate(text, folder, backend, dtype, max_new_tokens, temperature, top_k, top_p, seed, max_cache, keep, layer,
             head, fmt, output, roles):
    """Continue TEXT with a decoder model and show, for each new token, what its heads attended to.

    \b
    mha generate "The cat" --model ./qwen2.5-0.5b                  stream tokens and strongest heads
    mha generate "The cat" --model ./llama --layer 3 --head 5       one head's three strongest keys
    mha generate "The cat" --model ./gpt2 --format html -o steps.html   the step view
    """
    # the format from -o's name, checked before any work (-o out.txt or --format term -o FILE: a usage error)
    fmt = output_format(output, fmt, {".json": "json", ".html": "html", ".htm": "html"}) or "term"
    check_text(text)
    model = _load(folder, backend, dtype)
    for name, value, n in (("--layer", layer, model.num_layers), ("--head", head, model.num_heads)):
        if value is not None and not 0 <= value < n:
            raise click.BadParameter(f"{value} is out of range: {model.name} has {n} {name[2:]}s, numbered 0 to "
                                     f"{n - 1}", param_hint=name)
    try:
        prompt = model.prompt_ids(text)
    except (ValueError, TypeError) as err:
        raise click.BadParameter(str(err), param_hint="TEXT") from None
    tokens = model.tokens(prompt)
    stream = fmt == "term"
    if stream:
        shown = ''.join(tokens) if model.tokenizer is not None else ' '.join(map(str, prompt))
        click.echo(f"{model.name}: {len(prompt)} prompt tokens: {shown!r}")

    def on_token(step, ids, att):
        tokens.append(model.tokens(ids)[0])
        if stream:
            click.echo(_term_line(step, tokens[-1], att[0], tokens, layer, head))

    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_cache=max_cache, keep=keep)
    try:
        out = model.generate(prompt, max_new_tokens, attentions=True, on_token=on_token, **kwargs)
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from None
    if stream:
        click.echo(f"text: {out.text!r}" if out.text is not None else f"ids: {' '.join(map(str, out.new_ids))}")
        return
    if fmt == "html":
        import mha.viz as mv

        from ._heads_decoder import step_roles

        page = mv.step_report(out, model=model.name, backend=model.backend, roles=step_roles(model) if roles else None)
        _write(page.html, output)
        if page.note:
            note(f"note: {page.note}")
        return
    _write(json.dumps(_summary(model, out), indent=1), output)


def _summary(model, out) -> dict:
    """--format json: the generation and, per step, each layer's heads' strongest keys."""
    steps = []
    for s, att in enumerate(out.attentions):
        rows = att[:, :, -1]  # (layers, H, S)
        steps.append({"step": s, "query": int(rows.shape[-1] - 1), "token": out.tokens[out.prompt_length + s],
                      "id": int(out.new_ids[s]),
                      "heads": [[_top(rows[la, h], JSON_TOP) for h in range(rows.shape[1])]
                                for la in range(rows.shape[0])],
                      "sink_mass": None if out.sink_mass is None else [[round(float(v), 6) for v in r]
                                                                       for r in out.sink_mass[s]]})
    return {"model": model.name, "family": model.family, "backend": model.backend,
            "num_layers": model.num_layers, "num_heads": model.num_heads, "prompt_length": out.prompt_length,
            "ids": out.ids.tolist(), "tokens": out.tokens, "text": out.text, "finished": bool(out.finished.all()),
            "attention_shapes": [list(a.shape) for a in out.attentions],
            "top": f"per step, layer and head: the {JSON_TOP} strongest keys as [position, weight]", "steps": steps}


def _write(body: str, output) -> None:
    if output:
        write_output(output, lambda f: f.write(body.encode("utf-8")))
    else:
        click.echo(body)
        sys.stdout.flush()
