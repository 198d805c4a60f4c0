"""Read client images safely: EXIF rotation applied, alpha and palettes flattened, sizes capped before decoding."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sdxl.errors import InputError

log = logging.getLogger(__name__)

MAX_INPUT_PIXELS = 4096 * 4096  # checked from the header, before any pixel is decoded
SIZE_MULTIPLE = 8
MIN_SIDE = 64
MAX_SIDE = 2048


def _open(path: Path | str, field: str) -> Image.Image:
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(
            field, f"could not be read as an image ({error.__class__.__name__}); send a PNG, JPEG or WebP file"
        ) from None
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            field, f"{width}x{height} is too large; at most {MAX_INPUT_PIXELS // 1_000_000} megapixels are accepted"
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(field, f"the image data is corrupt or truncated ({error})") from None


def _flatten(image: Image.Image) -> Image.Image:
    """RGB over a white background: transparent pixels carry arbitrary colours, white is predictable."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path | str, field: str = "image") -> Image.Image:
    return _flatten(_open(path, field))


def load_mask(path: Path | str, field: str = "mask") -> Image.Image:
    """A greyscale mask: white (255) is repainted, black (0) kept."""
    return _flatten(_open(path, field)).convert("L")


def check_side(field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(field, f"{value!r} is not an integer")
    if value % SIZE_MULTIPLE or not MIN_SIDE <= value <= MAX_SIDE:
        raise InputError(
            field, f"{value} is not allowed; use a multiple of {SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}"
        )


def img2img_size(image: Image.Image) -> tuple[int, int]:
    """img2img keeps the input's size: scaled down to fit MAX_SIDE if larger, rounded down to a multiple of 8."""
    width, height = image.size
    scale = min(1.0, MAX_SIDE / max(width, height))
    size = tuple(int(side * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE for side in (width, height))
    if min(size) < MIN_SIDE:
        raise InputError("image", f"{width}x{height} is too small; each side must be at least {MIN_SIDE} pixels")
    if size != (width, height):
        log.info(
            "image: %dx%d is used at %dx%d (multiple of %d, at most %d a side)",
            width,
            height,
            *size,
            SIZE_MULTIPLE,
            MAX_SIDE,
        )
    return size
