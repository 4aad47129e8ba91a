"""Intra-op threads that follow the machine's load, so a busy machine slows mixq-onnx in proportion.

Why: torch's OpenMP workers meet at a barrier after every operator. When another process holds one of
the cores, the worker that lost its core delays every barrier by a scheduler time slice, and
thousands of small operators per second (ResNet-20 on CPU) turn that into a 7-15x slowdown. Running
only as many threads as there are idle cores avoids the barrier stalls.

Policy (`configure`, called by every CLI command that computes, before torch is imported):
- `--threads N` or `OMP_NUM_THREADS` set by the user: exactly that, never changed.
- otherwise ("auto"): the idle cores measured from /proc/stat (other processes' load, not ours), at
  least 1, at most the cores this process may run on; re-measured at most every `interval` seconds
  by `tick()`, which the long loops (inversion steps, reconstruction iterations, eval batches) call.
- libgomp's default wait policy (spin briefly, then sleep). PASSIVE made qdrop 1.7x slower on an idle
  machine (a futex wake-up per operator); ACTIVE spins forever, so its idle pool threads would take
  the core that one-thread mode leaves to the other process.

Library users who call `torch.set_num_threads` themselves are never overridden: `tick()` is a no-op
until `configure` has enabled auto mode.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, from the first line of /proc/stat."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


def _own_ticks() -> int:
    """user + system jiffies of this process (all its threads)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class _Sample:
    busy: int
    total: int
    own: int
    at: float


def _sample() -> _Sample | None:
    m = _machine_ticks()
    if m is None:
        return None
    return _Sample(m[0], m[1], _own_ticks(), time.monotonic())


def idle_cores(a: _Sample, b: _Sample) -> float | None:
    """Cores left idle by other processes between two samples (our own use counts as idle)."""
    dt = b.total - a.total
    if dt <= 0:
        return None
    n_machine = os.cpu_count() or 1
    others = max(0.0, (b.busy - a.busy) - (b.own - a.own)) / dt * n_machine
    return max(0.0, usable_cores() - others)


class Governor:
    """Owns the intra-op thread count in auto mode."""

    def __init__(self, max_threads: int, interval: float = 2.0):
        self.max_threads = max(1, max_threads)
        self.interval = interval
        self.last = _sample()
        self.threads = 0
        self.history: list[int] = []

    def choose(self, idle: float | None) -> int:
        if idle is None:
            return self.max_threads
        return max(1, min(self.max_threads, int(idle + 0.35)))  # 1.7 idle cores still earn 2 threads

    def apply(self, n: int) -> None:
        import torch

        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
            self.history.append(n)

    def measure(self, wait: float = 0.2) -> int:
        """Sample the load over `wait` seconds now (start of a command) and apply the result."""
        a = _sample()
        time.sleep(wait)
        b = _sample()
        n = self.choose(idle_cores(a, b) if a and b else None)
        self.last = b
        self.apply(n)
        return n

    def tick(self) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last.at < self.interval:
            return
        cur = _sample()
        if cur is None or self.last is None:
            return
        self.apply(self.choose(idle_cores(self.last, cur)))
        self.last = cur


_GOVERNOR: Governor | None = None


def _omp_threads(value: str) -> int:
    """OMP_NUM_THREADS as OpenMP reads it: the first entry of a comma list ("4" or "4,2")."""
    from .errors import MixqError

    try:
        n = int(value.split(",")[0].strip())
    except ValueError:
        raise MixqError(f"OMP_NUM_THREADS={value!r} is not a thread count: set a positive integer or unset it") from None
    if n < 1:
        raise MixqError(f"OMP_NUM_THREADS={value!r} is not a thread count: set a positive integer or unset it")
    return n


def configure(threads: int | None = None) -> str:
    """Set the thread policy for this process; returns a one-line description for the log.

    `threads`: a fixed count (`--threads`); None: OMP_NUM_THREADS if set, else auto."""
    global _GOVERNOR
    if threads is not None or os.environ.get("OMP_NUM_THREADS", "").strip():
        n = threads if threads is not None else _omp_threads(os.environ["OMP_NUM_THREADS"])
        import torch

        torch.set_num_threads(max(1, n))
        _GOVERNOR = None
        cores = usable_cores()
        over = f"; more than the {cores} usable cores, which slows it down" if n > cores else ""
        return f"threads: {n} ({'--threads' if threads is not None else 'OMP_NUM_THREADS'}{over})"
    _GOVERNOR = Governor(usable_cores())
    n = _GOVERNOR.measure()
    return f"threads: {n} of {_GOVERNOR.max_threads} (auto: follows the idle cores; --threads N to fix)"


def tick() -> None:
    """Re-fit the thread count to the load, at most every few seconds; a no-op outside auto mode."""
    if _GOVERNOR is not None:
        _GOVERNOR.tick()


def governor() -> Governor | None:
    return _GOVERNOR


def reset() -> None:
    """Leave auto mode (the thread count stays as it is)."""
    global _GOVERNOR
    _GOVERNOR = None


if __name__ == "__main__":  # python -m mixq_onnx.threads: what auto mode would choose now
    print(configure(), file=sys.stderr)
