"""The property suite: each property a function ``check(impl, problem)``, stated in its docstring.

Themes, one module each: ``reference`` (the float64 oracle; pins the scale), ``equivariance``
(token and key permutations, batch independence), ``masks`` (hidden keys, NaN isolation, empty rows,
mask algebra), ``causal``, ``weights`` (the returned weights), ``heads`` (decomposition, permutation,
head_mask, single head, GQA), ``invariances`` (key/value bias, linearity, the scale), ``decoding``
(the key/value cache, RoPE, sliding windows), ``numerics`` (inputs and scales to the dtype's limit,
float64), ``gradients`` (implementations that differentiate: the float64 oracle, check_vjp,
equivariance, zero gradients through hidden keys) and ``sinks`` (learned attention sinks, gpt-oss).

``PROPERTIES`` maps each name to a :class:`Property` with the features it needs and the strategy
that draws its examples.
"""

# Importing a theme registers its properties; this order is the order of reports.
from . import reference  # noqa: F401, I001
from . import equivariance  # noqa: F401
from . import masks  # noqa: F401
from . import causal  # noqa: F401
from . import weights  # noqa: F401
from . import heads  # noqa: F401
from . import invariances  # noqa: F401
from . import decoding  # noqa: F401
from . import numerics  # noqa: F401
from . import gradients  # noqa: F401
from . import sinks  # noqa: F401
from ._common import PROPERTIES, Property

__all__ = ["PROPERTIES", "Property"]
