"""``mha prune --model FOLDER --heads L:H[,H...] -o OUT``: a decoder checkpoint without some attention
heads, written as a folder transformers loads (mha.models.pruning_plan, DecoderModel.prune_heads and save).

Every check comes before the weights are read: the --heads syntax, the layers and heads against the
folder's config.json, the grouped-query rule (whole key/value groups, or the same number of query heads
from every group), whether the family can state the result (a pruned GPT-2 cannot), and the output
folder (new or empty, writable).
"""

from __future__ import annotations

import json

import click

from ._util import note


def parse_heads(values, option: str = "--heads") -> dict:
    """``{layer: [indices]}`` from repeated ``L:I[,I...]`` strings; BadParameter naming ``option``."""
    out: dict = {}
    for text in values:
        layer, sep, rest = text.partition(":")
        try:
            if not sep:
                raise ValueError
            items = [int(v) for v in rest.split(",") if v.strip()]
            key = int(layer)
        except ValueError:
            raise click.BadParameter(f"{text!r} is not LAYER:INDEX[,INDEX...] (0-based ints, e.g. 0:1,3)",
                                     param_hint=option) from None
        if not items:
            raise click.BadParameter(f"{text!r} names no index after the colon (e.g. {layer}:0)", param_hint=option)
        out.setdefault(key, []).extend(items)
    return out


def _config(model_name: str):
    """(folder, raw config, DecoderConfig) of a decoder folder, read without any weight."""
    import mha.models as mm

    try:
        folder, raw = mm.read_config(model_name)
        if raw.get("model_type", "bert") in mm.ENCODER_TYPES:
            raise ValueError(f"{model_name} is an encoder (model_type {raw.get('model_type', 'bert')!r}): --heads "
                             f"prunes decoder checkpoints; without --heads, mha prune runs the encoder experiment")
        return folder, raw, mm.decoder_config(raw, folder)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--model") from None


def refuse_decoder(model_name: str) -> None:
    """A usage error when ``model_name`` is a decoder folder (or shipped decoder) and no head was named:
    the pruning-curve experiment runs on sentence-embedding models (config.json read, no weight)."""
    import mha.models as mm

    try:
        model_type = mm.read_config(model_name)[1].get("model_type")
    except ValueError:
        return  # not a folder with a config: the encoder path says what is wrong
    if model_type in mm.DECODER_TYPES:
        raise click.BadParameter(f"{model_name} is a decoder (model_type {model_type!r}) and no head to prune was "
                                 f"given: name them with --heads LAYER:HEAD[,HEAD...] or --kv-heads LAYER:GROUP and "
                                 f"-o OUT (without them, mha prune runs the pruning curve of a sentence-embedding "
                                 f"model)", param_hint="--model")


def prune_decoder(model_name: str, heads: tuple, kv_heads: tuple, output, as_json: bool) -> None:
    """The command's decoder path (module docstring)."""
    import mha.models as mm

    spec = parse_heads(heads)
    groups = parse_heads(kv_heads, "--kv-heads")
    if output is None:
        raise click.UsageError("--heads writes a pruned model: give the output folder with -o OUT")
    folder, raw, config = _config(model_name)
    G = config.num_heads // config.num_kv_heads
    for layer, gs in groups.items():
        bad = [g for g in gs if not 0 <= g < config.num_kv_heads]
        if bad:
            raise click.BadParameter(f"{layer}:{bad[0]}: key/value head {bad[0]} is out of range; the model has "
                                     f"{config.num_kv_heads} per layer, 0 to {config.num_kv_heads - 1}",
                                     param_hint="--kv-heads")
        spec.setdefault(layer, []).extend(h for g in gs for h in range(g * G, (g + 1) * G))
    try:
        new_config, kept = mm.pruning_plan(config, raw, spec, folder.name)
    except (ValueError, TypeError) as err:
        raise click.BadParameter(str(err), param_hint="--heads") from None
    try:
        mm.check_output_folder(output)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="-o") from None
    model = mm.load(folder, backend="numpy")
    pruned = model.prune_heads(spec)
    try:
        pruned.save(output)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    note(f"wrote {output}")
    result = {"model": model.name, "output": str(output), "removed": {str(k): sorted(set(v)) for k, v in spec.items()},
              "num_heads": [config.num_heads, new_config.num_heads],
              "num_kv_heads": [config.num_kv_heads, new_config.num_kv_heads],
              "kept": {str(la): [hs for _, hs in live] for la, live in kept.items()},
              "dead_heads": {str(k): v for k, v in pruned.dead_heads.items()}}
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(f"{model.name}: {config.num_layers} layers, query heads {config.num_heads} -> {new_config.num_heads}, "
               f"key/value heads {config.num_kv_heads} -> {new_config.num_kv_heads} per layer")
    for la, live in kept.items():
        gone = sorted(set(spec.get(la, ())))
        dead = pruned.dead_heads.get(la, [])
        click.echo(f"  layer {la}: removed {gone or 'none'}; kept {[hs for _, hs in live]}"
                   + (f"; {len(dead)} dead heads pad it to the common shape (zero o_proj columns)" if dead else ""))
    if pruned.dead_heads:
        click.echo("transformers' config has one head count for every layer: layers that keep fewer heads are padded "
                   "with dead heads (they add nothing); prune the same shape in every layer for a smaller model.")
