"""The CLI answers at once: --help, --version and argument errors never import torch, onnx, numpy, ...

Each check runs `python -m mixq_onnx.cli` in a fresh subprocess, so nothing this test process (or conftest.py)
has already imported can hide a slow module-level import.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

HEAVY = ("torch", "torchvision", "timm", "diffusers", "transformers", "onnx", "onnx_ir", "onnxruntime", "numpy",
         "safetensors", "PIL", "tensorrt", "tensorrt_rtx")
LIMIT_S = 1.0  # wall time of one fast CLI call, interpreter start-up included
CLI = [sys.executable, "-m", "mixq_onnx.cli"]
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)


def _best_of(args: list[str], n: int = 3) -> tuple[float, subprocess.CompletedProcess]:
    """Fastest of n runs, so a busy CI machine does not flake the timing."""
    best, res = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        res = _run(args)
        best = min(best, time.perf_counter() - t)
    return best, res


def _commands(help_text: str) -> list[str]:
    """Command names of click's 'Commands:' section."""
    section = help_text.split("\nCommands:\n", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  (\S+)\s", section, re.M)]


def test_import_loads_no_heavy_module():
    code = ("import mixq_onnx.cli, sys; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = _run([sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_public_names_still_import():
    code = ("import sys, mixq_onnx; assert 'torch' not in sys.modules; "
            "from mixq_onnx import MixqError, __version__, load_model, quantize, load_quantized, CalibConfig; "
            "assert callable(load_model) and callable(quantize) and callable(load_quantized); "
            "assert issubclass(MixqError, Exception) and __version__; print('ok')")
    res = _run([sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_every_help_loads_no_heavy_module():
    """All --help pages (nested groups included) in one process: none of them imports a heavy module."""
    code = f"""
import sys
import click
from mixq_onnx.cli import cli, main

def walk(group, path):
    for name in group.list_commands(None):
        cmd = group.get_command(None, name)
        yield path + [name]
        if isinstance(cmd, click.Group):
            yield from walk(cmd, path + [name])

paths = [[]] + list(walk(cli, []))
for p in paths:
    try:
        main(p + ["--help"])
    except SystemExit as e:
        assert e.code == 0, (p, e.code)
print("HEAVY", sorted(m for m in {HEAVY!r} if m in sys.modules), len(paths))
"""
    res = _run([sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY [] "), last
    assert int(last.split()[-1]) >= 16  # the group, 11 commands, the 4 cache subcommands


def test_python_m_entry_point():
    res = _run(CLI + ["--version"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("mixq-onnx, version ")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["quantize", "--help"], ["build", "--help"],
                                  ["cache", "rm", "--help"]], ids=" ".join)
def test_fast_help_and_version(args):
    best, res = _best_of(CLI + args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert best <= LIMIT_S, f"mixq-onnx {' '.join(args)} took {best:.2f} s (best of 3)"


@pytest.mark.parametrize("args", [["quantize", "--wbits", "x"], ["quantize", "--bogus"],
                                  ["quantize", "--out", "x"], ["nosuchcommand"]], ids=" ".join)
def test_fast_argument_errors(args):
    best, res = _best_of(CLI + args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert best <= LIMIT_S, f"mixq-onnx {' '.join(args)} took {best:.2f} s (best of 3)"


def test_every_listed_subcommand_has_help():
    top = _run(CLI + ["--help"])
    assert top.returncode == 0, top.stderr
    names = _commands(top.stdout)
    assert {"calib", "cache", "quantize", "eval", "export", "check", "verify",
            "build", "inspect", "run", "bench"} <= set(names)
    for name in names:
        res = _run(CLI + [name, "--help"])
        assert res.returncode == 0, (name, res.stderr)
        assert res.stdout.startswith(f"Usage: mixq-onnx {name} "), (name, res.stdout[:200])
        if "\nCommands:\n" in res.stdout:  # a group: its subcommands too (cache ls, cache rm, ...)
            for sub in _commands(res.stdout):
                r = _run(CLI + [name, sub, "--help"])
                assert r.returncode == 0, (name, sub, r.stderr)
                assert r.stdout.startswith(f"Usage: mixq-onnx {name} {sub} "), (name, sub, r.stdout[:200])
