"""One fetch deadline per request and cancels that reach downloads, seen by a client of the real Cog server: a
loopback sender trickles one byte every 0.1 s (inside every read timeout) to each download of a request. The
request answers by its one deadline whatever it asked to fetch, a cancel or a client hang-up frees the slot within
about a second, and the server is READY after each. Loopback only."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tools.testing.cog_server import TERMINAL, CogServer, WebhookReceiver, ready_server
from tools.testing.slow_senders import TrickleServer

REQUEST_DEADLINE = 6
BASE = {"prompt": "a photo", "width": 64, "height": 64, "num_inference_steps": 1}


def endless(head: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000


@pytest.fixture(scope="module")
def sender():
    server = TrickleServer(reply=endless)
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(tiny_weights_dir, tmp_path_factory):
    env = {
        "SDXL_ALLOW_LOOPBACK_HTTP": "1",
        "SDXL_WEIGHTS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "SDXL_REQUEST_FETCH_DEADLINE": str(REQUEST_DEADLINE),
        "SDXL_FETCH_READ_TIMEOUT": "5",
    }
    with ready_server(tiny_weights_dir, tmp_path_factory.mktemp("log") / "server.log", env) as cog:
        yield cog


def ready_within(cog: CogServer, seconds: float) -> float:
    """Seconds until /health-check says READY (fails past `seconds`)."""
    started = time.monotonic()
    cog.wait_for("READY", "DEFUNCT", "SETUP_FAILED", timeout=seconds)
    assert cog.health()["status"] == "READY"
    return time.monotonic() - started


def test_all_of_a_requests_downloads_end_by_its_one_deadline(server, sender):
    """The trained tar and four LoRAs, each of which could take 1800 s on its own, and the image (120 s): the
    answer comes by the request's 6 s deadline, naming the field that ran out of time."""
    loras = json.dumps([{"url": sender.url(f"/l{i}.safetensors")} for i in range(4)])
    inputs = {**BASE, "image": sender.url("/i.png"), "replicate_weights": sender.url(), "loras": loras}
    started = time.monotonic()
    body = server.predict(inputs, timeout=120).json()
    elapsed = time.monotonic() - started
    assert body["status"] == "failed", body
    assert "FetchError: image: " in body["error"], body["error"]
    assert f"the request's downloads took longer than the {REQUEST_DEADLINE}s allowed" in body["error"]
    assert REQUEST_DEADLINE - 0.5 <= elapsed < REQUEST_DEADLINE + 4, elapsed  # measured ~6.3 s
    ready_within(server, 5)


def test_the_deadline_is_shared_by_the_trained_tar_and_the_loras(server, sender):
    inputs = {**BASE, "replicate_weights": sender.url("/t.tar"), "loras": json.dumps([{"url": sender.url("/l.st")}])}
    started = time.monotonic()
    body = server.predict(inputs, timeout=120).json()
    elapsed = time.monotonic() - started
    assert "FetchError: replicate_weights: " in body["error"], body
    assert "the request's downloads took longer" in body["error"], body
    assert elapsed < REQUEST_DEADLINE + 4, elapsed
    ready_within(server, 5)


@pytest.mark.parametrize("what", ["image", "replicate_weights"])
def test_a_cancel_stops_a_running_download_within_a_second(server, sender, what):
    """The image downloads in run()'s own thread (Cog's cancel is an exception raised there), the trained tar on
    the compute thread (the cancel event): either way the prediction ends canceled about a second later."""
    webhook = WebhookReceiver()
    try:
        response = server.predict_async({**BASE, what: sender.url(f"/{what}")}, webhook.url, id=f"cancel-{what}")
        assert response.status_code == 202, response.text
        time.sleep(1.5)
        cancelled_at = time.monotonic()
        assert requests.post(f"{server.url}/predictions/cancel-{what}/cancel", timeout=10).status_code == 200
        final = webhook.wait_until(lambda p: p["status"] in TERMINAL, timeout=30)
        assert final["status"] == "canceled", final
        ready_within(server, 10)
    finally:
        webhook.close()
    assert time.monotonic() - cancelled_at < 2.5  # measured 0.5-0.6 s


def test_a_client_that_hangs_up_frees_the_slot(server, sender):
    """coglet cancels a synchronous prediction whose client went away; the download stops at once."""
    with pytest.raises(requests.Timeout):
        requests.post(f"{server.url}/predictions", json={"input": {**BASE, "image": sender.url()}}, timeout=1.5)
    hung_up = time.monotonic()
    ready_within(server, 10)
    assert time.monotonic() - hung_up < 2.5  # measured ~0.1 s (before: BUSY until the download's deadline)
