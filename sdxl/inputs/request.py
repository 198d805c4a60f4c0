"""The predictor's inputs, each described once (`Spec`: what predict.py declares and what is checked), and the
validated, frozen generation request: every check a client can fail lives here, with the field's name."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Optional

from PIL import Image

from sdxl.errors import InputError
from sdxl.formats import DEFAULT_FORMAT, DEFAULT_QUALITY, FORMATS, QUALITY_RANGE
from sdxl.model.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdxl.validation import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, Spec, check_fields, described

DEFAULT_PROMPT = "An astronaut riding a rainbow unicorn"
REFINE_MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")
CONTROLNETS = ("none", "canny", "depth")
MAX_OUTPUTS = 4
MAX_STEPS = 500
# CLIP reads 77 tokens (~300 characters). A longer text is only tokenized to warn where the cut fell, which costs
# seconds and hundreds of MB per MB of text: it is refused before anything reads it (weighted prompts: 3000).
MAX_PROMPT_CHARS = 10_000
SEED_RANGE = (0, 2**32 - 1)  # random seeds are drawn from all of it
# base_image_refiner runs the refiner as img2img over the finished base image at the pipeline's default strength,
# so it runs int(refiner_steps * 0.3) steps, as the hosted model does.
BASE_IMAGE_REFINER_STRENGTH = 0.3

# The predictor's inputs (the hosted stability-ai/sdxl's names, defaults and descriptions), in the order predict.py
# declares them. The bounds declared here are the ones checked: GenerationRequest's fields carry these specs.
_SIZE = f"of output image (a multiple of 8 from {MIN_SIDE} to {MAX_SIDE})"
PROMPT = Spec(str, "Input prompt", DEFAULT_PROMPT, max_chars=MAX_PROMPT_CHARS)
NEGATIVE_PROMPT = Spec(str, "Input Negative Prompt", "", max_chars=MAX_PROMPT_CHARS)
IMAGE = Spec(object, "Input image for img2img or inpaint mode", optional=True)
MASK = Spec(
    object,
    "Input mask for inpaint mode. Black areas will be preserved, white areas will be inpainted.",
    optional=True,
)
WIDTH = Spec(int, f"Width {_SIZE}", 1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
HEIGHT = Spec(int, f"Height {_SIZE}", 1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
NUM_OUTPUTS = Spec(int, "Number of images to output.", 1, ge=1, le=MAX_OUTPUTS)
SCHEDULER = Spec(str, "scheduler", DEFAULT_SCHEDULER, choices=tuple(SCHEDULERS))
NUM_INFERENCE_STEPS = Spec(int, "Number of denoising steps", 50, ge=1, le=MAX_STEPS)
GUIDANCE_SCALE = Spec(float, "Scale for classifier-free guidance", 7.5, ge=1, le=50)
PROMPT_STRENGTH = Spec(
    float,
    "Prompt strength when using img2img / inpaint. 1.0 corresponds to full destruction of information in image",
    0.8,
    ge=0.0,
    le=1.0,
)
SEED = Spec(int, "Random seed. Leave blank to randomize the seed", None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
            optional=True)  # fmt: skip
REFINE = Spec(str, "Which refine style to use", "no_refiner", choices=REFINE_MODES)
HIGH_NOISE_FRAC = Spec(float, "For expert_ensemble_refiner, the fraction of noise to use", 0.8, ge=0.0, le=1.0)
REFINE_STEPS = Spec(
    int,
    "For base_image_refiner, the number of steps to refine, defaults to num_inference_steps",
    None,
    ge=1,
    le=MAX_STEPS,
    optional=True,
)
APPLY_WATERMARK = Spec(
    bool,
    "Applies a watermark to enable determining if an image is generated in downstream applications. If you have "
    "other provisions for generating or deploying images safely, you can use this to disable watermarking.",
    True,
)
LORA_SCALE = Spec(float, "LoRA additive scale. Only applicable on trained models.", 0.6, ge=0.0, le=1.0)
REPLICATE_WEIGHTS = Spec(
    str, "Replicate LoRA weights to use. Leave blank to use the default weights.", None, optional=True
)
DISABLE_SAFETY_CHECKER = Spec(bool, "Disable safety checker for generated images.", False)
MAX_LORAS = 4
EXTRA_SCALE_RANGE = (-2.0, 2.0)
LORAS = Spec(
    str,
    'Extra LoRAs (beyond the hosted model): a JSON list of {"url": ..., "scale": ...}, diffusers/peft or kohya '
    f"(A1111/ComfyUI) SDXL LoRA safetensors files, at most {MAX_LORAS}, scale from {EXTRA_SCALE_RANGE[0]:g} to "
    f"{EXTRA_SCALE_RANGE[1]:g}",
    "",
)
PROMPT_WEIGHTING = Spec(
    bool,
    "Beyond the hosted model: read compel's weighting syntax in prompt and negative_prompt (word+, word-, "
    "(words)1.3, (...).blend(), (...).and()) and encode prompts past 77 tokens in chunks instead of cutting them off",
    False,
)
OUTPUT_FORMAT = Spec(str, "Beyond the hosted model: format of the output images", DEFAULT_FORMAT,
                     choices=tuple(FORMATS))  # fmt: skip
OUTPUT_QUALITY = Spec(int, "Beyond the hosted model: quality of webp and jpg outputs (png is lossless)",
                      DEFAULT_QUALITY, ge=QUALITY_RANGE[0], le=QUALITY_RANGE[1])  # fmt: skip

# ControlNet (beyond the hosted model). Defaults as diffusers' SDXL ControlNet examples use them: scale 0.5, control
# over the whole schedule (0 to 1), the edge or depth map computed from control_image.
CONTROLNET = Spec(
    str,
    "Beyond the hosted model: steer composition with control_image through a ControlNet: canny (edges) or depth",
    "none",
    choices=CONTROLNETS,
)
CONTROL_IMAGE = Spec(object, "Beyond the hosted model: the image whose edges or depth steer the ControlNet",
                     optional=True)  # fmt: skip
CONTROLNET_CONDITIONING_SCALE = Spec(
    float, "Beyond the hosted model: how strongly the ControlNet steers (0 turns it off)", 0.5, ge=0.0, le=2.0
)
CONTROL_GUIDANCE_START = Spec(
    float, "Beyond the hosted model: fraction of the denoising steps where the ControlNet starts", 0.0, ge=0.0, le=1.0
)
CONTROL_GUIDANCE_END = Spec(
    float, "Beyond the hosted model: fraction of the denoising steps where the ControlNet stops", 1.0, ge=0.0, le=1.0
)
CONTROL_PREPROCESS = Spec(
    bool,
    "Beyond the hosted model: compute the edge or depth map from control_image (false: control_image is the map)",
    True,
)
INPAINT_MODELS = ("base", "inpainting")
INPAINT_MODEL = Spec(
    str,
    "Beyond the hosted model: the UNet that inpaints (image + mask): base (as the hosted model) or inpainting "
    "(SDXL 1.0's dedicated inpainting UNet, which blends the repainted area in)",
    "base",
    choices=INPAINT_MODELS,
)
IP_ADAPTER_IMAGE = Spec(
    object,
    "Beyond the hosted model: an image prompt (IP-Adapter): its style and subject steer the image",
    optional=True,
)
IP_ADAPTER_SCALE = Spec(
    float, "Beyond the hosted model: how strongly ip_adapter_image steers the image (0 = not at all)", 0.6, ge=0.0,
    le=1.0,
)  # fmt: skip


def random_seed() -> int:
    return secrets.randbelow(SEED_RANGE[1] + 1)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = described(PROMPT)
    negative_prompt: str = described(NEGATIVE_PROMPT)
    image: Optional[Image.Image] = field(default=None, repr=False)  # image and mask are checked together below
    mask: Optional[Image.Image] = field(default=None, repr=False)
    width: int = described(WIDTH)
    height: int = described(HEIGHT)
    num_outputs: int = described(NUM_OUTPUTS)
    scheduler: str = described(SCHEDULER)
    num_inference_steps: int = described(NUM_INFERENCE_STEPS)
    guidance_scale: float = described(GUIDANCE_SCALE)
    prompt_strength: float = described(PROMPT_STRENGTH)
    seed: Optional[int] = described(SEED)
    refine: str = described(REFINE)
    high_noise_frac: float = described(HIGH_NOISE_FRAC)
    refine_steps: Optional[int] = described(REFINE_STEPS)
    apply_watermark: bool = described(APPLY_WATERMARK)
    disable_safety_checker: bool = described(DISABLE_SAFETY_CHECKER)
    prompt_weighting: bool = described(PROMPT_WEIGHTING)  # beyond the hosted model: compel's syntax, long prompts
    controlnet: str = described(CONTROLNET)  # beyond the hosted model: ControlNet
    control_image: Optional[Image.Image] = field(default=None, repr=False)
    controlnet_conditioning_scale: float = described(CONTROLNET_CONDITIONING_SCALE)
    control_guidance_start: float = described(CONTROL_GUIDANCE_START)
    control_guidance_end: float = described(CONTROL_GUIDANCE_END)
    control_preprocess: bool = described(CONTROL_PREPROCESS)
    inpaint_model: str = described(INPAINT_MODEL)  # beyond the hosted model: the dedicated inpainting UNet
    ip_adapter_image: Optional[Image.Image] = field(default=None, repr=False)  # beyond the hosted model: image prompt
    ip_adapter_scale: float = described(IP_ADAPTER_SCALE)

    def __post_init__(self):
        check_fields(self)
        if self.prompt_weighting:
            from sdxl.inputs.prompt_weighting import check_syntax  # compel loads only for requests that use it

            check_syntax(self.prompt, self.negative_prompt)
        self._check_images()
        self._check_control()
        self._check_steps_run()

    def _check_images(self) -> None:
        if self.mask is not None and self.image is None:
            raise InputError("mask", "a mask needs an image to inpaint; send `image` too, or drop `mask`")
        if self.inpaint_model != "base" and self.mask is None:
            raise InputError(
                "inpaint_model",
                f"{self.inpaint_model!r} inpaints, so it needs `image` and `mask`; send both, or leave it at 'base'",
            )
        if self.mask is not None and self.mask.size != self.image.size:
            raise InputError(
                "mask",
                f"its size {self.mask.size[0]}x{self.mask.size[1]} differs from the image's "
                f"{self.image.size[0]}x{self.image.size[1]}; send a mask of the same size",
            )

    def _check_control(self) -> None:
        if self.control_image is not None and self.controlnet == "none":
            raise InputError(
                "control_image", "a control image needs a ControlNet; set `controlnet` (canny or depth), or drop it"
            )
        if self.controlnet != "none" and self.control_image is None:
            raise InputError("controlnet", f"{self.controlnet!r} needs a `control_image` to steer by; send one")
        if self.control_guidance_end <= self.control_guidance_start:
            raise InputError(
                "control_guidance_end",
                f"{self.control_guidance_end} is not after control_guidance_start {self.control_guidance_start}; "
                "the end must be greater than the start",
            )
        if self.controlnet != "none" and self.refine == "expert_ensemble_refiner" and self.mode == "img2img":
            # diffusers' StableDiffusionXLControlNetImg2ImgPipeline has no denoising_end to hand over at
            raise InputError(
                "refine",
                "expert_ensemble_refiner with controlnet in img2img mode (image without mask) is not supported; "
                "use refine=base_image_refiner or no_refiner, or controlnet=none",
            )

    def _check_steps_run(self) -> None:
        if self.image is not None and int(self.num_inference_steps * self.prompt_strength) < 1:
            raise InputError(
                "prompt_strength",
                f"{self.prompt_strength} x {self.num_inference_steps} steps leaves no denoising step to run; "
                "raise prompt_strength or num_inference_steps",
            )
        if self.refine == "base_image_refiner" and int(self.refiner_steps * BASE_IMAGE_REFINER_STRENGTH) < 1:
            raise InputError(
                "refine_steps",
                f"{self.refiner_steps} steps at the refiner's strength {BASE_IMAGE_REFINER_STRENGTH} run no step; "
                f"use at least {math.ceil(1 / BASE_IMAGE_REFINER_STRENGTH)}",
            )

    @property
    def refiner_steps(self) -> int:
        """base_image_refiner's num_inference_steps: refine_steps, else num_inference_steps (as the hosted model)."""
        return self.refine_steps or self.num_inference_steps

    @property
    def uses_image_prompt(self) -> bool:
        """An image prompt at scale 0 steers nothing: the request runs (and draws) exactly as without it."""
        return self.ip_adapter_image is not None and self.ip_adapter_scale > 0

    @property
    def mode(self) -> str:
        if self.image is None:
            return "text2img"
        return "inpaint" if self.mask is not None else "img2img"

    @property
    def base_view(self) -> str:
        """The view that denoises first: the mode's over the base UNet, or "inpainting" over the dedicated UNet."""
        return "inpainting" if self.inpaint_model == "inpainting" else self.mode

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed: the one given, or a fresh random one (logged and returned to the client)."""
        if self.seed is not None:
            return self
        return replace(self, seed=random_seed())
