"""``mha heads [TEXT...]``: a table of what each head does, on a few sentences or over a corpus."""

from __future__ import annotations

import json

import click

from ._models import describe, encode, load, model_options
from ._util import Progress, note

WIDTH = 100
QUICK = 40  # sentences of the corpus with --quick


@click.command()
@click.argument("texts", nargs=-1, metavar="[TEXT...]")
@model_options
@click.option("--corpus", "corpus_file", type=click.Path(dir_okay=False), default=None,
              help="One sentence per line: roles as corpus statistics, with chance and 95% bootstrap intervals "
                   "(with no TEXT and no --corpus: the shipped corpus of 148 sentences).")
@click.option("--words", is_flag=True, help="Score word-level attention (WordPiece pieces merged).")
@click.option("--json", "as_json", is_flag=True, help="Print the roles as JSON.")
@click.option("--role", "only", multiple=True,
              help="List only heads with this role (repeatable); counts and means stay those of every head.")
@click.option("--quick", is_flag=True, help=f"Corpus: the first {QUICK} sentences and 500 bootstrap resamples, "
                                             "for a first look (wider intervals).")
@click.option("--sequences", type=click.IntRange(2, 10_000), default=32, show_default=True,
              help="Decoders: repeated random token sequences for induction and duplicate (docs/heads.md).")
@click.option("--length", type=click.IntRange(2, 10_000), default=24, show_default=True,
              help="Decoders: tokens in each half of a repeated random sequence.")
def heads(texts, model_name, backend, corpus_file, words, as_json, only, quick, sequences, length):
    """Label every head of a model by what it attends to: previous, next, self, first ([CLS]), last
    ([SEP]), punctuation, same_word, local, broad or content, with a score (docs/roles.md: the method;
    decoders: previous, induction, duplicate, first, sink, self, local, broad, always against chance;
    docs/heads.md). On TEXT (one or a few sentences) as a mean;
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
    if quick and len(sentences) > QUICK:
        note(f"--quick: the first {QUICK} of {len(sentences)} sentences, 500 bootstrap resamples")
        sentences = sentences[:QUICK]
    _corpus(ma, model, sentences, corpus_file, words, as_json, only, 500 if quick else 2000)


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
    """Encodings of ``texts`` (batched through the model for a corpus, with progress), at word level with
    ``words``."""
    import mha.viz as mv

    if batched:
        encs, chunk = [], 16
        with Progress(len(texts), f"encoding {len(texts)} sentences") as bar:
            for start in range(0, len(texts), chunk):
                encs += model.encode_many(list(texts[start:start + chunk]))
                bar.update(len(texts[start:start + chunk]))
    else:
        encs = [encode(model, t) for t in texts]
    return [mv.words_encoding(e) for e in encs] if words else encs


def _texts(ma, model, texts, words, as_json, only):
    encs = _encodings(model, texts, words)
    roles = ma.head_roles([e.attentions for e in encs], [e.tokens for e in encs])
    labels = encs[0].head_labels
    shown = [r for r in roles if not only or r.role in only]
    if as_json:
        click.echo(json.dumps({"model": model.name, "sentences": list(texts), "words": words, "rule": ma.RULE,
                               "heads": [{**r.as_dict(), "label": labels.get((r.layer, r.head))} for r in shown]},
                              indent=1))
        return
    click.echo(describe(model))
    click.echo(f"over {len(texts)} sentence(s)" + (", word level" if words else ""))
    header = f"{'layer':>5} {'head':>4}  {'role':<12} {'score':>5}  strongest other roles"
    if labels:
        header += "  (constructed as)"
    click.echo(header)
    for r in shown:
        others = sorted(((v, k) for k, v in r.scores.items() if k != r.role), reverse=True)[:2]
        line = f"{r.layer:>5} {r.head:>4}  {r.role:<12} {r.score:>5.2f}  " + ", ".join(
            f"{k} {v:.2f}" for v, k in others)
        if labels:
            line += f"  ({labels.get((r.layer, r.head), '')})"
        click.echo(line)
    _footer(ma, roles, shown, only)


def _corpus(ma, model, sentences, corpus_file, words, as_json, only, resamples):
    encs = _encodings(model, sentences, words, batched=True)
    stats = ma.corpus_roles([e.attentions for e in encs], [e.tokens for e in encs], resamples=resamples)
    shown = [s for s in stats if not only or s.role in only]
    name = str(corpus_file) if corpus_file else "shipped corpus"
    if as_json:
        click.echo(json.dumps({"model": model.name, "corpus": name, "sentences": len(sentences), "words": words,
                               "rule": ma.RULE, "heads": [s.as_dict() for s in shown]}, indent=1))
        return
    click.echo(describe(model))
    click.echo(f"over {len(sentences)} sentences ({name}" + (", word level)" if words else ")"))
    click.echo(f"{'layer':>5} {'head':>4}  {'role':<12} {'score':>5}  {'chance':>6}  {'95% interval':<14} specialised")
    for s in shown:
        click.echo(f"{s.layer:>5} {s.head:>4}  {s.role:<12} {s.score:>5.2f}  {s.chance:>6.2f}  "
                   f"[{s.ci[0]:.2f}, {s.ci[1]:.2f}]   {'yes' if s.specialised else 'no'}")
    _by_layer(stats)
    _footer(ma, stats, shown, only, specialised=True)


def _echo(text: str, indent: str = "") -> None:
    import textwrap

    for line in textwrap.wrap(text, WIDTH, subsequent_indent=indent + "  ", break_on_hyphens=False):
        click.echo(line)


def _footer(ma, records, shown, only, specialised: bool = False) -> None:
    """Counts over every head (whatever --role lists), what each role found means, and the rule."""
    if only:
        click.echo(f"(listed: {len(shown)} of {len(records)} heads, --role {' '.join(only)}; the counts and means "
                   f"are over all of them)")
    counts: dict = {}
    for r in records:
        counts[r.role] = counts.get(r.role, 0) + 1
    line = "roles: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    if specialised:
        line += f"; specialised: {sum(r.specialised for r in records)} of {len(records)}"
    _echo(line)
    _echo("where each role's attention goes: " + "; ".join(f"{k}: {ma.GLOSSARY[k]}" for k in ma.ROLES if k in counts))
    _echo(ma.RULE + (" Specialised: the 95% interval (bootstrap over sentences) lies above chance, the score of "
                     "uniform attention over the same sentences; broad heads never are." if specialised else ""))


def _by_layer(stats) -> None:
    """Mean share of attention per layer, over all its heads (whatever --role lists) and the sentences,
    as Clark et al. plot it; broad is the mean normalised entropy."""
    cols = ("first", "last", "punctuation", "self", "previous", "next", "same_word", "local", "broad")
    click.echo("mean per layer (over its heads and the sentences):")
    click.echo(f"{'':<8}" + " ".join(f"{c:>{max(5, len(c))}}" for c in cols))
    for layer in sorted({s.layer for s in stats}):
        rows = [s for s in stats if s.layer == layer]
        click.echo(f"{'layer ' + str(layer):<8}" + " ".join(
            f"{sum(s.scores[c] for s in rows) / len(rows):>{max(5, len(c))}.2f}" for c in cols))
