"""The front door: what the project's HAProxy config (deploy/haproxy) lets through to a real Cog server on loopback.

Only the public API passes (POST /predictions, GET /openapi.json); a request reaches a predictor only whole, within
the body timeout; a webhook, in any spelling a JSON parser reads as one, is refused before a predictor sees it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.deploy.test_balancer import SMALL, pytestmark  # noqa: F401  (skips without haproxy)
from tools.testing.cluster import Cluster
from tools.testing.cog_server import HOST

BODY_TIMEOUT_S = 4


@pytest.fixture(scope="module")
def door(tiny_weights_dir, tmp_path_factory):
    """One predictor (the only slot) behind the balancer."""
    cluster = Cluster(tiny_weights_dir, tmp_path_factory.mktemp("door"), CLUSTER_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S))
    try:
        cluster.run("start", "1")
        yield cluster
    finally:
        cluster.run("stop")


def served(cluster: Cluster) -> int:
    """Requests the balancer has sent to the predictor so far."""
    return int(cluster.stats()["predictor1"]["stot"])


def predictor_state(cluster: Cluster) -> str:
    return requests.get(f"http://{HOST}:{cluster.backend_port}/health-check", timeout=5).json()["status"]


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request written byte for byte (no client library normalising it); the status and the answer."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


REFUSED = [
    "POST /shutdown HTTP/1.1",
    "POST /trainings HTTP/1.1",
    "PUT /trainings/t1 HTTP/1.1",
    "PUT /predictions/p1 HTTP/1.1",
    "POST /predictions/p1/cancel HTTP/1.1",
    "GET /health-check HTTP/1.1",
    "GET /predictions HTTP/1.1",
    "POST /predictions/ HTTP/1.1",
    "POST /predictions/../shutdown HTTP/1.1",
    "POST /prediction%73/../shutdown HTTP/1.1",
    "POST //shutdown HTTP/1.1",
    "POST http://predictor/shutdown HTTP/1.1",  # absolute form
    "POST /Shutdown HTTP/1.1",
]


def test_only_the_public_api_passes_and_the_predictor_stays_ready(door):
    before = served(door)
    for line in REFUSED:
        status, answer = raw_request(door.port, f"{line}\r\nHost: x\r\nContent-Length: 2\r\nConnection: close", b"{}")
        assert status in (400, 404, 405), (line, answer[:300])
    assert served(door) == before, "a refused request reached the predictor"
    assert predictor_state(door) == "READY"
    schema = requests.get(f"{door.url}/openapi.json", timeout=30)
    assert schema.status_code == 200 and "Input" in schema.json()["components"]["schemas"]
    answer = requests.post(f"{door.url}/predictions", json={"input": SMALL}, timeout=120)
    assert (answer.status_code, answer.json()["status"]) == (200, "succeeded")


def trickle(port: int, body: bytes, every_s: float, done: threading.Event) -> tuple[int, float]:
    """Send the head at once and the body one byte every `every_s`; the status the balancer answered, and when."""
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=60) as sock:
        head = f"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        sock.sendall(head.encode() + b"\r\n\r\n")
        try:
            for byte in body:
                sock.sendall(bytes([byte]))
                if done.wait(every_s):
                    break
        except OSError:
            pass  # the balancer closed the connection: what the test wants
        answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1]), time.monotonic() - started


def test_a_trickling_sender_holds_no_predictor(door):
    body = json.dumps({"input": SMALL}).encode()
    stop = threading.Event()
    before = served(door)
    with ThreadPoolExecutor(1) as pool:
        trickler = pool.submit(trickle, door.port, body, 0.5, stop)  # would take ~60 s to send it all
        time.sleep(1)
        started = time.monotonic()
        answer = requests.post(f"{door.url}/predictions", json={"input": SMALL}, timeout=120)
        normal_s = time.monotonic() - started
        assert not trickler.done(), "the trickler must still be sending while the normal client is served"
        status, trickler_s = trickler.result(timeout=60)
        stop.set()
    assert (answer.status_code, answer.json()["status"]) == (200, "succeeded")
    assert status == 408 and BODY_TIMEOUT_S - 0.5 <= trickler_s < BODY_TIMEOUT_S + 10, (status, trickler_s)
    assert served(door) == before + 1, "only the whole request reached the predictor"
    print(f"normal request answered in {normal_s:.2f} s; trickler got {status} after {trickler_s:.1f} s")


def test_bodies_over_the_cap_or_of_unknown_length_are_refused(door):
    before = served(door)
    big = json.dumps({"input": {**SMALL, "prompt": "x" * 250_000}}).encode()
    status, answer = raw_request(door.port, f"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}", big)
    assert status == 413 and b"245760" in answer
    chunked = b"2\r\n{}\r\n0\r\n\r\n"
    status, _ = raw_request(door.port, "POST /predictions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", chunked)
    assert status == 411
    assert served(door) == before


class Listener:
    """A loopback port that counts every connection made to it (a webhook target that must never be called)."""

    def __init__(self):
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.url = f"http://{HOST}:{self.sock.getsockname()[1]}/hook"

    def connections(self, wait_s: float) -> int:
        count, deadline = 0, time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                self.sock.accept()[0].close()
                count += 1
            except TimeoutError:
                pass
        return count


def webhook_bodies(url: str) -> list[bytes]:
    inputs = json.dumps(SMALL)
    return [
        json.dumps({"input": SMALL, "webhook": url}).encode(),
        json.dumps({"input": SMALL, "webhook": url, "webhook_events_filter": ["start", "completed"]}).encode(),
        f'{{"input": {inputs}, "we\\u0062hook": "{url}"}}'.encode(),  # an escaped letter
        f'{{"input": {inputs}, "\\u0077ebhook": "{url}"}}'.encode(),
        f'{{"input": {inputs}, "WEBHOOK": "{url}"}}'.encode(),
        f'{{"input": {inputs}, "webhook": "https://example.com/", "webhook": "{url}"}}'.encode(),  # duplicate keys
        f'{{"input": {{"prompt": "\x00"}}, "webhook": "{url}"}}'.encode(),  # a NUL byte before the key
        f'{{"input": {inputs}, "webhook" \n\t : "{url}"}}'.encode(),  # JSON whitespace before the colon
    ]


def test_a_loopback_webhook_is_never_called(door):
    listener, before = Listener(), served(door)
    for body in webhook_bodies(listener.url):
        for headers in ({}, {"Prefer": "respond-async"}):
            answer = requests.post(f"{door.url}/predictions", data=body, headers=headers, timeout=60)
            assert answer.status_code == 400, (body[:80], answer.text)
    async_only = requests.post(
        f"{door.url}/predictions", json={"input": SMALL}, headers={"Prefer": "respond-async"}, timeout=60
    )
    assert async_only.status_code == 400 and "respond-async" in async_only.json()["detail"]
    assert served(door) == before, "a request with a webhook reached the predictor"
    # The word itself is no key: a prompt may speak of webhooks, even quoted, and is answered.
    words = {**SMALL, "prompt": 'a "webhook": diagram, webhook'}
    answer = requests.post(f"{door.url}/predictions", json={"input": words}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert listener.connections(wait_s=2) == 0
    assert predictor_state(door) == "READY"
