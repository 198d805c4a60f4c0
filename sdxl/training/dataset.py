"""Read a preprocessed training folder: `NNNN.src.png` + `NNNN.mask.png` + `captions.csv` (image_file,mask_file,caption).

Images must already be resolution x resolution (preprocessing crops and resizes); a different size is an error,
never a silent resize. The trained token in captions is replaced, as a whole word, by the new tokens.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from sdxl.training.config import word_pattern

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.csv"
COLUMNS = ("image_file", "mask_file", "caption")


class DatasetError(ValueError):
    """The training folder cannot be trained on; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Example:
    name: str
    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    mask: torch.Tensor  # [1, H, W] in [0, 1]; 1 = the loss counts here
    caption: str  # with token_string already replaced by the new tokens


def replace_token(caption: str, token_string: str, replacement: str) -> str:
    """Replace token_string where it is a whole word only: "TOK, near tokyo" -> "<s0><s1>, near tokyo"."""
    return word_pattern(token_string).sub(lambda _: replacement, caption)


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


def _read_image(path: Path, mode: str, resolution: int) -> np.ndarray:
    with Image.open(path) as image:
        if image.size != (resolution, resolution):
            raise DatasetError(
                f"{path.name} is {image.size[0]}x{image.size[1]}; training at resolution {resolution} needs "
                f"{resolution}x{resolution} images (preprocessing crops and resizes them)"
            )
        return np.asarray(image.convert(mode), dtype=np.float32) / 255.0


def _read_rows(folder: Path) -> list[dict]:
    captions = folder / CAPTIONS_FILE
    if not captions.is_file():
        raise DatasetError(f"{folder} has no {CAPTIONS_FILE}")
    with captions.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(f"{CAPTIONS_FILE} lacks the column(s) {', '.join(missing)}; needs {','.join(COLUMNS)}")
        return list(reader)


def read_examples(folder: Path, resolution: int, token_string: str, replacement: str, min_images: int = 1):
    """Every example in `folder`, in captions.csv order."""
    folder = Path(folder)
    examples = []
    for row_number, row in enumerate(_read_rows(folder), start=2):
        image_path = _inside(folder, row["image_file"], row_number, "image_file")
        pixels = _read_image(image_path, "RGB", resolution)
        if row["mask_file"]:
            mask = _read_image(_inside(folder, row["mask_file"], row_number, "mask_file"), "L", resolution)
        else:
            mask = np.ones(pixels.shape[:2], dtype=np.float32)
        if mask.max() == 0:
            log.warning("%s: the mask is all black, so this image adds nothing to the loss", row["mask_file"])
        examples.append(
            Example(
                name=image_path.name,
                pixels=torch.from_numpy(pixels).permute(2, 0, 1) * 2.0 - 1.0,
                mask=torch.from_numpy(mask)[None],
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
