"""The property suite: each property a function ``check(impl, problem)``, stated in its docstring.

Themes, one module each: ``reference`` (the float64 oracle; pins the scale), ``equivariance``
(token and key permutations, batch independence), ``masks`` (hidden keys, NaN isolation, empty rows,
mask algebra), ``causal``, ``weights`` (the returned weights), ``heads`` (decomposition, permutation,
head_mask, single head, GQA), ``invariances`` (key/value bias, linearity, the scale) and ``decoding``
(the key/value cache, RoPE, sliding windows) and ``numerics`` (inputs and scales to the dtype's limit,
float64).

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
from ._common import PROPERTIES, Property

__all__ = ["PROPERTIES", "Property"]
