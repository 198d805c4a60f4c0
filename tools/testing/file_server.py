"""A loopback HTTP file server for tests and scripts: serves in-memory files on 127.0.0.1 (plain http, or https with a
given certificate) with Range support, and can play a hostile or slow host: redirect, stall, omit lengths, refuse
ranges, or stream an endless body while counting the bytes it sent."""

from __future__ import annotations

import contextlib
import mimetypes
import os
import ssl
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
ENDLESS_LIMIT = 256 << 20  # the most an "endless" body ever sends; far above every cap under test
CHUNK = 64 << 10
ENDLESS_PREFIX = "/endless"  # any such path streams without end; "/endless-announced" also claims a huge length


class FileServer:
    """Serves `files` (path -> bytes) on 127.0.0.1. Counts `requests` per path and keeps each request's
    (path, User-Agent) in order in `fetched`. `redirects` (path -> Location) answer 302; paths in `stalls` hang until
    close (or 10 s); paths in `no_length` are sent without Content-Length; `ranges = False` ignores Range headers."""

    def __init__(self, tls: tuple[Path, Path] | None = None):
        self.scheme = "https" if tls else "http"
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.stalls: set[str] = set()
        self.no_length: set[str] = set()
        self.ranges = True
        self.requests: Counter[str] = Counter()
        self.fetched: list[tuple[str, str]] = []  # (path, User-Agent), in order
        self.range_requests: list[str] = []
        self.release = threading.Event()  # ends every stall
        self.sent: Counter[str] = Counter()  # bytes of endless bodies sent, per path
        self.finished = threading.Event()  # an endless body ended (the client hung up, or the limit was reached)
        self.pause = 0.0  # seconds between chunks of an endless body (slow enough to watch a download grow)
        self.httpd = ThreadingHTTPServer((HOST, 0), _Handler)
        self.httpd.owner = self
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.handle_error = lambda request, address: None  # clients that hang up early are expected
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = HOST) -> str:
        return f"{self.scheme}://{host}:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url(path)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        files: FileServer = self.server.owner
        path = self.path
        files.requests[path] += 1
        files.fetched.append((path, self.headers.get("User-Agent", "")))
        wanted = self.headers.get("Range")
        if path in files.redirects:
            self._head(302, {"Location": files.redirects[path], "Content-Length": "0"})
        elif path in files.stalls:
            files.release.wait(10)
        elif path in files.files and wanted and files.ranges:
            files.range_requests.append(wanted)
            self._send_range(files.files[path], wanted)
        elif path in files.files:
            self._send_whole(files, path)
        elif path.startswith(ENDLESS_PREFIX):
            self._send_endless(files, announce=path == ENDLESS_PREFIX + "-announced")
        else:
            self._head(404, {"Content-Length": "0"})

    def _send_range(self, body: bytes, wanted: str) -> None:
        start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
        part = body[start : end + 1]
        self._head(206, {"Content-Length": str(len(part)), "Content-Range": f"bytes {start}-{end}/{len(body)}"})
        self.wfile.write(part)

    def _send_whole(self, files: FileServer, path: str) -> None:
        body = files.files[path]
        kind = mimetypes.guess_type(path.split("?")[0])[0] or "application/octet-stream"
        headers = {"Content-Type": kind, **({"Accept-Ranges": "bytes"} if files.ranges else {})}
        if path in files.no_length:
            headers["Connection"] = "close"
            self.close_connection = True
        else:
            headers["Content-Length"] = str(len(body))
        self._head(200, headers)
        self.wfile.write(body)

    def _send_endless(self, files: FileServer, announce: bool) -> None:
        headers = {"Content-Length": str(ENDLESS_LIMIT)} if announce else {"Connection": "close"}
        self.close_connection = True
        self._head(200, headers)
        chunk = b"\0" * CHUNK
        try:
            while files.sent[self.path] < ENDLESS_LIMIT:
                self.wfile.write(chunk)
                files.sent[self.path] += len(chunk)
                time.sleep(files.pause)
        except OSError:
            pass  # the client hung up: what the tests measure
        finally:
            files.finished.set()

    def _head(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()


@contextlib.contextmanager
def loopback_file_server():
    """A FileServer, with plain-http loopback URLs allowed (sdxl.guard.remote refuses them outside tests) meanwhile."""
    from sdxl.guard import remote

    os.environ[remote.ALLOW_LOOPBACK_ENV] = "1"
    server = FileServer()
    try:
        yield server
    finally:
        server.close()
        del os.environ[remote.ALLOW_LOOPBACK_ENV]
