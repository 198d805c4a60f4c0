"""Read a preprocessed training folder (its layout: sdxl.formats): images, masks and captions.csv naming them.

Images must already be resolution x resolution (preprocessing crops and resizes); a different size is an error,
never a silent resize. The trained token in captions is replaced, as a whole word, by the new tokens. Pixels are
read from disk when they are used (once, to cache latents), so holding the examples costs no image memory.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from sdxl.errors import InputError
from sdxl.formats import CAPTIONS_COLUMNS, CAPTIONS_FILE, whole_word
from sdxl.inputs.images import decode, open_checked
from sdxl.preprocess.config import max_training_images

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The training folder cannot be trained on; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Example:
    name: str
    image_path: Path
    mask_path: Path | None  # None: the loss counts everywhere
    resolution: int
    caption: str  # with token_string already replaced by the new tokens

    @property
    def pixels(self) -> torch.Tensor:
        """[3, H, W] in [-1, 1], read now."""
        rgb = _read_image(self.image_path, "RGB", self.resolution)
        return torch.from_numpy(rgb).permute(2, 0, 1) * 2.0 - 1.0

    @property
    def mask(self) -> torch.Tensor:
        """[1, H, W] in [0, 1]; 1 = the loss counts here. Read now."""
        if self.mask_path is None:
            return torch.ones(1, self.resolution, self.resolution)
        return torch.from_numpy(_read_image(self.mask_path, "L", self.resolution))[None]


def replace_token(caption: str, token_string: str, replacement: str) -> str:
    """Replace token_string where it is a whole word only: "TOK, near tokyo" -> "<s0><s1>, near tokyo"."""
    return re.sub(whole_word(token_string), lambda _: replacement, caption)


def size_conditioning(resolution: int) -> tuple[int, int, int, int, int, int]:
    """SDXL's micro-conditioning for a square crop at `resolution`: original size, crop top-left, target size."""
    return (resolution, resolution, 0, 0, resolution, resolution)


def _inside(folder: Path, name: str, row: int, column: str) -> Path:
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise DatasetError(f"{CAPTIONS_FILE} row {row}: {column} {name!r} must be a file name inside the folder")
    path = folder / relative
    if not path.is_file():
        raise DatasetError(f"{CAPTIONS_FILE} row {row}: {column} {name!r} does not exist in {folder}")
    return path


def _open(path: Path, resolution: int):
    """PNG, JPEG or WebP of exactly resolution x resolution, checked from the header (nothing is decoded yet)."""
    try:
        image = open_checked(path, path.name, max_pixels=4 * resolution * resolution)
    except InputError as error:
        raise DatasetError(str(error)) from None
    if image.size != (resolution, resolution):
        image.close()
        raise DatasetError(
            f"{path.name} is {image.size[0]}x{image.size[1]}; training at resolution {resolution} needs "
            f"{resolution}x{resolution} images (preprocessing crops and resizes them)"
        )
    return image


def _check_image(path: Path, resolution: int) -> None:
    _open(path, resolution).close()


def _read_image(path: Path, mode: str, resolution: int) -> np.ndarray:
    try:
        image = decode(_open(path, resolution), path.name)
    except InputError as error:
        raise DatasetError(str(error)) from None
    return np.asarray(image.convert(mode), dtype=np.float32) / 255.0


def _read_rows(folder: Path, max_rows: int) -> list[dict]:
    """captions.csv's rows, streamed and refused past `max_rows` (one row per training image)."""
    captions = folder / CAPTIONS_FILE
    if not captions.is_file():
        raise DatasetError(f"{folder} has no {CAPTIONS_FILE}")
    with captions.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [c for c in CAPTIONS_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(
                f"{CAPTIONS_FILE} lacks the column(s) {', '.join(missing)}; needs {','.join(CAPTIONS_COLUMNS)}"
            )
        rows = []
        for row in reader:
            if len(rows) == max_rows:
                raise DatasetError(
                    f"{captions} lists more than {max_rows:,} training images; at most {max_rows:,} are accepted"
                    " (setting SDXL_MAX_TRAINING_IMAGES)"
                )
            rows.append(row)
        return rows


def read_examples(folder: Path, resolution: int, token_string: str, replacement: str, min_images: int = 1):
    """Every example in `folder`, in captions.csv order."""
    folder = Path(folder)
    examples = []
    for row_number, row in enumerate(_read_rows(folder, max_training_images()), start=2):
        image_path = _inside(folder, row["image_file"], row_number, "image_file")
        _check_image(image_path, resolution)
        mask_path = _inside(folder, row["mask_file"], row_number, "mask_file") if row["mask_file"] else None
        if mask_path is not None and _read_image(mask_path, "L", resolution).max() == 0:
            log.warning("%s: the mask is all black, so this image adds nothing to the loss", row["mask_file"])
        examples.append(
            Example(
                name=image_path.name,
                image_path=image_path,
                mask_path=mask_path,
                resolution=resolution,
                caption=replace_token(row["caption"] or "", token_string, replacement),
            )
        )
    if len(examples) < min_images:
        raise DatasetError(
            f"{folder} holds {len(examples)} training image(s); at least {min_images} needed"
            + (" (one per training process)" if min_images > 1 else "")
        )
    if not any(replacement in e.caption for e in examples):
        log.warning("no caption mentions %r: the new tokens %s will not learn anything", token_string, replacement)
    log.info("dataset: %d images at %dx%d from %s", len(examples), resolution, resolution, folder)
    return examples
