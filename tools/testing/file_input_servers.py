"""Test helpers for file inputs: a listener that must never be connected to, and the peak size of a folder while a
request runs. The worker's pid and memory: tools.testing.cog_server.child_pids, tools.testing.proc,
tools.testing.memory_probe; the loopback file server: tools.testing.file_server.FileServer."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"


class SilentListener:
    """A TCP socket listening on loopback that never accepts: a connection attempt stays queued, so
    `was_connected()` sees it. Used where a URL must be refused before any connection is made."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def was_connected(self, wait: float = 0.3) -> bool:
        readable, _, _ = select.select([self.sock], [], [], wait)
        return bool(readable)

    def close(self) -> None:
        self.sock.close()


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class FolderPeak:
    """Samples a folder's total file size every few milliseconds in a thread; `peak` is the largest seen."""

    def __init__(self, folder: Path, every: float = 0.005):
        self.folder, self.every, self.peak = folder, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.folder))
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
