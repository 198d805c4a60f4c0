"""Tiny random ControlNets (canny, depth) and a tiny random Depth Anything, in the production layout.

A ControlNet starts as a copy of the base UNet's encoder with zero convolutions on its outputs: freshly made it adds
nothing, and a test where the control map cannot change the image proves nothing. So the zero convolutions (and the
conditioning embedding's last conv) get seeded random weights here; canny and depth get different ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdxl.model import weights

# Gains of the random convolutions: outputs of about this many times their input's size. The conditioning
# embedding's inner convs get He-like weights (diffusers' default init shrinks a map ~50x over its eight convs, so the
# map barely mattered: two different maps moved the tiny image by under 0.1 of a pixel level).
ZERO_CONV_GAIN = 1.0
EMBEDDING_GAIN = 2.0


def _randomise(conv, gain: float, generator: torch.Generator) -> None:
    scale = gain / conv.weight[0].numel() ** 0.5
    # drawn on the CPU (the generator's device), whatever the default device: the same seed, the same weights
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, device="cpu") * scale)
    conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator, device="cpu") * 0.01)


def _randomise_zero_convs(controlnet, generator: torch.Generator) -> None:
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):
            _randomise(conv, EMBEDDING_GAIN, generator)
        for conv in (embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            _randomise(conv, ZERO_CONV_GAIN, generator)


def random_controlnet(unet, seed: int):
    """A ControlNet copied from `unet` (as the real ones were trained from SDXL's), its zero convolutions randomised."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet).to(unet.dtype)
    _randomise_zero_convs(controlnet, torch.Generator().manual_seed(seed))
    return controlnet


def write_controlnets(root: Path, seed: int) -> None:
    """One ControlNet per registry entry, each from the written base UNet, with its own seed."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root / weights.BASE.folder / "unet")
    for offset, spec in enumerate(weights.CONTROLNETS.values()):
        random_controlnet(unet, seed + offset).save_pretrained(root / spec.folder)


def write_depth_estimator(root: Path) -> None:
    """Depth Anything (a DINOv2 backbone and a DPT head) with the production processor's settings at 28 px."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    processor = DPTImageProcessor(
        do_resize=True,
        size={"height": 28, "width": 28},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    folder = root / weights.DEPTH_ESTIMATOR.folder
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    processor.save_pretrained(folder)
