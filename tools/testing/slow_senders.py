"""A slow sender for tests: a raw TCP server on 127.0.0.1 that trickles its answer one byte at a time."""

from __future__ import annotations

import socket
import threading

BYTE_EVERY = 0.1  # seconds between bytes: far inside any read timeout the tests use


class TrickleServer:
    """A raw TCP server on 127.0.0.1: each connection gets `reply(request head)`, bytes sent one byte every `every`
    seconds (or a pair: bytes sent at once, then bytes trickled), or nothing at all when `silent`."""

    def __init__(self, reply=None, silent: bool = False, every: float = BYTE_EVERY):
        self.reply, self.silent, self.every = reply, silent, every
        self.connections = 0
        self.requests: list[str] = []
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/w.tar", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def _accept(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            if self.silent:
                self.closed.wait(30)
                return
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            head = request.decode("latin-1")
            self.requests.append(head)
            reply = self.reply(head)
            at_once, trickled = reply if isinstance(reply, tuple) else (b"", reply)
            conn.sendall(at_once)
            for byte in trickled:
                if self.closed.wait(self.every):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up: what the test wants

    def close(self):
        self.closed.set()
        self.listener.close()
