"""Downloads through the real Cog server: a `replicate_weights` URL whose server trickles bytes fails at the
SDXL_FETCH_DEADLINE and leaves the server READY with the same images; presigned URLs (the model's own weights in
COG_WEIGHTS, a request's replicate_weights and loras) never show their query strings in the server's log or in an
error. Loopback only."""

import re
import time

import numpy as np
import pytest
from diffusers import UNet2DConditionModel

from sdxl.model import weights
from tools.testing.cog_server import CogServer, decode_png, ready_server
from tools.testing.file_server import FileServer
from tools.testing.slow_senders import TrickleServer
from tools.testing.trained import lora_state, trained_tar

BASE = {"prompt": "a photo", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 7, "apply_watermark": False}
DEADLINE = 3  # SDXL_FETCH_DEADLINE for this server; the read timeout (2 s) is far longer than a trickle's gaps
SECRET = "SECRETc0ffee"  # in every presigned URL below; must appear nowhere in the log or an error


@pytest.fixture(scope="module")
def files(tiny_weights_dir, tmp_path_factory):
    """Presigned-looking URLs: /own and /lora each redirect, with a second secret in the Location."""
    server = FileServer()
    unet = UNet2DConditionModel.from_pretrained(tiny_weights_dir / weights.BASE.folder / "unet")
    tar = trained_tar(tmp_path_factory.mktemp("tar"), lora=lora_state(unet, seed=11))
    server.redirects[f"/own?X-Amz-Signature={SECRET}-1"] = f"/own.tar?X-Amz-Signature={SECRET}-2"
    server.serve(f"/own.tar?X-Amz-Signature={SECRET}-2", tar)
    server.redirects[f"/gone?X-Amz-Signature={SECRET}-3"] = f"/gone.tar?X-Amz-Signature={SECRET}-4"  # then 404
    yield server
    server.close()


@pytest.fixture(scope="module")
def trickle():
    server = TrickleServer(reply=lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10**6)
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(tiny_weights_dir, files, tmp_path_factory):
    env = {
        "SDXL_ALLOW_LOOPBACK_HTTP": "1",
        "SDXL_WEIGHTS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "SDXL_FETCH_READ_TIMEOUT": "2",
        "SDXL_FETCH_DEADLINE": str(DEADLINE),
        "COG_WEIGHTS": files.url(f"/own?X-Amz-Signature={SECRET}-1"),  # the model's own weights, presigned
    }
    with ready_server(tiny_weights_dir, tmp_path_factory.mktemp("log") / "server.log", env) as cog:
        yield cog


def image_of(response) -> np.ndarray:
    body = response.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs", "")[-2000:]
    return decode_png(body["output"][0])


def full_log(server: CogServer) -> str:
    return server.log_path.read_text(errors="replace")  # all of it, not only the tail .log() shows


def test_own_weights_from_a_presigned_url(server, files):
    """Setup fetched COG_WEIGHTS through its redirect; the log names the URL without its query."""
    assert files.requests[f"/own.tar?X-Amz-Signature={SECRET}-2"] == 1
    log = full_log(server)
    assert re.search(r"own weights from http://127\.0\.0\.1:\d+/own\?\.\.\. loaded", log), log[-3000:]
    assert re.search(r"/own\?\.\.\. redirects to http://127\.0\.0\.1:\d+/own\.tar\?\.\.\.", log), log[-3000:]


def test_a_trickling_server_fails_at_the_deadline_and_the_server_stays_ready(server, trickle):
    before = image_of(server.predict(BASE))
    started = time.monotonic()
    body = server.predict({**BASE, "replicate_weights": trickle.url("/trained_model.tar")}).json()
    elapsed = time.monotonic() - started
    assert body["status"] == "failed", body
    assert re.search(f"replicate_weights: .*took longer than the {DEADLINE}s", body["error"]), body["error"]
    # measured: 3.05 s for the whole request (deadline 3 s + request handling), on 2 shared cores
    assert DEADLINE <= elapsed < DEADLINE + 1.5, elapsed
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"
    np.testing.assert_array_equal(image_of(server.predict(BASE)), before)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"replicate_weights": f"/gone?X-Amz-Signature={SECRET}-3"}, "replicate_weights: .*HTTP 404"),
        ({"replicate_weights": f"https://10.0.0.9/w.tar?X-Amz-Signature={SECRET}"}, "replicate_weights: refused"),
        ({"replicate_weights": f"https://h:99999/w.tar?X-Amz-Signature={SECRET}"}, "not a valid URL"),
        ({"loras": f'[{{"url": "/gone?X-Amz-Signature={SECRET}-3"}}]'}, r"loras\[0\]: .*HTTP 404"),
        ({"loras": f'[{{"url": "https://h/l?X-Amz-Signature={SECRET}", "w": 1}}]'}, r"loras\[0\]: .*must be"),
    ],
    ids=["redirect-then-404", "refused", "bad-port", "lora-redirect-then-404", "lora-bad-item"],
)
def test_presigned_urls_stay_out_of_the_log_and_the_error(server, files, extra, words):
    extra = {key: value.replace('"/gone', f'"{files.url("/gone")}') for key, value in extra.items()}
    extra = {key: files.url(value) if value.startswith("/") else value for key, value in extra.items()}
    body = server.predict({**BASE, **extra}).json()
    assert body["status"] == "failed", body
    assert re.search(words, body["error"]), body["error"]
    assert SECRET not in body["error"] and SECRET not in (body.get("logs") or "")
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"


def test_the_whole_log_holds_no_secret(server):
    """Runs last: the server's log from setup through every request above (the module's tests run in order)."""
    log = full_log(server)
    assert "redirects to" in log and "?..." in log  # the hops were logged, redacted
    assert SECRET not in log, [line for line in log.splitlines() if SECRET in line][:5]
