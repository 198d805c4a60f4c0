"""SDXL-shaped model configurations at three sizes: tiny (tests), mid (CPU benchmarks), full (SDXL 1.0 itself).

All three keep SDXL's structure: two CLIP text encoders of different widths whose hidden states are concatenated for
the base's cross-attention, the second one's pooled projection plus six size/crop ids as the base's extra
conditioning (five with the aesthetic score for the refiner), and an 8x VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class Architecture:
    name: str
    te1: dict  # CLIPTextModel (ViT-L/14's text tower in production)
    te2: dict  # CLIPTextModelWithProjection (OpenCLIP bigG in production)
    base_unet: dict
    refiner_unet: dict
    vae: dict
    safety_vision: dict  # the safety checker's CLIP vision tower (ViT-L/14 in production)
    safety_projection: int


def _clip_vision(hidden, intermediate, heads, layers, image_size, patch_size) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        image_size=image_size,
        patch_size=patch_size,
    )


def _clip_text(hidden, intermediate, heads, layers, hidden_act="gelu", **extra) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act=hidden_act,
        **extra,
    )


def _unet(blocks, cross_attention_dim, time_ids, time_embed_dim, te2_projection, **extra) -> dict:
    config = dict(
        block_out_channels=tuple(channels for channels, _, _ in blocks),
        down_block_types=tuple("CrossAttnDownBlock2D" if depth else "DownBlock2D" for _, depth, _ in blocks),
        up_block_types=tuple("CrossAttnUpBlock2D" if depth else "UpBlock2D" for _, depth, _ in reversed(blocks)),
        transformer_layers_per_block=tuple(max(depth, 1) for _, depth, _ in blocks),
        attention_head_dim=tuple(heads for _, _, heads in blocks),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=time_ids * time_embed_dim + te2_projection,
        use_linear_projection=True,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
    )
    return {**config, **extra}


def _vae(blocks, layers_per_block, groups, force_upcast=False) -> dict:
    return dict(
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
    )


# (channels, transformer depth (0 = no attention), attention heads) per UNet level.
# Tiny: SDXL's three levels and its attention pattern (none at the highest resolution, transformer layers below: SDXL's
# 0, 2, 10 as 0, 1, 1), wide enough that LoRAs and fine-tunes move its images as much as the tests expect. Measured on
# this 2-core machine (UNet forward, batch 2, no grad): 0.45 s at a 128x128 latent (1024 px, scripts/run.sh's
# default) and 30 ms at 8x8 (64 px, the tests' size), against 1.50 s and 26 ms for the earlier two-level tiny UNet
# (32/64 channels, two transformer layers at 1/16 of the image side) and 0.72 s and 41 ms with depths 0, 2, 2.
TINY_UNET_LEVELS = ((32, 0, 2), (32, 1, 1), (64, 1, 4))
TINY = Architecture(
    name="tiny",
    te1=_clip_text(32, 37, 4, 3),
    te2=_clip_text(48, 53, 4, 3, projection_dim=32),
    base_unet=_unet(TINY_UNET_LEVELS, 32 + 48, 6, 8, 32, norm_num_groups=1, sample_size=16),
    refiner_unet=_unet(TINY_UNET_LEVELS, 48, 5, 8, 32, norm_num_groups=1, sample_size=16),
    vae=_vae((8, 16, 16, 16), 1, 8),
    safety_vision=_clip_vision(16, 37, 2, 2, 32, 8),
    safety_projection=16,
)

MID = Architecture(
    name="mid",
    te1=_clip_text(256, 1024, 4, 4),
    te2=_clip_text(384, 1536, 6, 4, projection_dim=384),
    base_unet=_unet(((128, 0, 2), (256, 1, 4), (512, 2, 8)), 256 + 384, 6, 64, 384, sample_size=64),
    refiner_unet=_unet(((128, 0, 2), (256, 1, 4), (512, 2, 8)), 384, 5, 64, 384, sample_size=64),
    vae=_vae((32, 64, 128, 128), 1, 32),
    safety_vision=_clip_vision(128, 512, 4, 4, 224, 14),
    safety_projection=128,
)

# SDXL 1.0's published configs (base, refiner, VAE, CLIP ViT-L, OpenCLIP bigG).
FULL = Architecture(
    name="full",
    te1=_clip_text(768, 3072, 12, 12, hidden_act="quick_gelu"),
    te2=_clip_text(1280, 5120, 20, 32, projection_dim=1280),
    base_unet=_unet(((320, 0, 5), (640, 2, 10), (1280, 10, 20)), 2048, 6, 256, 1280, sample_size=128),
    refiner_unet=_unet(
        ((384, 0, 6), (768, 4, 12), (1536, 4, 24), (1536, 0, 24)),
        1280,
        5,
        256,
        1280,
        sample_size=128,
        transformer_layers_per_block=4,  # the middle block has four too
    ),
    vae=_vae((128, 256, 512, 512), 2, 32),
    safety_vision=_clip_vision(1024, 4096, 16, 24, 224, 14),
    safety_projection=768,
)

ARCHITECTURES = {arch.name: arch for arch in (TINY, MID, FULL)}
