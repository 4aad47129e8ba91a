"""Package structure: no module imports another module's private names, and module-level imports form no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mixq_onnx"


def _modname(f: Path) -> str:
    parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(top_level_only: bool):
    for f in sorted(PKG.rglob("*.py")):
        mod, is_pkg = _modname(f), f.name == "__init__.py"
        tree = ast.parse(f.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                yield mod, _resolve(mod, is_pkg, node), node
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield mod, a.name, None


def test_no_private_names_cross_modules():
    bad = []
    for mod, target, node in _imports(top_level_only=False):
        if node is None or not target.startswith("mixq_onnx") or target == mod:
            continue
        for a in node.names:
            if a.name.startswith("_") and not a.name.startswith("__"):
                bad.append(f"{mod} imports {target}.{a.name}")
    assert not bad, bad


def test_no_private_attributes_of_other_modules():
    """`from . import cache as C` then `C._x` is the same reach into another module's privates as importing
    `_x` by name; the test above cannot see it."""
    mods = {_modname(f) for f in PKG.rglob("*.py")}
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        mod, is_pkg = _modname(f), f.name == "__init__.py"
        tree = ast.parse(f.read_text())
        aliases: dict[str, str] = {}  # local name -> the project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node)
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != mod:
                bad.append(f"{mod}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad


def test_module_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    mods = {_modname(f) for f in PKG.rglob("*.py")}
    for mod, target, node in _imports(top_level_only=True):
        if not target.startswith("mixq_onnx"):
            continue
        deps = {target}
        if node is not None:  # `from pkg import sub` imports the submodule pkg.sub
            deps |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
        graph.setdefault(mod, set()).update(d for d in deps if d in mods and d != mod)
    # a package's __init__ importing its own submodules is not a cycle worth reporting; edges sub -> parent are
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if seen.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                if not all(c == cyc[0] or c.startswith(cyc[0] + ".") or cyc[0].startswith(c + ".") for c in cyc):
                    cycles.append(cyc)
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, cycles
