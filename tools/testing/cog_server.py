"""The real Cog HTTP server (coglet) on 127.0.0.1 for tests and scripts, a webhook receiver, PNG data-URI helpers."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
TERMINAL = ("succeeded", "failed", "canceled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports, below the ephemeral range (where clients' sockets land)."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket()).bind((HOST, port))
            return first
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


class CogServer:
    """`python -m cog.server.http` in its own process group, torn down with it: predict.py:Runner, or with
    `train=True` train.py:train (`--x-mode train`). `env` adds to (or overrides) the server's environment; `args` adds
    server arguments; `cwd` is where the server looks for the predictor and .cog/openapi_schema.json."""

    def __init__(
        self,
        weights_dir: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        train: bool = False,
        args: tuple[str, ...] = (),
        cwd: Path = ROOT,
    ):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        stub = ("COG_TRAIN_TYPE_STUB", "train.py:train") if train else ("COG_PREDICT_TYPE_STUB", "predict.py:Runner")
        env = {
            **os.environ,
            "PORT": str(self.port),
            stub[0]: stub[1],
            "SDXL_WEIGHTS_DIR": str(weights_dir),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the worker's python
            **(env or {}),
        }
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        mode = ["--x-mode", "train"] if train else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", HOST, *mode, *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its worker joins the group; stop() ends both
        )
        self.statuses_seen: list[str] = []

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_for(self, *statuses: str, timeout: float = 120) -> dict:
        """Poll /health-check until it reports one of `statuses`, recording every distinct status on the way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); log:\n{self.log()}")
            try:
                health = self.health()
            except requests.ConnectionError:
                time.sleep(0.1)
                continue
            if not self.statuses_seen or self.statuses_seen[-1] != health["status"]:
                self.statuses_seen.append(health["status"])
            if health["status"] in statuses:
                return health
            time.sleep(0.1)
        raise TimeoutError(f"no {statuses} within {timeout}s (seen {self.statuses_seen}); log:\n{self.log()}")

    def predict(self, input: dict, busy_retry_s: float = 2.0, timeout: float = 300, **kwargs) -> requests.Response:
        """POST a prediction. coglet frees its slot a few ms after it answers, so a request sent at once can get 409;
        like a client, retry that for up to `busy_retry_s` (0: take the first answer, to test the 409 itself)."""
        deadline = time.monotonic() + busy_retry_s
        while True:
            response = requests.post(f"{self.url}/predictions", json={"input": input, **kwargs}, timeout=timeout)
            if response.status_code != 409 or time.monotonic() >= deadline:
                return response
            time.sleep(0.02)

    def predict_async(self, input: dict, webhook: str, events=("start", "output", "logs", "completed"), **kwargs):
        body = {"input": input, "webhook": webhook, "webhook_events_filter": list(events), **kwargs}
        return requests.post(f"{self.url}/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30)

    def worker_pid(self) -> int:
        """coglet's worker: the one child of the server process (`python -c "...coglet.server._run_worker()"`)."""
        (pid,) = child_pids(self.process.pid)
        return pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        self._log.close()


@contextlib.contextmanager
def ready_server(weights_dir: Path, log_path: Path, env: dict[str, str] | None = None, **kwargs):
    """A CogServer that has reached READY (within 300 s, setup included), stopped when the block ends; a failed setup
    raises at once with the server's log."""
    server = CogServer(weights_dir, log_path, env=env, **kwargs)
    try:
        if server.wait_for("READY", "SETUP_FAILED", timeout=300)["status"] != "READY":
            raise RuntimeError(f"setup failed; log:\n{server.log()}")
        yield server
    finally:
        server.stop()


def child_pids(pid: int) -> list[int]:
    """The process's children. Each thread lists the children it started, and coglet spawns from a tokio thread."""
    children = set()
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children.update(int(child) for child in listing.read_text().split())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(children)


class WebhookReceiver:
    """A loopback HTTP server that keeps every JSON body POSTed to it, in order."""

    def __init__(self):
        self.payloads: list[dict] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._changed:
                    receiver.payloads.append(json.loads(body))
                    receiver._changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self._server.server_address[1]}/webhook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_until(self, predicate, timeout: float = 120) -> dict:
        """The first payload for which predicate(payload) holds, waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for payload in self.payloads:
                    if predicate(payload):
                        return payload
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no matching webhook in {timeout}s; got {[p.get('status') for p in self.payloads]}"
                    )
                self._changed.wait(left)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def decode_png(data_uri: str) -> np.ndarray:
    header, _, data = data_uri.partition(",")
    assert header == "data:image/png;base64", header
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
