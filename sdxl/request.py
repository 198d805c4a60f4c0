"""A validated, frozen generation request: every check a client can fail lives here, with the field's name."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Optional

from PIL import Image

from sdxl.errors import InputError
from sdxl.images import check_side
from sdxl.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

DEFAULT_PROMPT = "An astronaut riding a rainbow unicorn"
REFINE_MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")
MAX_OUTPUTS = 4
MAX_STEPS = 500
# CLIP reads 77 tokens (~300 characters). A longer text is only tokenized to warn where the cut fell, which costs
# seconds and hundreds of MB per MB of text: it is refused before anything reads it (weighted prompts: 3000).
MAX_PROMPT_CHARS = 10_000
SEED_RANGE = (0, 2**32 - 1)  # random seeds are drawn from all of it
# base_image_refiner runs the refiner as img2img over the finished base image at the pipeline's default strength,
# so it runs int(refiner_steps * 0.3) steps, as the hosted model does.
BASE_IMAGE_REFINER_STRENGTH = 0.3


def _check_number(name: str, value, low, high, kind=float) -> None:
    number_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types) or (kind is float and not math.isfinite(value)):
        raise InputError(name, f"{value!r} is not {'an integer' if kind is int else 'a number'}")
    if not low <= value <= high:
        raise InputError(name, f"{value} is out of range; allowed: {low} to {high}")


def random_seed() -> int:
    return secrets.randbelow(SEED_RANGE[1] + 1)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    image: Optional[Image.Image] = field(default=None, repr=False)
    mask: Optional[Image.Image] = field(default=None, repr=False)
    width: int = 1024
    height: int = 1024
    num_outputs: int = 1
    scheduler: str = DEFAULT_SCHEDULER
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    prompt_strength: float = 0.8
    seed: Optional[int] = None
    refine: str = "no_refiner"
    high_noise_frac: float = 0.8
    refine_steps: Optional[int] = None
    apply_watermark: bool = True
    disable_safety_checker: bool = False
    prompt_weighting: bool = False  # beyond the hosted model: compel's weighting syntax and prompts past 77 tokens

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(name, f"{getattr(self, name)!r} is not a string")
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise InputError(
                    name, f"is {len(getattr(self, name)):,} characters long; at most {MAX_PROMPT_CHARS:,} are accepted"
                )
        if not isinstance(self.prompt_weighting, bool):
            raise InputError("prompt_weighting", f"{self.prompt_weighting!r} is not true or false")
        if self.prompt_weighting:
            from sdxl.prompt_weighting import check_syntax  # compel loads only for requests that use it

            check_syntax(self.prompt, self.negative_prompt)
        check_side("width", self.width)
        check_side("height", self.height)
        _check_number("num_outputs", self.num_outputs, 1, MAX_OUTPUTS, int)
        _check_number("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS, int)
        _check_number("guidance_scale", self.guidance_scale, 1, 50)
        _check_number("prompt_strength", self.prompt_strength, 0, 1)
        _check_number("high_noise_frac", self.high_noise_frac, 0, 1)
        if self.seed is not None:
            _check_number("seed", self.seed, *SEED_RANGE, int)
        if self.refine_steps is not None:
            _check_number("refine_steps", self.refine_steps, 1, MAX_STEPS, int)
        if self.scheduler not in SCHEDULERS:
            raise InputError("scheduler", f"{self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.refine not in REFINE_MODES:
            raise InputError("refine", f"{self.refine!r} is not one of {', '.join(REFINE_MODES)}")
        if self.mask is not None and self.image is None:
            raise InputError("mask", "a mask needs an image to inpaint; send `image` too, or drop `mask`")
        if self.mask is not None and self.mask.size != self.image.size:
            raise InputError(
                "mask",
                f"its size {self.mask.size[0]}x{self.mask.size[1]} differs from the image's "
                f"{self.image.size[0]}x{self.image.size[1]}; send a mask of the same size",
            )
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
    def mode(self) -> str:
        if self.image is None:
            return "text2img"
        return "inpaint" if self.mask is not None else "img2img"

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed: the one given, or a fresh random one (logged and returned to the client)."""
        if self.seed is not None:
            return self
        return replace(self, seed=random_seed())
