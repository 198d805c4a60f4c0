"""One long-lived thread for all model work, entered once by each edge.

torch's CPU parallelism (OpenMP) keeps a team of worker threads for every thread that runs parallel work. Cog's
worker calls run() from a pool of threads, so without this each of them grew its own team; the teams competed for
the cores and libgomp throttled its spin-waiting, which measured 2-3x slower per prediction on 2 cores. So the
edges (predict.py's setup and run) each make ONE call onto this thread: setup's loading, warm-up and own weights in
one, a request's "trained weights applied + generation" in another. Everything below the edges (sdxl.model.loading,
sdxl.trained, sdxl.inference.generation) is plain synchronous code that runs on whatever thread calls it; it never hops
threads itself, so a call from the compute thread is never sent to it again (which, with one worker, would wait
for itself forever).

A cancel (Cog raises an exception in the calling thread) is passed on: the work's `cancelled` event is set, the work
stops at its next check (between the trained-weights steps, and after every denoising step), and the caller
re-raises once the thread is free, so the next request never finds the model half-changed.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
POLL_SECONDS = 0.05  # how often a waiting caller runs Python code, so an exception raised in it is seen
THREAD_NAME = "sdxl-compute"


class Cancelled(Exception):
    """The caller went away (a cancel): the work stopped early."""


def stop_if_cancelled(cancelled: threading.Event | None, where: str) -> None:
    """A check point for long work: raise Cancelled if the caller has gone."""
    if cancelled is not None and cancelled.is_set():
        raise Cancelled(f"cancelled {where}")


def _get_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        return _executor


def on_compute_thread(work: Callable[[threading.Event], T]) -> T:
    """Run `work(cancelled)` on the compute thread and return its result; `cancelled` is set if the caller is
    interrupted while waiting. For the edges only: never call it from work already on the compute thread."""
    if threading.current_thread().name.startswith(THREAD_NAME):  # it would wait for itself forever
        raise RuntimeError("on_compute_thread called from the compute thread: call the work directly")
    cancelled = threading.Event()
    future = _get_executor().submit(work, cancelled)
    try:
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                continue
    except BaseException:
        if not future.done():
            cancelled.set()
            concurrent.futures.wait([future])  # the thread is free again before the caller moves on
        raise
