"""The Kubernetes probes (deploy/probe.py, as the manifests run it) against the real Cog server in each state.

coglet 0.23.1's /health-check answers 200 in every state, with the state in the body; with KUBERNETES_SERVICE_HOST
set it writes /var/run/cog/ready the first time a health check finds it READY.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tools.testing.cog_server import ROOT, CogServer
from tools.testing.modules import load_file

PROBE = ROOT / "deploy" / "probe.py"
READY_FILE = Path("/var/run/cog/ready")
MODES = ("startup", "ready", "live")
# What each probe must answer in each state: True = exit 0.
EXPECTED = {
    "NO_ANSWER": {"startup": False, "ready": False, "live": False},
    "STARTING": {"startup": False, "ready": False, "live": True},
    "READY": {"startup": True, "ready": True, "live": True},
    "BUSY": {"startup": True, "ready": False, "live": True},
    "SETUP_FAILED": {"startup": True, "ready": False, "live": False},
    "UNHEALTHY": {"startup": True, "ready": False, "live": False},
    "DEFUNCT": {"startup": True, "ready": False, "live": False},
}
LONG = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 500, "disable_safety_checker": True}


def run_probes(url: str) -> tuple[str, dict[str, bool]]:
    """Each probe as the kubelet runs it; the state it saw (they must agree) and whether it passed."""
    seen, passed = set(), {}
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, str(PROBE), mode], env={**os.environ, "PROBE_URL": url}, capture_output=True, text=True,
            timeout=20,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stderr
        seen.add(done.stdout.split(": ")[1].split(" ->")[0])
        passed[mode] = done.returncode == 0
    if len(seen) != 1:
        return "CHANGED", passed  # the state moved between two probes: ask again
    return seen.pop(), passed


def probe_until(url: str, status: str, timeout: float = 120) -> dict[str, bool]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen, passed = run_probes(url)
        if seen == status:
            return passed
        time.sleep(0.05)
    raise TimeoutError(f"the probes never saw {status}")


@pytest.fixture
def under_kubernetes(monkeypatch):
    """KUBERNETES_SERVICE_HOST as the kubelet sets it (loopback: nothing may be contacted); the ready file cleaned."""
    if os.geteuid() != 0:
        pytest.skip("coglet writes /var/run/cog/ready: needs root here")
    if READY_FILE.exists():
        pytest.skip(f"{READY_FILE} exists already (another server under KUBERNETES_SERVICE_HOST?)")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    yield
    READY_FILE.unlink(missing_ok=True)
    if READY_FILE.parent.exists() and not any(READY_FILE.parent.iterdir()):
        READY_FILE.parent.rmdir()


def test_every_state_has_the_intended_answers():
    probe = load_file("probe", PROBE)

    for status, answers in EXPECTED.items():
        assert {mode: probe.passes(mode, status) for mode in MODES} == answers, status


def test_probes_and_ready_file_through_starting_ready_busy_and_a_dead_worker(
    tiny_weights_dir, tmp_path, under_kubernetes
):
    server = CogServer(tiny_weights_dir, tmp_path / "server.log")
    try:
        assert probe_until(server.url, "STARTING") == EXPECTED["STARTING"]
        assert not READY_FILE.exists(), "the ready file must not exist before setup finished"
        assert probe_until(server.url, "READY") == EXPECTED["READY"]
        assert READY_FILE.exists(), "coglet writes the ready file once a health check finds it READY"

        response = requests.post(
            f"{server.url}/predictions", json={"input": LONG}, headers={"Prefer": "respond-async"}, timeout=30
        )
        assert response.status_code == 202
        assert probe_until(server.url, "BUSY", timeout=30) == EXPECTED["BUSY"]
        assert READY_FILE.exists(), "the file stays while BUSY: it says setup finished once, not 'free now'"

        worker = int(subprocess.check_output(["pgrep", "-P", str(server.process.pid)], text=True).split()[0])
        os.kill(worker, signal.SIGKILL)  # coglet's Python worker
        assert probe_until(server.url, "UNHEALTHY", timeout=30) == EXPECTED["UNHEALTHY"]
        assert READY_FILE.exists(), "nor is it removed when the worker is dead: liveness must catch that"
    finally:
        server.stop()


def test_probes_on_a_failed_setup(tmp_path, under_kubernetes):
    server = CogServer(tmp_path / "no-weights-here", tmp_path / "server.log")
    try:
        assert probe_until(server.url, "SETUP_FAILED") == EXPECTED["SETUP_FAILED"]
        assert not READY_FILE.exists()
    finally:
        server.stop()
    assert run_probes(server.url) == ("NO_ANSWER", EXPECTED["NO_ANSWER"])
