"""Backend discovery and selection. MLX is imported lazily, only when asked for or probed."""

from __future__ import annotations

import functools
import importlib
import os

import numpy as np

BACKENDS = ("numpy", "mlx")
ENV_VAR = "MHA_BACKEND"
MLX_INSTALL = "pip install 'mha-twin[mlx]' (that is: pip install mlx on macOS, 'mlx[cpu]' or 'mlx[cuda]' on Linux)"


@functools.lru_cache(maxsize=None)
def _mlx_status() -> tuple[bool, bool, str]:
    """(importable, on a GPU, device description)."""
    try:
        import mlx.core as mx
    except ImportError:
        return False, False, "not installed"
    gpu = False
    for name in ("metal", "cuda"):
        mod = getattr(mx, name, None)
        try:
            gpu = gpu or bool(mod is not None and mod.is_available())
        except Exception:  # a broken driver must not break import
            pass
    return True, gpu, str(mx.default_device())


def available_backends() -> tuple[str, ...]:
    """Backends that can run here: always "numpy"; "mlx" when MLX imports."""
    return ("numpy", "mlx") if _mlx_status()[0] else ("numpy",)


def mlx_on_gpu() -> bool:
    return _mlx_status()[1]


def backend_info() -> dict:
    """What runs here: ``{"numpy": {...}, "mlx": {...}}``, each with ``available`` (bool), ``device`` (str)
    and ``gpu`` (bool); MLX's also ``install`` (how to get it, when it is missing); and ``default``, what
    backend="auto" picks."""
    installed, gpu, device = _mlx_status()
    mlx = {"available": installed, "device": device, "gpu": gpu}
    if not installed:
        mlx["install"] = MLX_INSTALL
    return {"numpy": {"available": True, "device": "cpu", "gpu": False}, "mlx": mlx, "default": default_backend()}


def check_name(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r} ({type(backend).__name__})")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'numpy', 'mlx', got {backend!r}")
    return backend


def default_backend() -> str:
    """What backend="auto" picks: ``$MHA_BACKEND`` if set, else MLX when it runs on a GPU (Apple Metal
    or CUDA), else numpy. (MLX's Linux CPU build has no BLAS, so auto never picks it for the CPU.)"""
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"${ENV_VAR} must be one of 'auto', 'numpy', 'mlx', got {env!r}")
        return env
    return "mlx" if mlx_on_gpu() else "numpy"


def resolve(backend) -> str:
    """Validate a backend name and resolve "auto"; MLX asked for but missing is a clear error."""
    name = check_name(backend)
    if name == "auto":
        name = default_backend()
    if name == "mlx" and not _mlx_status()[0]:
        raise ValueError(f"backend='mlx' needs MLX, which is not installed: {MLX_INSTALL}")
    return name


def layer_class(backend):
    """The layer class of a backend (imports the backend package)."""
    name = resolve(backend)
    return importlib.import_module("mha_cpu" if name == "numpy" else "mha_mlx").MultiHeadAttention


def to_numpy(array) -> np.ndarray:
    """A numpy array from a numpy array, an mx.array (bfloat16 widened to float32), a torch tensor
    or anything array-like."""
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.startswith("mlx"):
        import mlx.core as mx

        if array.dtype == mx.bfloat16:
            array = array.astype(mx.float32)
        return np.array(array, copy=True)
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor
        t = array.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(array)
