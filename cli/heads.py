"""``mha heads [TEXT...]``: a table of what each head does, on a few sentences or over a corpus."""

from __future__ import annotations

import json

import click

from ._models import encode, load, model_options
from ._util import note


@click.command()
@click.argument("texts", nargs=-1, metavar="[TEXT...]")
@model_options
@click.option("--corpus", "corpus_file", type=click.Path(dir_okay=False), default=None,
              help="One sentence per line: roles as corpus statistics, with chance and 95% bootstrap intervals "
                   "(with no TEXT and no --corpus: the shipped corpus of 148 sentences).")
@click.option("--words", is_flag=True, help="Score word-level attention (WordPiece pieces merged).")
@click.option("--json", "as_json", is_flag=True, help="Print the roles as JSON.")
@click.option("--role", "only", multiple=True, help="Only heads with this role (repeatable).")
@click.option("--sequences", type=click.IntRange(2, 10_000), default=32, show_default=True,
              help="Decoders: repeated random token sequences for induction and duplicate (docs/heads.md).")
@click.option("--length", type=click.IntRange(2, 10_000), default=24, show_default=True,
              help="Decoders: tokens in each half of a repeated random sequence.")
def heads(texts, model_name, backend, corpus_file, words, as_json, only, sequences, length):
    """Label every head of a model by what it attends to: previous, next, self, first ([CLS]), last
    ([SEP]), punctuation, broad or content, with a score (decoders: previous, induction, duplicate,
    first, sink, self, local, broad, always against chance; docs/heads.md). On TEXT (one or a few sentences) as a mean;
    over a corpus (--corpus FILE, or the shipped one when no TEXT is given) with what uniform attention
    would score (chance) and a 95% bootstrap interval over sentences: a head is specialised only when
    the interval clears chance."""
    import mha.analysis as ma

    bad = [r for r in only if r not in ma.ROLES and r not in ma.DECODER_ROLES]
    if bad:
        raise click.BadParameter(f"unknown role {bad[0]!r}; roles: {', '.join(ma.ROLES)} (decoders: "
                                 f"{', '.join(ma.DECODER_ROLES)})", param_hint="--role")
    if texts and corpus_file:
        raise click.UsageError("give TEXT or --corpus FILE, not both")
    model = load(model_name, backend)
    if hasattr(model, "num_kv_heads") and hasattr(model, "generate"):
        from ._heads_decoder import decoder_heads

        return decoder_heads(ma, model, texts, corpus_file, words, as_json, only, sequences, length)
    bad = [r for r in only if r not in ma.ROLES]
    if bad:
        raise click.BadParameter(f"role {bad[0]!r} is a decoder role; roles: {', '.join(ma.ROLES)}",
                                 param_hint="--role")
    if texts:
        return _texts(ma, model, texts, words, as_json, only)
    sentences = read_corpus(ma, corpus_file)
    if corpus_file is None:
        note(f"no TEXT: the shipped corpus of {len(sentences)} sentences (mha/analysis/data/corpus.txt)")
    _corpus(ma, model, sentences, corpus_file, words, as_json, only)


def read_corpus(ma, corpus_file) -> list:
    """The sentences of --corpus FILE (None: the shipped corpus), at least 2; one-line usage errors."""
    try:
        sentences = ma.corpus(corpus_file)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--corpus") from None
    if len(sentences) < 2:
        raise click.BadParameter(f"{corpus_file}: a corpus needs at least 2 sentences, one per line",
                                 param_hint="--corpus")
    return sentences


def _encodings(model, texts, words: bool, batched: bool = False):
    """Encodings of ``texts`` (batched through the model for a corpus), at word level with ``words``."""
    import mha.viz as mv

    encs = model.encode_many(list(texts)) if batched else [encode(model, t) for t in texts]
    return [mv.words_encoding(e) for e in encs] if words else encs


def _texts(ma, model, texts, words, as_json, only):
    encs = _encodings(model, texts, words)
    roles = ma.head_roles([e.attentions for e in encs], [e.tokens for e in encs])
    labels = encs[0].head_labels
    roles = [r for r in roles if not only or r.role in only]
    if as_json:
        click.echo(json.dumps({"model": model.name, "sentences": list(texts), "words": words, "rule": ma.RULE,
                               "heads": [{**r.as_dict(), "label": labels.get((r.layer, r.head))} for r in roles]},
                              indent=1))
        return
    click.echo(f"{model.name}: {model.num_layers} layers x {model.num_heads} heads over {len(texts)} sentence(s)"
               + (", word level" if words else ""))
    header = f"{'layer':>5} {'head':>4}  {'role':<12} {'score':>5}  strongest other roles"
    if labels:
        header += "  (constructed as)"
    click.echo(header)
    for r in roles:
        others = sorted(((v, k) for k, v in r.scores.items() if k != r.role), reverse=True)[:2]
        line = f"{r.layer:>5} {r.head:>4}  {r.role:<12} {r.score:>5.2f}  " + ", ".join(
            f"{k} {v:.2f}" for v, k in others)
        if labels:
            line += f"  ({labels.get((r.layer, r.head), '')})"
        click.echo(line)
    _counts(roles)
    click.echo(ma.RULE)


def _corpus(ma, model, sentences, corpus_file, words, as_json, only):
    encs = _encodings(model, sentences, words, batched=True)
    stats = [s for s in ma.corpus_roles([e.attentions for e in encs], [e.tokens for e in encs])
             if not only or s.role in only]
    name = str(corpus_file) if corpus_file else "shipped corpus"
    if as_json:
        click.echo(json.dumps({"model": model.name, "corpus": name, "sentences": len(sentences), "words": words,
                               "rule": ma.RULE, "heads": [s.as_dict() for s in stats]}, indent=1))
        return
    click.echo(f"{model.name}: {model.num_layers} layers x {model.num_heads} heads over {len(sentences)} sentences "
               f"({name}" + (", word level)" if words else ")"))
    click.echo(f"{'layer':>5} {'head':>4}  {'role':<12} {'score':>5}  {'chance':>6}  {'95% interval':<14} specialised")
    for s in stats:
        click.echo(f"{s.layer:>5} {s.head:>4}  {s.role:<12} {s.score:>5.2f}  {s.chance:>6.2f}  "
                   f"[{s.ci[0]:.2f}, {s.ci[1]:.2f}]   {'yes' if s.specialised else 'no'}")
    _counts(stats, specialised=True)
    _by_layer(ma, stats)
    click.echo(ma.RULE + " Specialised: the 95% interval (bootstrap over sentences) lies above chance, the score "
               "of uniform attention over the same sentences; broad heads never are.")


def _counts(records, specialised: bool = False) -> None:
    counts: dict = {}
    for r in records:
        counts[r.role] = counts.get(r.role, 0) + 1
    line = "roles: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    if specialised:
        line += f"; specialised: {sum(r.specialised for r in records)} of {len(records)}"
    click.echo(line)


def _by_layer(ma, stats) -> None:
    """Mean share of attention per layer (over its heads and the sentences), as Clark et al. plot it."""
    cols = ("first", "last", "punctuation", "self", "previous", "next", "broad")
    click.echo("mean per layer (over heads and sentences): " + "  ".join(cols))
    for layer in sorted({s.layer for s in stats}):
        rows = [s for s in stats if s.layer == layer]
        means = [sum(s.scores[c] for s in rows) / len(rows) for c in cols]
        click.echo(f"  layer {layer}: " + "  ".join(f"{c} {m:.2f}" for c, m in zip(cols, means)))
