"""The thread policy: user settings win, auto mode follows other processes' load (not our own)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mixq_onnx import threads as T


def _s(busy: int, total: int, own: int) -> T._Sample:
    return T._Sample(busy, total, own, time.monotonic())


def test_idle_cores_counts_only_other_processes(monkeypatch):
    monkeypatch.setattr(T.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(T, "usable_cores", lambda: 2)
    a = _s(0, 0, 0)
    assert T.idle_cores(a, _s(0, 200, 0)) == 2.0  # idle machine
    assert T.idle_cores(a, _s(200, 200, 200)) == 2.0  # all the load is ours
    assert T.idle_cores(a, _s(100, 200, 0)) == 1.0  # one core held by someone else
    assert T.idle_cores(a, _s(200, 200, 0)) == 0.0
    assert T.idle_cores(a, a) is None
    g = T.Governor(2)
    assert [g.choose(x) for x in (0.0, 0.6, 1.0, 1.7, 2.0, None)] == [1, 1, 1, 2, 2, 2]


def test_user_settings_win(monkeypatch):
    import torch

    old = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert "OMP_NUM_THREADS" in T.configure() and T.governor() is None and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert "--threads" in T.configure(2) and torch.get_num_threads() == 2 and T.governor() is None
        T.tick()  # no-op outside auto mode
        assert torch.get_num_threads() == 2
    finally:
        T._GOVERNOR = None
        torch.set_num_threads(old)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_auto_mode_backs_off_when_every_core_is_busy():
    """With a busy loop on every usable core, auto mode runs one thread (never more than are idle)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(T.usable_cores())]
    try:
        time.sleep(0.5)
        code = ("import mixq_onnx.threads as T, torch; d = T.configure(); "
                "print(torch.get_num_threads(), d)")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        n = int(out.stdout.split()[0])
        assert n == 1 and "auto" in out.stdout, out.stdout + out.stderr
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_bad_omp_num_threads_is_a_one_line_error(run_cli, monkeypatch, tmp_path):
    from conftest import one_line_error

    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    msg = one_line_error(run_cli("calib", "--generator", "noise", "--num", "4", "--size", "16", "--cache-root", tmp_path))
    assert "OMP_NUM_THREADS='lots'" in msg
    monkeypatch.setenv("OMP_NUM_THREADS", "1,1")
    assert T._omp_threads("1,1") == 1
