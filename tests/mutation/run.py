"""Mutation harness: apply each mutant to a copy of the project and run the property suite on it.

    python tests/mutation/run.py              # every mutant; prints a kill table and the kill rate
    python tests/mutation/run.py scale-1/D    # chosen mutants
    python tests/mutation/run.py --matrix     # every property on every mutant: which ones kill it
    python tests/mutation/run.py --backends mlx fused-no-empty-fix   # the properties on one backend only

A mutant is killed when any property fails on either backend (numpy and mlx, each with automatic and
with tiny blocks) under the derandomized
"mutation" Hypothesis profile. Exit status 0 only when every mutant is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.mutation import ast_edit  # noqa: E402
from tests.mutation.mutants import MUTANTS  # noqa: E402

DRIVER = r"""
import json, sys
import mha
assert mha.__file__.startswith(sys.argv[1]), mha.__file__   # the mutated copy, not the installed one
from mha.testing import run_property
from mha.testing.adapters import BackendAdapter
from mha.testing.profiles import load_profile
from mha.testing.properties import PROPERTIES
from mha.testing.conventions import conventions_of
load_profile("mutation")
matrix = sys.argv[2] == "matrix"
backends = sys.argv[3].split(",")
killers = []
for backend, blocks in (("numpy", None), ("numpy", (2, 3)), ("mlx", None), ("mlx", (2, 3))):
    if backend not in backends:
        continue
    adapter = BackendAdapter(backend, blocks)
    for name in PROPERTIES:
        if matrix and name in killers:
            continue
        if PROPERTIES[name].not_applicable(adapter.features, conventions_of(adapter), adapter.dtypes):
            continue  # n/a on this backend (e.g. float64 on MLX): not a kill
        try:
            run_property(adapter, name)
        except Exception as err:
            if not matrix:
                print(json.dumps({"killed": True, "by": f"{backend}{'-blocks' if blocks else ''}:{name}", "why": str(err).splitlines()[0][:160]}))
                sys.exit(0)
            killers.append(name)
print(json.dumps({"killed": bool(killers), "by": ",".join(killers), "killers": killers}))
"""


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "mha", "mha_cpu", "mha_mlx"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def apply(dest: Path, m) -> None:
    path = dest / m.path
    path.write_text(ast_edit.apply(path.read_text(), m.function, m.old, m.new))


def run_one(m, mode: str = "first", backends=("numpy", "mlx")) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp)
        copy_project(dest)
        apply(dest, m)
        env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", DRIVER, str(dest), mode, ",".join(backends)], cwd=dest, env=env,
                             capture_output=True, text=True, timeout=900)
        out = res.stdout.strip().splitlines()
        if res.returncode != 0 or not out:
            return {"killed": True, "by": "crash", "why": (res.stderr.strip().splitlines() or ["?"])[-1][:160],
                    "seconds": time.perf_counter() - t0}
        result = json.loads(out[-1])
        result["seconds"] = time.perf_counter() - t0
        return result


def main(argv) -> int:
    matrix = "--matrix" in argv
    argv = [a for a in argv if a != "--matrix"]
    backends = ("numpy", "mlx")
    if "--backends" in argv:  # the properties on these backends only (e.g. a backend's own mutants)
        i = argv.index("--backends")
        backends = tuple(argv[i + 1].split(","))
        argv = argv[:i] + argv[i + 2:]
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    if argv and len(chosen) != len(argv):
        raise SystemExit(f"unknown mutants: {set(argv) - {m.name for m in MUTANTS}}")
    killed, unique = 0, {}
    for m in chosen:
        r = run_one(m, "matrix" if matrix else "first", backends)
        killed += r["killed"]
        status = "killed" if r["killed"] else "SURVIVED"
        by = r.get("by", "")
        if matrix:
            ks = r.get("killers", [])
            metamorphic = [k for k in ks if k != "reference"]
            by = f"{len(ks)} properties: {', '.join(ks)}" + ("" if metamorphic else "  [only the oracle]")
            if len(ks) == 1:
                unique[ks[0]] = unique.get(ks[0], 0) + 1
        print(f"{m.name:<24} {status:<8} {r['seconds']:5.1f} s  {by}  ({m.bug})", flush=True)
    print(f"\nkill rate: {killed}/{len(chosen)} = {100 * killed / len(chosen):.0f}%")
    if matrix:
        print("sole killers: " + (", ".join(f"{k} ({n})" for k, n in unique.items()) or "none"))
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
