#!/usr/bin/env python3
"""Fail when the package imports a third-party module that pyproject.toml does not declare.

A dependency that only arrives by hand (or through another package's dependencies) passes on the
machine that has it and breaks a fresh install: `onnxscript` once did exactly that. `.ci/run` runs
this before the tests.

Usage: python tools/check_imports.py [--package mixq_onnx] [--also tools]
Every `import x` / `from x import` anywhere in the package (top level or inside functions) must map to
a distribution named in [project.dependencies] or one of the optional extras (the TensorRT modules
live in extras and are imported lazily). Exit 1 with one line per undeclared import.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution, for modules whose distribution is not installed where this runs
# folders whose scripts never run in the project's environment: tools/peers/ holds the drivers that
# tools/bench_peers.py runs inside each peer tool's own virtual environment (ModelOpt, the QDrop checkout)
FOREIGN = ("tools/peers",)
ALIASES = {"PIL": "pillow", "cv2": "opencv-python", "yaml": "pyyaml", "sklearn": "scikit-learn",
           "tensorrt_rtx": "tensorrt-rtx-cu13", "onnx_ir": "onnx-ir", "cuda": "cuda-python"}


def _norm(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared(pyproject: Path) -> set[str]:
    proj = tomllib.loads(pyproject.read_text())["project"]
    out = {_norm(d) for d in proj.get("dependencies", [])}
    for deps in proj.get("optional-dependencies", {}).values():
        out |= {_norm(d) for d in deps}
    return out


def imports(folder: Path, root: Path = ROOT) -> dict[str, str]:
    """Top-level module name -> first file importing it (absolute imports only)."""
    seen: dict[str, str] = {}
    for f in sorted(folder.rglob("*.py")):
        if any(f.relative_to(root).as_posix().startswith(d + "/") for d in FOREIGN):
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                seen.setdefault(n.split(".")[0], str(f.relative_to(root)))
    return seen


def undeclared(folders: list[Path], package: str, deps: set[str], root: Path = ROOT) -> list[str]:
    dists_of = md.packages_distributions()
    bad = []
    for folder in folders:
        local = {f.stem for f in folder.glob("*.py")} | {d.name for d in folder.iterdir() if (d / "__init__.py").exists()}
        for mod, where in sorted(imports(folder, root).items()):
            if mod in sys.stdlib_module_names or mod in (package, "__future__") or mod in local:
                continue
            dists = {d.lower().replace("_", "-") for d in dists_of.get(mod, [])}
            dists = dists or {ALIASES.get(mod, mod).lower().replace("_", "-")}
            if not dists & deps:
                bad.append(f"undeclared import: {mod} (in {where}; distribution {', '.join(sorted(dists))}) "
                           "is not in pyproject.toml")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="project root holding pyproject.toml")
    ap.add_argument("--package", default="mixq_onnx")
    ap.add_argument("--also", nargs="*", default=[], help="more folders to check (e.g. tools)")
    a = ap.parse_args()
    root = a.root.resolve()
    bad = undeclared([root / a.package, *(root / f for f in a.also)], a.package, declared(root / "pyproject.toml"), root)
    for b in bad:
        print(b)
    if not bad:
        print(f"imports ok: every third-party import of {a.package} is declared in pyproject.toml")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
