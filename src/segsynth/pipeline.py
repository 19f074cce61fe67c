"""One thread pipeline for the streaming stages (synthesize, filter): source -> work -> write.

    run_pipeline(source, work, write, workers=0)   a loader thread draws `source`, the calling thread
                                                   runs `work` (a model whose OpenMP team owns the
                                                   cores), a writer thread runs `write`
    run_pipeline(source, work, write, workers=N)   N worker threads each draw the next item and run
                                                   `work` (the filter's single-threaded scoring lanes)

Bounded queues between the steps keep memory flat; the first error in any
thread stops every thread and is raised in the caller (results already made
are still written); `write` runs in one
thread, so outputs are appended in one place. With `low_priority_helpers` the
loader and writer run at the lowest priority (segsynth.cpu), so they fill the
gaps of the model's OpenMP team instead of stalling it at its barriers.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

from segsynth.cpu import lower_this_thread_priority

_POLL_SECONDS = 0.1


class _End:
    """End-of-stream marker between the threads."""


def run_pipeline(source: Iterable, work: Callable, write: Callable, *, workers: int = 0, depth: int = 2,
                 low_priority_helpers: bool = False) -> None:
    """Run every item of `source` through `work`, then `write` (see the module docstring)."""
    stop = threading.Event()
    errors: list[BaseException] = []
    results: queue.Queue = queue.Queue(maxsize=depth if workers == 0 else 2 * workers)

    def fail(error: BaseException) -> None:
        errors.append(error)
        stop.set()

    def writer() -> None:
        if low_priority_helpers:
            lower_this_thread_priority()
        failed = False
        while True:
            item = results.get()
            if isinstance(item, _End):
                return
            if failed:
                continue  # keep draining, so no producer blocks on a full queue
            try:
                write(item)  # finished work is written even after another thread failed: a rerun keeps it
            except BaseException as error:  # raised in the caller
                failed = True
                fail(error)

    write_thread = threading.Thread(target=writer, name="segsynth-writer", daemon=True)
    write_thread.start()
    try:
        if workers == 0:
            _work_in_caller(iter(source), work, results, stop, fail, depth, low_priority_helpers)
        else:
            _work_in_threads(iter(source), work, results, stop, fail, workers)
    finally:
        _put_always(results, _End(), write_thread)
        write_thread.join()
        stop.set()
    if errors:
        raise errors[0]


def _work_in_caller(items, work, results, stop, fail, depth: int, low_priority: bool) -> None:
    """A loader thread draws items ahead; the calling thread works on them."""
    loaded: queue.Queue = queue.Queue(maxsize=depth)

    def loader() -> None:
        if low_priority:
            lower_this_thread_priority()
        try:
            for item in items:
                if not _put(loaded, item, stop):
                    return
        except BaseException as error:
            fail(error)
        finally:
            _put(loaded, _End(), stop)

    load_thread = threading.Thread(target=loader, name="segsynth-loader", daemon=True)
    load_thread.start()
    try:
        while True:
            item = _get(loaded, stop)
            if isinstance(item, _End):
                break
            if not _put(results, work(item), stop):
                break
    except BaseException as error:
        fail(error)
    finally:
        stop.set()  # a loader still drawing (the work failed) stops; the writer drains what was queued
        load_thread.join(timeout=5)


def _work_in_threads(items, work, results, stop, fail, workers: int) -> None:
    """`workers` threads each take the next item (under a lock) and work on it."""
    take = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            with take:
                try:
                    item = next(items, _End())
                except BaseException as error:
                    fail(error)
                    return
            if isinstance(item, _End):
                return
            try:
                result = work(item)
            except BaseException as error:
                fail(error)
                return
            if not _put(results, result, stop):
                return

    threads = [threading.Thread(target=worker, name=f"segsynth-worker{n}", daemon=True) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _put(target: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the pipeline is stopping (so no thread blocks forever on a full queue)."""
    while not stop.is_set():
        try:
            target.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _put_always(target: queue.Queue, item, consumer: threading.Thread) -> None:
    """Hand the consumer its end marker even when the pipeline is stopping and its queue is full."""
    while consumer.is_alive():
        try:
            target.put(item, timeout=_POLL_SECONDS)
            return
        except queue.Full:
            continue


def _get(source: queue.Queue, stop: threading.Event):
    """The next item, or an end marker once the pipeline is stopping."""
    while not stop.is_set():
        try:
            return source.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue
    return _End()
