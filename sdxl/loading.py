"""Load base, refiner and safety checker once, sharing every component that can be shared."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from sdxl import weights
from sdxl.compute import on_compute_thread
from sdxl.device import Placement, choose_placement
from sdxl.fastpath import FastPath, apply_fastpath
from sdxl.lora_slots import LoraSlots

log = logging.getLogger(__name__)


@dataclass
class Pipelines:
    """Every pipeline view a request can need. The views share modules: one copy of each weight in memory."""

    text2img: StableDiffusionXLPipeline
    img2img: StableDiffusionXLImg2ImgPipeline
    inpaint: StableDiffusionXLInpaintPipeline
    refiner: StableDiffusionXLImg2ImgPipeline
    refiner_inpaint: StableDiffusionXLInpaintPipeline
    safety_checker: torch.nn.Module
    safety_feature_extractor: object
    placement: Placement
    weights_dir: Path
    fastpath: FastPath
    random_weights: str | None  # "tiny"/"mid"/"full" for seeded random weights (they draw noise), None for real
    lora_slots: LoraSlots | None = None  # the compiled base UNet's fixed-shape LoRA slots (SDXL_COMPILE=1)

    @property
    def base_views(self):
        return (self.text2img, self.img2img, self.inpaint)

    @property
    def refiner_views(self):
        return (self.refiner, self.refiner_inpaint)


def _view(cls, pipe):
    """`cls` over the same modules and config flags as `pipe` (what from_pipe does, minus its per-module .to() pass,
    which made up a tenth of setup)."""
    params = inspect.signature(cls.__init__).parameters
    components = {name: module for name, module in pipe.components.items() if name in params}
    flags = {k: v for k, v in pipe.config.items() if k in params and k not in components and not k.startswith("_")}
    view = cls(**components, **flags, add_watermarker=False)
    view.set_progress_bar_config(disable=True)
    return view


def _variant(folder: Path) -> str | None:
    """Production folders hold fp16 variant files (`*.fp16.safetensors`); the tiny set holds plain ones."""
    return "fp16" if any(folder.glob("unet/*.fp16.safetensors")) else None


def _count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M params"


def load_pipelines(
    root: Path | None = None, placement: Placement | None = None, fastpath: FastPath | None = None
) -> Pipelines:
    """Load everything a prediction needs from `root` (the weights folder), on the compute thread where every
    generation will run (sdxl.compute). Never downloads."""
    return on_compute_thread(lambda _: _load_pipelines(root, placement, fastpath))


def _load_pipelines(root: Path | None, placement: Placement | None, fastpath: FastPath | None) -> Pipelines:
    root = Path(root or weights.weights_dir())
    placement = placement or choose_placement()
    fastpath = fastpath or FastPath.from_env()
    weights.require(root, weights.PREDICTION_WEIGHTS)
    placement.use_cpu_threads()
    started = time.perf_counter()
    dtype = placement.dtype
    common = dict(dtype=dtype, use_safetensors=True, local_files_only=True)
    if fastpath.direct_load:  # each tensor goes from the file to the device; nothing is staged in CPU memory
        common["device_map"] = placement.device.type

    # 1. The fp16-safe VAE, shared by base and refiner.
    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder, **common)

    # 2. The base, then its img2img and inpaint views over the same modules.
    base_dir = root / weights.BASE.folder
    text2img = StableDiffusionXLPipeline.from_pretrained(
        base_dir, vae=vae, add_watermarker=False, variant=_variant(base_dir), **common
    )
    img2img = _view(StableDiffusionXLImg2ImgPipeline, text2img)
    inpaint = _view(StableDiffusionXLInpaintPipeline, text2img)

    # 3. The refiner: its own UNet; VAE and second text encoder are the base's.
    refiner_dir = root / weights.REFINER.folder
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_dir,
        vae=vae,
        text_encoder_2=text2img.text_encoder_2,
        tokenizer_2=text2img.tokenizer_2,
        add_watermarker=False,
        variant=_variant(refiner_dir),
        **common,
    )
    refiner_inpaint = _view(StableDiffusionXLInpaintPipeline, refiner)

    # 4. The safety checker and its image processor.
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    checker_dir = root / weights.SAFETY_CHECKER.folder
    safety_checker = StableDiffusionSafetyChecker.from_pretrained(checker_dir, **common)
    feature_extractor = CLIPImageProcessor.from_pretrained(checker_dir)

    for module in (vae, text2img.text_encoder, text2img.text_encoder_2, text2img.unet, refiner.unet, safety_checker):
        if module.device != placement.device:
            module.to(placement.device)
        module.eval().requires_grad_(False)
    for pipe in (text2img, img2img, inpaint, refiner, refiner_inpaint):
        pipe.set_progress_bar_config(disable=True)

    random_weights = weights.random_architecture(root)
    log.info(
        "loaded %s weights from %s in %.1fs on %s/%s (%d CPU threads): base unet %s, refiner unet %s, text encoders %s + %s, vae %s",
        f"RANDOM ({random_weights}, they draw noise)" if random_weights else "production",
        root,
        time.perf_counter() - started,
        placement.device,
        str(dtype).removeprefix("torch."),
        torch.get_num_threads(),
        _count(text2img.unet),
        _count(refiner.unet),
        _count(text2img.text_encoder),
        _count(text2img.text_encoder_2),
        _count(vae),
    )
    pipes = Pipelines(
        text2img=text2img,
        img2img=img2img,
        inpaint=inpaint,
        refiner=refiner,
        refiner_inpaint=refiner_inpaint,
        safety_checker=safety_checker,
        safety_feature_extractor=feature_extractor,
        placement=placement,
        weights_dir=root,
        fastpath=fastpath,
        random_weights=random_weights,
    )
    apply_fastpath(pipes, fastpath)
    return pipes
