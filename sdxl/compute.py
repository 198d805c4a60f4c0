"""One long-lived thread for all model work, whoever calls.

torch's CPU parallelism (OpenMP) keeps a team of worker threads for every thread that runs parallel work. Cog's
worker calls run() from a pool of threads, so without this each of them grew its own team; the teams competed for
the cores and libgomp throttled its spin-waiting, which measured 2-3x slower per prediction on 2 cores. Loading and
every generation run here instead: one team, whatever thread the request arrives on.

A cancel (Cog raises an exception in the calling thread) is passed on: the work's `cancelled` event is set, the work
stops at its next check (the denoising loop checks every step), and the caller re-raises once the thread is free.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_compute_thread_ident: int | None = None
POLL_SECONDS = 0.05  # how often a waiting caller runs Python code, so an exception raised in it is seen


class Cancelled(Exception):
    """The caller went away (a cancel): the work stopped early."""


def _mark_compute_thread() -> None:
    global _compute_thread_ident
    _compute_thread_ident = threading.get_ident()


def _get_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sdxl-compute", initializer=_mark_compute_thread
            )
        return _executor


def on_compute_thread(work: Callable[[threading.Event], T]) -> T:
    """Run `work(cancelled)` on the compute thread and return its result; `cancelled` is set if the caller is
    interrupted while waiting."""
    cancelled = threading.Event()
    if threading.get_ident() == _compute_thread_ident:  # already there (nested call)
        return work(cancelled)
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


def compute_bound(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for torch work done outside a generation (loading a LoRA, swapping a UNet, adding tokens): it runs
    on the compute thread too, so the calling thread never grows an OpenMP team of its own."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return on_compute_thread(lambda _cancelled: fn(*args, **kwargs))

    return wrapper
