"""The registry of subcommands, each in a module of its own, imported when the group is built.

Modules import only click at top level; numpy, MLX, torch and the models load inside the command.
"""

from __future__ import annotations

import importlib


def _lazy(module: str, attr: str):
    def load():
        return getattr(importlib.import_module(f"mha_cli.{module}"), attr)

    return load


COMMANDS = {
    "demo": _lazy("demo", "demo"),
    "heads": _lazy("heads", "heads"),
    "generate": _lazy("generate", "generate"),
    "prune": _lazy("prune", "prune"),
    "bench": _lazy("bench", "bench"),
    "check": _lazy("check", "check"),
    "info": _lazy("info", "info"),
    "distributed": _lazy("distributed", "distributed"),
}
