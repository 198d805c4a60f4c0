"""Seeded random stand-ins for the optional prediction models, in their production layout: the SDXL inpainting UNet
(the base UNet's configuration with 9 input channels: latents, mask, masked-image latents) and the SDXL IP-Adapter
(a CLIP vision encoder with projection and the adapter's safetensors: image projection + one key/value pair per
cross-attention layer, keyed as h94/IP-Adapter's files are)."""

from __future__ import annotations

from pathlib import Path

import torch

from sdxl.model import weights
from sdxl.model.random_weights.architectures import TINY, Architecture

# The tiny image encoder: a CLIP vision tower small enough to run in milliseconds, projecting to 24 dimensions.
TINY_IMAGE_ENCODER = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8,
    projection_dim=24,
)  # fmt: skip
IP_TOKENS = 4  # the plain SDXL IP-Adapter's image tokens


def inpainting_unet_config(arch: Architecture) -> dict:
    return {**arch.base_unet, "in_channels": 9}


def write_inpainting_unet(root: Path, arch: Architecture = TINY) -> None:
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**inpainting_unet_config(arch)).save_pretrained(root / weights.INPAINTING_UNET.folder / "unet")


def ip_adapter_state_dict(unet_config: dict, image_embed_dim: int) -> dict[str, torch.Tensor]:
    """Random adapter weights for a UNet of `unet_config`, keyed as the released files are: image_proj.* (a linear
    projection to IP_TOKENS tokens and a layer norm) and ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight, one pair per
    cross-attention layer in the UNet's processor order (diffusers' _convert_ip_adapter_attn_to_diffusers)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import ImageProjection

    width = unet_config["cross_attention_dim"]
    projection = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=width,
                                 num_image_text_embeds=IP_TOKENS)  # fmt: skip
    state = {f"image_proj.{k.replace('image_embeds', 'proj')}": v for k, v in projection.state_dict().items()}
    with torch.device("meta"):
        processors = UNet2DConditionModel(**unet_config).attn_processors
    key_id = 1
    for name in processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(name, unet_config["block_out_channels"])
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{kind}.weight"] = torch.nn.Linear(width, hidden, bias=False).weight.detach()
        key_id += 2
    return {key: value.contiguous() for key, value in state.items()}


def _hidden_size(processor_name: str, channels: tuple) -> int:
    if processor_name.startswith("mid_block"):
        return channels[-1]
    block = int(processor_name.split(".")[1])
    return list(reversed(channels))[block] if processor_name.startswith("up_blocks") else channels[block]


def write_ip_adapter(root: Path, arch: Architecture = TINY) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = root / weights.IP_ADAPTER.folder
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER)).save_pretrained(
        folder / weights.IP_ADAPTER_ENCODER
    )
    path = folder / weights.IP_ADAPTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state_dict(arch.base_unet, TINY_IMAGE_ENCODER["projection_dim"]), path)


WRITERS = (write_inpainting_unet, write_ip_adapter)
