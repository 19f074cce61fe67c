"""How many cores other processes are using right now, measured without importing torch.

A stage's OpenMP team stalls at every barrier where one of its threads waits for a core: next to one
busy process, two threads on two cores ran at 0.22x of their alone speed in one measurement, and two
segsynth stages with two threads each at 0.03x. One thread per free core avoids that. This module
measures what "free" means: the CPU time the machine's cores (those this process may run on) spent
busy, minus the CPU time of this process and its children (DataLoader workers), over a window.

`CpuMeter()` made at CLI start (before torch is imported) gives the first decision a window of a few
seconds: the imports. `segsynth.cpu.ThreadGovernor` repeats the measurement every few seconds while
a stage runs and sets torch's thread count from it.
"""

from __future__ import annotations

import math
import os
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota when there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def free_cores(cores: int, others: float) -> int:
    """Whole cores left for this process when others keep `others` cores busy (at least 1): a process
    using more than half a core takes one."""
    return max(1, math.floor(cores - others + 0.5))


class CpuMeter:
    """Cores kept busy by other processes between two readings (`others()` moves the window on)."""

    def __init__(self):
        self._cpus = _affinity_cpus()
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        """(wall seconds, busy CPU seconds of our cores, CPU seconds of this process and its children)."""
        busy = _busy_seconds(self._cpus)
        if busy is None:
            return None
        return time.monotonic(), busy, _own_seconds()

    def others(self, min_window: float = 0.5) -> float | None:
        """Average cores other processes kept busy since the last reading; None if the window is shorter
        than `min_window` seconds or /proc cannot be read (not Linux)."""
        now = self._read()
        if now is None or self._last is None or now[0] - self._last[0] < min_window:
            return None
        wall, busy, own = (now[i] - self._last[i] for i in range(3))
        self._last = now
        return max(0.0, (busy - own) / wall)


def _affinity_cpus() -> set[int] | None:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _busy_seconds(cpus: set[int] | None) -> float | None:
    """CPU seconds the given cores spent on anything but idle and iowait since boot (/proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        total += user + nice + system + irq + softirq + steal  # steal: a hypervisor gave the core to others
    return total / CLOCK_TICKS


CHILD_SCAN_SECONDS = 10.0  # how often the process table is scanned for new children (a few ms per scan)
_children: dict = {"pids": [], "scanned": -1e9}


def _own_seconds() -> float:
    """CPU seconds of this process (all threads) and of its live children (e.g. DataLoader workers)."""
    times = os.times()
    own = time.process_time() + times.children_user + times.children_system  # children already waited for
    if time.monotonic() - _children["scanned"] > CHILD_SCAN_SECONDS:
        _children["pids"], _children["scanned"] = _child_pids(), time.monotonic()
    for child in _children["pids"]:
        fields = _stat_fields(child)
        if fields is not None and fields[1] == str(os.getpid()):  # still ours (field 4, ppid)
            own += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return own


def _child_pids() -> list[str]:
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    pid = str(os.getpid())
    return [entry for entry in entries if entry.isdigit() and (fields := _stat_fields(entry)) and fields[1] == pid]


def _stat_fields(pid: str) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, ...), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


# Made when the CLI starts, before the stage's imports: the first window is the import time.
START = CpuMeter()
