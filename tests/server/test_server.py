"""The Cog edge end to end: the real Cog server (coglet) on 127.0.0.1 serving predict.py:Runner on tiny weights."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from sdxl.inference.generation import generate
from sdxl.inputs.request import GenerationRequest
from tools.testing.cog_server import ROOT, TERMINAL, CogServer, WebhookReceiver, decode_png, png_data_uri, ready_server

# Small and quick; 256 px so the invisible watermark (which needs 65536 pixels) really runs.
BASE = {"prompt": "a red bicycle", "width": 256, "height": 256, "num_inference_steps": 2}
LONG = {**BASE, "num_inference_steps": 200}  # tens of seconds on CPU: certainly still running when poked


@pytest.fixture(scope="module")
def server(tiny_weights_dir, tmp_path_factory):
    with ready_server(tiny_weights_dir, tmp_path_factory.mktemp("cog") / "server.log") as cog:
        yield cog


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def in_process(pipes, **inputs) -> list[np.ndarray]:
    """What sdxl.generate makes of the same inputs in this process (the reference for every HTTP answer)."""
    result = generate(pipes, GenerationRequest(**inputs))
    return [np.asarray(image.convert("RGB")) for image in result.images]


def assert_same_images(data_uris: list[str], expected: list[np.ndarray]) -> None:
    assert len(data_uris) == len(expected)
    for uri, pixels in zip(data_uris, expected):
        np.testing.assert_array_equal(decode_png(uri), pixels)


def test_health_goes_from_starting_to_ready(server):
    assert server.statuses_seen[0] == "STARTING"
    assert server.statuses_seen[-1] == "READY"
    assert "RANDOM tiny test weights" in server.health()["setup"]["logs"]


def test_setup_failure_is_reported_with_the_missing_weights(tmp_path):
    missing = tmp_path / "no-weights-here"
    cog = CogServer(missing, tmp_path / "server.log")
    try:
        health = cog.wait_for("SETUP_FAILED", "READY")
    finally:
        cog.stop()
    assert health["status"] == "SETUP_FAILED"
    assert health["setup"]["status"] == "failed"
    logs = health["setup"]["logs"]
    assert f"the weight folder {missing} is incomplete" in logs
    assert "make_tiny_weights.py" in logs  # it says how to fix it


def test_sync_prediction_equals_in_process_generation(server, pipes):
    inputs = {**BASE, "seed": 1234, "num_outputs": 2}
    response = server.predict(inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body
    assert "Using seed: 1234" in body["logs"]
    assert_same_images(body["output"], in_process(pipes, **inputs))


def test_random_seed_is_logged(server):
    body = server.predict({**BASE, "width": 64, "height": 64, "num_inference_steps": 1}).json()
    assert body["status"] == "succeeded"
    assert "Using seed: " in body["logs"]


def test_async_prediction_sends_start_output_and_completed_webhooks(server, webhook, pipes):
    inputs = {**BASE, "seed": 99}
    response = server.predict_async(inputs, webhook.url, id="async-1")
    assert response.status_code == 202, response.text
    completed = webhook.wait_until(lambda p: p["status"] in TERMINAL)
    start, with_output = webhook.payloads[0], next(p for p in webhook.payloads if p.get("output"))
    assert start["status"] == "processing" and not start.get("output")
    assert with_output["id"] == completed["id"] == "async-1"
    assert completed["status"] == "succeeded", completed
    assert_same_images(completed["output"], in_process(pipes, **inputs))


def test_cancel_during_denoising_leaves_the_server_ready_and_unaffected(server, webhook, pipes):
    response = server.predict_async({**LONG, "seed": 5}, webhook.url, id="to-cancel")
    assert response.status_code == 202, response.text
    webhook.wait_until(lambda p: "base: step 1/200" in (p.get("logs") or ""))  # mid-denoising
    assert requests.post(f"{server.url}/predictions/to-cancel/cancel", timeout=10).status_code == 200

    canceled = webhook.wait_until(lambda p: p["status"] in TERMINAL, timeout=60)
    assert canceled["status"] == "canceled"
    assert "base: step 200/200" not in canceled["logs"]
    assert server.wait_for("READY", timeout=30)["status"] == "READY"

    # The next request (another scheduler too) comes out exactly as a fresh run would.
    inputs = {**BASE, "seed": 6, "scheduler": "DPMSolverMultistep"}
    body = server.predict(inputs).json()
    assert body["status"] == "succeeded", body
    assert_same_images(body["output"], in_process(pipes, **inputs))


def test_second_request_while_one_runs_gets_409_and_the_first_completes(server, webhook, pipes):
    first = {**BASE, "num_inference_steps": 60, "seed": 11}  # seconds even on an idle machine: still running when poked
    assert server.predict_async(first, webhook.url, id="first").status_code == 202
    webhook.wait_until(lambda p: "base: step 1/60" in (p.get("logs") or ""))

    second = server.predict({**BASE, "seed": 12}, busy_retry_s=0)
    assert second.status_code == 409, second.text
    assert second.json()["status"] == "failed"

    completed = webhook.wait_until(lambda p: p["status"] in TERMINAL)
    assert completed["status"] == "succeeded", completed
    assert_same_images(completed["output"], in_process(pipes, **first))


@pytest.mark.parametrize(
    "field, value",
    [
        ("width", 4096),
        ("height", 32),
        ("width", "wide"),
        ("num_outputs", 5),
        ("num_outputs", 2.5),
        ("num_inference_steps", 0),
        ("guidance_scale", 0.5),
        ("prompt_strength", 1.5),
        ("high_noise_frac", -0.1),
        ("lora_scale", 2),
        ("refine_steps", 501),
        ("scheduler", "K_LMS"),
        ("refine", "sometimes"),
        ("seed", "lucky"),
        ("seed", -1),
        ("seed", 2**32),
        ("apply_watermark", "maybe"),
        ("prompt", 42),
    ],
)
def test_invalid_inputs_get_422_naming_the_field(server, field, value):
    response = server.predict({**BASE, field: value})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [error["loc"] for error in detail] == [["body", "input", field]]
    assert detail[0]["msg"]


def _corrupt_image():
    return {"image": "data:image/png;base64," + "bm90IGFuIGltYWdlIGF0IGFsbA=="}  # "not an image at all"


def _mask_of_the_wrong_size():
    return {"image": png_data_uri(Image.new("RGB", (128, 128), "red")), "mask": png_data_uri(Image.new("L", (64, 64)))}


def _width_not_a_multiple_of_8():
    return {"width": 100}


def _trained_weights_over_ftp():
    return {"replicate_weights": "ftp://127.0.0.1/trained_model.tar"}


@pytest.mark.parametrize(
    "extra, expected_error",
    [
        (_corrupt_image, "image: could not be read as an image"),
        (_mask_of_the_wrong_size, "mask: its size 64x64 differs from the image's 128x128"),
        (_width_not_a_multiple_of_8, "width: 100 is not allowed; use a multiple of 8"),
        (_trained_weights_over_ftp, "replicate_weights: "),
        # 2 MB of prompt: tokenizing it all (to warn of the cut) cost 13 s and ~400 MB; refused unread, in ms.
        (lambda: {"prompt": "a red bicycle " * 150_000}, "prompt: is 2,100,000 characters long; at most 10,000"),
        (lambda: {"negative_prompt": "x" * 10_001}, "negative_prompt: is 10,001 characters long"),
    ],
)
def test_bad_requests_fail_clearly_and_the_server_stays_ready(server, extra, expected_error):
    response = server.predict({**BASE, **extra()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed"
    assert expected_error in body["error"]
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"


def test_shell_entry_makes_the_same_image_as_http(server, tiny_weights_dir, tmp_path):
    # img2img, so the shell's `-i image=@path` and the server's data: URI download are both exercised.
    photo = tmp_path / "photo.png"
    Image.radial_gradient("L").resize((128, 96)).convert("RGB").save(photo)
    inputs = {"prompt": "a lighthouse", "num_inference_steps": 4, "prompt_strength": 0.5, "seed": 77}
    body = server.predict({**inputs, "image": png_data_uri(Image.open(photo))}).json()
    assert body["status"] == "succeeded", body

    args = [f"{name}={value}" for name, value in inputs.items()] + [f"image=@{photo}"]
    shell = subprocess.run(
        [sys.executable, "scripts/cog_predict.py", *(f"-i{arg}" for arg in args), "-o", str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, "SDXL_WEIGHTS_DIR": str(tiny_weights_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shell.returncode == 0, shell.stderr[-3000:]
    written = [line.removeprefix("wrote ") for line in shell.stdout.splitlines() if line.startswith("wrote ")]
    assert len(written) == 1
    assert "Using seed: 77" in shell.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(written[0]).convert("RGB")), decode_png(body["output"][0]))


def test_request_folders_coglet_leaves_behind_are_removed_by_a_later_request(server):
    """coglet makes /tmp/coglet/predictions/<id>/{inputs,outputs} for every request and never removes it (nor the
    spill files it writes there for oversized messages). A later request of this server removes every finished folder
    of its own (here aged by hand past cog_scratch.STALE_AFTER_S instead of waiting)."""
    from cog_scratch import COGLET_PREDICTIONS, STALE_AFTER_S

    before = set(COGLET_PREDICTIONS.iterdir()) if COGLET_PREDICTIONS.exists() else set()
    assert server.predict({**BASE, "seed": 1}).json()["status"] == "succeeded"
    left = [folder for folder in COGLET_PREDICTIONS.iterdir() if folder not in before]
    assert left, "coglet no longer leaves a folder per request: cog_scratch may be unneeded"
    for folder in left:
        for entry in (folder, *folder.rglob("*")):
            aged = os.lstat(entry).st_mtime - STALE_AFTER_S - 5
            os.utime(entry, (aged, aged), follow_symlinks=False)

    assert server.predict({**BASE, "seed": 2}).json()["status"] == "succeeded"
    assert not any(folder.exists() for folder in left)
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"
