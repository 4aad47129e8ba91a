"""tools/check_imports.py: CI fails when the package imports something pyproject.toml does not declare."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_imports.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120)


def test_project_declares_every_import():
    r = _run("--also", "tools")
    assert r.returncode == 0, r.stdout + r.stderr


def test_planted_undeclared_import_fails(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "p"\ndependencies = ["numpy>=1"]\n'
                                             '[project.optional-dependencies]\nx = ["click"]\n')
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import numpy\nfrom . import sub\n")
    (pkg / "sub.py").write_text("import json\n\ndef f():\n    import click\n    import onnxscript  # lazy, still counts\n")
    r = _run("--root", str(tmp_path), "--package", "pkg")
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "onnxscript" in lines[0] and "pkg/sub.py" in lines[0], r.stdout


def test_peer_drivers_are_not_the_projects_imports(tmp_path):
    """tools/peers/ runs inside each peer's own virtual environment: its imports are not the project's; any
    other tools/ script's are."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "p"\ndependencies = ["numpy>=1"]\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("import numpy\n")
    (tmp_path / "tools" / "peers").mkdir(parents=True)
    (tmp_path / "tools" / "peers" / "driver.py").write_text("import modelopt\n")
    assert _run("--root", str(tmp_path), "--package", "pkg", "--also", "tools").returncode == 0
    (tmp_path / "tools" / "bench.py").write_text("import modelopt\n")
    r = _run("--root", str(tmp_path), "--package", "pkg", "--also", "tools")
    assert r.returncode == 1 and "tools/bench.py" in r.stdout, r.stdout
