"""Load the modules training needs from the weights folder (SDXL base + the fp16-safe VAE), never downloading."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl.model import weights

log = logging.getLogger(__name__)

TRAINING_BASE_WEIGHTS = (weights.BASE, weights.VAE)


@dataclass
class Components:
    tokenizers: list  # [CLIP ViT-L tokenizer, OpenCLIP bigG tokenizer]
    text_encoders: list  # [CLIPTextModel, CLIPTextModelWithProjection]
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler with the base's training schedule


def _variant(folder: Path) -> str | None:
    """Production folders hold fp16 variant files; the tiny set holds plain ones."""
    return "fp16" if any(folder.glob("unet/*.fp16.safetensors")) else None


def load_components(root: Path) -> Components:
    """Everything in fp32 (training precision); the caller moves modules and picks what trains."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root)
    weights.require(root, TRAINING_BASE_WEIGHTS)
    base = root / weights.BASE.folder
    common = dict(dtype=torch.float32, use_safetensors=True, local_files_only=True)
    variant = _variant(base)
    components = Components(
        tokenizers=[CLIPTokenizer.from_pretrained(base / name) for name in ("tokenizer", "tokenizer_2")],
        text_encoders=[
            CLIPTextModel.from_pretrained(base / "text_encoder", variant=variant, **common),
            CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2", variant=variant, **common),
        ],
        vae=AutoencoderKL.from_pretrained(root / weights.VAE.folder, **common),
        unet=UNet2DConditionModel.from_pretrained(base / "unet", variant=variant, **common),
        noise_scheduler=DDPMScheduler.from_pretrained(base / "scheduler"),
    )
    for module in (*components.text_encoders, components.vae, components.unet):
        module.requires_grad_(False).eval()
    log.info(
        "loaded %s training weights from %s: unet %.1fM, text encoders %.1fM + %.1fM, vae %.1fM params",
        f"RANDOM {weights.random_architecture(root)}" if weights.random_architecture(root) else "production",
        root,
        components.unet.num_parameters() / 1e6,
        components.text_encoders[0].num_parameters() / 1e6,
        components.text_encoders[1].num_parameters() / 1e6,
        components.vae.num_parameters() / 1e6,
    )
    return components
