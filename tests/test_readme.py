"""The README cannot rot: every fenced example carries a marker, and the `fast` ones run as written.

Markers are HTML comments on the line before a fence:
  <!-- example: fast -->          runs as written in CI (in order, in one fresh folder with ../shared beside it)
  <!-- example: slow -->          runs as written, takes minutes (the main job); not run here
  <!-- example: needs WHAT -->    needs something this machine lacks (a GPU, hub weights, Docker)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, TEST_NPZ, need_shared

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"(?:<!-- example: (?P<kind>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def examples() -> list[tuple[str | None, str, str]]:
    """(marker, language, code) of every fenced block except `text` ones (shown output, not commands)."""
    return [(m["kind"], m["lang"], m["code"]) for m in FENCE.finditer(README.read_text()) if m["lang"] != "text"]


def test_every_example_is_marked():
    ex = examples()
    assert len(ex) >= 8
    unmarked = [code.splitlines()[0] for kind, _, code in ex if not kind]
    assert not unmarked, f"README examples without a <!-- example: ... --> marker: {unmarked}"
    kinds = {kind.split()[0] for kind, _, _ in ex}
    assert kinds <= {"fast", "slow", "needs"}, kinds
    assert sum(k == "fast" for k, _, _ in ex) >= 3


def test_readme_opens_with_the_two_setup_commands():
    kind, lang, code = examples()[0]
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert kind == "slow" and lang == "bash" and len(lines) == 2
    assert "mixq-onnx quantize" in lines[0] and "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "pip install -q -e '.[dev]'" in ci


@need_shared(TEST_NPZ)
@pytest.mark.slow
def test_fast_examples_run_as_written(tmp_path):
    """Run every `fast` block, in README order, in a fresh folder whose ../shared is the real one."""
    work = tmp_path / "main"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    exe = shutil.which("mixq-onnx")
    assert exe, "mixq-onnx is not installed (pip install -e .)"
    env = {**os.environ, "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MIXQ_CACHE_ROOT", None)
    for i, (kind, lang, code) in enumerate(examples()):
        if kind != "fast":
            continue
        if lang == "python":
            cmd = [sys.executable, "-c", code]
        else:
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README example {i} failed:\n{code}\n--- stderr\n{r.stderr[-3000:]}"
