"""Loss masks: what matters in each training image. White (255) is trained on fully, black (0) not at all.

Three kinds, exactly one mask per image, in the images' order:
- CLIPSeg, prompted by `mask_target_prompts`: sigmoid(logits / clipseg_temperature), a small floor, scaled so the
  most salient pixel is 1, resized to the image;
- faces (`use_face_detection_instead`): YuNet or OpenCV's Haar cascades (sdxl/preprocess/faces.py); the faces of an
  image go into its one mask;
- neither: a uniform (all-white) mask.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdxl.model import weights
from sdxl.preprocess import faces as faces_module
from sdxl.preprocess import models
from sdxl.preprocess.faces import Box

log = logging.getLogger(__name__)

CLIPSEG_FLOOR = 0.01  # as the hosted trainer: no pixel is ignored completely
# A Haar box spans brows to mouth; an ellipse with these half-axes (relative to the box) covers the whole box
# (its corners lie at 0.75 of the ellipse's radius) plus forehead and chin.
FACE_ELLIPSE = (0.75, 0.9)


def uniform_mask(image: Image.Image) -> Image.Image:
    return Image.new("L", image.size, 255)


# --- CLIPSeg --------------------------------------------------------------------------------------------------


class Segmenter(models.PreprocessModel):
    weights_spec = weights.SEGMENTER
    model_class = "CLIPSegForImageSegmentation"
    processor_class = "CLIPSegProcessor"

    @torch.inference_mode()
    def mask(self, image: Image.Image, prompt: str, temperature: float = 1.0) -> Image.Image:
        """A soft mask of the image's size; a higher temperature flattens (blurs) it."""
        parameter = next(self.model.parameters())
        inputs = self.processor(
            text=[prompt], images=[image.convert("RGB")], padding="max_length", truncation=True, return_tensors="pt"
        )
        inputs = {key: value.to(parameter.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        logits = self.model(**inputs).logits.float()
        logits = logits.reshape(1, 1, *logits.shape[-2:])  # batch of one: some versions squeeze it away
        probs = (torch.sigmoid(logits / temperature) + CLIPSEG_FLOOR).clamp(0, 1)
        probs = probs / probs.max()
        width, height = image.size
        probs = torch.nn.functional.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
        array = (probs[0, 0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array, "L")


def clipseg_masks(
    images: list[Image.Image], prompt: str, temperature: float, segmenter: Segmenter
) -> list[Image.Image]:
    return [segmenter.mask(image, prompt, temperature) for image in images]


# --- faces ------------------------------------------------------------------------------------------------------


def detect_faces(image: Image.Image, detector=None) -> list[Box]:
    """Face boxes in the image's pixel coordinates, largest first (sdxl/preprocess/faces.py); [] if none is found."""
    return faces_module.find_faces(image, detector or faces_module.load_detector())


def face_mask(image: Image.Image, faces: list[Box] | None = None) -> Image.Image:
    """ONE mask whatever the number of faces: the union of an ellipse around each. No face: uniform."""
    faces = detect_faces(image) if faces is None else faces
    if not faces:
        return uniform_mask(image)
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    for face in faces:
        cx, cy = face.center
        rx, ry = face.width * FACE_ELLIPSE[0], face.height * FACE_ELLIPSE[1]
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    return mask


def face_masks(images: list[Image.Image], models_dir: Path | None = None) -> list[Image.Image]:
    detector = faces_module.load_detector(models_dir)
    masks, without = [], []
    for index, image in enumerate(images):
        faces = detect_faces(image, detector)
        if not faces:
            without.append(index)
        masks.append(face_mask(image, faces))
    if without:
        log.warning(
            "mask: no face found in %d of %d images (%s); their masks are uniform",
            len(without),
            len(images),
            ", ".join(f"image {i}" for i in without),
        )
    else:
        log.info("mask: a face found in each of the %d images", len(images))
    return masks
