"""SDXL's invisible watermark (DWT-DCT, the 48-bit message of Stability's reference code), applied per call.

It is applied to finished images rather than switched on a shared pipeline, so turning it off for one request can
never leave it off for the next, whatever that request did.
"""

from __future__ import annotations

import logging

import numpy as np
from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

log = logging.getLogger(__name__)

METHOD = "dwtDct"
MIN_PIXELS = 256 * 256  # the encoder refuses smaller images


def _encoder() -> WatermarkEncoder:
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    return encoder


def apply_watermark(images: list[Image.Image]) -> list[Image.Image]:
    encoder = _encoder()
    marked = []
    for image in images:
        if image.width * image.height < MIN_PIXELS:
            log.warning("watermark: %dx%d is below the %d pixels it needs; left unmarked", *image.size, MIN_PIXELS)
            marked.append(image)
            continue
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        marked.append(Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, METHOD)[:, :, ::-1])))
    return marked


def read_watermark_bits(image: Image.Image) -> list[int]:
    decoder = WatermarkDecoder("bits", len(WATERMARK_BITS))
    bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    return [int(bit) for bit in decoder.decode(np.ascontiguousarray(bgr), METHOD)]


def watermark_match(image: Image.Image) -> float:
    """Fraction of the 48 bits that read back as SDXL's message (about 0.5 for an unmarked image)."""
    bits = read_watermark_bits(image)
    return sum(a == b for a, b in zip(bits, WATERMARK_BITS)) / len(WATERMARK_BITS)
