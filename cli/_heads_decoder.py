"""``mha heads --model FOLDER`` on a decoder: the role table against chance (mha.analysis.decoder_roles).

Induction and duplicate are measured on repeated random token sequences; the positional roles on the
texts given (two or more TEXT arguments, or --corpus FILE), on the shipped corpus when the model has a
tokenizer and no text is given, else on the random sequences too. Every record carries its chance and
95% interval; with grouped-query attention a second table pools each key/value group.
"""

from __future__ import annotations

import json
import textwrap

import click



def decoder_heads(ma, model, texts, corpus_file, words, as_json, only, sequences, length) -> None:
    """The command's decoder path (module docstring)."""
    bad = [r for r in only if r not in ma.DECODER_ROLES]
    if bad:
        raise click.BadParameter(f"unknown role {bad[0]!r} for a decoder; roles: {', '.join(ma.DECODER_ROLES)}",
                                 param_hint="--role")
    if words:
        raise click.BadParameter("--words merges WordPiece pieces of encoders; decoders are scored per token",
                                 param_hint="--words")
    if len(texts) == 1:
        raise click.UsageError("a decoder's roles need at least 2 texts (one per argument) or --corpus FILE for an "
                               "interval over texts; with none, they are measured on random token sequences")
    source = None
    if texts:
        source, name = list(texts), f"{len(texts)} texts"
    elif corpus_file is not None or model.tokenizer is not None:
        from .heads import read_corpus

        source = read_corpus(ma, corpus_file)
        name = str(corpus_file) if corpus_file else "the shipped corpus"
    else:
        name = None
    try:
        table = ma.decoder_roles(model, source, sequences=sequences, length=length)
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from None
    shown = [r for r in table.heads if not only or r.role in only]
    groups = [r for r in table.groups if not only or r.role in only]
    grouped = model.num_kv_heads < model.num_heads
    if as_json:
        out = {"model": model.name, "family": model.family, "texts": name, **table.as_dict()}
        out["heads"] = [r.as_dict() for r in shown]
        out["kv_groups"] = [r.as_dict() for r in groups]
        if not grouped:
            out.pop("kv_groups")
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"{model.name}: {model.num_layers} layers x {model.num_heads} heads ({model.num_kv_heads} "
               f"key/value heads); induction and duplicate on {table.sequences} repeated random sequences of 2 x "
               f"{length} tokens, the rest on {name + f' ({len(source)})' if source else 'the same sequences'}")
    _table(shown, "head")
    if grouped:
        click.echo("per key/value group (its query heads pooled):")
        _table(groups, "kv")
    firsts = "; ".join(f"{role} L{top.layer}H{top.head} {top.scores[role] - top.chances[role]:+.2f}"
                       for role in table.roles if role != "broad" for top in table.ranking(role)[:1])
    for line in textwrap.wrap("first in each role (largest score - chance): " + firsts, 100, subsequent_indent="  "):
        click.echo(line)
    counts: dict = {}
    for r in table.heads:
        counts[r.role] = counts.get(r.role, 0) + 1
    click.echo("roles: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
               + f"; specialised: {sum(r.specialised for r in table.heads)} of {len(table.heads)}")
    for line in textwrap.wrap(table.rule + " Specialised: the 95% interval (bootstrap over sequences) lies above "
                              "chance.", 100):
        click.echo(line)


def _table(records, unit: str) -> None:
    """One line per record: (layer, head, its kv head) or (layer, kv head, its query heads)."""
    first, second = ("head", "kv") if unit == "head" else ("kv", "heads")
    click.echo(f"{'layer':>5} {first:>4} {second:>5}  {'role':<10} {'score':>5}  {'chance':>6}  {'95% interval':<14} "
               f"specialised")
    for r in records:
        a, b = (r.head, str(r.kv_head)) if unit == "head" else (r.kv_head, f"{r.heads[0]}-{r.heads[-1]}")
        click.echo(f"{r.layer:>5} {a:>4} {b:>5}  {r.role:<10} {r.score:>5.2f}  {r.chance:>6.2f}  "
                   f"[{r.ci[0]:.2f}, {r.ci[1]:.2f}]   {'yes' if r.specialised else 'no'}")


STEP_SEQUENCES = 16  # repeated random sequences behind the step view's role table


def step_roles(model):
    """The role table of the step view (``mha generate --format html``): induction and duplicate and the
    positional roles on 16 repeated random sequences of up to 24 tokens a half; None for a model whose
    positions cannot hold 2 x 2 tokens."""
    import mha.analysis as ma

    bos = getattr(model.config, "bos_token_id", None) is not None
    length = min(24, (model.max_length - bos) // 2)
    if length < 2:
        return None
    return ma.decoder_roles(model, sequences=STEP_SEQUENCES, length=length)
