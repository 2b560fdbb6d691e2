"""``mha heads TEXT...``: a table of what each head does."""

from __future__ import annotations

import json

import click

from ._models import encode, load, model_options


@click.command()
@click.argument("texts", nargs=-1, required=True, metavar="TEXT...")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the roles as JSON.")
@click.option("--role", "only", multiple=True, help="Only heads with this role (repeatable).")
def heads(texts, model_name, backend, as_json, only):
    """Label every head of a model by what it attends to in TEXT (one or several sentences):
    previous, next, self, first ([CLS]), last ([SEP]), punctuation, broad or content, with a score."""
    import mha.analysis as ma

    bad = [r for r in only if r not in ma.ROLES]
    if bad:
        raise click.BadParameter(f"unknown role {bad[0]!r}; roles: {', '.join(ma.ROLES)}", param_hint="--role")
    model = load(model_name, backend)
    encs = [encode(model, t) for t in texts]
    roles = ma.head_roles([e.attentions for e in encs], [e.tokens for e in encs])
    labels = encs[0].head_labels
    roles = [r for r in roles if not only or r.role in only]
    if as_json:
        click.echo(json.dumps({"model": model.name, "sentences": list(texts), "rule": ma.RULE,
                               "heads": [{**r.as_dict(), "label": labels.get((r.layer, r.head))} for r in roles]},
                              indent=1))
        return
    click.echo(f"{model.name}: {model.num_layers} layers x {model.num_heads} heads over {len(texts)} sentence(s)")
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
    counts = {}
    for r in roles:
        counts[r.role] = counts.get(r.role, 0) + 1
    click.echo("roles: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    click.echo(ma.RULE)
