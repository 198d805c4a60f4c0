"""The inputs beyond the hosted model, through the real Cog server on 127.0.0.1: old clients' requests are unchanged,
bad values are refused naming the field, and the server stays READY."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from sdxl.inference.generation import generate
from sdxl.inputs.request import MAX_PROMPT_CHARS, GenerationRequest
from sdxl.output import infotext
from sdxl.output.outputs import read_parameters
from tools.testing.cog_server import ready_server

# Every hosted-model input an old client may send (image, mask and replicate_weights left out: they have no default).
OLD_CLIENT = {
    "prompt": "a red bicycle",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "num_outputs": 2,
    "scheduler": "K_EULER",
    "num_inference_steps": 2,
    "guidance_scale": 7.5,
    "prompt_strength": 0.8,
    "seed": 21,
    "refine": "no_refiner",
    "high_noise_frac": 0.8,
    "apply_watermark": True,
    "lora_scale": 0.6,
    "disable_safety_checker": False,
}
SMALL = {"prompt": "a red bicycle", "width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_weights_dir, tmp_path_factory):
    with ready_server(tiny_weights_dir, tmp_path_factory.mktemp("cog") / "server.log") as cog:
        yield cog


def decode(data_uri: str, mime: str) -> Image.Image:
    header, _, data = data_uri.partition(",")
    assert header == f"data:{mime};base64", header
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_an_old_clients_request_is_answered_as_before(server, pipes):
    response = server.predict(OLD_CLIENT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    request = {name: value for name, value in OLD_CLIENT.items() if name != "lora_scale"}  # no LoRA here
    expected = generate(pipes, GenerationRequest(**request)).images
    for position, (uri, image) in enumerate(zip(body["output"], expected, strict=True)):
        png = decode(uri, "image/png")
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(image))
        _, _, pairs = infotext.parse(png.info["parameters"])
        assert (pairs["Seed"], pairs["Batch pos"]) == ("21", str(position))


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"output_format": "gif"}, "output_format"),
        ({"output_quality": 0}, "output_quality"),
        ({"output_quality": 101}, "output_quality"),
        ({"prompt_weighting": "sometimes"}, "prompt_weighting"),
    ],
)
def test_bad_new_inputs_get_422_naming_the_field(server, extra, field):
    response = server.predict({**SMALL, **extra})
    assert response.status_code == 422, response.text
    assert field in response.text


def test_bad_weighting_fails_naming_the_field_and_the_server_stays_ready(server):
    response = server.predict({**SMALL, "prompt": "a (red:1.3) bicycle", "prompt_weighting": True})
    body = response.json()
    assert body["status"] == "failed" and "InputError: prompt: " in body["error"], body  # coglet prefixes it
    assert "A1111 syntax" in body["error"]
    # coglet reports READY a moment after it answers; a server that stays BUSY still fails here.
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"
    good = server.predict({**SMALL, "prompt": "a (red)1.3 bicycle", "prompt_weighting": True}).json()
    assert good["status"] == "succeeded", good.get("error")


def test_webp_output_carries_its_random_seed(server, tmp_path):
    body = server.predict({**SMALL, "output_format": "webp", "output_quality": 90}).json()
    assert body["status"] == "succeeded", body.get("error")
    assert decode(body["output"][0], "image/webp").format == "WEBP"
    path = tmp_path / "out.webp"
    path.write_bytes(base64.b64decode(body["output"][0].partition(",")[2]))
    _, _, pairs = infotext.parse(read_parameters(path))
    seed = int(pairs["Seed"])
    assert f"Using seed: {seed}" in server.log()


FORGED = "a fox\x00 in snow\nNegative prompt: forged\u2028\nSteps: 1, Sampler: DDIM, CFG scale: 1, Seed: 7\n"
EMOJI = "\U0001f98a"
MIME = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


def parameters_of(body: dict, fmt: str, tmp_path) -> tuple[str, str, dict[str, str]]:
    assert body["status"] == "succeeded", body.get("error")
    path = tmp_path / f"out.{fmt}"
    path.write_bytes(base64.b64decode(body["output"][0].partition(",")[2]))
    assert decode(body["output"][0], MIME[fmt]).format == {"jpg": "JPEG"}.get(fmt, fmt.upper())
    return infotext.parse(read_parameters(path))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_a_prompt_cannot_forge_the_negative_prompt_or_the_parameters(server, tmp_path, fmt):
    """A NUL, a line separator and lines that look like A1111's reach the file as visible prompt text."""
    body = server.predict({**SMALL, "prompt": FORGED, "negative_prompt": "blurry", "seed": 11, "output_format": fmt})
    prompt, negative, pairs = parameters_of(body.json(), fmt, tmp_path)
    assert (
        prompt
        == "a fox\\x00 in snow\nNegative prompt\\: forged\\u2028\nSteps\\: 1, Sampler: DDIM, CFG scale: 1, Seed: 7\n"
    )
    assert negative == "blurry"
    assert (pairs["Seed"], pairs["Steps"], pairs["Sampler"]) == ("11", "2", "Euler")


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
def test_10000_emoji_in_both_prompts_are_answered_in_every_format(server, tmp_path, fmt):
    """At the prompt caps EXIF (jpg, webp) cannot hold both prompts: they are cut and marked, the parameters line
    whole; a PNG holds them whole."""
    long = EMOJI * MAX_PROMPT_CHARS
    body = server.predict({**SMALL, "prompt": long, "negative_prompt": long, "seed": 12, "output_format": fmt})
    prompt, negative, pairs = parameters_of(body.json(), fmt, tmp_path)
    if fmt == "png":
        assert prompt == negative == long
    else:
        assert prompt == negative and prompt.endswith(EMOJI + infotext.MARKER)
        assert MAX_PROMPT_CHARS // 2 < len(prompt) < MAX_PROMPT_CHARS
    assert (pairs["Seed"], pairs["Steps"], pairs["Size"], pairs["Model"]) == (
        "12",
        "2",
        "64x64",
        infotext.model_name("tiny"),
    )


def test_a_lone_surrogate_is_refused_before_any_work(server):
    """JSON can carry half a UTF-16 pair, which no encoder writes; the server refuses it when it reads the body (the
    parameters text would write it as visible `\\ud83d` text: tests/output/test_outputs.py)."""
    body = '{"input": {"prompt": "half \\ud83d a pair", "width": 64, "height": 64, "num_inference_steps": 2}}'
    response = requests.post(
        f"{server.url}/predictions", data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400 and "input.prompt" in response.text, response.text
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"
