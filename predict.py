"""The Cog edge for predictions: the inputs of stability-ai/sdxl, translated into one call to sdxl.serving.

Nothing here decides how an image is made. Checks a client can fail live in sdxl.inputs.request (and in the Input bounds
below, which the server turns into 422 answers); generation lives in sdxl.inference.generation.
"""

from __future__ import annotations

import logging
import shutil
from typing import Optional

from cog import BaseRunner, Path

from cog_inputs import FileInput, field, guard_worker_egress
from cog_scratch import discard_finished_request_folders, request_finished
from sdxl.guard.request_deadline import RequestDeadline
from sdxl.inference.control import require_loaded
from sdxl.inference.image_prompt import check_weights
from sdxl.inputs import file_inputs
from sdxl.inputs import request as spec
from sdxl.inputs.images import load_image, load_mask
from sdxl.inputs.request import GenerationRequest
from sdxl.model.compute import on_compute_thread
from sdxl.model.weights import random_architecture, weights_dir
from sdxl.output import infotext
from sdxl.output.outputs import OutputOptions, save_images
from sdxl.serving import predict_once, set_up
from sdxl.trained.request import AdapterRequest, parse_loras

log = logging.getLogger("predict")

PROGRESS_EVERY = 10  # log denoising progress on the first step, every N steps and the last


def log_progress(stage: str, step: int, steps: int) -> None:
    if step == 1 or step == steps or step % PROGRESS_EVERY == 0:
        log.info("%s: step %d/%d", stage, step, steps)


def read_input_images(image, mask, control_image=None, deadline: RequestDeadline | None = None):
    """`image`, `mask` and `control_image` (https URLs or data: URIs over HTTP; see sdxl.inputs.file_inputs) as decoded
    images, fetched by the request's `deadline`. The fetched files are removed as soon as their pixels are in memory."""
    limits = file_inputs.FileInputLimits.for_images()
    values = {"image": image, "mask": mask, "control_image": control_image}
    with file_inputs.local_files(values, limits, deadline=deadline) as files:
        return (
            load_image(files["image"], "image") if files["image"] else None,
            load_mask(files["mask"], "mask") if files["mask"] else None,
            load_image(files["control_image"], "control_image") if files["control_image"] else None,
        )


def read_image_prompt(ip_adapter_image, deadline: RequestDeadline | None = None):
    """`ip_adapter_image` (beyond the hosted model), fetched and decoded like `image`, under the same network policy
    and the request's one `deadline`."""
    limits = file_inputs.FileInputLimits.for_images()
    with file_inputs.local_files({"ip_adapter_image": ip_adapter_image}, limits, deadline=deadline) as files:
        return load_image(files["ip_adapter_image"], "ip_adapter_image") if files["ip_adapter_image"] else None


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
        prompt: str = field(spec.PROMPT),
        negative_prompt: str = field(spec.NEGATIVE_PROMPT),
        image: Optional[FileInput] = field(spec.IMAGE),
        mask: Optional[FileInput] = field(spec.MASK),
        width: int = field(spec.WIDTH),
        height: int = field(spec.HEIGHT),
        num_outputs: int = field(spec.NUM_OUTPUTS),
        scheduler: str = field(spec.SCHEDULER),
        num_inference_steps: int = field(spec.NUM_INFERENCE_STEPS),
        guidance_scale: float = field(spec.GUIDANCE_SCALE),
        prompt_strength: float = field(spec.PROMPT_STRENGTH),
        seed: Optional[int] = field(spec.SEED),
        refine: str = field(spec.REFINE),
        high_noise_frac: float = field(spec.HIGH_NOISE_FRAC),
        refine_steps: Optional[int] = field(spec.REFINE_STEPS),
        apply_watermark: bool = field(spec.APPLY_WATERMARK),
        lora_scale: float = field(spec.LORA_SCALE),
        replicate_weights: Optional[str] = field(spec.REPLICATE_WEIGHTS),
        disable_safety_checker: bool = field(spec.DISABLE_SAFETY_CHECKER),
        loras: str = field(spec.LORAS),
        prompt_weighting: bool = field(spec.PROMPT_WEIGHTING),
        output_format: str = field(spec.OUTPUT_FORMAT),
        output_quality: int = field(spec.OUTPUT_QUALITY),
        controlnet: str = field(spec.CONTROLNET),
        control_image: Optional[FileInput] = field(spec.CONTROL_IMAGE),
        controlnet_conditioning_scale: float = field(spec.CONTROLNET_CONDITIONING_SCALE),
        control_guidance_start: float = field(spec.CONTROL_GUIDANCE_START),
        control_guidance_end: float = field(spec.CONTROL_GUIDANCE_END),
        control_preprocess: bool = field(spec.CONTROL_PREPROCESS),
        inpaint_model: str = field(spec.INPAINT_MODEL),
        ip_adapter_image: Optional[FileInput] = field(spec.IP_ADAPTER_IMAGE),
        ip_adapter_scale: float = field(spec.IP_ADAPTER_SCALE),
    ) -> list[Path]:
        deadline = RequestDeadline.from_env()  # one for all of the request's downloads
        self._discard_previous_outputs()
        try:
            options = OutputOptions(output_format, output_quality)
            extra = AdapterRequest(replicate_weights=replicate_weights, lora_scale=lora_scale, loras=parse_loras(loras))
            # before anything is fetched: a ControlNet this server has not loaded fails at once
            require_loaded(self.pipes.control_views, self.pipes.depth_estimator, controlnet, control_preprocess)
            check_weights(self.pipes, image_prompt_given=bool(ip_adapter_image), inpaint_model=inpaint_model)
            input_image, input_mask, input_control = read_input_images(image, mask, control_image, deadline)
            image_prompt = read_image_prompt(ip_adapter_image, deadline)
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
                controlnet=controlnet,
                control_image=input_control,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start,
                control_guidance_end=control_guidance_end,
                control_preprocess=control_preprocess,
                inpaint_model=inpaint_model,
                ip_adapter_image=image_prompt,
                ip_adapter_scale=ip_adapter_scale,
            ).with_seed()
            log.info("Using seed: %d", request.seed)
            result = on_compute_thread(
                lambda cancelled: predict_once(
                    self.pipes, self.trained_weights, extra, request, cancelled, log_progress, deadline
                )
            )
            used = infotext.Weights.of(self.pipes.random_weights, self.own_weights, extra)
            texts = infotext.for_outputs(request, used, result.nsfw)  # what each file says about how it was made
            self._outputs = [Path(path) for path in save_images(result.images, options, texts)]
            return self._outputs
        finally:
            request_finished()  # this server holds no request folder back while it waits for the next
