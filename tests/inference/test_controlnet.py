"""ControlNet requests equal, pixel for pixel, diffusers' own SDXL ControlNet pipelines built from the same saved tiny
weights with the same seed and control map (text-to-image, img2img, inpainting, the ensemble hand-over); the map
changes the image; scale 0 gives the plain image; every refusal names its field."""

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

from sdxl.errors import InputError
from sdxl.inference import control
from sdxl.inference.generation import generate
from sdxl.inputs import prompt_weighting
from sdxl.inputs.request import GenerationRequest
from sdxl.model import weights

SEED = 99
PROMPT, NEGATIVE = "a red house by a lake", "blurry"
SIZE = dict(width=64, height=64)


def half_map(left: bool) -> Image.Image:
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (0, 0, 32, 64) if left else (32, 0, 64, 64))
    return image


@pytest.fixture(scope="module")
def reference(tiny_weights_dir):
    """diffusers' ControlNet pipelines from the saved folders, loaded independently of sdxl.model.loading."""
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    controlnet = ControlNetModel.from_pretrained(tiny_weights_dir / weights.CONTROLNET_CANNY.folder)
    base = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=vae, controlnet=controlnet, add_watermarker=False
    )
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_weights_dir / weights.REFINER.folder,
        vae=vae,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        add_watermarker=False,
    )
    pipes = {
        "text2img": base,
        "img2img": StableDiffusionXLControlNetImg2ImgPipeline(**base.components, add_watermarker=False),
        "inpaint": StableDiffusionXLControlNetInpaintPipeline(**base.components, add_watermarker=False),
        "refiner": refiner,
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipes


def ours(pipes, **kwargs) -> np.ndarray:
    defaults = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, apply_watermark=False, disable_safety_checker=True,
        num_inference_steps=4, controlnet="canny", control_preprocess=False,
    )  # fmt: skip
    request = GenerationRequest(**{**defaults, **kwargs})
    return np.stack([np.asarray(image) for image in generate(pipes, request).images])


def theirs(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(SEED)
    args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, generator=generator)
    return np.stack([np.asarray(image) for image in pipe(**{**args, **kwargs}).images])


def test_text2img_equals_diffusers(pipes, reference):
    expected = theirs(reference["text2img"], image=half_map(True), controlnet_conditioning_scale=0.7, **SIZE)
    got = ours(pipes, control_image=half_map(True), controlnet_conditioning_scale=0.7, **SIZE)
    np.testing.assert_array_equal(got, expected)


def test_img2img_equals_diffusers(pipes, reference):
    photo = Image.radial_gradient("L").resize((64, 64)).convert("RGB")
    expected = theirs(
        reference["img2img"], image=photo, control_image=half_map(True), strength=0.75,
        controlnet_conditioning_scale=0.5, control_guidance_start=0.25, control_guidance_end=0.9,
    )  # fmt: skip
    got = ours(
        pipes, image=photo, control_image=half_map(True), prompt_strength=0.75, control_guidance_start=0.25,
        control_guidance_end=0.9,
    )  # fmt: skip
    np.testing.assert_array_equal(got, expected)


def test_inpaint_equals_diffusers(pipes, reference):
    photo = Image.radial_gradient("L").resize((64, 64)).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    expected = theirs(
        reference["inpaint"], image=photo, mask_image=mask, control_image=half_map(False), strength=0.9,
        controlnet_conditioning_scale=0.5, **SIZE,
    )  # fmt: skip
    got = ours(pipes, image=photo, mask=mask, control_image=half_map(False), prompt_strength=0.9, **SIZE)
    np.testing.assert_array_equal(got, expected)


def test_expert_ensemble_hands_over_as_diffusers_does(pipes, reference):
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = reference["text2img"](
        prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, generator=generator,
        image=half_map(True),
        controlnet_conditioning_scale=0.5, denoising_end=0.8, output_type="latent", **SIZE,
    ).images  # fmt: skip
    expected = reference["refiner"](
        prompt=[PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=10, guidance_scale=7.5, generator=generator,
        image=latents,
        denoising_start=0.8,
    ).images  # fmt: skip
    request = dict(control_image=half_map(True), refine="expert_ensemble_refiner", high_noise_frac=0.8, **SIZE)
    got = ours(pipes, **{**request, "num_inference_steps": 10})
    np.testing.assert_array_equal(got, np.stack([np.asarray(image) for image in expected]))


def test_the_map_steers_and_scale_zero_is_the_plain_image(pipes):
    left, right = ours(pipes, control_image=half_map(True), **SIZE), ours(pipes, control_image=half_map(False), **SIZE)
    moved = np.abs(left.astype(int) - right).mean()
    assert moved > 2, moved  # measured: 14 of 255 levels on average
    plain = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, num_inference_steps=4,
                              apply_watermark=False, disable_safety_checker=True, **SIZE)  # fmt: skip
    off = ours(pipes, control_image=half_map(True), controlnet_conditioning_scale=0.0, **SIZE)
    np.testing.assert_array_equal(off[0], np.asarray(generate(pipes, plain).images[0]))


def test_prompt_weighting_passes_embeddings_to_the_controlnet_pipeline(pipes, reference):
    prompt = "a (red)1.4 house by a lake"
    embeds = prompt_weighting.encode_base(pipes.text2img, prompt, NEGATIVE).as_kwargs()
    expected = theirs(reference["text2img"], **{**embeds, "prompt": None, "negative_prompt": None},
                      image=half_map(True), controlnet_conditioning_scale=0.5, **SIZE)  # fmt: skip
    got = ours(pipes, control_image=half_map(True), prompt_weighting=True, prompt=prompt, **SIZE)
    np.testing.assert_array_equal(got, expected)


def test_canny_and_depth_maps_are_sized_to_the_output(pipes):
    photo = Image.radial_gradient("L").resize((90, 70)).convert("RGB")
    request = GenerationRequest(controlnet="canny", control_image=photo, width=128, height=96)
    edges = control.control_map(request, (128, 96), None)
    resized = np.asarray(photo.resize((128, 96), Image.LANCZOS))
    np.testing.assert_array_equal(np.asarray(edges)[:, :, 0], cv2.Canny(resized, 100, 200))
    depth = control.control_map(GenerationRequest(controlnet="depth", control_image=photo), (128, 96),
                                pipes.depth_estimator)  # fmt: skip
    assert depth.size == (128, 96) and depth.mode == "RGB"


@pytest.mark.parametrize(
    "fields, field, message",
    [
        (dict(control_image=half_map(True)), "control_image", "a control image needs a ControlNet"),
        (dict(controlnet="depth"), "controlnet", "'depth' needs a `control_image`"),
        (dict(controlnet="canny", control_image=half_map(True), control_guidance_start=0.5,
              control_guidance_end=0.5), "control_guidance_end", "is not after control_guidance_start"),
        (dict(controlnet="canny", control_image=half_map(True), image=half_map(False),
              refine="expert_ensemble_refiner"), "refine", "expert_ensemble_refiner with controlnet"),
        (dict(controlnet="canny", controlnet_conditioning_scale=2.5), "controlnet_conditioning_scale", "2.5"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(fields, field, message):
    with pytest.raises(InputError) as error:
        GenerationRequest(**fields)
    assert error.value.field == field and message in str(error.value), str(error.value)


def test_an_absent_controlnet_fails_at_once_naming_the_command(pipes):
    views = {key: view for key, view in pipes.control_views.items() if key[0] != "depth"}
    with pytest.raises(InputError) as error:
        control.require_loaded(views, pipes.depth_estimator, "depth", True)
    assert error.value.field == "controlnet" and "download_weights.py --controlnet" in str(error.value)
    with pytest.raises(InputError) as error:
        control.require_loaded(pipes.control_views, None, "depth", True)
    assert error.value.field == "control_preprocess"
    control.require_loaded(pipes.control_views, None, "depth", False)  # a ready depth map needs no estimator
