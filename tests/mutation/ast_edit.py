"""Mutants as AST edits anchored on a function, so that reformatting or moving code never breaks them.

A mutant names a file, a function (its qualified name, e.g. ``masked_softmax`` or ``MaskSet.causal_keep``),
the code it replaces and the code it puts instead. ``old`` is parsed: one expression is looked for among
the function's expressions, one or more statements among its statement lists, compared as ASTs (names,
operators, constants; not formatting, comments or line breaks). It must occur exactly once in that
function. The module is then written back with ``ast.unparse`` (comments go; it is a throw-away copy).
"""

from __future__ import annotations

import ast


class MutantError(ValueError):
    """A mutant that does not apply (its function or code is not found once)."""


def _dump(node) -> str:
    """The node's AST as text, with every Store/Del context read as Load (so targets match too)."""
    text = ast.dump(node, annotate_fields=True, include_attributes=False)
    return text.replace("ctx=Store()", "ctx=Load()").replace("ctx=Del()", "ctx=Load()")


def _function(tree: ast.Module, qualname: str):
    """The function (or class) node at ``qualname`` ('Class.method', 'function', 'outer.inner')."""
    node, parts = tree, qualname.split(".")
    for part in parts:
        found = [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part and n is not node]
        direct = [n for n in found if _is_child_def(node, n)]
        found = direct or found
        if len(found) != 1:
            raise MutantError(f"{qualname}: {len(found)} definitions named {part!r}")
        node = found[0]
    return node


def _is_child_def(parent, child) -> bool:
    """Whether ``child`` is defined in ``parent`` itself, not in a nested definition."""
    stack = list(ast.iter_child_nodes(parent))
    while stack:
        n = stack.pop()
        if n is child:
            return True
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(n))
    return False


def _expression(code: str):
    body = ast.parse(code).body
    return body[0].value if len(body) == 1 and isinstance(body[0], ast.Expr) else None


def _expr_sites(func, target: str) -> list:
    """(parent, field, index or None) of every expression in ``func`` whose AST is ``target``."""
    sites = []
    for parent in ast.walk(func):
        for field, value in ast.iter_fields(parent):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, ast.expr) and _dump(item) == target:
                    sites.append((parent, field, i if isinstance(value, list) else None))
    return sites


def _stmt_sites(func, targets: list) -> list:
    """(statement list, start) of every run of statements in ``func`` equal to ``targets``."""
    want = [_dump(t) for t in targets]
    sites = []
    for parent in ast.walk(func):
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(parent, field, None)
            if not isinstance(stmts, list) or not stmts or not isinstance(stmts[0], ast.stmt):
                continue
            dumps = [_dump(s) for s in stmts]
            for i in range(len(stmts) - len(want) + 1):
                if dumps[i:i + len(want)] == want:
                    sites.append((stmts, i))
    return sites


def apply(source: str, function: str, old: str, new: str) -> str:
    """``source`` with ``old`` replaced by ``new`` inside ``function`` (see the module docstring)."""
    tree = ast.parse(source)
    func = _function(tree, function)
    expr = _expression(old)
    if expr is not None and _expression(new) is not None:  # else (e.g. a call -> pass): as statements
        sites = _expr_sites(func, _dump(expr))
        if len(sites) == 1:
            parent, field, i = sites[0]
            replacement = _expression(new)
            if i is None:
                setattr(parent, field, replacement)
            else:
                getattr(parent, field)[i] = replacement
            return ast.unparse(ast.fix_missing_locations(tree)) + "\n"
        if len(sites) > 1:
            raise MutantError(f"{function}: {old!r} occurs {len(sites)} times")
    targets = ast.parse(old).body
    sites = _stmt_sites(func, targets)
    if len(sites) != 1:
        raise MutantError(f"{function}: {old!r} occurs {len(sites)} times as statements")
    stmts, i = sites[0]
    stmts[i:i + len(targets)] = ast.parse(new).body or [ast.Pass()]
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"
