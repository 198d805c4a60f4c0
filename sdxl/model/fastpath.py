"""Speed settings for the loaded pipelines, each behind its own switch so it can be measured on and off.

Set through the environment (read once at setup):
  SDXL_ATTENTION=sdpa|xformers   attention kernel; xformers is a GPU-only extra (no CPU kernels)
  SDXL_CHANNELS_LAST=1           UNet and VAE in channels_last memory format
  SDXL_FUSE_QKV=1                fused q/k/v projections (incompatible with per-request LoRA: refused together)
  SDXL_COMPILE=1                 regional torch.compile of the UNets' repeated transformer blocks, warmed up in setup
  SDXL_DIRECT_LOAD=1             weights read from disk straight onto the device (diffusers/transformers device_map),
                                 instead of into CPU memory and then moved
  SDXL_LORA_SLOT_RANK=64         with SDXL_COMPILE=1: the rank of the base UNet's fixed LoRA slots (sdxl/model/lora_slots.py),
                                 so switching LoRAs never recompiles; 0 = no slots (LoRAs are refused)
  SDXL_VAE_UPCAST=1              decode (and encode) in fp32 as the stock SDXL VAE must; by default the VAE runs in
                                 the pipeline's dtype, as the fp16-fix VAE's config (force_upcast false) allows
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "xformers")
DEFAULT_LORA_SLOT_RANK = 64  # the trainer's default rank 32 twice over (a trained LoRA plus one more)
MAX_LORA_SLOT_RANK = 1024
COMPILED_VARIANTS_LIMIT = 64
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch reads compiled kernels from here


def _flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    if value not in ("0", "1", "true", "false", ""):
        raise ValueError(f"{name}={value!r}: use 1 or 0")
    return value in ("1", "true")


def _whole(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: use a whole number") from None


PEFT, SLOTS, REFUSED = "peft", "slots", "refused"


@dataclass(frozen=True)
class LoraBackend:
    kind: str  # PEFT, SLOTS or REFUSED
    refusal: str = ""  # why LoRAs are refused (REFUSED only)


@dataclass(frozen=True)
class FastPath:
    attention: str = "sdpa"
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    direct_load: bool = False
    vae_upcast: bool = False
    lora_slot_rank: int = DEFAULT_LORA_SLOT_RANK

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"SDXL_ATTENTION={self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if isinstance(self.lora_slot_rank, bool) or not isinstance(self.lora_slot_rank, int):
            raise ValueError(f"SDXL_LORA_SLOT_RANK={self.lora_slot_rank!r}: use a whole number")
        if not 0 <= self.lora_slot_rank <= MAX_LORA_SLOT_RANK:
            raise ValueError(f"SDXL_LORA_SLOT_RANK={self.lora_slot_rank}: allowed 0 to {MAX_LORA_SLOT_RANK}")

    @property
    def lora_backend(self) -> LoraBackend:
        """How this server takes LoRAs, decided here only (loading installs slots from it, sdxl.trained picks its LoRA
        store from it): peft adapters when eager (they cost nothing when off); fixed-shape slots when compiled, so
        a LoRA switch never recompiles; refused with fused projections, or compiled with slot rank 0."""
        if self.fuse_qkv:
            return LoraBackend(
                REFUSED, "this server runs with fused attention projections (SDXL_FUSE_QKV=1), which cannot take LoRAs"
            )
        if self.compile and self.lora_slot_rank == 0:
            return LoraBackend(
                REFUSED, "this server compiles its UNet without LoRA slots (SDXL_COMPILE=1, SDXL_LORA_SLOT_RANK=0)"
            )
        return LoraBackend(SLOTS if self.compile else PEFT)

    @classmethod
    def from_env(cls) -> FastPath:
        return cls(
            attention=os.environ.get("SDXL_ATTENTION", "sdpa"),
            channels_last=_flag("SDXL_CHANNELS_LAST"),
            fuse_qkv=_flag("SDXL_FUSE_QKV"),
            compile=_flag("SDXL_COMPILE"),
            direct_load=_flag("SDXL_DIRECT_LOAD"),
            vae_upcast=_flag("SDXL_VAE_UPCAST"),
            lora_slot_rank=_whole("SDXL_LORA_SLOT_RANK", DEFAULT_LORA_SLOT_RANK),
        )

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def apply_fastpath(pipes, fastpath: FastPath):
    """Apply each enabled setting to the shared modules (once: the pipeline views share them); returns the pipelines
    with these settings and the LoRA slots they install. Compiling happens lazily: warm_up(pipes) does it in setup."""
    import torch

    unets = (pipes.text2img.unet, pipes.refiner.unet)
    if fastpath.attention == "xformers":
        if not pipes.placement.is_cuda:
            raise ValueError("SDXL_ATTENTION=xformers needs a CUDA device: xformers has no CPU kernels")
        for pipe in (pipes.text2img, pipes.refiner):
            pipe.enable_xformers_memory_efficient_attention()
    if fastpath.vae_upcast:  # the pipelines read this flag at every encode and decode (only half precision upcasts)
        pipes.text2img.vae.register_to_config(force_upcast=True)
    if fastpath.channels_last:
        for module in (*unets, pipes.text2img.vae):
            module.to(memory_format=torch.channels_last)
    if fastpath.fuse_qkv:
        for pipe in (pipes.text2img, pipes.refiner):
            pipe.fuse_qkv_projections()
    slots = None
    if fastpath.lora_backend.kind == SLOTS:  # before compiling: the slots are part of the compiled blocks
        from sdxl.model.lora_slots import LoraSlots

        slots = LoraSlots.install(pipes.text2img.unet, fastpath.lora_slot_rank)
    if fastpath.compile:
        _compile(unets)
    log.info("fast path: %s", fastpath.describe())
    return replace(pipes, fastpath=fastpath, lora_slots=slots)


def _compile(unets) -> None:
    import torch._dynamo

    # One compiled block code serves base and refiner, with and without LoRA, maybe a new size: more than
    # dynamo's default 8 variants, after which it would silently run the blocks eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS_LIMIT)
    _private_compile_cache()
    for unet in unets:
        unet.compile_repeated_blocks(fullgraph=True, dynamic=True)


def _private_compile_cache() -> None:
    """TorchInductor keeps compiled kernels under a fixed name in the temporary folder and loads them from there without
    checking who made them: another local user could plant code the server then runs. Make that folder ours (0700)."""
    import tempfile
    from getpass import getuser

    from sdxl.guard.private_dirs import private_dir

    default = Path(tempfile.gettempdir()) / f"torchinductor_{getuser()}"
    folder = private_dir(Path(os.environ.get(INDUCTOR_CACHE_ENV) or default), INDUCTOR_CACHE_ENV)
    os.environ[INDUCTOR_CACHE_ENV] = str(folder.resolve())


def warm_up(pipes) -> None:
    """A setup step: with SDXL_COMPILE=1, compile now, not in the first client's request (one short base + refiner
    run at the default size, and the base with its LoRA slots on). Does nothing otherwise."""
    import time

    import torch

    if not pipes.fastpath.compile:
        return
    started = time.perf_counter()
    with torch.inference_mode():
        latents = pipes.text2img("warm-up", num_inference_steps=2, output_type="latent").images
        pipes.refiner("warm-up", image=latents, num_inference_steps=2, denoising_start=0.5, output_type="latent")
        if pipes.lora_slots is not None:  # the LoRA variant of the base's blocks too (zero slots: same image)
            pipes.lora_slots.set_active(True)
            try:
                pipes.text2img("warm-up", num_inference_steps=2, output_type="latent")
            finally:
                pipes.lora_slots.clear()
    log.info("compiled and warmed up in %.1fs", time.perf_counter() - started)
