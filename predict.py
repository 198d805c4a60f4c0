"""The Cog edge for predictions: the inputs of stability-ai/sdxl, translated into one call to sdxl.serving.

Nothing here decides how an image is made. Checks a client can fail live in sdxl.request (and in the Input bounds
below, which the server turns into 422 answers); generation lives in sdxl.generation.
"""

from __future__ import annotations

import logging
import shutil
from typing import Optional

from cog import BaseRunner, Input, Path

from cog_inputs import FileInput, guard_worker_egress
from cog_scratch import discard_finished_request_folders
from sdxl import file_inputs, infotext
from sdxl.compute import on_compute_thread
from sdxl.images import MAX_SIDE, MIN_SIDE, load_image, load_mask
from sdxl.outputs import DEFAULT_FORMAT, DEFAULT_QUALITY, FORMATS, QUALITY_RANGE, OutputOptions, save_images
from sdxl.request import DEFAULT_PROMPT, MAX_OUTPUTS, MAX_STEPS, REFINE_MODES, SEED_RANGE, GenerationRequest
from sdxl.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdxl.serving import predict_once, set_up
from sdxl.trained.request import AdapterRequest, parse_loras
from sdxl.weights import random_architecture, weights_dir

log = logging.getLogger("predict")

PROGRESS_EVERY = 10  # log denoising progress on the first step, every N steps and the last


def log_progress(stage: str, step: int, steps: int) -> None:
    if step == 1 or step == steps or step % PROGRESS_EVERY == 0:
        log.info("%s: step %d/%d", stage, step, steps)


def read_input_images(image, mask):
    """`image` and `mask` (https URLs or data: URIs over HTTP; see sdxl.file_inputs) as decoded images. The fetched
    files are removed as soon as their pixels are in memory."""
    with file_inputs.local_files({"image": image, "mask": mask}, file_inputs.FileInputLimits.for_images()) as files:
        return (
            load_image(files["image"], "image") if files["image"] else None,
            load_mask(files["mask"], "mask") if files["mask"] else None,
        )


class Runner(BaseRunner):
    own_weights: Optional[str] = None  # the trained tar setup() applied for good (COG_WEIGHTS), for the record

    def _discard_previous_outputs(self) -> None:
        """Cog leaves returned files on disk. A sync run() never overlaps another, and Cog has sent (or uploaded) the
        previous request's files before it starts the next run: they can go then, instead of piling up in /tmp."""
        for folder in {path.parent for path in self._outputs}:
            shutil.rmtree(folder, ignore_errors=True)
        self._outputs = []
        discard_finished_request_folders()

    def setup(self, weights: Optional[str] = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        guard_worker_egress()
        root = weights_dir()
        if random_architecture(root):
            log.warning("%s holds RANDOM %s test weights: every image will be noise", root, random_architecture(root))
        # Cog's weights mechanism (COG_WEIGHTS): a trained_model.tar deployed as this model's own weights
        self.own_weights = str(weights) if weights else None
        self.pipes, self.trained_weights = on_compute_thread(lambda _: set_up(root, self.own_weights))
        self._outputs: list[Path] = []  # the previous request's files

    def run(
        self,
        prompt: str = Input(description="Input prompt", default=DEFAULT_PROMPT),
        negative_prompt: str = Input(description="Input Negative Prompt", default=""),
        image: Optional[FileInput] = Input(description="Input image for img2img or inpaint mode", default=None),
        mask: Optional[FileInput] = Input(
            description="Input mask for inpaint mode. Black areas will be preserved, white areas will be inpainted.",
            default=None,
        ),
        width: int = Input(
            description=f"Width of output image (a multiple of 8 from {MIN_SIDE} to {MAX_SIDE})",
            default=1024,
            ge=MIN_SIDE,
            le=MAX_SIDE,
        ),
        height: int = Input(
            description=f"Height of output image (a multiple of 8 from {MIN_SIDE} to {MAX_SIDE})",
            default=1024,
            ge=MIN_SIDE,
            le=MAX_SIDE,
        ),
        num_outputs: int = Input(description="Number of images to output.", default=1, ge=1, le=MAX_OUTPUTS),
        scheduler: str = Input(description="scheduler", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS)),
        num_inference_steps: int = Input(description="Number of denoising steps", default=50, ge=1, le=MAX_STEPS),
        guidance_scale: float = Input(description="Scale for classifier-free guidance", default=7.5, ge=1, le=50),
        prompt_strength: float = Input(
            description="Prompt strength when using img2img / inpaint. 1.0 corresponds to full destruction of "
            "information in image",
            default=0.8,
            ge=0.0,
            le=1.0,
        ),
        seed: Optional[int] = Input(
            description="Random seed. Leave blank to randomize the seed",
            default=None,
            ge=SEED_RANGE[0],
            le=SEED_RANGE[1],
        ),
        refine: str = Input(description="Which refine style to use", default="no_refiner", choices=list(REFINE_MODES)),
        high_noise_frac: float = Input(
            description="For expert_ensemble_refiner, the fraction of noise to use", default=0.8, ge=0.0, le=1.0
        ),
        refine_steps: Optional[int] = Input(
            description="For base_image_refiner, the number of steps to refine, defaults to num_inference_steps",
            default=None,
            ge=1,
            le=MAX_STEPS,
        ),
        apply_watermark: bool = Input(
            description="Applies a watermark to enable determining if an image is generated in downstream "
            "applications. If you have other provisions for generating or deploying images safely, you can use this "
            "to disable watermarking.",
            default=True,
        ),
        lora_scale: float = Input(
            description="LoRA additive scale. Only applicable on trained models.", default=0.6, ge=0.0, le=1.0
        ),
        replicate_weights: Optional[str] = Input(
            description="Replicate LoRA weights to use. Leave blank to use the default weights.", default=None
        ),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
        loras: str = Input(
            description='Extra LoRAs (beyond the hosted model): a JSON list of {"url": ..., "scale": ...}, diffusers/peft'
            " or kohya (A1111/ComfyUI) SDXL LoRA safetensors files, at most 4, scale from -2 to 2",
            default="",
        ),
        prompt_weighting: bool = Input(
            description="Beyond the hosted model: read compel's weighting syntax in prompt and negative_prompt "
            "(word+, word-, (words)1.3, (...).blend(), (...).and()) and encode prompts past 77 tokens in chunks "
            "instead of cutting them off",
            default=False,
        ),
        output_format: str = Input(
            description="Beyond the hosted model: format of the output images",
            default=DEFAULT_FORMAT,
            choices=list(FORMATS),
        ),
        output_quality: int = Input(
            description="Beyond the hosted model: quality of webp and jpg outputs (png is lossless)",
            default=DEFAULT_QUALITY,
            ge=QUALITY_RANGE[0],
            le=QUALITY_RANGE[1],
        ),
    ) -> list[Path]:
        self._discard_previous_outputs()
        options = OutputOptions(output_format, output_quality)
        extra = AdapterRequest(replicate_weights=replicate_weights, lora_scale=lora_scale, loras=parse_loras(loras))
        input_image, input_mask = read_input_images(image, mask)
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=input_image,
            mask=input_mask,
            width=width,
            height=height,
            num_outputs=num_outputs,
            scheduler=scheduler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            prompt_strength=prompt_strength,
            seed=seed,
            refine=refine,
            high_noise_frac=high_noise_frac,
            refine_steps=refine_steps,
            apply_watermark=apply_watermark,
            disable_safety_checker=disable_safety_checker,
            prompt_weighting=prompt_weighting,
        ).with_seed()
        log.info("Using seed: %d", request.seed)
        result = on_compute_thread(
            lambda cancelled: predict_once(self.pipes, self.trained_weights, extra, request, cancelled, log_progress)
        )
        used = infotext.Weights.of(self.pipes.random_weights, self.own_weights, extra)
        texts = infotext.for_outputs(request, used, result.nsfw)  # what each file says about how it was made
        self._outputs = [Path(path) for path in save_images(result.images, options, texts)]
        return self._outputs
