"""The code's shape, checked: no import cycle in mha/, no private imports across packages, and the
kernel and front end in functions and files a maintainer can read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"mha": ROOT / "mha", "mha_cpu": ROOT / "mha_cpu", "mha_mlx": ROOT / "mha_mlx", "mha_cli": ROOT / "cli"}


def _module_name(path: Path) -> str:
    for pkg, folder in PACKAGES.items():
        if folder in path.parents or path.parent == folder:
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((pkg,) + parts)
    raise ValueError(path)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_no_import_cycle_in_mha():
    files = {_module_name(p): p for p in (ROOT / "mha").rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {i for i in deps if not (files[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, deps in graph.items()}
    seen, stack = {}, []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if seen.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in seen:
                visit(d)
        seen[m] = "done"
        stack.pop()

    for m in sorted(graph):
        if m not in seen:
            visit(m)


@pytest.mark.parametrize("folder", ["cli", "benchmarks", "examples", "mha/testing"])
def test_no_private_imports_into_the_core_or_backends(folder):
    """The CLI, benchmarks, examples and the property suite use public names only (mha.testing may use
    its own private modules)."""
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[0] in ("mha", "mha_cpu", "mha_mlx", "mha_cli") and any(p.startswith("_") for p in parts[1:]):
                    if folder == "mha/testing" and n.startswith("mha.testing."):
                        continue
                    if folder == "cli" and parts[0] == "mha_cli":
                        continue
                    bad.append(f"{path.relative_to(ROOT)}: {n}")
    assert not bad, "private imports: " + "; ".join(bad)


KERNEL_FILES = sorted((ROOT / "mha_cpu").glob("*.py")) + [ROOT / "mha" / f for f in
                                                           ("_layer.py", "_prepare.py", "_interface.py")]


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernel_and_front_end_stay_readable(path):
    """No function over 80 lines, no file over 400, in the numpy backend and the shared front end."""
    text = path.read_text()
    assert len(text.splitlines()) <= 400, f"{path.name}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= 80, f"{path.name}: {node.name} has {n} lines"
