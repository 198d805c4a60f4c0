"""Read client images safely: PNG, JPEG and WebP only (told by content), sizes capped from the header and decode
work (JPEG scans, PNG chunks: sdxl/inputs/image_structure.py) before any pixel is decoded, EXIF rotation applied, alpha
and palettes flattened.

Pillow's global `Image.MAX_IMAGE_PIXELS` is left as it is: it is process-wide, and diffusers, the safety checker and
the tests read images through the same Pillow. Each caller passes its own, tighter cap instead, checked from the
header; Pillow's guard stays behind it as a backstop (its error, for images above twice its limit, is answered with
the same message as ours). `Image.open(..., formats=[...])` is given only the format the bytes announce, so no
other decoder ever parses a client's file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sdxl.errors import InputError
from sdxl.inputs.image_structure import TooMuchWork, check_structure
from sdxl.validation import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE

log = logging.getLogger(__name__)

MAX_INPUT_PIXELS = 4096 * 4096  # checked from the header, before any pixel is decoded
ACCEPTED = "PNG, JPEG or WebP"
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)


class ImageTooLarge(InputError):
    """More pixels than the caller's cap: refused from the header, before decoding."""


def sniff_format(head: bytes) -> str | None:
    """'PNG', 'JPEG' or 'WEBP' from a file's first 16 bytes; None for anything else."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _describe(head: bytes) -> str:
    for magic, name in ((b"GIF8", "a GIF"), (b"BM", "a BMP"), (b"II*\x00", "a TIFF"), (b"MM\x00*", "a TIFF")):
        if head.startswith(magic):
            return name
    return "not an image" if not head else f"unrecognised data (it starts with {head[:8]!r})"


def open_checked(path: Path | str, field: str, max_pixels: int, label: str = "") -> Image.Image:
    """The image opened lazily (header read, no pixel decoded), or an InputError naming `field` (and `label`, e.g.
    the file's name inside an archive) when it is not PNG/JPEG/WebP or has more than `max_pixels` pixels."""
    prefix = f"{label} " if label else ""
    with open(path, "rb") as file:
        head = file.read(16)
    kind = sniff_format(head)
    if kind is None:
        raise InputError(
            field, f"{prefix}could not be read as an image: it is {_describe(head)}; send a {ACCEPTED} file"
        )
    try:
        check_structure(path, kind)  # before Pillow, which reads a JPEG's segments and a PNG's chunks in Python
    except TooMuchWork as error:
        raise InputError(field, f"{prefix}{error}; re-save it as a plain (baseline) {kind}") from None
    try:
        image = Image.open(path, formats=[kind])
    except Image.DecompressionBombError:
        raise ImageTooLarge(field, f"{prefix}is too large; at most {max_pixels:,} pixels are accepted") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(
            field, f"{prefix}could not be read as a {kind} image ({error.__class__.__name__}); send a {ACCEPTED} file"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(field, f"{prefix}{width}x{height} is too large; at most {max_pixels:,} pixels are accepted")
    return image


def decode(image: Image.Image, field: str, label: str = "") -> Image.Image:
    """Decode the opened image's pixels and apply its EXIF rotation; corrupt data is an InputError."""
    prefix = f"{label} " if label else ""
    try:
        with image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(
            field, f"{prefix}could not be decoded: the image data is corrupt or truncated ({error})"
        ) from None


def flatten(image: Image.Image) -> Image.Image:
    """RGB over a white background: transparent pixels carry arbitrary colours, white is predictable."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _read(path: Path | str, field: str) -> Image.Image:
    return flatten(decode(open_checked(path, field, MAX_INPUT_PIXELS), field))


def load_image(path: Path | str, field: str = "image") -> Image.Image:
    return _read(path, field)


def load_mask(path: Path | str, field: str = "mask") -> Image.Image:
    """A greyscale mask: white (255) is repainted, black (0) kept."""
    return _read(path, field).convert("L")


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
