"""mha.distributed when things go wrong (a rank dies, hangs, or the ranks disagree), what one process checks
on its own (arguments, the import without MLX), and the ``mha distributed`` command alone and under
``mlx.launch``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mha
from mha.testing import tolerance
from mha.testing.tolerance import _abs_projections
from tests.conftest import HAS_MLX
from tests.distributed.distributed_launch import launch
from tests.distributed.test_distributed import ring_magnitude

pytestmark = pytest.mark.skipif(not HAS_MLX, reason="mha.distributed needs MLX (pip install 'mha-twin[mlx]')")


# -- failures: a rank that dies or hangs, ranks that disagree ---------------------------------------------
def _reports(tmp_path, n):
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)
            if (tmp_path / f"rank{r}.json").exists()}


@pytest.mark.parametrize("kind", ["head", "sequence"])
def test_a_rank_that_dies_makes_the_others_fail_clearly(kind, tmp_path):
    """Rank 1 of 3 exits before the first exchange: ranks 0 and 2 raise DistributedError naming the
    operation (MLX reports the lost peer) well within their 5 s timeout; nothing hangs."""
    out, seconds = launch(3, {"mode": "die", "kind": kind, "timeout": 5}, tmp_path, timeout=60)
    reports = _reports(tmp_path, 3)
    assert sorted(reports) == [0, 2], f"reports from {sorted(reports)}:\n{out[-3000:]}"
    for r in (0, 2):
        assert "DistributedError" in reports[r]["classes"], reports[r]
        assert f"rank {r} of 3" in reports[r]["error"] and "exit this process" in reports[r]["error"], reports[r]
        assert reports[r]["seconds"] < 5 + 1, reports[r]
    assert seconds < 30, f"the launch took {seconds:.1f} s"


def test_a_rank_that_hangs_times_out_the_others(tmp_path):
    """Rank 1 of 2 sleeps instead of calling: rank 0 raises PeerTimeout (a TimeoutError) after its 3 s
    timeout instead of blocking for ever in MLX's receive, and the launcher then stops rank 1."""
    out, seconds = launch(2, {"mode": "hang", "kind": "sequence", "timeout": 3}, tmp_path, timeout=60)
    reports = _reports(tmp_path, 2)
    assert list(reports) == [0], f"reports from {sorted(reports)}:\n{out[-3000:]}"
    rep = reports[0]
    assert {"PeerTimeout", "TimeoutError", "DistributedError"} <= set(rep["classes"]), rep
    assert "within 3 s" in rep["error"] and "exchange of chunk sizes" in rep["error"], rep
    assert 3 <= rep["seconds"] < 5, rep
    assert seconds < 30, f"the launch took {seconds:.1f} s"


def test_ranks_that_disagree_all_raise_the_same_error_and_go_on(tmp_path):
    """SequenceParallel with B = 1 on rank 0 and B = 2 on rank 1: both raise ValueError naming B and the
    values in rank order, and the next (consistent) call works on both."""
    out, _ = launch(2, {"mode": "disagree", "kind": "sequence", "timeout": 10}, tmp_path, timeout=60)
    reports = _reports(tmp_path, 2)
    assert sorted(reports) == [0, 1], out[-3000:]
    for rep in reports.values():
        assert rep.get("first", "").startswith("ValueError: the ranks disagree on B: [1, 2]"), rep
        assert "error" not in rep and rep["after"] > 0, rep


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_bad_input_on_one_rank_raises_the_same_error_everywhere(backend, tmp_path):
    """SequenceParallel on 3 ranks, one rank at a time with a bad argument (a NaN in its float mask, a
    query of the wrong width, a mask over the wrong number of keys): every rank raises the same
    ValueError naming the rank and the argument, at once (the ranks check before any attention and
    agree in one exchange), and the group stays usable; the same error left uncaught ends every process."""
    out, seconds = launch(3, {"mode": "bad", "backend": backend, "timeout": 20}, tmp_path, timeout=60)
    reports = _reports(tmp_path, 3)
    assert sorted(reports) == [0, 1, 2], out[-3000:]
    want = {"nan-mask": ("rank 1 of 3", "mask is an additive float mask and must not hold NaN"),
            "wrong-width": ("rank 0 of 3", "query"),
            "wrong-keys": ("the ranks", "mask: its last axis must be 1 or S = 15")}
    for name, (who, what) in want.items():
        errors = {rep[name] for rep in reports.values()}
        assert len(errors) == 1, f"{name}: the ranks raised different errors: {errors}"
        err = errors.pop()
        assert err.startswith("ValueError") and what in err, (name, err)
        assert who in err or name == "wrong-keys", (name, err)
        assert all(rep[name + "_seconds"] < 5 for rep in reports.values()), (name, reports)
    assert all(rep["after"] > 0 for rep in reports.values())
    assert seconds < 30 and out.count("rejected its arguments") >= 3, out[-3000:]


# -- one process: the checks that need no second rank ------------------------------------------------------
def test_one_rank_equals_the_layer_and_bad_arguments_are_named():
    import mlx.core as mx

    from mha.distributed import HeadParallel, SequenceParallel, chunk, chunk_bounds, head_split

    layer = mha.MultiHeadAttention(12, 4, num_kv_heads=2, backend="numpy", seed=3, rope=True)
    x = np.random.default_rng(0).normal(size=(2, 9, 12)).astype(np.float32)
    y = layer(x, causal=True)
    np.testing.assert_array_equal(HeadParallel(layer)(x, causal=True), y)  # one rank: the layer itself
    got = SequenceParallel(layer)(x, causal=True)
    M = tolerance.magnitude(layer.weights, x, y_ref=y, max_angle=8)
    tolerance.assert_close(got, y, 2 * tolerance.t1("float32", M), "SequenceParallel on one rank")
    assert chunk_bounds(37, 3) == [(0, 13), (13, 25), (25, 37)] and chunk_bounds(2, 3)[2] == (2, 2)
    assert chunk(x, mx.distributed.init()).shape == x.shape
    assert head_split(12, 3, 2) == [range(0, 8), range(8, 12)]
    with pytest.raises(ValueError, match=r"group size 3 is larger than the layer's 2 GQA groups"):
        head_split(4, 2, 3)
    with pytest.raises(TypeError, match="group must be an mx.distributed.Group.*got str"):
        HeadParallel(layer, "world")
    with pytest.raises(TypeError, match="layer must be an mha.MultiHeadAttention.*got list"):
        SequenceParallel([layer])
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds or None, got 0"):
        SequenceParallel(layer, timeout=0)
    with pytest.raises(ValueError, match="return_weights=True is not supported by SequenceParallel"):
        SequenceParallel(layer)(x, return_weights=True)
    with pytest.raises(ValueError, match=r"mask has 3 heads on axis 1 \(shape \(1, 3, 9, 9\)\); expected 4"):
        hp = HeadParallel(layer)
        hp.comm.size = 2  # pretend: the slicing check runs before any exchange
        hp(x, mask=np.ones((1, 3, 9, 9), bool))


def test_import_without_mlx_names_the_extra():
    """mha.distributed without MLX: an ImportError that says how to install it (mha itself still imports)."""
    code = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'mlx' or name.startswith('mlx.'):\n            raise ImportError('no mlx here')\n"
            "sys.meta_path.insert(0, Block())\nimport mha\ntry:\n    import mha.distributed\nexcept ImportError as e:\n"
            "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR mha.distributed needs MLX" in out.stdout and "pip install 'mha-twin[mlx]'" in out.stdout, \
        out.stdout + out.stderr


# -- the command ---------------------------------------------------------------------------------------
def test_cli_alone_and_its_errors():
    from click.testing import CliRunner

    from mha_cli.main import cli

    res = CliRunner().invoke(cli, ["distributed", "-T", "37", "-E", "12", "-H", "3", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["size"] == 1 and rec["rows"] == [0, 37] and rec["max_abs_diff"] < 1e-5 and rec["peak_mib"] > 0
    bad = CliRunner().invoke(cli, ["distributed", "-E", "64", "-H", "5"])
    assert bad.exit_code == 2 and "embed_dim=64 is not divisible by num_heads=5" in bad.output
    assert "Traceback" not in bad.output
    bad = CliRunner().invoke(cli, ["distributed", "--kind", "head", "-H", "4", "--kv-heads", "3"])
    assert bad.exit_code == 2 and "num_kv_heads" in bad.output


def test_cli_under_mlx_launch(tmp_path):
    """`mha distributed` on 3 ranks (T = 257: chunks 86, 86, 85): each rank's rows equal the one-process
    layer's within the ring's bound."""
    mha_script = Path(sys.executable).with_name("mha")
    out, _ = launch(3, None, tmp_path, timeout=60, command=["--", str(mha_script), "distributed", "-T", "257", "-E",
                                                            "24", "-H", "4", "--json"])
    recs = sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    assert [r["rows"] for r in recs] == [[0, 86], [86, 172], [172, 257]], out
    layer = mha.MultiHeadAttention(24, 4, seed=0, backend="numpy")
    x = np.random.default_rng(1).normal(size=(1, 257, 24)).astype(np.float32)
    y, lse = layer(x, causal=True, return_lse=True)
    weights = layer.weights
    M = tolerance.magnitude(weights, x, y_ref=y)
    _, _, vs = _abs_projections(weights, x, x, x)
    wv = float(np.abs(weights.o_weight.astype(np.float64)).sum(axis=1).max()) * max(float(np.abs(a).max()) for a in vs)
    bound = tolerance.t1("float32", M) + tolerance.t1("float32", ring_magnitude(M, wv, 3, lse))
    assert all(r["max_abs_diff"] <= bound for r in recs), (bound, recs)
