"""Test helpers for file inputs: a loopback file server that records who fetched what, a listener that must never be
connected to, and measurements of a Cog worker (its pid, peak memory, the temporary folder's size)."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
ENDLESS_LIMIT = 256 << 20  # the most an "endless" body ever sends; far above every cap under test
CHUNK = 64 << 10


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


class FileServer:
    """Serves in-memory files over plain http on loopback; records each request's path and User-Agent; can redirect,
    and stream an "endless" body (with or without announcing a huge Content-Length) counting the bytes it sent."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []  # (path, User-Agent)
        self.sent: Counter[str] = Counter()
        self.finished = threading.Event()
        self.pause = 0.0  # seconds between chunks of an endless body (slow enough to watch a download grow)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("User-Agent", "")))
                if self.path in server.redirects:
                    self._head(302, {"Location": server.redirects[self.path], "Content-Length": "0"})
                elif self.path.startswith("/endless"):
                    self._endless(announce=self.path == "/endless-announced")
                elif self.path in server.files:
                    body = server.files[self.path]
                    self._head(200, {"Content-Length": str(len(body)), "Content-Type": "image/png"})
                    self.wfile.write(body)
                else:
                    self._head(404, {"Content-Length": "0"})

            def _endless(self, announce: bool):
                headers = {"Content-Length": str(ENDLESS_LIMIT)} if announce else {"Connection": "close"}
                self.close_connection = True
                self._head(200, headers)
                chunk = b"\0" * CHUNK
                try:
                    while server.sent[self.path] < ENDLESS_LIMIT:
                        self.wfile.write(chunk)
                        server.sent[self.path] += len(chunk)
                        time.sleep(server.pause)
                except OSError:
                    pass  # the client hung up: what we measure
                finally:
                    server.finished.set()

            def _head(self, status, headers):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (the Cog server's worker is the child of its orchestrator)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_memory(pid: int) -> None:
    """Make VmHWM (peak resident memory) restart from the current RSS (Linux: 5 > /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


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
