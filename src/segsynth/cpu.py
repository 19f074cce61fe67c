"""Sharing a few CPU cores between a model and the work around it."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch


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
