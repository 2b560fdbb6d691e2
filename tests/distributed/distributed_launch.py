"""Launching tests/distributed_worker.py (or a command) on n ranks of this machine with ``mlx.launch --backend
ring``: free ports, a hard timeout, the launcher's whole process group killed afterwards."""

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


def launch(n: int, cfg: dict, tmp_path: Path, timeout: float = 120.0, command=None) -> tuple[str, float]:
    """Run the worker with ``cfg`` (or ``command``, a list) on ``n`` ranks; returns (the launcher's output,
    seconds). Kills the process group on timeout (and fails the test) and after the launch in any case."""
    import time

    if command is None:
        conf = tmp_path / "config.json"
        conf.write_text(json.dumps(cfg))
        command = ["--python", sys.executable, str(WORKER), str(conf), str(tmp_path)]
    cmd = [launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n), "--starting-port",
           str(free_ports(n)), *command]
    env = dict(os.environ, PYTHONPATH=str(WORKER.parents[2]))
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
