"""What a pod's termination does to a running prediction: SIGTERM to the server process (PID 1 in the container,
as the kubelet and `docker stop` send it) lets the prediction finish, refuses new connections, then exits.
This is why the manifests need no preStop hook, only a grace period longer than the longest prediction."""

from __future__ import annotations

import os
import signal
import threading
import time

import requests

from tools.testing.cog_server import CogServer

LONG = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 20, "disable_safety_checker": True}


def refuses_connections_soon(url: str, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            requests.get(f"{url}/health-check", timeout=2)
        except requests.ConnectionError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_finishes_the_running_prediction_then_exits(tiny_weights_dir, tmp_path):
    server = CogServer(tiny_weights_dir, tmp_path / "server.log")
    answer: dict = {}
    try:
        server.wait_for("READY")
        request = threading.Thread(target=lambda: answer.update(r=server.predict(LONG, busy_retry_s=0)))
        request.start()
        server.wait_for("BUSY", timeout=30)
        os.kill(server.process.pid, signal.SIGTERM)  # the server process only, not its group
        signalled = time.monotonic()
        assert refuses_connections_soon(server.url), "still accepting connections 10 s after SIGTERM"
        assert request.is_alive(), "the prediction ended before the listener closed: make it longer"
        request.join(timeout=300)
        server.process.wait(timeout=120)
        drained_s = time.monotonic() - signalled  # measured: 5-20 s here (the rest of a 20-step prediction)
    finally:
        server.stop()
    response = answer["r"]
    assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text[:500]
    assert server.process.returncode is not None
    assert drained_s < 120
