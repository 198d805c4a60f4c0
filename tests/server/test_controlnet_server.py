"""ControlNet over HTTP: the real Cog server on 127.0.0.1 with the tiny weights. A request equals diffusers' own
ControlNet pipeline built from the same saved weights, seed and map; two maps give two images; each refusal names its
field and the server stays READY; a control_image on a loopback listener is refused before any connection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
from PIL import Image

from sdxl.model import weights
from tests.server.test_file_inputs_server import _failed, _start
from tools.testing.cog_server import decode_png, png_data_uri

REQUEST = dict(prompt="a red house", seed=5, num_inference_steps=3, width=64, height=64, apply_watermark=False,
               disable_safety_checker=True, controlnet="canny", control_preprocess=False)  # fmt: skip


def half_map(left: bool) -> Image.Image:
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (0, 0, 32, 64) if left else (32, 0, 64, 64))
    return image


@pytest.fixture(scope="module")
def server(tiny_weights_dir, tmp_path_factory):
    cog = _start(tiny_weights_dir, tmp_path_factory.mktemp("controlnet"))
    yield cog
    cog.stop()


def _image(server, **fields) -> np.ndarray:
    result = server.predict({**REQUEST, **fields}).json()
    assert result["status"] == "succeeded", result.get("error") or result.get("logs", "")[-2000:]
    return decode_png(result["output"][0])


def test_text2img_over_http_equals_diffusers_and_the_map_steers(server, tiny_weights_dir):
    controlnet = ControlNetModel.from_pretrained(tiny_weights_dir / weights.CONTROLNET_CANNY.folder)
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=vae, controlnet=controlnet, add_watermarker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    expected = pipe(
        prompt="a red house", negative_prompt="", num_inference_steps=3, guidance_scale=7.5, width=64, height=64,
        image=half_map(True), controlnet_conditioning_scale=0.5, generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    left = _image(server, control_image=png_data_uri(half_map(True)))
    np.testing.assert_array_equal(left, np.asarray(expected))
    right = _image(server, control_image=png_data_uri(half_map(False)))
    assert np.abs(left.astype(int) - right).mean() > 2


def test_refusals_name_their_field(server):
    control = png_data_uri(half_map(True))
    cases = [
        (dict(controlnet="none", control_image=control), "control_image: a control image needs a ControlNet"),
        (dict(), "controlnet: 'canny' needs a `control_image`"),
        (dict(control_image=control, control_guidance_start=0.6, control_guidance_end=0.4), "control_guidance_end: "),
    ]
    for fields, message in cases:
        error = _failed(server, {**REQUEST, **fields})
        assert error.startswith(message), error


def test_a_loopback_control_image_is_refused_unconnected(server, listener):
    for url in (f"https://127.0.0.1:{listener.port}/map.png", f"http://127.0.0.1:{listener.port}/map.png"):
        error = _failed(server, {**REQUEST, "control_image": url})
        assert error.startswith("control_image: "), error
    assert not listener.was_connected()
