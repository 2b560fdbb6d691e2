"""Every script in examples/ runs to completion (they assert their own claims)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))
NEEDS = {"from_torch.py": "torch", "train_specialisation.py": "mlx.core", "generate.py": "mlx.core"}
SCREENFUL = 50  # lines


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    if script.name in NEEDS:
        pytest.importorskip(NEEDS[script.name])
    env = {**os.environ, "MPLBACKEND": "Agg", "MHA_EXAMPLE_QUICK": "1"}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    # a screenful, quietly: check_my_attention.py printed 2,396 lines, nearly all RuntimeWarnings
    lines = res.stdout.splitlines()
    assert len(lines) <= SCREENFUL and max(map(len, lines), default=0) <= 100, (len(lines), res.stdout[-3000:])
    assert "Warning" not in res.stderr, res.stderr[-3000:]


def test_check_my_attention_finds_the_second_bug_when_the_first_is_fixed(tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "check_my_attention.py"
    env = {**os.environ, "MHA_EXAMPLE_FIXED": "1"}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "the suite found: nonfinite_hidden_isolation, nonfinite_visible_confined, nonfinite_self_attention" in res.stdout
    assert "rerun: run_property(impl, 'nonfinite_hidden_isolation', reproduce='" in res.stdout
    assert len(res.stdout.splitlines()) <= SCREENFUL and "Warning" not in res.stderr


def test_rounds_benchmark_script_runs(tmp_path):
    pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "rounds.py"
    res = subprocess.run([sys.executable, str(script), "--shape", "1,8,8,2", "--rounds", "2", "--repeat", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("round ") == 2 and "medians over rounds: ratio" in res.stdout
    assert "fastest rounds: ratio" in res.stdout
    bad = subprocess.run([sys.executable, str(script), "--shape", "1,8,8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--shape must be four positive integers" in bad.stderr


def test_paired_benchmark_script_runs(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "paired.py"
    res = subprocess.run([sys.executable, str(script), "--shape", "2,16,16,4", "--pairs", "3", "--a",
                          '{"block_q": 4}', "--b", '{"threads": 2, "blas_threads": null}', "--weights"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "B - A paired median" in res.stdout
    bad = subprocess.run([sys.executable, str(script), "--a", '{"nope": 1}'], capture_output=True, text=True)
    assert bad.returncode == 2 and "mha_cpu.options fields" in bad.stderr
    bad = subprocess.run([sys.executable, str(script), "--a", '{"block_k": 0}'], capture_output=True, text=True)
    assert bad.returncode == 2 and "mha_cpu.options.block_k must be an int >= 1, got 0" in bad.stderr


def test_decode_benchmark_scripts_run(tmp_path):
    """benchmarks/decode_parts.py and versions.py (two trees in turns; here this tree twice), whose figures
    docs/performance.md quotes, on tiny shapes: they run, and refuse what they cannot measure."""
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "decode_parts.py"), "--context", "9", "--steps",
                          "20", "--llama", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "the rest" in res.stdout and "RoPE" in res.stdout, res.stdout + res.stderr
    versions = [sys.executable, str(root / "benchmarks" / "versions.py"), str(root), str(root), "--rounds", "2",
                "--calls", "2"]
    for extra in (["--shape", "2,9,16,4", "--causal"], ["--shape", "1,5,16,4", "--decode", "7", "--llama", "2"]):
        res = subprocess.run(versions + extra, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0 and "median B/A over rounds" in res.stdout, res.stdout + res.stderr
    bad = subprocess.run(versions + ["--decode", "7", "--causal"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--causal is for whole calls" in bad.stderr


def test_gpu_benchmark_script_runs_on_the_cpu(tmp_path):
    """benchmarks/mlx_gpu.py is run by hand on a GPU machine; a smoke run here keeps it from rotting
    (tiny shapes, every section, the JSON written)."""
    pytest.importorskip("mlx.core")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "mlx_gpu.py"
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(script), "--quick", "--only", "accuracy,speed,long,decode,parts",
                          "--repeat", "1", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    import json

    report = json.loads(out.read_text())
    assert set(report) >= {"info", "accuracy", "speed", "long", "decode", "parts"}
    for row in report["speed"]:
        assert {"mha mlx", "mlx.nn", "mha mlx +weights", "mlx naive"} <= set(row["ms"]), row
