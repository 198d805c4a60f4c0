"""A loopback HTTP file server for tests and scripts: serves in-memory files on 127.0.0.1 with Range support, and can
redirect, stall, omit lengths or refuse ranges to play a hostile or slow host."""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class WeightsServer:
    """Serves in-memory files on 127.0.0.1; counts requests; can redirect, stall, omit lengths or refuse ranges."""

    def __init__(self, tls: tuple[Path, Path] | None = None):
        self.scheme = "https" if tls else "http"
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.stalls: set[str] = set()
        self.no_length: set[str] = set()
        self.ranges = True
        self.requests: Counter[str] = Counter()
        self.range_requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                server.requests[path] += 1
                if path in server.redirects:
                    self._head(302, {"Location": server.redirects[path], "Content-Length": "0"})
                    return
                if path in server.stalls:
                    server.release.wait(10)
                    return
                body = server.files.get(path)
                if body is None:
                    self._head(404, {"Content-Length": "0"})
                    return
                wanted = self.headers.get("Range")
                if wanted and server.ranges:
                    server.range_requests.append(wanted)
                    start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
                    part = body[start : end + 1]
                    self._head(
                        206, {"Content-Length": str(len(part)), "Content-Range": f"bytes {start}-{end}/{len(body)}"}
                    )
                    self.wfile.write(part)
                    return
                headers = {"Accept-Ranges": "bytes"} if server.ranges else {}
                if path in server.no_length:
                    headers["Connection"] = "close"
                    self.close_connection = True
                else:
                    headers["Content-Length"] = str(len(body))
                self._head(200, headers)
                self.wfile.write(body)

            def _head(self, status, headers):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.handle_error = lambda request, address: None  # clients that hang up early are expected
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url(path)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def loopback_weights_server():
    """A WeightsServer, with plain-http loopback URLs allowed (sdxl.remote refuses them outside tests) meanwhile."""
    from sdxl import remote

    os.environ[remote.ALLOW_LOOPBACK_ENV] = "1"
    server = WeightsServer()
    try:
        yield server
    finally:
        server.close()
        del os.environ[remote.ALLOW_LOOPBACK_ENV]
