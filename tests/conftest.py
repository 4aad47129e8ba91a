from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread for the whole suite (set before torch loads): results do not depend on the CI
# machine's load, and in-process CLI calls keep to it instead of starting auto thread mode.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mixq_onnx.cli import main  # noqa: E402
from mixq_onnx.utils import shared_root  # noqa: E402

SHARED = shared_root()
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "resnet56-4bfd9763.th"
RESNET8 = SHARED / "models" / "mlperf-tiny-resnet8_cifar10_state_dict.pt"
TRAIN_NPZ = SHARED / "data" / "cifar10_train_calib.npz"
TEST_NPZ = SHARED / "data" / "cifar10_test_dev.npz"


def need_shared(*paths: Path):
    """Mark a test `shared` (select with -m shared) and skip it when ../shared lacks one of `paths`."""
    missing = [p for p in paths if not p.exists()]
    skip = pytest.mark.skipif(bool(missing), reason=f"../shared not available ({missing[0] if missing else ''})")

    def deco(obj):
        return pytest.mark.shared(skip(obj))

    return deco


#: the longest files, scheduled first: under `--dist loadfile` a long file started last leaves the other worker idle
LONG_FILES = ("test_readme.py", "test_export_timm.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda it: LONG_FILES.index(it.path.name) if it.path.name in LONG_FILES else len(LONG_FILES))


@pytest.fixture(autouse=True)
def _restore_threads():
    """A test that changes torch's thread count (or starts auto thread mode) leaves the next one unaffected."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    from mixq_onnx import threads

    threads.reset()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(before if before is not None else int(os.environ.get("OMP_NUM_THREADS", "1")))


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def last_line(self) -> str:
        lines = [ln for ln in self.out.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


@pytest.fixture
def run_cli(capsys):
    """Run `mixq-onnx ARGS` in-process; return exit code, stdout, stderr."""

    def _run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return _run


def cli_subprocess_cmd() -> list[str]:
    return [sys.executable, "-m", "mixq_onnx.cli"]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny random Stable-Diffusion pipeline folder built from diffusers configs (no download)."""
    from tiny_sd import make_tiny_sd_pipeline

    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def one_line_error(r: CliResult, code: int = 2) -> str:
    """Assert the hardening contract: exit `code`, stderr is exactly one `error: ...` line, no traceback."""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == code, (r.code, r.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err[-2000:]
    assert "Traceback" not in r.err
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots` with its size and mtime: compare before and after a command
    to prove it touched nothing outside its own output."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            out[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0)
    return out


def clean_error(run_cli, watch: list[Path], *args, code: int = 2) -> str:
    """Run a command that must fail: one `error:` line, exit `code`, nothing under `watch` touched."""
    before = snapshot(*watch)
    msg = one_line_error(run_cli(*args), code)
    assert snapshot(*watch) == before, "the failing command changed files"
    return msg


# A small user model file (`path.py:make`); `{side_effect}` is a line run at import (tests of the
# code-safety rules write one that leaves a marker).
SMALL_NET_PY = '''
import pathlib
import torch.nn as nn

{side_effect}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def make():
    return Net()
'''


def random_r20_rtn(n_calib: int = 8, bits: int = 4, model=None):
    """(float model, quantized model): a random-weight cifar_resnet20 (or `model`), rtn W`bits`A`bits` on
    `n_calib` seeded random images, on one thread. The fixture behind the tests that need any valid quantized
    network or folder."""
    import torch

    from mixq_onnx.models import load_model
    from mixq_onnx.quant import QuantConfig, quantize

    torch.set_num_threads(1)
    model = model if model is not None else load_model("cifar_resnet20", random_init=True)
    calib = torch.randn(n_calib, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, quantize(model, QuantConfig(wbits=bits, abits=bits, method="rtn"), calib, progress=False)
