"""``mha prune``: how much of a model's attention can go? Heads pruned by importance vs at random."""

from __future__ import annotations

import json

import click

from ._models import load
from ._util import Progress, note, output_format, output_path, require


@click.command()
@click.option("--model", "model_name", default="minilm", show_default=True, metavar="NAME|PATH",
              help="A sentence-embedding model (minilm, a folder, or builtin).")
@click.option("--importance", type=click.Choice(["ablation", "gradient"]), default="ablation", show_default=True,
              help="ablation: 1 - cosine to the full model with the head masked; gradient: E|dL/dgate| of an "
                   "InfoNCE loss over paraphrase pairs (MLX autodiff).")
@click.option("--random", "n_random", type=click.IntRange(0, 50), default=3, show_default=True,
              help="Random pruning orders to average as the control.")
@click.option("--fractions", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True,
              help="Comma-separated fractions of heads to prune.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the random orders.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Write the curves as a PNG (needs the plot extra); with --heads: the output folder (new or empty).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--quick", is_flag=True, help="A smaller sample for a first look: importance on 8 "
                                             "pairs, the curve on 8 others, fractions 0.1, 0.3, 0.5, 0.7, 0.9, "
                                             "one random order.")
@click.option("--heads", "prune_heads", multiple=True, metavar="L:H[,H...]",
              help="Decoders: remove these query heads of layer L (repeatable) and write the smaller model to -o "
                   "OUT, a folder transformers loads. Grouped-query attention: remove whole key/value groups or the "
                   "same number of query heads from every group (docs/heads.md).")
@click.option("--kv-heads", "prune_kv", multiple=True, metavar="L:G[,G...]",
              help="Decoders: remove these key/value groups of layer L, with all their query heads (repeatable).")
def prune(model_name, importance, n_random, fractions, seed, output, as_json, quick, prune_heads, prune_kv):
    """Prune a growing fraction of attention heads (weight surgery) and measure how the sentence
    embeddings change: mean cosine to the full model's embedding of the same sentence, and the rank
    agreement (Spearman) of all pairwise similarities. Heads go in order of importance (least important
    first) and, as the control, in random orders; every layer keeps at least one head. Importance is
    measured on the first 16 of the 32 shipped paraphrase pairs and the curve on the other 16 (held out),
    so the ordering cannot simply fit the sentences it is judged on.

    With --heads or --kv-heads (decoder folders): remove those heads by weight surgery and write the
    smaller model to -o OUT, loadable by transformers, equal to the original with those heads masked.

    \b
    mha prune --model ./qwen2 --heads 0:1,5 --heads 3:2,6 -o ./qwen2-pruned
    mha prune --model ./llama --kv-heads 2:0 -o ./llama-pruned     (a whole key/value group of layer 2)
    """
    from ._prune_decoder import prune_decoder, refuse_decoder

    if prune_heads or prune_kv:
        return prune_decoder(model_name, prune_heads, prune_kv, output, as_json)
    refuse_decoder(model_name)
    ctx = click.get_current_context()
    output = output_path(ctx, next(p for p in ctx.command.params if p.name == "output"), output)
    import numpy as np

    import mha.analysis as ma

    output_format(output, None, {".png": "png"})
    if quick:
        fractions, n_random = "0.1,0.3,0.5,0.7,0.9", min(n_random, 1)
    try:
        fracs = [float(f) for f in fractions.split(",") if f.strip()]
    except ValueError:
        raise click.BadParameter(f"not a list of numbers: {fractions!r}", param_hint="--fractions") from None
    if not fracs or not all(0 < f < 1 for f in fracs):
        raise click.BadParameter("fractions must lie strictly between 0 and 1", param_hint="--fractions")
    if importance == "gradient":
        require("mlx.core", "--importance gradient")
    model = load(model_name, "numpy")
    heads = sum(len(ids) for ids in model.head_ids)
    pairs = ma.paraphrase_pairs()
    half = len(pairs) // 2  # importance from the first half of the pairs, the curve on the other half
    if quick:
        pairs = pairs[:8] + pairs[half:half + 8]
        half = 8
    fit = [s for p in pairs[:half] for s in p]
    sents = [s for p in pairs[half:] for s in p]
    steps = heads if importance == "ablation" else 1
    note(f"mha prune: the importance of {heads} heads on {len(fit)} sentences, then {len(fracs)} fractions x "
         f"{1 + n_random} orders on {len(sents)} others" + ("" if quick else "; --quick for a smaller sample"))
    with Progress(steps + len(fracs) * (1 + n_random), "mha prune") as bar:
        if importance == "ablation":
            imp = ma.ablation_importance(model, fit, progress=bar.update)
        else:
            imp = ma.gradient_importance(model, pairs[:half], batch_size=half, progress=bar.update)
        ordered = ma.pruning_curve(model, ma.order_by(imp), fracs, sents, progress=bar.update)
        rng = np.random.default_rng(seed)
        randoms = []
        for _ in range(n_random):
            order = [(layer, h) for layer in range(model.num_layers) for h in model.head_ids[layer]]
            order = [order[i] for i in rng.permutation(len(order))]
            randoms.append(ma.pruning_curve(model, order, fracs, sents, progress=bar.update))
    result = {"model": model.name, "heads": heads, "importance": importance, "sentences": len(sents),
              "importance_sentences": len(fit),
              "importance_values": np.round(imp, 6).tolist(),
              "by_importance": [s.as_dict() for s in ordered],
              "random": [[s.as_dict() for s in r] for r in randoms]}
    if output:
        _plot(result, output)
        note(f"wrote {output}")
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(f"{model.name}: {heads} heads, importance by {importance} on {len(fit)} sentences, curve on "
               f"{len(sents)} held-out sentences, random control: mean of {n_random} orders")
    click.echo(f"{'pruned':>7} {'heads':>5} | {'by importance':^26} | {'random':^17}")
    click.echo(f"{'':>7} {'':>5} | {'cosine':>8} {'rank':>7} {'ms/sent':>8} | {'cosine':>8} {'rank':>7}")
    for i, s in enumerate(ordered):
        rand = (f"{np.mean([r[i].cosine for r in randoms]):>8.4f} "
                f"{np.mean([r[i].rank_agreement for r in randoms]):>7.4f}") if randoms else f"{'-':>8} {'-':>7}"
        click.echo(f"{100 * s.fraction:>6.0f}% {s.pruned:>5} | {s.cosine:>8.4f} {s.rank_agreement:>7.4f} "
                   f"{s.ms_per_sentence:>8.2f} | {rand}")


def _plot(result: dict, path) -> None:
    from mha.viz import pyplot, save_figure

    try:
        plt = pyplot()
    except ImportError as err:
        raise click.ClickException(str(err)) from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "cosine", "mean cosine to the full model"),
                           (axes[1], "rank_agreement", "rank agreement of pairwise similarities")):
        xs = [s["fraction"] * 100 for s in result["by_importance"]]
        ax.plot(xs, [s[key] for s in result["by_importance"]], "o-", label=f"by {result['importance']} importance")
        if result["random"]:
            import numpy as np

            vals = np.array([[s[key] for s in r] for r in result["random"]])
            ax.plot(xs, vals.mean(0), "s--", label=f"random (mean of {len(vals)})")
            ax.fill_between(xs, vals.min(0), vals.max(0), alpha=0.2)
        ax.set_xlabel("heads pruned (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Pruning {result['model']}'s {result['heads']} attention heads "
                 f"({result['sentences']} held-out sentences)")
    fig.tight_layout()
    try:
        save_figure(fig, path)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
