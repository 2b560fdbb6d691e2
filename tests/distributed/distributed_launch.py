"""Launching tests/distributed/distributed_worker.py on n ranks of this machine as ``mlx.launch --backend ring``
does, without its launcher process (or a command under mlx.launch itself): free ports, a hard timeout,
every process killed afterwards."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py").resolve()


def launcher() -> str:
    path = Path(sys.executable).with_name("mlx.launch")
    return str(path) if path.exists() else (shutil.which("mlx.launch") or "mlx.launch")


def free_ports(n: int) -> int:
    """A starting port p such that p .. p + n - 1 are free on 127.0.0.1 now."""
    rng = random.Random()
    for _ in range(200):
        p = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def run_ranks(n: int, cmd: list, env: dict, timeout: float, cwd=None) -> tuple[int, str, float]:
    """``cmd`` on ``n`` ranks of this machine, started as ``mlx.launch --backend ring`` starts them (a
    hostfile of one ``127.0.0.1:port`` per rank, ``MLX_HOSTFILE``, ``MLX_RANK``) but without its launcher
    process, which polls the ranks' output at most of a core (87% of one while the ranks slept, measured
    here) and so takes a core from the ranks of a 2-core machine. As mlx.launch does, a rank that exits
    with an error ends the others. Returns (the worst exit status, every rank's output, seconds); on
    timeout every rank is killed and the exit status is -9."""
    import tempfile
    import time

    port = free_ports(n)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{port + r}"] for r in range(n)], f)
    t0, outs = time.time(), []
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              env=dict(env, MLX_HOSTFILE=f.name, MLX_RANK=str(r)), cwd=cwd) for r in range(n)]
    try:
        failed = None
        while any(p.poll() is None for p in procs) and time.time() - t0 < timeout:
            if failed is None and any(p.poll() not in (None, 0) for p in procs):
                failed = time.time()
            if failed is not None and time.time() - failed > 1.0:  # a rank failed: end the others after 1 s
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        outs = [p.communicate()[0].decode(errors="replace") for p in procs]
        os.unlink(f.name)
    code = -9 if time.time() - t0 >= timeout else max((abs(p.returncode) for p in procs), default=0)
    return code, "".join(outs), time.time() - t0


def launch(n: int, cfg: dict, tmp_path: Path, timeout: float = 120.0, command=None) -> tuple[str, float]:
    """Run the worker with ``cfg`` on ``n`` ranks (:func:`run_ranks`), or ``command`` (a list of mlx.launch
    arguments) under ``mlx.launch`` itself; returns (the ranks' output, seconds). Kills every process on
    timeout (and fails the test) and after the launch in any case."""
    import time

    env = dict(os.environ, PYTHONPATH=str(WORKER.parents[2]))
    if command is None:
        conf = tmp_path / "config.json"
        conf.write_text(json.dumps(cfg))
        code, out, seconds = run_ranks(n, [sys.executable, str(WORKER), str(conf), str(tmp_path)], env, timeout,
                                       cwd=str(tmp_path))
        if code == -9:
            pytest.fail(f"the ranks did not finish within {timeout} s:\n{out[-3000:]}")
        return out, seconds
    cmd = [launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n), "--starting-port",
           str(free_ports(n)), *command]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                            cwd=str(tmp_path))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mlx.launch did not finish within {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # reap anything left of the group
        except ProcessLookupError:
            pass
    return out.decode(errors="replace"), time.time() - t0
