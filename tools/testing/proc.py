"""Readings of a running process from /proc (Linux): resident memory, its peak, open file descriptors."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessReading:
    rss_mb: float  # VmRSS: resident now
    hwm_mb: float  # VmHWM: the peak resident size since the process started
    fds: int  # open file descriptors
    cpu_s: float  # user + system CPU time used so far

    def as_dict(self) -> dict:
        return asdict(self)


def status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/PID/stat (fields 14 and 15, after the parenthesised command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_process(pid: int) -> ProcessReading:
    return ProcessReading(
        rss_mb=round(status_kb(pid, "VmRSS") / 1024, 1),
        hwm_mb=round(status_kb(pid, "VmHWM") / 1024, 1),
        fds=open_fds(pid),
        cpu_s=round(cpu_seconds(pid), 2),
    )


def process_state(pid: int) -> str:
    """The State line's letter: R running, S sleeping, Z zombie (exited, not yet reaped by its parent), ..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return "?"
