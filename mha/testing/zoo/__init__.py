"""A zoo of peers: other libraries' attention layers as adapters of the property suite.

Each adapter declares the features it really supports and the conventions it follows (see
mha.testing.conventions); ``adapter(name)`` builds one, ``available()`` lists those whose library
is installed here. Weights come from the suite (mha.AttentionWeights) and are copied into each
library's own layer, built from its own constructor or config class.
"""

from __future__ import annotations

import importlib
import importlib.util

# name -> (module, factory, kwargs, the import it needs)
ZOO = {
    "torch-mha-fast": ("torch_peers", "TorchMHA", {"path": "fast"}, "torch"),
    "torch-mha-weights": ("torch_peers", "TorchMHA", {"path": "weights"}, "torch"),
    "torch-sdpa": ("torch_peers", "TorchSDPA", {}, "torch"),
    "mlx-nn-mha": ("mlx_peers", "MlxNN", {}, "mlx"),
    "mlx-fast-sdpa": ("mlx_peers", "MxFastSDPA", {}, "mlx"),
    "keras-mha": ("keras_peer", "KerasMHA", {}, "keras"),
    "flax-nnx-mha": ("flax_peer", "FlaxMHA", {}, "flax"),
    "hf-bert-eager": ("hf_peers", "HFBert", {"attn": "eager"}, "transformers"),
    "hf-bert-sdpa": ("hf_peers", "HFBert", {"attn": "sdpa"}, "transformers"),
    "hf-llama-eager": ("hf_peers", "HFLlama", {"attn": "eager"}, "transformers"),
    "hf-llama-sdpa": ("hf_peers", "HFLlama", {"attn": "sdpa"}, "transformers"),
}

__all__ = ["ZOO", "adapter", "available", "requirement"]


def requirement(name: str) -> str:
    """The top-level package peer ``name`` needs."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo implementation {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name][3]


def available() -> list[str]:
    """The zoo's names whose library is installed here (found without importing it)."""
    return [n for n, (_, _, _, pkg) in ZOO.items() if importlib.util.find_spec(pkg) is not None]


def adapter(name: str):
    """The adapter of peer ``name``; ImportError naming the package when its library is missing."""
    module, factory, kwargs, pkg = ZOO[name] if name in ZOO else (None, None, None, requirement(name))
    if importlib.util.find_spec(pkg) is None:
        raise ImportError(f"{name} needs {pkg}, which is not installed")
    return getattr(importlib.import_module(f".{module}", __name__), factory)(**kwargs)
