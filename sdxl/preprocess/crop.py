"""Square crops: the largest square of the image centred as near as possible on a mask's centre of mass, then
resized to the training resolution. Image and mask are always cropped with the same box."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_of_mass(mask: Image.Image) -> tuple[float, float]:
    """The mask-weighted centre in pixels; an all-black mask has no salient region, so it gives the image centre."""
    weights = np.asarray(mask.convert("L"), dtype=np.float64)
    total = weights.sum()
    if total == 0:
        return mask.width / 2, mask.height / 2
    ys, xs = np.indices(weights.shape)
    return float((xs * weights).sum() / total) + 0.5, float((ys * weights).sum() / total) + 0.5


def square_box(size: tuple[int, int], center: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest square inside `size` whose centre is nearest `center`."""
    width, height = size
    side = min(width, height)
    left = min(max(round(center[0] - side / 2), 0), width - side)
    top = min(max(round(center[1] - side / 2), 0), height - side)
    return left, top, left + side, top + side


def crop_square(
    image: Image.Image, mask: Image.Image, center: tuple[float, float], resolution: int
) -> tuple[Image.Image, Image.Image]:
    if image.size != mask.size:
        raise ValueError(f"the image is {image.size} but its mask is {mask.size}: they must be cropped together")
    box = square_box(image.size, center)
    size = (resolution, resolution)
    return (
        image.crop(box).resize(size, Image.Resampling.LANCZOS),
        mask.crop(box).resize(size, Image.Resampling.BILINEAR),
    )
