"""Argument checks shared by the facade and both backends.

Every check raises before any arithmetic, with a message that names the argument, what was received
and what was expected. Shape letters: B batch, T query length, S key length, H heads, D head_dim,
E embed_dim.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

BACKEND_DTYPES = {
    "numpy": ("float32", "float64"),
    "mlx": ("float32", "float16", "bfloat16"),
}
ALL_DTYPES = ("float32", "float64", "float16", "bfloat16")


def positive_int(name: str, value) -> int:
    """``value`` as an int > 0, else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def int_at_least(name: str, value, minimum: int, *, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes when allowed), else TypeError (not an int; bool
    rejected) or ValueError (below), naming ``name``."""
    if value is None and allow_none:
        return None
    expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)


def optional_positive_int(name: str, value, default: int) -> int:
    return default if value is None else positive_int(name, value)


def real_number(name: str, value, *, allow_none: bool = False) -> float | None:
    """A finite real number (bool rejected)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a finite float or None" if allow_none else "a finite float"
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def boolean(name: str, value) -> bool:
    import numpy as np

    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def dtype_name(value, backend: str | None = None) -> str:
    """Normalise a dtype given as a string, numpy dtype or mlx dtype to its name, e.g. "float32"."""
    name = getattr(value, "name", None) if not isinstance(value, str) else value
    if name is None:  # numpy scalar types (np.float32) and mlx dtypes (mx.float32)
        text = str(value)
        name = text.rsplit(".", 1)[-1].strip("'>")
    if not isinstance(name, str) or name not in ALL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(ALL_DTYPES)}, got {value!r}")
    if backend is not None and name not in BACKEND_DTYPES[backend]:
        allowed = ", ".join(BACKEND_DTYPES[backend])
        hint = " (float16/bfloat16 need backend='mlx')" if backend == "numpy" else ""
        raise ValueError(f"dtype={name!r} is not supported by the {backend} backend; use one of {allowed}{hint}")
    return name


@dataclass(frozen=True)
class LayerConfig:
    """The hyper-parameters of one attention layer, validated."""

    embed_dim: int
    num_heads: int
    num_kv_heads: int
    kdim: int
    vdim: int
    bias: bool
    scale: float | None
    dropout: float
    dtype: str
    head_dim: int
    rope: object = None  # mha.RoPE or None
    window: int | None = None
    softcap: float | None = None  # logits l -> c tanh(l / c) before the additive mask
    qk_norm: float | None = None  # RMSNorm epsilon of the per-head query and key norms, or None (off)
    sinks: bool = False  # learned per-head sink logits

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def kwargs(self) -> dict:
        """Constructor keyword arguments that rebuild this configuration."""
        return dict(
            num_kv_heads=self.num_kv_heads, kdim=self.kdim, vdim=self.vdim, head_dim=self.head_dim,
            bias=self.bias, scale=self.scale, dropout=self.dropout, dtype=self.dtype, rope=self.rope,
            window=self.window, softcap=self.softcap, qk_norm=self.qk_norm, sinks=self.sinks,
        )


def head_counts(embed_dim, num_heads, num_kv_heads, head_dim=None) -> tuple[int, int, int, int]:
    """Check E, H, Hkv and D: H a multiple of Hkv; without an explicit head_dim, E = H * D."""
    embed_dim = positive_int("embed_dim", embed_dim)
    num_heads = positive_int("num_heads", num_heads)
    num_kv_heads = optional_positive_int("num_kv_heads", num_kv_heads, num_heads)
    if head_dim is None and embed_dim % num_heads:
        raise ValueError(
            f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}: "
            f"embed_dim must equal num_heads * head_dim (or pass head_dim=)"
        )
    head_dim = embed_dim // num_heads if head_dim is None else positive_int("head_dim", head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}: "
            f"each key/value head must serve a whole group of query heads"
        )
    return embed_dim, num_heads, num_kv_heads, head_dim


F32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max


def positive_float(name: str, value) -> float | None:
    """None, or a finite float > 0 (bool rejected)."""
    value = real_number(name, value, allow_none=True)
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive float or None, got {value}")
    return value


def layer_config(embed_dim, num_heads, *, num_kv_heads, kdim, vdim, head_dim=None, bias, scale, dropout, dtype,
                 backend: str, rope=None, window=None, softcap=None, qk_norm=None, sinks=False) -> LayerConfig:
    embed_dim, num_heads, num_kv_heads, head_dim = head_counts(embed_dim, num_heads, num_kv_heads, head_dim)
    kdim = optional_positive_int("kdim", kdim, embed_dim)
    vdim = optional_positive_int("vdim", vdim, embed_dim)
    bias = boolean("bias", bias)
    scale = real_number("scale", scale, allow_none=True)
    dropout = real_number("dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    dtype = dtype_name(dtype, backend)
    if scale is not None and dtype != "float64" and abs(scale) > F32_MAX:
        raise ValueError(f"scale must lie within float32's range (|scale| <= {F32_MAX:.7g}) for a {dtype} layer, "
                         f"got {scale:g}: it would be inf where the logits are formed (a float64 numpy layer "
                         f"takes it; or scale the query weights instead)")
    from ._rope import as_rope

    rope = as_rope(rope)
    if rope is not None:
        rope.rotated_dims(head_dim)  # raises if the head is too narrow for it
    window = None if window is None else positive_int("window", window)
    softcap, qk_norm = positive_float("softcap", softcap), positive_float("qk_norm", qk_norm)
    sinks = boolean("sinks", sinks)
    return LayerConfig(embed_dim, num_heads, num_kv_heads, kdim, vdim, bias, scale, dropout, dtype, head_dim,
                       rope, window, softcap, qk_norm, sinks)


def seed_value(seed) -> int | None:
    """None, or an int in [0, 2**63) (what numpy and MLX seed from)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative int or None, got {seed!r} ({type(seed).__name__})")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative int below 2**63 or None, got {seed}")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Call arguments


def _dt(x) -> str:
    """A dtype's short name, the same for numpy and mlx arrays ("float32", "bool")."""
    return str(x.dtype).replace("mlx.core.", "")


def array_kind(x) -> str:
    """numpy's dtype kind letter ('f', 'i', 'u', 'b', 'c', ...) for numpy or mlx arrays."""
    dtype = x.dtype
    kind = getattr(dtype, "kind", None)
    if kind is not None:
        return kind
    name = str(dtype).rsplit(".", 1)[-1]
    if name == "bool_" or name == "bool":
        return "b"
    if name.startswith("uint"):
        return "u"
    if name.startswith("int"):
        return "i"
    if name.startswith("complex"):
        return "c"
    if name.startswith("float") or name == "bfloat16":
        return "f"
    return "O"


def feature_input(name: str, x, expected_dim: int, dim_name: str):
    """Check one of query/key/value: real numbers, rank 2 (T, E) or 3 (B, T, E), last dim given."""
    kind = array_kind(x)
    if kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {_dt(x)}")
    if x.ndim not in (2, 3):
        raise ValueError(
            f"{name} must have shape (B, L, {dim_name}) or unbatched (L, {dim_name}), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-1] != expected_dim:
        raise ValueError(
            f"{name} has last dimension {x.shape[-1]}, expected {dim_name}={expected_dim} "
            f"(got shape {tuple(x.shape)})"
        )


def qkv_shapes(query, key, value) -> tuple[int, int, int, bool]:
    """Consistency of ranks, batch and key/value length; returns (B, T, S, batched)."""
    if not (query.ndim == key.ndim == value.ndim):
        raise ValueError(
            f"query, key and value must all be batched (3-D) or all unbatched (2-D), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batched = query.ndim == 3
    if batched and not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(
            f"query, key and value must share the batch size B, got {query.shape[0]}, "
            f"{key.shape[0]}, {value.shape[0]}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same length S, got key shape {tuple(key.shape)} and "
            f"value shape {tuple(value.shape)}"
        )
    B = query.shape[0] if batched else 1
    return B, query.shape[-2], key.shape[-2], batched


def mask_shape(x, B: int, H: int, T: int, S: int | None, batched: bool):
    """``mask`` must broadcast to (B, H, T, S); rejects torch's (B*H, T, S) layout with a hint.

    With batched input a 3-D mask is rejected unless its first axis is 1: numpy's broadcasting reads it
    as (H, T, S), Keras and many users mean (B, T, S), and when B == H nothing would tell them apart.
    """
    kind = array_kind(x)
    if kind not in "biuf":
        raise TypeError(
            f"mask must be bool (True = may attend), int 0/1 or float (added to the logits), "
            f"got dtype {_dt(x)}"
        )
    shape = tuple(x.shape)
    if S is None:  # the key length is not known yet (a cache's step): the last axis is checked later
        S = shape[-1] if shape else 1
    target = (B, H, T, S) if batched else (H, T, S)
    if batched and len(shape) == 3 and shape[0] != 1:
        hint = (f"; this looks like torch's (B*num_heads, T, S) layout: reshape it to ({B}, {H}, {T}, {S})"
                if B > 1 and shape == (B * H, T, S) else "")
        raise ValueError(
            f"mask of shape {shape} is ambiguous: a 3-D mask could be (B, T, S) or (H, T, S); give it 4 "
            f"dimensions, mask[:, None] for one mask per batch element (B, 1, T, S) or mask[None] for one "
            f"per head (1, H, T, S){hint}"
        )
    ok = len(shape) <= len(target) and all(
        a in (1, b) for a, b in zip(reversed(shape), reversed(target))
    )
    if ok:
        return
    letters = "(B, H, T, S)" if batched else "(H, T, S) for unbatched input"
    raise ValueError(f"mask of shape {shape} does not broadcast to {letters} = {target}")


def key_mask_shape(x, B: int, S: int, batched: bool, name: str = "key_mask"):
    kind = array_kind(x)
    if kind not in "biu":
        raise TypeError(
            f"{name} must be bool (True = real key, False = padding) or int 0/1, got dtype {_dt(x)}"
        )
    expected = (B, S) if batched else (S,)
    L = "T" if "new tokens" in name else "S"
    if tuple(x.shape) != expected and not (not batched and tuple(x.shape) == (1, S)):
        raise ValueError(
            f"{name} must have shape {f'(B, {L})' if batched else f'({L},)'} = {expected}, "
            f"got {tuple(x.shape)}"
        )


def head_mask_shape(x, B: int, H: int, batched: bool):
    kind = array_kind(x)
    if kind not in "fiub":
        raise TypeError(f"head_mask must hold real numbers, got dtype {_dt(x)}")
    shape = tuple(x.shape)
    allowed = [(H,), (B, H)] if batched else [(H,), (1, H)]
    if shape not in allowed:
        expected = f"(H,) = ({H},) or (B, H) = ({B}, {H})" if batched else f"(H,) = ({H},)"
        raise ValueError(f"head_mask must have shape {expected}, got {shape}")
