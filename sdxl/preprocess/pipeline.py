"""The trainer's preprocessing, as numbered steps: archive -> caption -> mask -> crop -> upscale -> files.

Small images are upscaled after the square is cropped, so Swin2SR and every later array work on at most
resolution x resolution pixels per image, whatever the upload's shape (the archive reader caps pixels and aspect
ratio, and scales large images down as it reads them).

It writes the training folder the training engine reads, laid out as sdxl.formats says (the contract between the
two): per image NNNN.src.png (RGB, resolution x resolution) and NNNN.mask.png (L, white = trained on, same size), and
captions.csv naming them with their captions.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdxl.errors import InputError
from sdxl.formats import CAPTIONS_COLUMNS, CAPTIONS_FILE, training_image_names
from sdxl.model.device import Placement
from sdxl.preprocess import archive, crop, mask, provenance
from sdxl.preprocess.archive import ArchiveLimits, limits_from_env
from sdxl.preprocess.caption import Captioner, caption_images
from sdxl.preprocess.config import DatasetInputs
from sdxl.preprocess.upscale import Upscaler, needs_upscaling, upscale_small

log = logging.getLogger(__name__)

MIN_IMAGES = 1  # one image is enough for a (pivotal-tuning) LoRA; fewer is the "no usable image" error
RECOMMENDED_MIN_RESOLUTION = 512
# Images are worked on at no more than this (or the resolution, if larger) on their short side: the crop ends at the
# resolution anyway, and face detection still sees faces in group photos.
WORKING_SHORT_SIDE = 1024


@dataclass(frozen=True)
class PreprocessConfig(DatasetInputs):
    """The trainer inputs that shape the training set (DatasetInputs: the trainer's own definitions, so a value the
    trainer accepts is accepted here), and how many usable images there must be."""

    min_images: int = MIN_IMAGES

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.min_images, int) or self.min_images < 1:
            raise ValueError(f"min_images: {self.min_images!r} is not allowed; use a positive integer")

    @property
    def target_prompt(self) -> str | None:
        """The CLIPSeg prompt, or None when masks come from faces or are uniform."""
        prompt = (self.mask_target_prompts or "").strip()
        return prompt if prompt and not self.use_face_detection_instead else None


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; preprocessing writes a fresh one")


def _masks(config: PreprocessConfig, images: list[Image.Image], models_dir, placement) -> list[Image.Image]:
    if config.use_face_detection_instead:
        if config.mask_target_prompts:
            log.info("mask: use_face_detection_instead is set, so mask_target_prompts is not used")
        return mask.face_masks(images, models_dir)
    if config.target_prompt is None:
        return [mask.uniform_mask(image) for image in images]
    segmenter = mask.Segmenter.load(models_dir, placement)
    return mask.clipseg_masks(images, config.target_prompt, config.clipseg_temperature, segmenter)


def _crop_centers(config: PreprocessConfig, images, masks, models_dir=None) -> list[tuple[float, float]]:
    """Around the salient region (the loss mask), or around the faces (found here unless the masks are faces)."""
    if config.crop_based_on_salience or config.use_face_detection_instead:
        return [crop.center_of_mass(m) for m in masks]
    return [crop.center_of_mass(m) for m in mask.face_masks(images, models_dir)]


def _write(out_dir: Path, images, masks, captions) -> None:
    """Write into a staging folder beside out_dir and rename it into place: a failure leaves no partial set."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        rows = []
        for index, (image, loss_mask, caption) in enumerate(zip(images, masks, captions, strict=True)):
            image_file, mask_file = training_image_names(index)
            image.save(staging / image_file)
            loss_mask.save(staging / mask_file)
            rows.append((image_file, mask_file, caption))
        with open(staging / CAPTIONS_FILE, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(CAPTIONS_COLUMNS)
            writer.writerows(rows)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty before any work started
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_samples(config: PreprocessConfig, archive_path, limits: ArchiveLimits) -> list[archive.Sample]:
    samples = archive.read_samples(
        archive_path,
        filetype=config.input_images_filetype,
        limits=limits,
        short_side=max(config.resolution, WORKING_SHORT_SIDE),
    )
    if len(samples) < config.min_images:
        raise InputError(
            archive.ARCHIVE_FIELD, f"holds {len(samples)} usable images; at least {config.min_images} are needed"
        )
    return samples


def _square_crops(config: PreprocessConfig, images, masks, models_dir) -> tuple[list, list]:
    """Square crops around the salient region or the faces, the masks cropped alike: (crops, their masks)."""
    centers = _crop_centers(config, images, masks, models_dir)
    squares = [crop.square(i, m, c) for i, m, c in zip(images, masks, centers, strict=True)]
    return [pair[0] for pair in squares], [pair[1] for pair in squares]


def _to_resolution(config: PreprocessConfig, crops, masks, models_dir, placement) -> list[tuple[Image.Image, ...]]:
    """Upscale the crops smaller than the resolution (Swin2SR x4, loaded only if needed), then resize crops and
    masks to the resolution."""
    if any(needs_upscaling(image, config.resolution) for image in crops):
        crops = upscale_small(crops, config.resolution, Upscaler.load(models_dir, placement))
    return [crop.resize_pair(i, m, config.resolution) for i, m in zip(crops, masks, strict=True)]


def run(
    config: PreprocessConfig,
    archive_path: Path | str,
    out_dir: Path | str,
    *,
    models_dir: Path | None = None,
    placement: Placement | None = None,
    limits: ArchiveLimits | None = None,
) -> Path:
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if config.resolution < RECOMMENDED_MIN_RESOLUTION:
        log.warning(
            "resolution %d is below %d: SDXL learns poorly that small", config.resolution, RECOMMENDED_MIN_RESOLUTION
        )
    started = time.monotonic()
    # 1. Read the archive: images (EXIF-rotated RGB; large ones scaled down as they are read, to bound memory) and
    #    caption.csv captions matched by file name.
    samples = _read_samples(config, archive_path, limits or limits_from_env())
    images = [sample.image for sample in samples]
    # 2. Caption what caption.csv did not (BLIP, greedy), prefixed with caption_prefix.
    captions = caption_images(images, [sample.caption for sample in samples], config.caption_prefix,
                              lambda: Captioner.load(models_dir, placement))  # fmt: skip
    # 3. One loss mask per image: CLIPSeg, faces or uniform.
    masks = _masks(config, images, models_dir, placement)
    kinds = provenance.mask_kinds(config.use_face_detection_instead, config.target_prompt, masks)
    # 4. Square crops around the salient region or the faces; masks cropped alike.
    crops, crop_masks = _square_crops(config, images, masks, models_dir)
    names, given = [sample.name for sample in samples], [sample.caption for sample in samples]  # for the report
    del images, masks, samples  # only the squares are needed from here on
    # 5. Upscale the small squares, then resize squares and masks to the resolution.
    pairs = _to_resolution(config, crops, crop_masks, models_dir, placement)
    # 6. Write the training set.
    _write(out_dir, [p[0] for p in pairs], [p[1] for p in pairs], captions)
    provenance.write_provenance(out_dir, names, given, kinds)
    log.info("preprocess: %d images at %dpx in %s (%.1fs)", len(pairs), config.resolution, out_dir,
             time.monotonic() - started)  # fmt: skip
    return out_dir


def preprocess(
    archive_path: Path | str,
    out_dir: Path | str,
    *,
    filetype: str = "infer",
    models_dir: Path | None = None,
    placement: Placement | None = None,
    limits: ArchiveLimits | None = None,
    **inputs,
) -> Path:
    """Turn the uploaded archive into the training set in `out_dir` (see the module docstring); returns out_dir.
    `inputs` are PreprocessConfig's fields (resolution, caption_prefix, token_string, mask_target_prompts,
    crop_based_on_salience, use_face_detection_instead, clipseg_temperature), validated before any file is read.
    Models come from `models_dir` (the weight folder), offline."""
    config = PreprocessConfig(input_images_filetype=filetype, **inputs)
    return run(config, archive_path, out_dir, models_dir=models_dir, placement=placement, limits=limits)
