"""``AttentionWeights``: the parameters of one layer as numpy arrays in the canonical layout.

The layout is torch/MLX/Hugging Face ``Linear``: a weight is ``(out_features, in_features)`` and
``y = x @ W.T + b``. Projected features split into heads as ``(H, D)``: head i owns rows
``i*D:(i+1)*D`` of ``q_weight`` (and of ``k_weight``/``v_weight`` for key/value head i).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import _io
from ._validate import dtype_name, head_counts, positive_int, seed_value

NAMES = ("q_weight", "k_weight", "v_weight", "o_weight", "q_bias", "k_bias", "v_bias", "o_bias")
EXTRAS = ("q_norm", "k_norm", "sinks")  # optional: q/k RMSNorm weights (D,), learned sink logits (H,)
FORMAT = "mha-twin/1"


def _host(x, name: str) -> np.ndarray:
    """numpy view of a numpy/torch/mlx array (bf16 widened to float32)."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    if type(x).__module__.startswith("mlx"):
        from ._backends import to_numpy

        return to_numpy(x)
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a


class AttentionWeights:
    """Weights of one multi-head attention layer (numpy, canonical ``(out, in)`` layout).

    Attributes:
        q_weight: (H*D, E); k_weight: (Hkv*D, kdim); v_weight: (Hkv*D, vdim); o_weight: (E, H*D).
        D is usually E / H, but need not be (a layer with pruned heads has H*D < E).
        q_bias: (H*D,); k_bias, v_bias: (Hkv*D,); o_bias: (E,). All four or none.
        q_norm, k_norm: (D,) weights of the per-head RMSNorm of queries and keys (a layer's ``qk_norm``);
            both or none. sinks: (H,) learned sink logits (a layer's ``sinks=True``), or None.
        num_heads: H; num_kv_heads: Hkv (H for plain MHA, 1 for MQA).
    """

    def __init__(self, q_weight, k_weight, v_weight, o_weight, q_bias=None, k_bias=None,
                 v_bias=None, o_bias=None, *, num_heads, num_kv_heads=None, q_norm=None, k_norm=None, sinks=None):
        arrays = dict(q_weight=q_weight, k_weight=k_weight, v_weight=v_weight, o_weight=o_weight,
                      q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias, q_norm=q_norm, k_norm=k_norm,
                      sinks=sinks)
        arrays = {k: None if v is None else _host(v, k) for k, v in arrays.items()}
        for name in NAMES[:4]:
            if arrays[name] is None:
                raise TypeError(f"{name} is required, got None")
            if arrays[name].ndim != 2:
                raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {arrays[name].shape}")
        E = arrays["q_weight"].shape[1]
        num_heads = positive_int("num_heads", num_heads)
        rows = arrays["q_weight"].shape[0]
        if rows % num_heads:
            raise ValueError(f"q_weight has {rows} rows, not a multiple of num_heads={num_heads} "
                             f"(it must be (num_heads * head_dim, embed_dim))")
        E, H, Hkv, D = head_counts(E, num_heads, num_kv_heads, max(1, rows // num_heads))
        kdim, vdim = arrays["k_weight"].shape[1], arrays["v_weight"].shape[1]
        expected = {
            "q_weight": (H * D, E), "k_weight": (Hkv * D, kdim), "v_weight": (Hkv * D, vdim),
            "o_weight": (E, H * D), "q_bias": (H * D,), "k_bias": (Hkv * D,), "v_bias": (Hkv * D,),
            "o_bias": (E,), "q_norm": (D,), "k_norm": (D,), "sinks": (H,),
        }
        present = [arrays[n] is not None for n in NAMES[4:]]
        if any(present) and not all(present):
            missing = [n for n, p in zip(NAMES[4:], present) if not p]
            raise ValueError(f"biases must be given for all of q/k/v/o or none; missing {', '.join(missing)}")
        if (arrays["q_norm"] is None) != (arrays["k_norm"] is None):
            raise ValueError("q_norm and k_norm must be given together or not at all, got only "
                             + ("q_norm" if arrays["k_norm"] is None else "k_norm"))
        wrong = [
            f"{n}: expected {expected[n]}, got {arrays[n].shape}"
            for n in NAMES + EXTRAS if arrays[n] is not None and arrays[n].shape != expected[n]
        ]
        if wrong:
            raise ValueError(
                f"weight shapes do not fit embed_dim={E}, num_heads={H}, num_kv_heads={Hkv}, "
                f"head_dim={D}: " + "; ".join(wrong)
            )
        dtype = np.result_type(*[arrays[n] for n in NAMES if arrays[n] is not None])  # the extras follow
        if dtype.kind != "f":
            dtype = np.dtype(np.float32)
        for n, a in arrays.items():
            setattr(self, n, None if a is None else np.array(a, dtype=dtype, copy=True))
        self.num_heads = H
        self.num_kv_heads = Hkv

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.q_weight.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q_weight.shape[0] // self.num_heads

    @property
    def kdim(self) -> int:
        return self.k_weight.shape[1]

    @property
    def vdim(self) -> int:
        return self.v_weight.shape[1]

    @property
    def bias(self) -> bool:
        return self.q_bias is not None

    @property
    def dtype(self) -> np.dtype:
        return self.q_weight.dtype

    @property
    def qk_norm(self) -> bool:
        """Whether it holds the q/k RMSNorm weights."""
        return self.q_norm is not None

    def to_dict(self) -> dict:
        """``{name: array or None}`` for the eight names of :data:`NAMES`, and those of :data:`EXTRAS` it holds."""
        return {n: getattr(self, n) for n in NAMES + EXTRAS if n in NAMES or getattr(self, n) is not None}

    def astype(self, dtype) -> AttentionWeights:
        dt = np.dtype(dtype_name(dtype, "numpy"))
        return AttentionWeights(**{n: None if a is None else a.astype(dt) for n, a in self.to_dict().items()},
                                num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)

    def __eq__(self, other) -> bool:
        if not isinstance(other, AttentionWeights):
            return NotImplemented
        return (self.num_heads, self.num_kv_heads) == (other.num_heads, other.num_kv_heads) and all(
            (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                          and np.array_equal(a, b))
            for a, b in zip(self.to_dict().values(), other.to_dict().values())
        )

    __hash__ = None

    def __repr__(self) -> str:
        return (f"AttentionWeights(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, kdim={self.kdim}, vdim={self.vdim}, "
                f"bias={self.bias}" + (", qk_norm=True" if self.qk_norm else "")
                + (", sinks=True" if self.sinks is not None else "") + f", dtype={self.dtype})")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def init(cls, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, head_dim=None, bias=True,
             seed=None, dtype="float32", qk_norm=False, sinks=False) -> AttentionWeights:
        """Xavier-uniform projections and zero biases (torch's initialisation), seeded; with ``qk_norm``
        q/k norm weights of ones, with ``sinks`` sink logits of zeros.

        Each projection ``W`` of shape (out, in) is drawn from U(-a, a), a = sqrt(6 / (in + out)).
        """
        E, H, Hkv, D = head_counts(embed_dim, num_heads, num_kv_heads, head_dim)
        kdim = E if kdim is None else positive_int("kdim", kdim)
        vdim = E if vdim is None else positive_int("vdim", vdim)
        dt = np.dtype(dtype_name(dtype, "numpy"))
        rng = np.random.default_rng(seed_value(seed))

        def xavier(out, inp):
            a = math.sqrt(6.0 / (inp + out))
            return rng.uniform(-a, a, size=(out, inp)).astype(dt)

        w = dict(q_weight=xavier(H * D, E), k_weight=xavier(Hkv * D, kdim),
                 v_weight=xavier(Hkv * D, vdim), o_weight=xavier(E, H * D))
        if bias:
            w.update(q_bias=np.zeros(H * D, dt), k_bias=np.zeros(Hkv * D, dt),
                     v_bias=np.zeros(Hkv * D, dt), o_bias=np.zeros(E, dt))
        if qk_norm:
            w.update(q_norm=np.ones(D, dt), k_norm=np.ones(D, dt))
        if sinks:
            w.update(sinks=np.zeros(H, dt))
        return cls(**w, num_heads=H, num_kv_heads=Hkv)

    @classmethod
    def from_torch(cls, module_or_state_dict, *, num_heads=None, prefix: str = "") -> AttentionWeights:
        """From a ``torch.nn.MultiheadAttention`` or its ``state_dict`` (packed ``in_proj_weight`` or
        separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``). A state dict needs
        ``num_heads``; ``prefix`` is stripped from its keys."""
        sd = module_or_state_dict
        if hasattr(sd, "state_dict") and hasattr(sd, "num_heads"):
            module = sd
            if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
                raise ValueError("from_torch: add_bias_kv and add_zero_attn have no equivalent here")
            if num_heads is not None and num_heads != module.num_heads:
                raise ValueError(f"num_heads={num_heads} disagrees with the module's {module.num_heads}")
            num_heads, sd = module.num_heads, module.state_dict()
        elif not hasattr(sd, "keys"):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention or a state_dict, got "
                            f"{type(sd).__name__}")
        elif num_heads is None:
            raise TypeError("from_torch(state_dict) needs num_heads=, which a state_dict does not record")
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        known = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                 "out_proj.weight", "out_proj.bias"}
        unexpected = sorted(set(sd) - known)
        if unexpected:
            raise ValueError(f"from_torch: unexpected keys {unexpected} (bias_k/bias_v are not supported)")
        get = {k: _host(v, k) for k, v in sd.items()}
        if "out_proj.weight" not in get:
            raise ValueError(f"from_torch: missing key 'out_proj.weight'; got keys {sorted(get)}")
        if "in_proj_weight" in get:
            w = get["in_proj_weight"]
            if w.ndim != 2 or w.shape[0] % 3:
                raise ValueError(f"from_torch: in_proj_weight must be (3*E, E), got {w.shape}")
            q, k, v = np.split(w, 3, axis=0)
        else:
            missing = [n for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight") if n not in get]
            if missing:
                raise ValueError(f"from_torch: missing keys {missing} (and no in_proj_weight)")
            q, k, v = get["q_proj_weight"], get["k_proj_weight"], get["v_proj_weight"]
        biases = {}
        if "in_proj_bias" in get:
            qb, kb, vb = np.split(get["in_proj_bias"], 3)
            ob = get.get("out_proj.bias")
            if ob is None:
                raise ValueError("from_torch: in_proj_bias present but out_proj.bias missing")
            biases = dict(q_bias=qb, k_bias=kb, v_bias=vb, o_bias=ob)
        elif "out_proj.bias" in get:
            raise ValueError("from_torch: out_proj.bias present but in_proj_bias missing")
        return cls(q, k, v, get["out_proj.weight"], **biases, num_heads=num_heads)

    @classmethod
    def from_mlx(cls, module) -> AttentionWeights:
        """From an ``mlx.nn.MultiHeadAttention`` (query_proj/key_proj/value_proj/out_proj), or one of
        this project's MLX layers."""
        if hasattr(module, "weights") and isinstance(getattr(module, "weights"), AttentionWeights):
            return module.weights
        try:
            projs = [module.query_proj, module.key_proj, module.value_proj, module.out_proj]
            num_heads = module.num_heads
        except (AttributeError, KeyError):
            raise TypeError(f"from_mlx expects an mlx.nn.MultiHeadAttention, got {type(module).__name__}") from None
        ws = [_host(p.weight, "weight") for p in projs]
        has = ["bias" in p for p in projs]
        if any(has) and not all(has):
            raise ValueError("from_mlx: biases must be on all four projections or none")
        biases = {}
        if all(has):
            biases = dict(zip(("q_bias", "k_bias", "v_bias", "o_bias"), (_host(p.bias, "bias") for p in projs)))
        return cls(*ws, **biases, num_heads=num_heads)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write a safetensors file (``.npz`` if the name ends so), atomically; never pickle."""
        arrays = {n: a for n, a in self.to_dict().items() if a is not None}
        meta = {"format": FORMAT, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads}
        _io.save_arrays(Path(path), arrays, meta)

    @classmethod
    def load(cls, path, *, num_heads=None, num_kv_heads=None) -> AttentionWeights:
        """Read a file written by :meth:`save` (safetensors or ``.npz``). ``num_heads`` and
        ``num_kv_heads`` are needed only for foreign files that do not record them."""
        tensors, meta = _io.load_arrays(path)
        unexpected = sorted(set(tensors) - set(NAMES + EXTRAS))
        missing = sorted(set(NAMES[:4]) - set(tensors))
        if unexpected or missing:
            raise ValueError(
                f"{path}: not an attention weights file: missing keys {missing}, unexpected keys {unexpected}; "
                f"expected {list(NAMES[:4])} and optionally {list(NAMES[4:] + EXTRAS)}"
            )
        H = _io.metadata_int(meta, "num_heads", path) if num_heads is None else num_heads
        if H is None:
            raise ValueError(f"{path}: the file does not record num_heads; pass num_heads=")
        Hkv = _io.metadata_int(meta, "num_kv_heads", path, H) if num_kv_heads is None else num_kv_heads
        try:
            return cls(**tensors, num_heads=H, num_kv_heads=Hkv)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None
