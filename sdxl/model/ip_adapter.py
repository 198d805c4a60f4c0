"""The SDXL IP-Adapter: loaded once at setup through diffusers' load_ip_adapter, kept in memory, attached to the UNet
that denoises (the base's, or the inpainting UNet, whose attention layers have the same names and widths) only for a
request that brings an image prompt.

A UNet carrying the adapter refuses to run without image embeddings (diffusers raises when `image_embeds` is missing),
so setup loads it, keeps what load_ip_adapter built (the image encoder, its processor, the adapter's attention
processors and image projection) and takes it off again with unload_ip_adapter: a request without an image prompt
runs the UNet exactly as if no adapter existed. attached() puts the kept parts back for one call, the way
load_ip_adapter installs them, and restores the processors the UNet had before (fused or not) when the call ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdxl.model import weights

log = logging.getLogger(__name__)

IP_PROJECTION_TYPE = "ip_image_proj"  # the UNet config value diffusers sets while an adapter is installed


@dataclass(frozen=True)
class ImagePrompt:
    image_encoder: object  # CLIPVisionModelWithProjection
    feature_extractor: object  # CLIPImageProcessor
    processors: dict  # attention processor name -> processor (IP-Adapter processors on cross-attention layers)
    projection: object  # MultiIPAdapterImageProjection

    @contextlib.contextmanager
    def attached(self, view, scale: float) -> Iterator[None]:
        """The adapter on `view`'s UNet at `scale` for the with-block; the UNet and view as before afterwards."""
        unet = view.unet
        before = dict(unet.attn_processors)
        try:
            unet.set_attn_processor(dict(self.processors))
            unet.encoder_hid_proj = self.projection
            unet.config.encoder_hid_dim_type = IP_PROJECTION_TYPE
            view.register_modules(image_encoder=self.image_encoder, feature_extractor=self.feature_extractor)
            view.set_ip_adapter_scale(scale)
            yield
        finally:
            view.register_modules(image_encoder=None, feature_extractor=None)
            unet.encoder_hid_proj = None
            unet.config.encoder_hid_dim_type = None
            unet.set_attn_processor(before)


def load_image_prompt(root: Path, pipe) -> ImagePrompt | None:
    """The IP-Adapter from `root`'s ip-adapter folder, or None when it is not there (then image prompts are refused)."""
    spec = weights.IP_ADAPTER
    if not weights.is_present(root, spec):
        log.info("no IP-Adapter in %s: image prompts are refused (fetch it with `%s`)", root / spec.folder,
                 weights.fetch_command(spec))  # fmt: skip
        return None
    subfolder, weight_name = weights.IP_ADAPTER_FILE.split("/")
    pipe.load_ip_adapter(
        str(root / spec.folder),
        subfolder=subfolder,
        weight_name=weight_name,
        image_encoder_folder=weights.IP_ADAPTER_ENCODER,
        local_files_only=True,
    )
    unet = pipe.unet
    kept = ImagePrompt(
        image_encoder=pipe.image_encoder.eval().requires_grad_(False),
        feature_extractor=pipe.feature_extractor,
        processors=dict(unet.attn_processors),
        projection=unet.encoder_hid_proj.eval().requires_grad_(False),
    )
    pipe.unload_ip_adapter()
    for processor in kept.processors.values():
        if hasattr(processor, "requires_grad_"):
            processor.requires_grad_(False)
    log.info("IP-Adapter loaded: image encoder %.1fM params, adapter %.1fM params", _millions(kept.image_encoder),
             _millions(kept.projection) + sum(_millions(p) for p in kept.processors.values() if hasattr(p, "parameters")))  # fmt: skip
    return kept


def _millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
