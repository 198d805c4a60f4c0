"""The real Cog HTTP server (coglet) on 127.0.0.1 for the benchmark's HTTP row: started in its own process group,
polled until READY, and stopped with everything it started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Cog server exited with code {process.returncode}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{url}/health-check", timeout=5).json()["status"] == "READY":
                return
        time.sleep(0.1)
    raise TimeoutError(f"the Cog server was not READY within {timeout:.0f} s")


@contextlib.contextmanager
def cog_server(weights_dir: Path, log_path: Path, timeout: float = 300):
    """Yields a function that POSTs one prediction and returns the response (409 retried, as a client would:
    coglet frees its slot ~2 ms after it answers, and that wait counts)."""
    port = _free_port()
    url = f"http://{HOST}:{port}"
    env = {
        **os.environ,
        "PORT": str(port),
        "COG_PREDICT_TYPE_STUB": "predict.py:Runner",
        "SDXL_WEIGHTS_DIR": str(weights_dir),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the worker's python
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", HOST],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_ready(url, process, timeout)

            def post(body: dict) -> requests.Response:
                while (
                    response := requests.post(f"{url}/predictions", json={"input": body}, timeout=300)
                ).status_code == 409:
                    time.sleep(0.001)
                return response

            yield post
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)
