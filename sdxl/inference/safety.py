"""The NSFW safety checker, as the hosted model uses it: flagged images are dropped."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


@torch.no_grad()
def nsfw_flags(checker, feature_extractor, images: list[Image.Image]) -> list[bool]:
    """One flag per image, True where the checker says the image is not safe."""
    device = next(checker.parameters()).device
    dtype = next(checker.parameters()).dtype
    clip_input = feature_extractor(images=images, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    pixels = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    _, flags = checker(images=pixels, clip_input=clip_input)
    return [bool(flag) for flag in flags]
