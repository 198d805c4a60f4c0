"""Peak memory of a process around one piece of work: VmHWM from /proc/PID/status, reset through clear_refs."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

MB = 1 << 20


def _status(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss(pid: int | str = "self") -> int:
    return _status(pid, "VmRSS")


def peak(pid: int | str = "self") -> int:
    return _status(pid, "VmHWM")


def reset_peak(pid: int | str = "self") -> None:
    """VmHWM falls back to the current RSS ("5" to clear_refs: reset the peak resident set size)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as error:
        pytest.skip(f"cannot reset the peak RSS of {pid} here ({error})")


def _release_free_heap() -> None:
    """Give freed heap pages back to the system, so memory that `work` allocates shows up as new RSS rather than
    reusing pages that are already resident (glibc keeps them after free)."""
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def growth_during(work: Callable[[], object], pid: int | str = "self") -> tuple[int, object]:
    """(bytes the peak RSS rose above the RSS before `work`, what work returned or raised). In this process."""
    _release_free_heap()
    reset_peak(pid)
    before = rss(pid)
    try:
        result = work()
    except Exception as error:  # the refusal is what the caller checks
        result = error
    return peak(pid) - before, result


def cog_worker(server_pid: int, timeout: float = 30) -> int:
    """The coglet worker: the server's child that runs the model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{server_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if b"_run_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
        time.sleep(0.1)
    raise TimeoutError(f"no coglet worker under process {server_pid}")


def files_and_bytes(folder: Path) -> tuple[list[str], int]:
    """Every file under `folder` (relative names) and their total size; files vanishing meanwhile are skipped."""
    names, total = [], 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
            names.append(str(path.relative_to(folder)))
    return names, total
