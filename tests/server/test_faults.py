"""The worker process killed (SIGKILL, as the kernel's OOM killer does) in the middle of a prediction and of a training,
on the real Cog server (coglet 0.23.1).

What coglet does, read from its source and proven here: the orchestrator sees the worker's control channel close,
fails the running prediction or training at once with "Worker crashed" (the waiting client gets its answer, a webhook
gets `completed`), and does not start a new worker. The server process stays up; /health-check keeps answering HTTP
200 with the body status UNHEALTHY (user_healthcheck_error "... healthcheck channel closed"), and every new request
is refused with 409 ("At capacity") because the dead slot is poisoned. Nothing hangs, and nothing recovers: the
deployment must restart the container when the body says UNHEALTHY, DEFUNCT or SETUP_FAILED (deploy/probe.py is
that probe). SIGTERM still ends the server at once, so the restart is quick.

Every wait is bounded: a hang fails the test instead of hanging CI.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tools.testing.cog_server import ROOT, CogServer, WebhookReceiver

COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")
ANSWER_WITHIN_S = 10  # from the kill to the failed answer: measured 0.04-0.15 s here, even on a loaded machine
LONG_PREDICTION = {"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 500, "seed": 1}
LONG_TRAINING = dict(resolution=64, max_train_steps=100_000, lora_rank=2, train_batch_size=1, seed=1)
LONG_TRAINING |= dict(checkpointing_steps=100_000)


def probe(server: CogServer, mode: str) -> int:
    """The exit status of the deployment's probe (deploy/probe.py, as the Kubernetes manifests run it)."""
    command = [sys.executable, str(ROOT / "deploy" / "probe.py"), mode]
    env = {**os.environ, "PROBE_URL": server.url}
    return subprocess.run(command, capture_output=True, timeout=30, env=env).returncode


def wait_for_log(server: CogServer, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in the server log within {timeout}s:\n{server.log()}"
        assert server.process.poll() is None, f"the server exited:\n{server.log()}"
        time.sleep(0.1)


def assert_dead_to_an_orchestrator(server: CogServer, path: str, input: dict) -> None:
    """What a client, a load balancer and an orchestrator can see once the worker is gone."""
    for _ in range(3):  # and it stays so: no new worker is started
        health = requests.get(f"{server.url}/health-check", timeout=15)
        assert health.status_code == 200
        assert health.json()["status"] == "UNHEALTHY", health.json()
        assert "channel closed" in health.json()["user_healthcheck_error"]
        time.sleep(0.5)
    refused = requests.post(f"{server.url}{path}", json={"input": input}, timeout=15)
    assert refused.status_code == 409, refused.text  # at once, not a hang
    assert probe(server, "live") == 1 and probe(server, "ready") == 1
    assert server.process.poll() is None  # the server does not exit by itself: someone must restart it
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)  # what a container stop sends
    assert server.process.wait(timeout=20) == 0
    assert time.monotonic() - started < 20


@pytest.fixture
def servers(tmp_path):
    started: list[CogServer] = []

    def start(weights, train: bool = False) -> CogServer:
        scratch = tmp_path / f"tmp-{len(started)}"
        scratch.mkdir()
        server = CogServer(weights, tmp_path / f"server-{len(started)}.log", env={"TMPDIR": str(scratch)}, train=train)
        started.append(server)
        server.wait_for("READY", timeout=300)
        return server

    yield start
    for server in started:
        server.stop()
    for name in ("fault-prediction", "fault-training"):  # coglet's own folder for each, which it never removes
        shutil.rmtree(COGLET_PREDICTIONS / name, ignore_errors=True)


def test_worker_killed_mid_prediction_fails_it_and_leaves_the_server_unhealthy(servers, tiny_weights_dir):
    server = servers(tiny_weights_dir)
    assert probe(server, "live") == 0 and probe(server, "ready") == 0
    answer = {}

    def predict():
        try:
            answer["response"] = requests.post(
                f"{server.url}/predictions",
                json={"id": "fault-prediction", "input": LONG_PREDICTION},
                timeout=ANSWER_WITHIN_S + 120,
            )
        finally:
            answer["at"] = time.monotonic()

    client = threading.Thread(target=predict, daemon=True)
    client.start()
    wait_for_log(server, "base: step 1/500")
    assert server.health()["status"] == "BUSY" and probe(server, "live") == 0 and probe(server, "ready") == 1
    worker = server.worker_pid()
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    client.join(ANSWER_WITHIN_S + 130)

    assert not client.is_alive(), "the client never got an answer"
    assert answer["at"] - killed_at < ANSWER_WITHIN_S
    response = answer["response"]
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["error"]) == ("failed", "Worker crashed")
    assert_dead_to_an_orchestrator(server, "/predictions", LONG_PREDICTION)


def zip_of_images(count: int = 2, size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(f"photos/{i}.png", png.getvalue())
    return buffer.getvalue()


def test_worker_killed_mid_training_fails_it_and_leaves_the_server_unhealthy(servers, tiny_weights_dir):
    server = servers(tiny_weights_dir, train=True)
    hook = WebhookReceiver()
    try:
        archive = "data:application/zip;base64," + base64.b64encode(zip_of_images()).decode()
        body = {"id": "fault-training", "input": {"input_images": archive, **LONG_TRAINING}, "webhook": hook.url}
        body["webhook_events_filter"] = ["start", "logs", "completed"]
        accepted = requests.post(f"{server.url}/trainings", json=body, headers={"Prefer": "respond-async"}, timeout=30)
        assert accepted.status_code == 202, accepted.text
        hook.wait_until(lambda p: "step 1/100000" in (p.get("logs") or ""), timeout=240)  # preprocessing done
        worker = server.worker_pid()
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        final = hook.wait_until(lambda p: p.get("status") in ("succeeded", "failed", "canceled"), ANSWER_WITHIN_S)
        assert time.monotonic() - killed_at < ANSWER_WITHIN_S
        assert (final["id"], final["status"], final["error"]) == ("fault-training", "failed", "Worker crashed")
        assert_dead_to_an_orchestrator(server, "/trainings", body["input"])
    finally:
        hook.close()
