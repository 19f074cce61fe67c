import os
import sys
import threading

import pytest
import torch

from segsynth import cpu, cpu_load
from segsynth.cpu import ThreadGovernor, lower_this_thread_priority, reset_thread_governor, thread_governor
from segsynth.cpu_load import CpuMeter, free_cores


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_only_the_calling_thread_is_lowered():
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def helper():
        lower_this_thread_priority()
        seen["helper"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    assert seen["helper"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


# --- load-aware thread counts -------------------------------------------------------------------------


@pytest.mark.parametrize("cores, others, expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 1.9, 1), (2, 5.0, 1), (8, 3.2, 5), (16, 0.2, 16),
])
def test_free_cores(cores, others, expected):
    """A process using more than half a core takes one; never fewer than 1."""
    assert free_cores(cores, others) == expected


class FakeMeter:
    """Readings of other processes' busy cores, one per measurement."""

    def __init__(self, readings):
        self.readings = list(readings)

    def others(self, min_window=0.5):
        return self.readings.pop(0) if self.readings else None


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_governor_follows_the_load_on_two_agreeing_measurements(monkeypatch, restore_threads):
    clock = [0.0]
    monkeypatch.setattr(cpu.time, "monotonic", lambda: clock[0])
    # start: idle machine; then one busy process appears (two readings), a blip, and it leaves again
    governor = ThreadGovernor(2, meter=FakeMeter([0.1, 0.9, 1.0, 0.2, 1.1, 0.1, 0.0]), interval=1.0, cores=2)
    counts = []
    for _ in range(6):
        clock[0] += 1.0
        counts.append(governor.tick())
    assert counts == [2, 1, 1, 1, 1, 2]  # 0.9: pending, 1.0: confirmed; 0.2 then 1.1 disagree; 0.1, 0.0: back to 2
    assert torch.get_num_threads() == 2
    assert [entry[2] for entry in governor.history] == [2, 2, 1, 1, 1, 1, 2]


def test_lanes_share_the_count_and_a_fixed_count_never_measures(monkeypatch, restore_threads):
    governor = ThreadGovernor(4, meter=FakeMeter([0.0]), cores=4)
    assert governor.tick(share=2) == 2 and governor.tick(share=8) == 1
    fixed = ThreadGovernor(3, fixed=True, meter=FakeMeter([]))
    assert fixed.tick() == 3 and fixed.history == []


def test_settings_that_fix_the_count(monkeypatch, restore_threads):
    monkeypatch.setenv("SEGSYNTH_THREADS", "1")
    reset_thread_governor()
    try:
        assert thread_governor().fixed and thread_governor().maximum == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("SEGSYNTH_THREADS", "auto")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's own setting wins
        reset_thread_governor()
        assert thread_governor().fixed
        monkeypatch.delenv("OMP_NUM_THREADS")
        reset_thread_governor()
        assert not thread_governor().fixed
    finally:
        reset_thread_governor()


def test_the_meter_subtracts_this_process_and_its_children(monkeypatch):
    """busy CPU of the cores minus own CPU, over the wall time: other processes' share."""
    readings = iter([(10.0, 100.0, 5.0), (12.0, 103.0, 6.0), (12.1, 103.1, 6.1)])
    meter = CpuMeter.__new__(CpuMeter)
    meter._read = lambda: next(readings)
    meter._last = meter._read()
    assert meter.others() == pytest.approx((3.0 - 1.0) / 2.0)  # 2 s: 3 busy core-seconds, 1 of them ours
    assert meter.others(min_window=0.5) is None  # 0.1 s is too short a window to judge


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")
def test_the_meter_reads_this_machine():
    meter = CpuMeter()
    busy_until = cpu_load.time.monotonic() + 0.3
    while cpu_load.time.monotonic() < busy_until:  # our own load is not "others"
        pass
    others = meter.others(min_window=0.2)
    assert others is not None and 0.0 <= others <= cpu_load.usable_cores() + 0.5
