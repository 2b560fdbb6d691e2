"""benchmarks/decoders.py runs end to end (a tiny shape; the figures are in docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decoders.py"


@pytest.mark.slow
def test_the_decoder_benchmark_runs(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--folder", str(tmp_path / "m"), "--prompt", "16",
                    "--new", "4", "--prefill", "32", "--rounds", "1", "--stages", "--json", str(out)], check=True,
                   timeout=300)
    r = json.loads(out.read_text())
    assert r["ours_ms_per_token"] > 0 and r["transformers_ms_per_token"] > 0 and r["read_gbps"] > 0
    assert set(r["rounds"]) == {"ours", "transformers", "bandwidth"}
    stages = r["medians"]["ours"]["stages"]  # each stage of a step, rebuilt from the model's parts
    assert {"attention", "mlp_gate_up", "mlp_down", "lm_head"} <= set(stages) and stages["step"] > 0
