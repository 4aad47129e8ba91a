"""Progress output: tqdm on a terminal, throttled plain lines (count, rate, ETA) in pipes and logs, nothing
under -q; and the commands' long steps report through it end to end."""
from __future__ import annotations

import io
import os
import re
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import cli_subprocess_cmd

from mixq_onnx.errors import MixqError
from mixq_onnx.progress import PlainProgress, progress_bar

# "quantize: 12/40 units, 0.8 unit/s, 15 s, ETA 35 s (layer2.1)"; the final line ends "done in 50 s"
LINE = re.compile(r"^(?P<desc>.+?): (?P<n>\d+)/(?P<total>\d+) \w+, [\d.e+-]+ \w+/s, "
                  r"(?:(?P<final>done in|stopped after) )?\d+ (?:s|min|h)\b")
TINY = ["--model", "test_resnet", "--input-size", "32", "--random-weights"]


class _Clock:
    """A hand-driven clock: throttling tested without sleeping."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _progress_lines(text: str, desc: str | None = None) -> list[re.Match]:
    ms = [LINE.match(ln) for ln in text.splitlines()]
    return [m for m in ms if m and (desc is None or m["desc"] == desc)]


def test_plain_lines_carry_count_rate_and_eta_at_most_one_per_interval_and_a_final_line():
    clock, buf = _Clock(), io.StringIO()
    bar = PlainProgress(40, "quantize", "unit", stream=buf, interval=10.0, clock=clock)
    for _ in range(36):  # one unit a second for 36 s: lines at 10, 20 and 30 s, none in between
        clock.t += 1.0
        bar.update(1)
        bar.set_postfix_str("layer2.1")
    assert buf.getvalue().splitlines() == [
        "quantize: 10/40 units, 1 unit/s, 10 s, ETA 30 s (layer2.1)",
        "quantize: 20/40 units, 1 unit/s, 20 s, ETA 20 s (layer2.1)",
        "quantize: 30/40 units, 1 unit/s, 30 s, ETA 10 s (layer2.1)",
    ]
    clock.t += 2.0  # the last four units within 8 s of the last line: only the final line follows
    bar.update(4)
    bar.close()
    bar.close()  # once only
    assert buf.getvalue().splitlines()[-1] == "quantize: 40/40 units, 1.05 unit/s, done in 38 s (layer2.1)"
    assert len(buf.getvalue().splitlines()) == 4


def test_the_heartbeat_keeps_lines_coming_while_one_step_outlasts_the_interval():
    buf = io.StringIO()
    with progress_bar(3, "calib[inversion]", "image", stream=buf, interval=0.05) as bar:
        bar.update(1)
        time.sleep(0.4)  # a slow step: no update, yet lines keep coming
    lines = _progress_lines(buf.getvalue(), "calib[inversion]")
    assert len(lines) >= 3, buf.getvalue()
    assert [m["n"] for m in lines[:-1]] == ["1"] * (len(lines) - 1) and lines[-1]["final"] == "stopped after"
    assert not any(t.name.startswith("progress ") for t in threading.enumerate())


def test_real_time_throttling_by_the_interval():
    buf = io.StringIO()
    t0 = time.monotonic()
    with progress_bar(60, "train", "step", stream=buf, interval=0.1) as bar:
        for _ in range(60):
            time.sleep(0.01)
            bar.update(1)
            bar.set_postfix({"kd": "0.123"})
    elapsed = time.monotonic() - t0
    lines = _progress_lines(buf.getvalue(), "train")
    assert lines[-1]["final"] == "done in" and lines[-1]["n"] == "60"
    assert 2 <= len(lines) - 1 <= elapsed / 0.1 + 1, buf.getvalue()
    counts = [int(m["n"]) for m in lines]
    assert counts == sorted(counts) and all("ETA" in m.string for m in lines[:-1])
    assert "(kd=0.123)" in lines[0].string


def test_disabled_prints_nothing_and_starts_no_thread():
    buf = io.StringIO()
    before = threading.active_count()
    with progress_bar(5, "eval", "image", enabled=False, stream=buf, interval=0.01) as bar:
        assert threading.active_count() == before
        bar.update(5)
        bar.set_postfix(x=1)
        bar.set_postfix_str("y")
        time.sleep(0.05)
    assert buf.getvalue() == "" and bar.n == 5


def _pty(cols: int):
    """A real pseudo-terminal of `cols` columns: (text stream on its slave side, master fd to read)."""
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    import struct

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    return open(slave, "w", buffering=1, closefd=True), master


def _drain(fd: int) -> str:
    import select

    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def test_a_sized_terminal_gets_tqdm_a_sizeless_one_and_forced_plain_get_lines(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("MIXQ_PROGRESS", raising=False)
    tty, master = _pty(100)
    try:
        with progress_bar(4, "sweep", "cell", stream=tty) as bar:
            assert isinstance(bar, tqdm)
            bar.update(4)
        drawn = _drain(master)
        assert "4/4" in drawn and "cell/s" in drawn and "\r" in drawn, drawn
        monkeypatch.setenv("MIXQ_PROGRESS", "plain")
        with progress_bar(4, "sweep", "cell", stream=tty, interval=10) as bar:
            assert isinstance(bar, PlainProgress)
            bar.update(4)
        assert _drain(master).splitlines()[-1].startswith("sweep: 4/4 cells, ")
        monkeypatch.setenv("MIXQ_PROGRESS", "fancy")
        with pytest.raises(MixqError, match="MIXQ_PROGRESS must be auto or plain"):
            progress_bar(4, "sweep", "cell", stream=tty)
    finally:
        tty.close()
        os.close(master)
    monkeypatch.delenv("MIXQ_PROGRESS")
    tty, master = _pty(0)  # what `script` gets from a pipe: tqdm would draw empty lines on it
    try:
        with progress_bar(4, "sweep", "cell", stream=tty, interval=10) as bar:
            assert isinstance(bar, PlainProgress)
    finally:
        tty.close()
        os.close(master)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_interval_is_bad_input(monkeypatch, value):
    monkeypatch.setenv("MIXQ_PROGRESS_INTERVAL", value)
    with pytest.raises(MixqError, match="MIXQ_PROGRESS_INTERVAL must be a positive number"):
        progress_bar(4, "x", stream=io.StringIO())


def test_bad_input_raised_inside_a_bar_stays_one_error_line():
    buf = io.StringIO()
    with pytest.raises(MixqError):
        with progress_bar(4, "eval", "image", stream=buf, interval=10):
            raise MixqError("labels outside the classes")
    bar = progress_bar(4, "train", "step", stream=buf, interval=10)
    try:
        with pytest.raises(MixqError):
            try:
                raise MixqError("no")
            finally:
                bar.close()
    finally:
        bar.close()
    assert buf.getvalue() == ""


# ----------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from mixq_onnx.calib import CalibConfig, make_calibration_cache

    root = tmp_path_factory.mktemp("progress")
    return make_calibration_cache(CalibConfig(generator="noise", num=32, size=32), root / "cache", progress=False)


def test_quantize_in_a_pipe_prints_progress_lines_and_with_q_only_the_summary(cache, tmp_path):
    """The CLI as a subprocess with stderr piped (not a TTY): the setup and the units report lines."""
    env = {**os.environ, "MIXQ_PROGRESS_INTERVAL": "0.05", "OMP_NUM_THREADS": "1"}
    env.pop("MIXQ_PROGRESS", None)
    base = [*cli_subprocess_cmd(), "quantize", *TINY, "--calib", str(cache), "--method", "qdrop", "--iters", "20"]
    r = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    setup = _progress_lines(r.stderr, "qdrop W4A4 setup")
    units = _progress_lines(r.stderr, "qdrop W4A4")
    assert setup and setup[-1]["final"] == "done in" and setup[-1]["n"] == setup[-1]["total"], r.stderr
    assert len(units) >= 2 and units[-1]["final"] == "done in" and units[-1]["n"] == units[-1]["total"] == "8"
    assert any("ETA" in m.string for m in units), r.stderr
    assert re.match(r"quantize: [\d.]+ s wall", r.stderr.splitlines()[-1])

    q = subprocess.run([*base, "--out", str(tmp_path / "b"), "-q"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert q.returncode == 0, q.stderr
    assert not _progress_lines(q.stderr) and "ETA" not in q.stderr, q.stderr
    assert re.match(r"quantize: [\d.]+ s wall", q.stderr.splitlines()[-1])
    assert q.stdout.strip().splitlines()[-1] == str(tmp_path / "b")


def test_inversion_reports_within_a_shard_and_eval_per_batch(run_cli, monkeypatch, tmp_path):
    """In-process (stderr captured, not a TTY): the calib bar moves during its one shard, eval's per batch."""
    monkeypatch.setenv("MIXQ_PROGRESS_INTERVAL", "0.001")
    r = run_cli("calib", "--generator", "inversion", *TINY, "--num", "8", "--iters", "30",
                "--cache-root", tmp_path / "c")
    assert r.code == 0, r.err
    lines = _progress_lines(r.err, "calib[inversion]")
    assert any(0 < int(m["n"]) < 8 for m in lines), r.err  # before the shard's images were written
    assert lines[-1]["final"] == "done in" and lines[-1]["n"] == "8"
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y=np.arange(40) % 10)
    r = run_cli("eval", *TINY, "--data", tmp_path / "d.npz", "--batch-size", "8")
    assert r.code == 0, r.err
    counts = [int(m["n"]) for m in _progress_lines(r.err, "eval")]
    assert counts and counts[-1] == 40 and all(c % 8 == 0 for c in counts), r.err
    q = run_cli("eval", *TINY, "--data", tmp_path / "d.npz", "--batch-size", "8", "-q")
    assert q.code == 0 and not _progress_lines(q.err) and "eval:" in q.err.splitlines()[-1], q.err


def test_diffusion_reports_every_denoising_step_and_batch_without_changing_the_images(tiny_pipeline, monkeypatch,
                                                                                     tmp_path):
    import torch

    from mixq_onnx.calib.classes import load_classes
    from mixq_onnx.calib.generators.base import GenContext
    from mixq_onnx.calib.generators.diffusion import DiffusionGenerator
    from mixq_onnx.calib.prompts import PromptConfig, plan_images

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vocab = load_classes("cifar10")
        ctx = GenContext(num=4, seed=7, size=32, prompts=PromptConfig("mixup"), vocab=vocab, model=None,
                         device=torch.device("cpu"), options={"pipeline": str(tiny_pipeline), "steps": 3,
                                                              "batch_size": 2}, log=lambda msg: None)
        gen = DiffusionGenerator(ctx)
        gen.validate()
        plans = plan_images(PromptConfig("mixup"), vocab, 7, 0, 4)
        seen: list[float] = []
        ctx.shard_progress = seen.append
        with_bar = gen.generate(0, plans).images
        # every scheduler timestep of 2 batches (PNDM runs a few more than --steps), and each batch's end
        assert len(seen) >= 8 and seen == sorted(seen) and seen[-1] == 1.0 and 0 < seen[0] < 0.5, seen
        assert len({round(f, 6) for f in seen}) >= 6 and max(seen[:len(seen) // 2]) <= 0.5, seen
        ctx.shard_progress = lambda _f: None
        gen.pipe.set_progress_bar_config(disable=True)
        plain = torch.stack([gen._run_group(plans[i:i + 2]) for i in (0, 2)]).reshape(with_bar.shape)
        assert torch.equal(with_bar, plain)  # the step callback leaves the latents alone
    finally:
        torch.set_num_threads(before)
