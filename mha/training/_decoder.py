r"""A trainable decoder of the project's ``mha_attn_only`` family, on token ids, its gradients by ``mha.vjp``.

The family (docs/training.md; the loader ``mha.models.load`` reads the same folder)::

    x_0 = E[ids] (+ P[positions])                  # (B, T, E): token (and learned position) embeddings
    x_{l+1} = x_l + attn_l(x_l, causal=True)       # L layers of this project's MultiHeadAttention
    logits = x_L W_lm^T                            # (B, T, V); W_lm = E when tied

No norms and no MLP: what the model computes, its attention heads compute. config.json holds
``model_type`` "mha_attn_only", ``vocab_size`` V, ``hidden_size`` E, ``num_hidden_layers`` L,
``num_attention_heads`` H, ``num_key_value_heads``, ``head_dim`` D, ``max_position_embeddings``,
``attention_bias``, ``positions`` ("learned" or "rope", with ``rope_theta``) and ``tie_word_embeddings``;
model.safetensors ``embed_tokens.weight`` (V, E), ``embed_positions.weight`` (P, E) when learned,
``layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (+ ``.bias``) and ``lm_head.weight`` unless tied.

Backward for the mean cross-entropy over the positions a mask selects: the softmax's gradient into the
logits, through W_lm, then each layer's pull-back from ``mha.vjp`` added to the residual stream's, then
the embeddings by scatter-add. Parameters are a nested mapping (``params``) that
:class:`mha.training.Adam` updates.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import numpy as np

from .. import _io
from .._layer import MultiHeadAttention
from .._rope import RoPE
from .._vjp import vjp
from .._weights import AttentionWeights

MODEL_TYPE = "mha_attn_only"
_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "max_position_embeddings", "attention_bias", "positions", "tie_word_embeddings")
_PROJ = (("q_weight", "q_proj.weight"), ("k_weight", "k_proj.weight"), ("v_weight", "v_proj.weight"),
         ("o_weight", "o_proj.weight"), ("q_bias", "q_proj.bias"), ("k_bias", "k_proj.bias"),
         ("v_bias", "v_proj.bias"), ("o_bias", "o_proj.bias"))


def check_config(config: dict) -> dict:
    """The config with every key of the family checked (ValueError naming the key otherwise)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {config.get('model_type')!r}")
    missing = [k for k in _KEYS if k not in config]
    if missing:
        raise ValueError(f"config misses {missing}")
    for k in _KEYS[:7]:
        v = config[k]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"config {k} must be a positive int, got {v!r}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ValueError(f"config num_key_value_heads={config['num_key_value_heads']} must divide "
                         f"num_attention_heads={config['num_attention_heads']}")
    if config["positions"] not in ("learned", "rope"):
        raise ValueError(f"config positions must be 'learned' or 'rope', got {config['positions']!r}")
    if config["positions"] == "rope" and not isinstance(config.get("rope_theta"), numbers.Real):
        raise ValueError(f"config rope_theta must be a number with positions 'rope', got {config.get('rope_theta')!r}")
    for k in ("attention_bias", "tie_word_embeddings"):
        if not isinstance(config[k], bool):
            raise ValueError(f"config {k} must be true or false, got {config[k]!r}")
    return config


class AttnOnlyDecoder:
    """The ``mha_attn_only`` decoder (module docstring), trainable on numpy (or MLX) through ``mha.vjp``.

    ``params``: {"embed_tokens": (V, E), "embed_positions": (P, E) (learned positions), "lm_head": (V, E)
    (untied), "layers": {"0": AttentionWeights, ...}}, float32 numpy arrays.
    """

    def __init__(self, config: dict, params: dict, backend: str = "numpy"):
        self.config = check_config(dict(config))
        self.backend = backend
        self.layers = []
        self.set_params(params)

    @classmethod
    def init(cls, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, max_positions: int, *,
             num_kv_heads: int | None = None, head_dim: int | None = None, attention_bias: bool = False,
             positions: str = "learned", rope_theta: float = 10000.0, tie_word_embeddings: bool = False,
             seed: int = 0, backend: str = "numpy") -> "AttnOnlyDecoder":
        """A freshly initialised model: embeddings ~ N(0, 1/E)... (token) and N(0, 0.02^2)... (positions),
        each layer's projections Xavier-uniform (mha.AttentionWeights.init), lm_head ~ N(0, 1/E)."""
        config = {"model_type": MODEL_TYPE, "vocab_size": vocab_size, "hidden_size": hidden_size,
                  "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
                  "num_key_value_heads": num_kv_heads or num_heads, "head_dim": head_dim or hidden_size // num_heads,
                  "max_position_embeddings": max_positions, "attention_bias": attention_bias,
                  "positions": positions, "tie_word_embeddings": tie_word_embeddings}
        if positions == "rope":
            config["rope_theta"] = float(rope_theta)
        check_config(config)
        rng = np.random.default_rng(seed)
        E, V = hidden_size, vocab_size
        params = {"embed_tokens": (rng.normal(size=(V, E)) / np.sqrt(E)).astype(np.float32), "layers": {}}
        if positions == "learned":
            params["embed_positions"] = (0.5 * rng.normal(size=(max_positions, E)) / np.sqrt(E)).astype(np.float32)
        if not tie_word_embeddings:
            params["lm_head"] = (rng.normal(size=(V, E)) / np.sqrt(E)).astype(np.float32)
        for i in range(num_layers):
            params["layers"][str(i)] = AttentionWeights.init(
                E, num_heads, num_kv_heads=config["num_key_value_heads"], head_dim=config["head_dim"],
                bias=attention_bias, seed=int(rng.integers(2**31)))
        return cls(config, params, backend)

    # -- parameters and files --------------------------------------------------------------------
    def set_params(self, params: dict) -> None:
        """Take new parameters (the structure of :attr:`params`), e.g. after an optimiser step."""
        c = self.config
        E, V = c["hidden_size"], c["vocab_size"]
        want = {"embed_tokens": (V, E)}
        if c["positions"] == "learned":
            want["embed_positions"] = (c["max_position_embeddings"], E)
        if not c["tie_word_embeddings"]:
            want["lm_head"] = (V, E)
        for n, shape in want.items():
            if n not in params or np.shape(params[n]) != shape:
                raise ValueError(f"params[{n!r}] must have shape {shape}, got "
                                 f"{np.shape(params[n]) if n in params else 'nothing'}")
        layers = params.get("layers", {})
        if sorted(layers, key=int) != [str(i) for i in range(c["num_hidden_layers"])]:
            raise ValueError(f"params['layers'] must hold layers 0..{c['num_hidden_layers'] - 1}, got {sorted(layers)}")
        self.params = {n: np.asarray(params[n], np.float32) for n in want}
        self.params["layers"] = dict(layers)
        rope = RoPE(base=c["rope_theta"]) if c["positions"] == "rope" else None
        if len(self.layers) == c["num_hidden_layers"]:
            for layer, i in zip(self.layers, range(c["num_hidden_layers"])):
                layer.set_weights(layers[str(i)])
        else:
            self.layers = [MultiHeadAttention.from_weights(layers[str(i)], backend=self.backend, rope=rope)
                           for i in range(c["num_hidden_layers"])]

    def state_dict(self) -> dict:
        """{safetensors name: array} of the family's layout (module docstring)."""
        out = {"embed_tokens.weight": self.params["embed_tokens"]}
        if "embed_positions" in self.params:
            out["embed_positions.weight"] = self.params["embed_positions"]
        for i, w in sorted(self.params["layers"].items(), key=lambda kv: int(kv[0])):
            for ours, theirs in _PROJ:
                a = getattr(w, ours)
                if a is not None:
                    out[f"layers.{i}.self_attn.{theirs}"] = np.ascontiguousarray(a, np.float32)
        if "lm_head" in self.params:
            out["lm_head.weight"] = self.params["lm_head"]
        return out

    def save(self, folder) -> Path:
        """Write config.json and model.safetensors into ``folder`` (made if missing); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _io.save_safetensors(folder / "model.safetensors", self.state_dict(), {"format": "pt"})
        _io.atomic_write(folder / "config.json",
                         lambda f: f.write(json.dumps(self.config, indent=1).encode() + b"\n"))
        return folder

    @classmethod
    def load(cls, folder, backend: str = "numpy") -> "AttnOnlyDecoder":
        """The model a :meth:`save` wrote (or any folder of the family)."""
        folder = Path(folder)
        config = check_config(json.loads((folder / "config.json").read_text()))
        tensors, _ = _io.load_safetensors(folder / "model.safetensors")
        params = {n: tensors.pop(f"{n}.weight") for n in ("embed_tokens", "embed_positions", "lm_head")
                  if f"{n}.weight" in tensors}
        params["layers"] = {}
        for i in range(config["num_hidden_layers"]):
            w = {ours: tensors.pop(f"layers.{i}.self_attn.{theirs}", None) for ours, theirs in _PROJ}
            params["layers"][str(i)] = AttentionWeights(**w, num_heads=config["num_attention_heads"],
                                                        num_kv_heads=config["num_key_value_heads"])
        if tensors:
            raise ValueError(f"{folder / 'model.safetensors'}: unexpected tensors {sorted(tensors)}")
        return cls(config, params, backend)

    # -- forward and backward --------------------------------------------------------------------
    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim not in (1, 2) or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be (T,) or (B, T) integers, got {ids.dtype} {ids.shape}")
        ids = ids.reshape(-1, ids.shape[-1]) if ids.ndim == 2 else ids[None]
        V, P = self.config["vocab_size"], self.config["max_position_embeddings"]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"ids must lie in [0, {V}), got values from {ids.min()} to {ids.max()}")
        if ids.shape[1] > P:
            raise ValueError(f"ids hold {ids.shape[1]} positions, more than max_position_embeddings={P}")
        return ids

    def _lm_head(self) -> np.ndarray:
        return self.params.get("lm_head", self.params["embed_tokens"])

    def embed(self, ids) -> np.ndarray:
        """(B, T, E): token embeddings plus learned position embeddings."""
        x = self.params["embed_tokens"][ids]
        if "embed_positions" in self.params:
            x = x + self.params["embed_positions"][: ids.shape[1]]
        return x

    def forward(self, ids, *, attentions: bool = False):
        """logits (B, T, V) float32 (ids (T,) gives (T, V)), and with ``attentions`` the weights of every
        layer, (layers, B, H, T, T)."""
        ids_ = self._ids(ids)
        from .._backends import to_numpy

        x, atts = self.embed(ids_), []
        for layer in self.layers:
            if attentions:
                a, w = layer(x, causal=True, return_weights=True)
                atts.append(to_numpy(w))
            else:
                a = layer(x, causal=True)
            x = x + to_numpy(a)
        logits = x @ self._lm_head().T
        if np.ndim(ids) == 1:
            logits = logits[0]
            atts = [a[0] for a in atts]
        return (logits, np.stack(atts)) if attentions else logits

    def logits(self, ids) -> np.ndarray:
        """(B, T, V) or (T, V) float32 next-token logits."""
        return self.forward(ids)

    def loss_and_grads(self, ids, targets, mask=None):
        """(loss, grads): the mean cross-entropy of ``targets`` (B, T) over the positions ``mask`` (B, T)
        selects (all when None), and its gradient for every parameter (the structure of :attr:`params`)."""
        from .._backends import to_numpy

        ids = self._ids(ids)
        targets = np.asarray(targets).reshape(ids.shape)
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool).reshape(ids.shape)
        x = self.embed(ids)
        pulls = []
        for layer in self.layers:
            a, pull = vjp(layer, x, causal=True)
            pulls.append(pull)
            x = x + to_numpy(a)
        W = self._lm_head()
        logits = x @ W.T  # (B, T, V)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        n = max(int(mask.sum()), 1)
        picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        loss = float(-(picked * mask).sum() / n)
        dlogits = np.exp(logp)
        np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - 1, -1)
        dlogits *= (mask / n)[..., None].astype(np.float32)  # (B, T, V)
        E = x.shape[-1]
        d_head = dlogits.reshape(-1, dlogits.shape[-1]).T @ x.reshape(-1, E)  # (V, E)
        dx = dlogits @ W  # (B, T, E)
        grads = {"layers": {}}
        for i in reversed(range(len(self.layers))):
            g = pulls[i](dx)
            grads["layers"][str(i)] = g.weights
            dx = dx + to_numpy(g.query)
        d_embed = np.zeros_like(self.params["embed_tokens"])
        np.add.at(d_embed, ids.reshape(-1), dx.reshape(-1, E))
        if "lm_head" in self.params:
            grads["lm_head"] = d_head
        else:
            d_embed += d_head
        grads["embed_tokens"] = d_embed
        if "embed_positions" in self.params:
            d_pos = np.zeros_like(self.params["embed_positions"])
            d_pos[: ids.shape[1]] = dx.sum(0)
            grads["embed_positions"] = d_pos
        return loss, grads
