"""Sharing a few CPU cores between a model, the work around it, and whatever else runs on the machine."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch

from segsynth.cpu_load import START, CpuMeter, free_cores, usable_cores


def lower_this_thread_priority() -> None:
    """Let a helper thread (loading, writing) run only where the model's threads leave a core idle.

    The model's OpenMP team waits at a barrier for its slowest thread: a helper preempting one team
    thread stalls all of them, so side work costs more than its own CPU time. At the lowest priority
    a helper mostly runs while the team waits for it (queue empty or full) or between operations.
    Linux keeps a nice value per thread; elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


@contextmanager
def torch_threads(count: int):
    """Run the block with `count` torch intra-op threads (process-wide: threads started inside
    pick it up), then restore the caller's count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- load-aware thread counts -------------------------------------------------------------------------


class ThreadGovernor:
    """Torch's intra-op thread count from the cores other processes leave free, re-measured while a stage runs.

    An OpenMP team of N threads on N cores runs at a fraction of its speed once another process wants
    one of those cores (each barrier waits for the preempted thread); one thread per free core keeps
    most of it. So the count is the free cores (`cpu_load.free_cores`: usable cores minus what other
    processes used over the last window), at most `maximum`, and at least 1. Two stages side by side
    each see the other and settle at half the cores; when one ends, the other takes them back at its
    next measurement.

    `tick()` is called by the thread that runs the model (torch's thread count belongs to the calling
    thread) once per step; it measures every `interval` seconds (a few ms of /proc reading) and moves
    the count only when two measurements in a row agree, so one noisy window does not flip it. Fixed counts (`--threads N`,
    SEGSYNTH_THREADS=N, or OMP_NUM_THREADS set by the user) turn the governor off."""

    def __init__(self, maximum: int, fixed: bool = False, meter: CpuMeter | None = None, interval: float = 1.0,
                 cores: int | None = None):
        self.maximum, self.fixed, self.interval = max(1, maximum), fixed, interval
        self.cores = cores or usable_cores()
        self.meter = meter or START
        self.threads = self.maximum
        self.pending: int | None = None
        self.last_check = -1e9
        self.history: list[tuple[float, float, int]] = []  # (time, others, threads) per measurement
        self._applied = threading.local()
        self._lock = threading.Lock()  # the filter's lanes tick from several threads
        if not fixed:
            self._measure(first=True)

    def _measure(self, first: bool = False) -> None:
        others = self.meter.others(min_window=0.2 if first else 0.5)
        self.last_check = time.monotonic()
        if others is None:
            return
        target = min(self.maximum, free_cores(self.cores, others))
        if first or target == self.pending:
            self.threads, self.pending = target, None
        elif target != self.threads:
            self.pending = target  # confirmed (or not) by the next measurement
        else:
            self.pending = None
        self.history.append((round(self.last_check, 2), round(others, 2), self.threads))
        del self.history[:-50]

    def tick(self, share: int = 1) -> int:
        """Measure if it is time, and set the calling thread's torch thread count to this process's count
        divided among `share` threads that compute at once (the filter's lanes). Returns the count set."""
        if not self.fixed and time.monotonic() - self.last_check >= self.interval:
            with self._lock:
                if time.monotonic() - self.last_check >= self.interval:
                    self._measure()
        count = max(1, self.threads // max(1, share))
        if getattr(self._applied, "count", None) != count:
            torch.set_num_threads(count)
            self._applied.count = count
        return count


_GOVERNOR: ThreadGovernor | None = None


def thread_governor() -> ThreadGovernor:
    """The process's governor, made on first use: fixed by SEGSYNTH_THREADS=N (`segsynth --threads N`) or
    by OMP_NUM_THREADS, else load-aware up to torch's thread count (the cores, or cores per torchrun rank)."""
    global _GOVERNOR
    if _GOVERNOR is None:
        setting = os.environ.get("SEGSYNTH_THREADS", "auto").strip().lower()
        if setting not in ("", "auto"):
            count = int(setting)
            torch.set_num_threads(count)
            _GOVERNOR = ThreadGovernor(count, fixed=True)
        else:
            _GOVERNOR = ThreadGovernor(torch.get_num_threads(), fixed="OMP_NUM_THREADS" in os.environ)
    return _GOVERNOR


def reset_thread_governor() -> None:
    """Forget the governor (the next `thread_governor()` makes a new one): for tests and benchmarks."""
    global _GOVERNOR
    _GOVERNOR = None
