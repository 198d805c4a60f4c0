"""Speed settings for the loaded pipelines, each behind its own switch so it can be measured on and off.

Set through the environment (read once at setup):
  SDXL_ATTENTION=sdpa|xformers   attention kernel; xformers is a GPU-only extra (no CPU kernels)
  SDXL_CHANNELS_LAST=1           UNet and VAE in channels_last memory format
  SDXL_FUSE_QKV=1                fused q/k/v projections (incompatible with per-request LoRA: refused together)
  SDXL_COMPILE=1                 regional torch.compile of the UNets' repeated transformer blocks, warmed up in setup
The VAE runs in the pipeline's dtype without an fp32 upcast: the fp16-fix VAE's config says force_upcast false.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "xformers")


def _flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    if value not in ("0", "1", "true", "false", ""):
        raise ValueError(f"{name}={value!r}: use 1 or 0")
    return value in ("1", "true")


@dataclass(frozen=True)
class FastPath:
    attention: str = "sdpa"
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"SDXL_ATTENTION={self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")

    @classmethod
    def from_env(cls) -> FastPath:
        return cls(
            attention=os.environ.get("SDXL_ATTENTION", "sdpa"),
            channels_last=_flag("SDXL_CHANNELS_LAST"),
            fuse_qkv=_flag("SDXL_FUSE_QKV"),
            compile=_flag("SDXL_COMPILE"),
        )

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def apply_fastpath(pipes, fastpath: FastPath) -> None:
    """Apply each enabled setting to the shared modules (once: the pipeline views share them)."""
    import torch

    unets = (pipes.text2img.unet, pipes.refiner.unet)
    if fastpath.attention == "xformers":
        if not pipes.placement.is_cuda:
            raise ValueError("SDXL_ATTENTION=xformers needs a CUDA device: xformers has no CPU kernels")
        for pipe in (pipes.text2img, pipes.refiner):
            pipe.enable_xformers_memory_efficient_attention()
    if fastpath.channels_last:
        for module in (*unets, pipes.text2img.vae):
            module.to(memory_format=torch.channels_last)
    if fastpath.fuse_qkv:
        for pipe in (pipes.text2img, pipes.refiner):
            pipe.fuse_qkv_projections()
    if fastpath.compile:
        for unet in unets:
            unet.compile_repeated_blocks(fullgraph=True, dynamic=True)
        _warm_up(pipes)
    log.info("fast path: %s", fastpath.describe())


def _warm_up(pipes) -> None:
    """Compile during setup, not in the first client's request: one short base + refiner run at the default size."""
    import time

    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        latents = pipes.text2img("warm-up", num_inference_steps=2, output_type="latent").images
        pipes.refiner("warm-up", image=latents, num_inference_steps=2, denoising_start=0.5, output_type="latent")
    log.info("compiled and warmed up in %.1fs", time.perf_counter() - started)
