"""The library's images equal, pixel for pixel, what a direct diffusers call with the same weights, seed and arguments
returns. The reference pipelines are loaded separately from disk and called the way the diffusers docs show."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from sdxl.inference.generation import generate
from sdxl.inputs.request import GenerationRequest
from sdxl.model import weights

SEED = 1234
PROMPT = "a watercolor fox in the snow"
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def reference(tiny_weights_dir):
    """Plain diffusers pipelines, loaded independently of sdxl.model.loading."""
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    base = StableDiffusionXLPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=vae, add_watermarker=False
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
        "img2img": StableDiffusionXLImg2ImgPipeline(**base.components, add_watermarker=False),
        "inpaint": StableDiffusionXLInpaintPipeline(**base.components, add_watermarker=False),
        "refiner": refiner,
        "refiner_inpaint": StableDiffusionXLInpaintPipeline(
            **refiner.components, requires_aesthetics_score=True, add_watermarker=False
        ),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.saved_scheduler_config = dict(pipe.scheduler.config)
    return pipes


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.RandomState(7)
    return Image.fromarray((rng.rand(96, 128, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def mask_image():
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (32, 24, 96, 72))
    return mask


def arrays(images):
    return np.stack([np.asarray(image) for image in images])


def ours(pipes, **kwargs):
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=SEED,
        apply_watermark=False,
        disable_safety_checker=True,
        **kwargs,
    )
    return arrays(generate(pipes, request).images)


def common_args(steps, outputs=1, generator=None):
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        num_images_per_prompt=outputs,
        generator=generator or torch.Generator("cpu").manual_seed(SEED),
    )


def with_scheduler(pipe, cls, **overrides):
    # From the config saved with the weights, never from a scheduler an earlier test set.
    pipe.scheduler = cls.from_config(pipe.saved_scheduler_config, **overrides)
    return pipe


SCHEDULER_CLASSES = {
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "K_EULER": (EulerDiscreteScheduler, {}),
    "PNDM": (PNDMScheduler, {}),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULER_CLASSES))
def test_text2img_each_scheduler(pipes, reference, scheduler):
    cls, overrides = SCHEDULER_CLASSES[scheduler]
    pipe = with_scheduler(reference["text2img"], cls, **overrides)
    expected = arrays(pipe(**common_args(5, outputs=2), width=64, height=64).images)
    got = ours(pipes, scheduler=scheduler, num_inference_steps=5, num_outputs=2, width=64, height=64)
    np.testing.assert_array_equal(got, expected)


def test_img2img(pipes, reference, init_image):
    pipe = with_scheduler(reference["img2img"], EulerDiscreteScheduler)
    expected = arrays(pipe(**common_args(6), image=init_image, strength=0.7).images)
    got = ours(pipes, image=init_image, prompt_strength=0.7, num_inference_steps=6)
    assert got.shape == (1, 96, 128, 3)  # img2img keeps the input's size
    np.testing.assert_array_equal(got, expected)


def test_inpaint(pipes, reference, init_image, mask_image):
    pipe = with_scheduler(reference["inpaint"], EulerDiscreteScheduler)
    expected = arrays(
        pipe(**common_args(6), image=init_image, mask_image=mask_image, strength=0.9, width=128, height=96).images
    )
    got = ours(
        pipes, image=init_image, mask=mask_image, prompt_strength=0.9, num_inference_steps=6, width=128, height=96
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("scheduler", ["K_EULER", "DPMSolverMultistep", "HeunDiscrete"])
def test_expert_ensemble_refiner(pipes, reference, scheduler):
    cls, overrides = SCHEDULER_CLASSES[scheduler]
    base = with_scheduler(reference["text2img"], cls, **overrides)
    refiner = with_scheduler(reference["refiner"], cls, **overrides)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = base(
        **common_args(10, outputs=2, generator=generator), width=64, height=64, denoising_end=0.8, output_type="latent"
    ).images
    args = common_args(10, generator=generator)
    args.update(prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2)
    expected = arrays(refiner(**args, image=latents, denoising_start=0.8).images)
    got = ours(
        pipes,
        refine="expert_ensemble_refiner",
        high_noise_frac=0.8,
        scheduler=scheduler,
        num_inference_steps=10,
        num_outputs=2,
        width=64,
        height=64,
    )
    np.testing.assert_array_equal(got, expected)


def test_base_image_refiner(pipes, reference):
    base = with_scheduler(reference["text2img"], EulerDiscreteScheduler)
    refiner = with_scheduler(reference["refiner"], EulerDiscreteScheduler)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = base(**common_args(4, generator=generator), width=64, height=64, output_type="latent").images
    expected = arrays(refiner(**common_args(10, generator=generator), image=latents).images)  # default strength 0.3
    got = ours(pipes, refine="base_image_refiner", num_inference_steps=4, refine_steps=10, width=64, height=64)
    np.testing.assert_array_equal(got, expected)


def test_inpaint_with_expert_ensemble_keeps_the_mask_in_the_refiner(pipes, reference, init_image, mask_image):
    base = with_scheduler(reference["inpaint"], EulerDiscreteScheduler)
    refiner = with_scheduler(reference["refiner_inpaint"], EulerDiscreteScheduler)
    generator = torch.Generator("cpu").manual_seed(SEED)
    size = dict(width=128, height=96)
    latents = base(
        **common_args(10, generator=generator),
        image=init_image,
        mask_image=mask_image,
        strength=0.9,
        denoising_end=0.8,
        output_type="latent",
        **size,
    ).images
    expected = arrays(
        refiner(
            **common_args(10, generator=generator), image=latents, mask_image=mask_image, denoising_start=0.8, **size
        ).images
    )
    got = ours(
        pipes,
        image=init_image,
        mask=mask_image,
        prompt_strength=0.9,
        refine="expert_ensemble_refiner",
        num_inference_steps=10,
        **size,
    )
    np.testing.assert_array_equal(got, expected)
