import os

import pytest

from mha.testing.profiles import load_profile

# The tolerances are derived for float32 arithmetic; on GPUs with TF32 (NVIDIA, Apple M5) MLX would run
# float32 matrix products in TF32 (read once, at MLX's first product).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

load_profile()


def _has_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


HAS_MLX = _has_mlx()
BACKENDS = ["numpy", "mlx"] if HAS_MLX else ["numpy"]


@pytest.fixture(params=["numpy", "mlx"])
def backend(request):
    if request.param == "mlx" and not HAS_MLX:
        if os.environ.get("CI"):
            pytest.fail("MLX must be installed in CI (pip install -e '.[dev]')")
        pytest.skip("MLX is not installed")
    return request.param
