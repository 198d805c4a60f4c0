"""Square crops: the largest square of the image centred as near as possible on a mask's centre of mass, then
resized to the training resolution. Image and mask are always cropped with the same box."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_of_mass(mask: Image.Image) -> tuple[float, float]:
    """The mask-weighted centre in pixels; an all-black mask has no salient region, so it gives the image centre.
    Computed from the row and column sums: no full-size float or index array is made."""
    weights = np.asarray(mask.convert("L"))
    total = int(weights.sum(dtype=np.int64))
    if total == 0:
        return mask.width / 2, mask.height / 2
    columns = weights.sum(axis=0, dtype=np.int64)
    rows = weights.sum(axis=1, dtype=np.int64)
    x = float(np.dot(np.arange(columns.size, dtype=np.float64), columns)) / total
    y = float(np.dot(np.arange(rows.size, dtype=np.float64), rows)) / total
    return x + 0.5, y + 0.5


def square_box(size: tuple[int, int], center: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest square inside `size` whose centre is nearest `center`."""
    width, height = size
    side = min(width, height)
    left = min(max(round(center[0] - side / 2), 0), width - side)
    top = min(max(round(center[1] - side / 2), 0), height - side)
    return left, top, left + side, top + side


def square(image: Image.Image, mask: Image.Image, center: tuple[float, float]) -> tuple[Image.Image, Image.Image]:
    """The square around `center`, at the image's own scale (upscaling, if needed, comes after: on the square)."""
    if image.size != mask.size:
        raise ValueError(f"the image is {image.size} but its mask is {mask.size}: they must be cropped together")
    box = square_box(image.size, center)
    return image.crop(box), mask.crop(box)


def resize_pair(image: Image.Image, mask: Image.Image, resolution: int) -> tuple[Image.Image, Image.Image]:
    size = (resolution, resolution)
    return image.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.BILINEAR)


def crop_square(
    image: Image.Image, mask: Image.Image, center: tuple[float, float], resolution: int
) -> tuple[Image.Image, Image.Image]:
    return resize_pair(*square(image, mask, center), resolution)
