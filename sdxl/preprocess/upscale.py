"""Swin2SR x4 super-resolution for training images smaller than the training resolution."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from sdxl.model import weights
from sdxl.preprocess import models

log = logging.getLogger(__name__)

# Swin2SR's activations grow with the output: a short but very long image (a panorama) is resized instead.
MAX_OUTPUT_PIXELS = 4096 * 4096


class Upscaler(models.PreprocessModel):
    weights_spec = weights.UPSCALER
    model_class = "Swin2SRForImageSuperResolution"
    processor_class = "Swin2SRImageProcessor"

    @property
    def scale(self) -> int:
        return self.model.config.upscale

    @torch.inference_mode()
    def upscale(self, image: Image.Image) -> Image.Image:
        """The image `scale` times larger. The processor pads to a multiple of the window size; the padding is
        cropped off the output again."""
        parameter = next(self.model.parameters())
        pixels = self.processor(image.convert("RGB"), return_tensors="pt").pixel_values
        output = self.model(pixel_values=pixels.to(parameter.device, parameter.dtype)).reconstruction
        width, height = image.size
        output = output[0, :, : height * self.scale, : width * self.scale].float().clamp(0, 1)
        array = (output.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array, "RGB")


def needs_upscaling(image: Image.Image, resolution: int) -> bool:
    return min(image.size) < resolution


def upscale_small(images: list[Image.Image], resolution: int, upscaler: Upscaler) -> list[Image.Image]:
    """Each image whose short side is below `resolution` goes once through Swin2SR; if it is still short (an image
    under resolution/4, or one too long for Swin2SR), a Lanczos resize finishes the job. Larger images are returned
    unchanged."""
    out = []
    for index, image in enumerate(images):
        if not needs_upscaling(image, resolution):
            out.append(image)
            continue
        if image.width * image.height * upscaler.scale**2 <= MAX_OUTPUT_PIXELS:
            upscaled = upscaler.upscale(image)
        else:
            log.info("upscale: image %d (%dx%d) is too long for Swin2SR; resized instead", index, *image.size)
            upscaled = image
        if needs_upscaling(upscaled, resolution):
            factor = resolution / min(upscaled.size)
            size = tuple(max(resolution, round(side * factor)) for side in upscaled.size)
            upscaled = upscaled.resize(size, Image.Resampling.LANCZOS)
        log.info("upscale: image %d from %dx%d to %dx%d", index, *image.size, *upscaled.size)
        out.append(upscaled)
    return out
