"""Run one generation request: pick the pipelines for its mode, denoise, refine, check safety, watermark."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from sdxl.errors import NSFWError
from sdxl.inference import control, image_prompt
from sdxl.inference.safety import nsfw_flags
from sdxl.inference.watermark import apply_watermark
from sdxl.inputs import images as image_io
from sdxl.inputs import prompt_weighting
from sdxl.inputs.request import BASE_IMAGE_REFINER_STRENGTH, GenerationRequest
from sdxl.model.compute import stop_if_cancelled
from sdxl.model.loading import Pipelines
from sdxl.model.schedulers import make_scheduler

log = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77

# on_step(stage, step, steps): called after each denoising step of a stage ("base" or "refiner"), step counting from 1.
StepCallback = Callable[[str, int, int], None]


@dataclass
class GenerationResult:
    images: list[Image.Image]  # the outputs that survived the safety checker, watermarked if asked
    seed: int
    nsfw: list[bool] = field(default_factory=list)  # one flag per generated image, before dropping
    seconds: float = 0.0


@contextlib.contextmanager
def _scheduler_for(pipe, name: str):
    """A fresh scheduler of the requested kind for this call only; the pipeline's own is put back afterwards."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, original.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def _warn_if_truncated(pipes: Pipelines, request: GenerationRequest) -> None:
    """CLIP reads 77 tokens (75 words' worth plus start/end): say what a long prompt loses, as diffusers does."""
    tokenizer = pipes.text2img.tokenizer_2
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        ids = tokenizer(text, truncation=False, add_special_tokens=True).input_ids
        if len(ids) > CLIP_MAX_TOKENS:
            kept = tokenizer.decode(ids[1 : CLIP_MAX_TOKENS - 1])
            log.warning(
                "%s is %d tokens; the text encoders read the first %d, so everything after %r is ignored",
                name,
                len(ids) - 2,
                CLIP_MAX_TOKENS - 2,
                kept[-40:],
            )


def base_call(pipes: Pipelines, request: GenerationRequest):
    """The base pipeline view for the request's mode (over the base or the inpainting UNet) and the arguments only that
    mode takes; with a ControlNet, the ControlNet view of that mode over the same UNet, and its control map."""
    pipe, kwargs = _plain_base_call(pipes, request)
    if request.controlnet == "none":
        return pipe, kwargs
    size = (request.width, request.height) if request.mode != "img2img" else kwargs["image"].size
    control_map = control.control_map(request, size, pipes.depth_estimator)
    # The text-to-image ControlNet pipeline takes the map as `image`; img2img and inpaint as `control_image`.
    kwargs["image" if request.mode == "text2img" else "control_image"] = control_map
    if request.mode == "img2img":
        kwargs.update(width=size[0], height=size[1])
    kwargs.update(
        controlnet_conditioning_scale=request.controlnet_conditioning_scale,
        control_guidance_start=request.control_guidance_start,
        control_guidance_end=request.control_guidance_end,
    )
    return pipes.control_views[(request.controlnet, request.base_view)], kwargs


def _plain_base_call(pipes: Pipelines, request: GenerationRequest):
    if request.mode == "text2img":
        return pipes.text2img, dict(width=request.width, height=request.height)
    if request.mode == "img2img":
        width, height = image_io.img2img_size(request.image)
        image = (
            request.image
            if request.image.size == (width, height)
            else request.image.resize((width, height), Image.LANCZOS)
        )
        return pipes.img2img, dict(image=image, strength=request.prompt_strength)
    return pipes.inpainting if request.base_view == "inpainting" else pipes.inpaint, dict(
        image=request.image,
        mask_image=request.mask,
        strength=request.prompt_strength,
        width=request.width,
        height=request.height,
    )


def refiner_call(pipes: Pipelines, request: GenerationRequest, latents: torch.Tensor):
    """The refiner view and its arguments: inpainting keeps its mask through the refiner."""
    pipe, kwargs = (pipes.refiner, {"image": latents})
    if request.mode == "inpaint":
        pipe, kwargs = pipes.refiner_inpaint, {"image": latents, "mask_image": request.mask}
        kwargs.update(width=request.width, height=request.height)
    if request.refine == "expert_ensemble_refiner":
        kwargs["denoising_start"] = request.high_noise_frac
    else:
        kwargs.update(num_inference_steps=request.refiner_steps, strength=BASE_IMAGE_REFINER_STRENGTH)
    return pipe, kwargs


def _progress(on_step: StepCallback | None, stage: str, cancelled: threading.Event | None = None) -> dict:
    """diffusers' step-end hook: reports progress and stops at a cancel; the tensors go back untouched."""
    if on_step is None and cancelled is None:
        return {}

    def callback(pipe, step, timestep, callback_kwargs):
        stop_if_cancelled(cancelled, f"in {stage} after step {step + 1}")
        if on_step is not None:
            on_step(stage, step + 1, pipe.num_timesteps)
        return callback_kwargs

    return {"callback_on_step_end": callback}


@dataclass(frozen=True)
class TextInputs:
    base: dict  # prompt arguments of the base call (one prompt, num_images_per_prompt images)
    refiner: dict  # of the refiner call: one row per latent, so num_outputs rows


def text_inputs(pipes: Pipelines, request: GenerationRequest) -> TextInputs:
    """The prompts as strings (diffusers encodes them, truncated at 77 tokens), or with prompt_weighting the
    embeddings compel builds: both encoders and the pooled one for the base, text_encoder_2 for the refiner."""
    count = request.num_outputs
    if not request.prompt_weighting:
        base = dict(prompt=request.prompt, negative_prompt=request.negative_prompt)
        refiner = dict(prompt=[request.prompt] * count, negative_prompt=[request.negative_prompt] * count)
        return TextInputs(base, refiner)
    embeds = prompt_weighting.encode_base(pipes.text2img, request.prompt, request.negative_prompt)
    log.info("prompt_weighting: %d tokens of embeddings per prompt", embeds.prompt_embeds.shape[1])
    refiner = {}
    if request.refine != "no_refiner":
        refiner_embeds = prompt_weighting.encode_refiner(
            pipes.refiner, pipes.text2img, embeds, request.prompt, request.negative_prompt
        )
        refiner = refiner_embeds.repeated(count).as_kwargs()
    return TextInputs(embeds.as_kwargs(), refiner)


def denoise(
    pipes: Pipelines,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    cancelled: threading.Event | None = None,
) -> list[Image.Image]:
    """Base (and refiner) denoising for a request with a concrete seed; returns every generated image."""
    generator = torch.Generator("cpu").manual_seed(request.seed)  # CPU noise: the same seed, the same start anywhere
    text = text_inputs(pipes, request)
    common = dict(
        **text.base,
        num_images_per_prompt=request.num_outputs,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=generator,
    )
    base, base_kwargs = base_call(pipes, request)
    base_kwargs.update(_progress(on_step, "base", cancelled))
    if request.refine == "no_refiner":
        with _scheduler_for(base, request.scheduler), image_prompt.applied(pipes, request, base) as prompt_kwargs:
            return base(**common, **base_kwargs, **prompt_kwargs).images
    if request.refine == "expert_ensemble_refiner":
        base_kwargs["denoising_end"] = request.high_noise_frac
    with _scheduler_for(base, request.scheduler), image_prompt.applied(pipes, request, base) as prompt_kwargs:
        latents = base(**common, **base_kwargs, **prompt_kwargs, output_type="latent").images
    refiner, refiner_kwargs = refiner_call(pipes, request, latents)
    # Each prompt's latents are already repeated num_outputs times: the refiner takes one image per latent.
    refiner_common = {
        **{name: value for name, value in common.items() if name not in text.base},
        **text.refiner,
        "num_images_per_prompt": 1,
        **refiner_kwargs,
        **_progress(on_step, "refiner", cancelled),
    }
    with _scheduler_for(refiner, request.scheduler):
        return refiner(**refiner_common).images


def generate(
    pipes: Pipelines,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    cancelled: threading.Event | None = None,
) -> GenerationResult:
    """1. fix the seed  2. denoise (and refine)  3. drop what the safety checker flags  4. watermark.

    Runs on the calling thread (the edge calls it on the compute thread, sdxl.model.compute); once `cancelled` is set it
    stops after the current denoising step."""
    started = time.perf_counter()
    request = request.with_seed()
    log.info(
        "generate: mode=%s controlnet=%s refine=%s scheduler=%s steps=%d outputs=%d seed=%d",
        request.mode,
        request.controlnet,
        request.refine,
        request.scheduler,
        request.num_inference_steps,
        request.num_outputs,
        request.seed,
    )
    control.require_loaded(pipes.control_views, pipes.depth_estimator, request.controlnet, request.control_preprocess)
    if not request.prompt_weighting:
        _warn_if_truncated(pipes, request)
    pipes.placement.use_cpu_threads()
    with torch.inference_mode():
        images = denoise(pipes, request, on_step, cancelled)

    flags = [False] * len(images)
    if not request.disable_safety_checker:
        flags = nsfw_flags(pipes.safety_checker, pipes.safety_feature_extractor, images)
        if all(flags):
            raise NSFWError("NSFW content detected in every output. Try running it again, or try a different prompt.")
        if any(flags):
            log.warning("safety checker flagged %d of %d outputs; they are dropped", sum(flags), len(flags))
        images = [image for image, flagged in zip(images, flags) if not flagged]

    if request.apply_watermark:
        images = apply_watermark(images)
    seconds = time.perf_counter() - started
    log.info("generated %d image(s) in %.2fs (seed %d)", len(images), seconds, request.seed)
    return GenerationResult(images=images, seed=request.seed, nsfw=flags, seconds=seconds)
