"""Output files: PNG (default), WebP or JPEG, each carrying its generation parameters.

Where the `parameters` text goes, so that A1111 (and Civitai, and ComfyUI's A1111 readers) find it:
- PNG: a text chunk named `parameters` (tEXt; iTXt when the text is not Latin-1, as Pillow chooses);
- JPEG and WebP: EXIF UserComment (tag 0x9286 in the Exif IFD), 8-byte character-code prefix then the text:
  `ASCII\\0\\0\\0` for ASCII text, else `UNICODE\\0` and UTF-16 big-endian, in a big-endian ("MM") EXIF block, as
  piexif writes it for A1111 (`UserComment.dump(text, encoding="unicode")`) and piexif's `UserComment.load` reads it.
The text is made to fit before it is written (infotext.fit cuts the prompts, marked, never the parameters line), so
writing never fails after the images were made: EXIF at most MAX_EXIF_BYTES, the limit of a JPEG APP1 segment, for
WebP too (Pillow sets none there, but readers such as piexif and any copy of the EXIF into a JPEG expect it); a PNG
text at most MAX_PNG_TEXT_BYTES, what Pillow reads back from a compressed text chunk (the prompt caps keep it far
below).
Each request's files go into a fresh folder, so concurrent requests never share a file name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

from sdxl.errors import InputError
from sdxl.formats import DEFAULT_FORMAT, DEFAULT_QUALITY, FORMATS, QUALITY_RANGE
from sdxl.output import infotext

PARAMETERS_KEY = "parameters"
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
ASCII_PREFIX = b"ASCII\x00\x00\x00"
UNICODE_PREFIX = b"UNICODE\x00"
FOLDER_PREFIX = "sdxl-out-"
MAX_EXIF_BYTES = 65_533  # a JPEG marker segment's payload; Pillow refuses more ("EXIF data is too long")
MAX_PNG_TEXT_BYTES = PngImagePlugin.MAX_TEXT_CHUNK  # 1 MiB


@dataclass(frozen=True)
class OutputOptions:
    format: str = DEFAULT_FORMAT
    quality: int = DEFAULT_QUALITY  # lossy formats only; PNG is lossless

    def __post_init__(self):
        if self.format not in FORMATS:
            raise InputError("output_format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        low, high = QUALITY_RANGE
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not low <= self.quality <= high:
            raise InputError("output_quality", f"{self.quality!r} is not allowed; use an integer from {low} to {high}")

    @property
    def suffix(self) -> str:
        return f".{self.format}"


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes: character-code prefix, then the text."""
    if text.isascii():
        return ASCII_PREFIX + text.encode("ascii")
    return UNICODE_PREFIX + text.encode("utf-16-be")


def read_user_comment(data: bytes) -> str:
    prefix, body = data[:8], data[8:]
    if prefix == UNICODE_PREFIX:
        return body.decode("utf-16-be")
    return body.decode("ascii" if prefix == ASCII_PREFIX else "utf-8", errors="replace")


def _exif(text: str) -> Image.Exif:
    exif = Image.Exif()  # no endian set: Pillow writes "MM", big-endian, matching the UTF-16BE text
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(text)
    return exif


def fits(output_format: str) -> Callable[[str], bool]:
    """Whether a parameters text fits where `output_format` keeps it, measured as it will be written."""
    if output_format == "png":
        return lambda text: len(text.encode("utf-8")) <= MAX_PNG_TEXT_BYTES
    return lambda text: len(_exif(text).tobytes()) <= MAX_EXIF_BYTES


def save_image(image: Image.Image, path: Path, options: OutputOptions, parameters: str) -> Path:
    image = image.convert("RGB")
    parameters = infotext.fit(parameters, fits(options.format))
    if options.format == "png":
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
        image.save(path, format="PNG", pnginfo=info)
    else:
        image.save(path, format=FORMATS[options.format], quality=options.quality, exif=_exif(parameters))
    return path


def save_images(images: list[Image.Image], options: OutputOptions, parameters: list[str]) -> list[Path]:
    """Write each image with its own parameters text into a fresh folder: out-0.png, out-1.png, ..."""
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    return [
        save_image(image, folder / f"out-{index}{options.suffix}", options, text)
        for index, (image, text) in enumerate(zip(images, parameters, strict=True))
    ]


def read_parameters(path: Path | str) -> str | None:
    """The `parameters` text of a file this module wrote (PNG text chunk or EXIF UserComment), else None."""
    with Image.open(path) as image:
        if PARAMETERS_KEY in image.info:
            return image.info[PARAMETERS_KEY]
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    return read_user_comment(comment) if comment else None
