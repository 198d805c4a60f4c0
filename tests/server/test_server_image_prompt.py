"""Image prompts (IP-Adapter) and the dedicated inpainting UNet through the real Cog server on 127.0.0.1: each mode
equals, pixel for pixel, the diffusers pipelines called directly (load_ip_adapter + ip_adapter_image; the SDXL inpaint
pipeline with the 9-channel UNet, also with an image prompt or a ControlNet); an image prompt changes the image, scale 0 gives the image without it, a request
without one is unchanged by one before it; refusals name the field; ip_adapter_image obeys the network policy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from sdxl.model import weights
from tools.testing.cog_server import decode_png, png_data_uri, ready_server

SEED = 11
PROMPT = "a lighthouse at dusk"
SMALL = {"prompt": PROMPT, "seed": SEED, "num_inference_steps": 4, "apply_watermark": False}
SMALL = {**SMALL, "disable_safety_checker": True, "scheduler": "K_EULER"}
SCALE = 0.7


def photo(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def square_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


IMAGE_PROMPT, INIT, MASK = photo(1, (48, 40)), photo(2), square_mask()
WITH_IMAGE_PROMPT = {"ip_adapter_image": png_data_uri(IMAGE_PROMPT), "ip_adapter_scale": SCALE}
INPAINT = {"image": png_data_uri(INIT), "mask": png_data_uri(MASK), "prompt_strength": 0.9}


@pytest.fixture(scope="module")
def server(tiny_weights_dir, tmp_path_factory):
    with ready_server(tiny_weights_dir, tmp_path_factory.mktemp("cog") / "server.log") as cog:
        yield cog


@pytest.fixture(scope="module")
def reference(tiny_weights_dir):
    """diffusers' own pipelines, loaded apart from sdxl.model.loading: the adapter through load_ip_adapter."""
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    base = StableDiffusionXLPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=vae, add_watermarker=False
    )
    subfolder, weight_name = weights.IP_ADAPTER_FILE.split("/")
    base.load_ip_adapter(
        str(tiny_weights_dir / weights.IP_ADAPTER.folder),
        subfolder=subfolder,
        weight_name=weight_name,
        image_encoder_folder=weights.IP_ADAPTER_ENCODER,
    )
    base.set_ip_adapter_scale(SCALE)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_weights_dir / weights.REFINER.folder, vae=vae, text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2, add_watermarker=False,
    )  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(tiny_weights_dir / weights.INPAINTING_UNET.folder, subfolder="unet")
    plain = {name: module for name, module in base.components.items() if name not in ("image_encoder", "unet")}
    pipes = {
        "text2img": base,
        "img2img": StableDiffusionXLImg2ImgPipeline(**base.components, add_watermarker=False),
        "inpaint": StableDiffusionXLInpaintPipeline(**base.components, add_watermarker=False),
        "inpainting": StableDiffusionXLInpaintPipeline(**plain, unet=unet, image_encoder=None, add_watermarker=False),
        "refiner": refiner,
        "refiner_inpaint": StableDiffusionXLInpaintPipeline(
            **refiner.components, requires_aesthetics_score=True, add_watermarker=False
        ),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    return pipes


def common(outputs: int = 1, generator=None) -> dict:
    generator = generator or torch.Generator("cpu").manual_seed(SEED)
    return dict(prompt=PROMPT, negative_prompt="", num_inference_steps=SMALL["num_inference_steps"],
                guidance_scale=7.5, num_images_per_prompt=outputs, generator=generator)  # fmt: skip


def served(server, **inputs) -> np.ndarray:
    body = server.predict({**SMALL, **inputs}).json()
    assert body["status"] == "succeeded", body.get("error")
    return np.stack([decode_png(uri) for uri in body["output"]])


def arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def refined(reference, latents, kwargs, generator, outputs=1):
    """The refiner over the base's latents, drawing on the base's generator: one row of prompts per latent."""
    pipe = reference["refiner_inpaint" if "mask_image" in kwargs else "refiner"]
    args = {
        **common(generator=generator),
        "prompt": [PROMPT] * outputs,
        "negative_prompt": [""] * outputs,
        "num_images_per_prompt": 1,
    }
    return arrays(pipe(**args, image=latents, **kwargs).images)


def test_text2img_with_an_image_prompt_equals_diffusers(server, reference):
    expected = reference["text2img"](**common(2), width=64, height=64, ip_adapter_image=IMAGE_PROMPT).images
    got = served(server, width=64, height=64, num_outputs=2, **WITH_IMAGE_PROMPT)
    np.testing.assert_array_equal(got, arrays(expected))


def test_img2img_with_an_image_prompt_equals_diffusers(server, reference):
    expected = reference["img2img"](**common(), image=INIT, strength=0.7, ip_adapter_image=IMAGE_PROMPT).images
    got = served(server, image=png_data_uri(INIT), prompt_strength=0.7, **WITH_IMAGE_PROMPT)
    np.testing.assert_array_equal(got, arrays(expected))


def test_inpainting_with_an_image_prompt_equals_diffusers(server, reference):
    expected = reference["inpaint"](
        **common(), image=INIT, mask_image=MASK, strength=0.9, width=64, height=64, ip_adapter_image=IMAGE_PROMPT
    ).images
    got = served(server, width=64, height=64, **INPAINT, **WITH_IMAGE_PROMPT)
    np.testing.assert_array_equal(got, arrays(expected))


@pytest.mark.parametrize("refine", ["expert_ensemble_refiner", "base_image_refiner"])
def test_the_image_prompt_steers_the_base_and_the_refiner_finishes(server, reference, refine):
    """The adapter is the base UNet's (the refiner's cross-attention is another width): the base part runs with it."""
    ensemble = refine == "expert_ensemble_refiner"
    end = {"denoising_end": 0.8} if ensemble else {}
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = reference["text2img"](
        **common(generator=generator), width=64, height=64, ip_adapter_image=IMAGE_PROMPT, output_type="latent", **end
    ).images
    after = {"denoising_start": 0.8} if ensemble else {"strength": 0.3}
    expected = refined(reference, latents, after, generator)
    got = served(server, width=64, height=64, refine=refine, **WITH_IMAGE_PROMPT)
    np.testing.assert_array_equal(got, expected)


def test_the_inpainting_unet_equals_diffusers_inpaint_pipeline(server, reference):
    expected = reference["inpainting"](**common(), image=INIT, mask_image=MASK, strength=0.9, width=64, height=64)
    got = served(server, width=64, height=64, inpaint_model="inpainting", **INPAINT)
    np.testing.assert_array_equal(got, arrays(expected.images))
    assert not np.array_equal(got, served(server, width=64, height=64, **INPAINT))  # another UNet drew it


def test_the_refiner_after_the_inpainting_unet_equals_diffusers(server, reference):
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = reference["inpainting"](
        **common(generator=generator), image=INIT, mask_image=MASK, strength=0.9, width=64, height=64, denoising_end=0.8,
        output_type="latent",
    ).images  # fmt: skip
    expected = refined(
        reference, latents, {"mask_image": MASK, "width": 64, "height": 64, "denoising_start": 0.8}, generator
    )
    got = served(server, width=64, height=64, inpaint_model="inpainting", refine="expert_ensemble_refiner", **INPAINT)
    np.testing.assert_array_equal(got, expected)


def test_scale_zero_gives_the_image_without_it_and_nothing_lingers(server):
    plain = served(server, width=64, height=64)
    steered = served(server, width=64, height=64, **WITH_IMAGE_PROMPT)
    assert np.abs(steered.astype(int) - plain).mean() > 1  # the image prompt changes the image
    np.testing.assert_array_equal(
        served(server, width=64, height=64, **{**WITH_IMAGE_PROMPT, "ip_adapter_scale": 0}), plain
    )
    np.testing.assert_array_equal(served(server, width=64, height=64), plain)  # after an image prompt: as before


def failed(server, inputs) -> str:
    body = server.predict({**SMALL, "width": 64, "height": 64, **inputs}).json()
    assert body["status"] == "failed", body
    # coglet prefixes "Prediction failed: ... InputError: "; what follows is our message, which names the field.
    return re.match(r"(?:\w+ failed: )*(?:\w+Error: )?(.*)", body["error"], re.S).group(1)


@pytest.mark.parametrize(
    "inputs, start",
    [
        ({"inpaint_model": "inpainting"}, "inpaint_model: 'inpainting' inpaints, so it needs `image` and `mask`"),
        ({"ip_adapter_image": "/etc/passwd"}, "ip_adapter_image: a file path on the server is not accepted"),
        ({"ip_adapter_image": png_data_uri(IMAGE_PROMPT)[:40]}, "ip_adapter_image: "),
    ],
)
def test_refusals_name_the_field_and_the_server_stays_ready(server, inputs, start):
    assert failed(server, inputs).startswith(start)
    assert server.wait_for("READY", timeout=10)["status"] == "READY"


@pytest.mark.parametrize("body", [{"inpaint_model": "dedicated"}, {"ip_adapter_scale": 1.5}])
def test_out_of_range_values_get_422_naming_the_field(server, body):
    response = server.predict({**SMALL, **body})
    assert response.status_code == 422 and next(iter(body)) in response.text, response.text


def test_a_loopback_image_prompt_url_is_refused_unconnected(server, listener):
    error = failed(server, {"ip_adapter_image": f"https://127.0.0.1:{listener.port}/face.png"})
    assert error.startswith("ip_adapter_image: refused: ") and "a loopback address" in error, error
    assert not listener.was_connected()


def test_a_controlnet_and_an_image_prompt_together_equal_diffusers(server, tiny_weights_dir):
    """Both in one request: diffusers' SDXL ControlNet pipeline with load_ip_adapter, the same map and image prompt."""
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    controlnet = ControlNetModel.from_pretrained(tiny_weights_dir / weights.CONTROLNET_CANNY.folder)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=vae, controlnet=controlnet, add_watermarker=False
    )
    subfolder, weight_name = weights.IP_ADAPTER_FILE.split("/")
    pipe.load_ip_adapter(str(tiny_weights_dir / weights.IP_ADAPTER.folder), subfolder=subfolder,
                         weight_name=weight_name, image_encoder_folder=weights.IP_ADAPTER_ENCODER)  # fmt: skip
    pipe.set_ip_adapter_scale(SCALE)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (0, 0, 32, 64))
    expected = pipe(**common(), image=edges, controlnet_conditioning_scale=0.5, width=64, height=64,
                    ip_adapter_image=IMAGE_PROMPT).images  # fmt: skip
    control = {"controlnet": "canny", "control_image": png_data_uri(edges), "control_preprocess": False}
    got = served(server, width=64, height=64, **control, **WITH_IMAGE_PROMPT)
    np.testing.assert_array_equal(got, arrays(expected))
    assert not np.array_equal(got, served(server, width=64, height=64, **control))  # the image prompt counted


def inpainting_unet(tiny_weights_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_weights_dir / weights.INPAINTING_UNET.folder, subfolder="unet")


def test_an_image_prompt_on_the_inpainting_unet_equals_diffusers(server, reference, tiny_weights_dir):
    """load_ip_adapter on diffusers' inpaint pipeline over the 9-channel UNet: its attention layers are the base's."""
    plain = {name: module for name, module in reference["text2img"].components.items() if name != "unet"}
    pipe = StableDiffusionXLInpaintPipeline(**plain, unet=inpainting_unet(tiny_weights_dir), add_watermarker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    subfolder, weight_name = weights.IP_ADAPTER_FILE.split("/")
    pipe.load_ip_adapter(str(tiny_weights_dir / weights.IP_ADAPTER.folder), subfolder=subfolder,
                         weight_name=weight_name, image_encoder_folder=weights.IP_ADAPTER_ENCODER)  # fmt: skip
    pipe.set_ip_adapter_scale(SCALE)
    expected = pipe(
        **common(), image=INIT, mask_image=MASK, strength=0.9, width=64, height=64, ip_adapter_image=IMAGE_PROMPT
    ).images
    got = served(server, width=64, height=64, inpaint_model="inpainting", **INPAINT, **WITH_IMAGE_PROMPT)
    np.testing.assert_array_equal(got, arrays(expected))
    assert not np.array_equal(got, served(server, width=64, height=64, inpaint_model="inpainting", **INPAINT))


def test_a_controlnet_on_the_inpainting_unet_equals_diffusers(server, reference, tiny_weights_dir):
    """diffusers' SDXL ControlNet inpaint pipeline over the 9-channel UNet: the UNet gets the mask and masked image,
    the ControlNet the 4 latent channels and the map."""
    plain = {name: module for name, module in reference["text2img"].components.items()
             if name not in ("unet", "image_encoder", "feature_extractor")}  # fmt: skip
    controlnet = ControlNetModel.from_pretrained(tiny_weights_dir / weights.CONTROLNET_CANNY.folder)
    pipe = StableDiffusionXLControlNetInpaintPipeline(
        **plain, unet=inpainting_unet(tiny_weights_dir), controlnet=controlnet, add_watermarker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (0, 0, 32, 64))
    expected = pipe(**common(), image=INIT, mask_image=MASK, control_image=edges, strength=0.9, width=64, height=64,
                    controlnet_conditioning_scale=0.5).images  # fmt: skip
    control = {"controlnet": "canny", "control_image": png_data_uri(edges), "control_preprocess": False}
    got = served(server, width=64, height=64, inpaint_model="inpainting", **INPAINT, **control)
    np.testing.assert_array_equal(got, arrays(expected))
    assert not np.array_equal(got, served(server, width=64, height=64, inpaint_model="inpainting", **INPAINT))


def test_a_server_without_the_optional_weights_refuses_naming_the_command(server, tiny_weights_dir, tmp_path):
    """The same tiny set without the inpainting UNet and the IP-Adapter: setup succeeds, and a request that needs one
    fails at once naming its field and the download command; the server stays READY."""
    bare = tmp_path / "weights"
    bare.mkdir()
    for entry in tiny_weights_dir.iterdir():
        if entry.name not in (weights.IP_ADAPTER.folder, weights.INPAINTING_UNET.folder):
            (bare / entry.name).symlink_to(entry)
    with ready_server(bare, tmp_path / "server.log") as cog:
        error = failed(cog, WITH_IMAGE_PROMPT)
        assert error.startswith("ip_adapter_image: this server has no IP-Adapter weights"), error
        assert "python scripts/download_weights.py --ip-adapter" in error
        error = failed(cog, {**INPAINT, "inpaint_model": "inpainting"})
        assert error.startswith("inpaint_model: this server has no inpainting UNet"), error
        assert "python scripts/download_weights.py --inpainting" in error
        assert cog.wait_for("READY", timeout=10)["status"] == "READY"
        # its plain images are the server-with-everything's: the optional models change nothing when unused
        np.testing.assert_array_equal(served(cog, width=64, height=64), served(server, width=64, height=64))
