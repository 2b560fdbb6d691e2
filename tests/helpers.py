"""Small shared builders for the tests: random weights with non-zero biases, inputs, masks."""

from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np

import mha


def random_weights(E, H, *, Hkv=None, kdim=None, vdim=None, bias=True, seed=0, dtype=np.float32):
    """Weights ~ N(0, 1/E) and biases ~ N(0, 0.5^2) (non-zero, so a dropped bias shows)."""
    rng = np.random.default_rng(seed)
    Hkv = H if Hkv is None else Hkv
    kdim = E if kdim is None else kdim
    vdim = E if vdim is None else vdim
    D = E // H

    def w(o, i):
        return (rng.normal(size=(o, i)) / np.sqrt(i)).astype(dtype)

    def b(n):
        return (0.5 * rng.normal(size=n)).astype(dtype) if bias else None

    return mha.AttentionWeights(
        w(H * D, E), w(Hkv * D, kdim), w(Hkv * D, vdim), w(E, H * D),
        b(H * D), b(Hkv * D), b(Hkv * D), b(E), num_heads=H, num_kv_heads=Hkv,
    )


def normal(shape, seed, dtype=np.float32, sigma=1.0):
    return (sigma * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def random_bool(shape, seed, p=0.7):
    return np.random.default_rng(seed).random(shape) < p


LONG_TEXT = Path(__file__).parent / "data" / "long_text.txt"  # 615 words: 730 MiniLM tokens, cut to 512


def minilm_available() -> bool:
    import mha.models as mm

    try:
        mm.resolve("minilm")
        import tokenizers  # noqa: F401
    except (ValueError, ImportError):
        return False
    return True


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]


def tiny_bert(folder, seed=0):
    """A loadable BERT folder of random weights: config.json (E=6, 3 heads, 2 layers), vocab.txt (11 tokens)
    and model.safetensors. Returns the folder."""
    import json
    from pathlib import Path

    from mha import _io
    from mha.models._bert import BertConfig, _expected_shapes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="bert", vocab_size=len(TINY_VOCAB), hidden_size=6, num_hidden_layers=2,
                  num_attention_heads=3, intermediate_size=10, max_position_embeddings=16, type_vocab_size=2)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    shapes = _expected_shapes(BertConfig.from_file(folder / "config.json"))
    rng = np.random.default_rng(seed)
    _io.save_safetensors(folder / "model.safetensors",
                         {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})
    return folder


def in_threads(fn, n: int) -> None:
    """Run ``fn(i)`` for i in range(n), each on a thread of its own, all at once; re-raise the first
    error any of them hit (after every thread has ended)."""
    import threading

    errors = []

    def run(i):
        try:
            fn(i)
        except BaseException as err:  # noqa: BLE001 - reported on the calling thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def layouts(a: np.ndarray):
    """(name, array) pairs equal to ``a`` value for value, in layouts and byte orders users send."""
    out = []
    for ax in range(a.ndim):
        if a.shape[ax] > 1:
            out.append((f"reversed axis {ax}", np.flip(np.flip(a, ax).copy(), ax)))
    if a.ndim >= 2:
        perm = tuple(reversed(range(a.ndim)))
        out.append(("transposed", np.ascontiguousarray(a.transpose(perm)).transpose(perm)))
        out.append(("Fortran order", np.asfortranarray(a)))
    out.append(("strided", np.repeat(a, 2, axis=-1)[..., ::2]))
    out.append(("reversed twice", a[::-1][::-1]))
    if a.dtype != bool:
        big = a.astype(a.dtype.newbyteorder(">"))
        out += [("big-endian", big), ("big-endian reversed", np.flip(np.flip(big, -1).copy(), -1))]
    return out


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page open at ``url`` (the test is skipped without chromium or playwright);
    JavaScript errors collect in ``page.errors``."""
    import shutil

    import pytest

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium")
    sync = pytest.importorskip("playwright.sync_api")
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        try:
            yield page
        finally:
            browser.close()
