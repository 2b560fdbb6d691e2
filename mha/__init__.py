"""mha-twin: multi-head attention with twin backends (MLX and numpy) behind one interface.

Public names::

    mha.MultiHeadAttention       the layer (builds the numpy or MLX backend's layer)
    mha.AttentionWeights         parameters in the canonical (out, in) layout; init/from_torch/from_mlx/save/load
    mha.available_backends()     backends that run here
    mha.default_backend()        what backend="auto" picks
    mha.backend_info()           each backend: available, device, GPU, how to install it
    mha.to_numpy(array)          numpy view of any backend's array
    mha.prune_heads(layer, heads)  a smaller layer without those heads (or a model: {layer: [heads]})
    mha.RoPE                     rotary position embedding settings (the layer's ``rope=``)
    mha.KVCache                  the decoding cache ``layer.init_cache(batch_size, max_length)`` returns
    mha.reference                the reference algorithm, generic over the array namespace
    mha.vjp(layer, query, ...)   (output, vjp): vjp(d_out) gives the gradients of inputs and weights
    mha.Gradients                what vjp(d_out) returns: .query, .key, .value, .weights
"""

from . import _reference as reference
from ._cache import KVCache
from ._backends import available_backends, backend_info, default_backend, to_numpy
from ._layer import MultiHeadAttention
from ._prune import prune_heads, prune_weights
from ._rope import RoPE
from ._vjp import Gradients, vjp
from ._weights import AttentionWeights

__version__ = "0.1.0"

__all__ = [
    "AttentionWeights",
    "Gradients",
    "KVCache",
    "MultiHeadAttention",
    "RoPE",
    "available_backends",
    "backend_info",
    "default_backend",
    "prune_heads",
    "prune_weights",
    "reference",
    "to_numpy",
    "vjp",
]
