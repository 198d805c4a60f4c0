"""Sample images during a training run, drawn the way the predictor draws them: the same pipeline class built from
the modules being trained, the predictor's scheduler registry, CPU noise from the seed, the trained word replaced by
its new tokens. With the same prompt, seed, steps and size, the last sample equals what the predictor draws with the
exported trained_model.tar (at lora_scale 1, no watermark): the report's grid shows the model the tar holds.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from PIL import Image

from sdxl.model.schedulers import DEFAULT_SCHEDULER, make_scheduler
from sdxl.training.dataset import replace_token

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a photo of {token}", "a photo of {token} in a garden", "a painting of {token}")
MAX_SAMPLE_SIDE = 1024


@dataclass(frozen=True)
class SampleSettings:
    """What the report samples: each prompt with its own seed, at `points` evenly spaced steps (0 = before training)."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # {token} is the trained word (token_string)
    seeds: tuple[int, ...] = (1, 2, 3)
    points: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = DEFAULT_SCHEDULER
    size: int | None = None  # None: the training resolution, at most MAX_SAMPLE_SIDE

    def __post_init__(self):
        if len(self.prompts) != len(self.seeds) or not self.prompts:
            raise ValueError("sample settings: one seed per prompt, at least one prompt")
        if self.points < 1 or self.num_inference_steps < 1:
            raise ValueError("sample settings: points and num_inference_steps must be positive")

    def steps(self, total: int) -> list[int]:
        """The training steps sampled at: 0, ..., total, evenly spaced (fewer when the run is shorter)."""
        if self.points == 1:
            return [total]
        return sorted({round(i * total / (self.points - 1)) for i in range(self.points)})

    def side(self, resolution: int) -> int:
        return self.size or min(resolution, MAX_SAMPLE_SIDE)

    def prompt_texts(self, token_string: str) -> list[str]:
        return [prompt.format(token=token_string) for prompt in self.prompts]


@contextlib.contextmanager
def _inference(trainer, vae):
    """Modules in eval mode, the VAE on the device, for the duration of the sampling only."""
    unet_was_training = trainer.unet.training
    trainer.unet.eval()
    vae.to(trainer.device)
    try:
        yield
    finally:
        vae.to("cpu")
        trainer.unet.train(unet_was_training)


def _pipeline(trainer, vae, scheduler_config, name: str):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=trainer.text_encoders[0],
        text_encoder_2=trainer.text_encoders[1],
        tokenizer=trainer.tokenizers[0],
        tokenizer_2=trainer.tokenizers[1],
        unet=trainer.unet,
        scheduler=make_scheduler(name, scheduler_config),
        force_zeros_for_empty_prompt=True,  # SDXL base's model_index.json, as the predictor loads it
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def draw(trainer, vae, scheduler_config, settings: SampleSettings) -> list[Image.Image]:
    """One image per prompt, with the modules as they are now."""
    config = trainer.config
    side = settings.side(config.resolution)
    new_tokens = "".join(config.new_tokens)
    images = []
    with _inference(trainer, vae), trainer.accelerator.autocast():
        pipe = _pipeline(trainer, vae, scheduler_config, settings.scheduler)
        for prompt, seed in zip(settings.prompt_texts(config.token_string), settings.seeds):
            pipe.scheduler = make_scheduler(settings.scheduler, scheduler_config)  # fresh state per image
            images.append(
                pipe(
                    prompt=replace_token(prompt, config.token_string, new_tokens),
                    negative_prompt="",
                    width=side,
                    height=side,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(seed),
                ).images[0]
            )
    return images
