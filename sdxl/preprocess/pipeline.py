"""The trainer's preprocessing, as numbered steps: archive -> caption -> mask -> crop -> upscale -> files.

Small images are upscaled after the square is cropped, so Swin2SR and every later array work on at most
resolution x resolution pixels per image, whatever the upload's shape (the archive reader caps pixels and aspect
ratio, and scales large images down as it reads them).

It writes the training set the training engine reads (the contract between the two; do not change it):
    out_dir/NNNN.src.png   RGB, resolution x resolution
    out_dir/NNNN.mask.png  L (0..255, white = trained on), same size
    out_dir/captions.csv   columns image_file,mask_file,caption (file names relative to out_dir)
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdxl import provenance
from sdxl.device import Placement
from sdxl.errors import InputError
from sdxl.images import check_side
from sdxl.preprocess import archive, crop, mask
from sdxl.preprocess.archive import ArchiveLimits, limits_from_env
from sdxl.preprocess.caption import Captioner, caption_images
from sdxl.preprocess.upscale import Upscaler, needs_upscaling, upscale_small

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.csv"
CAPTIONS_COLUMNS = ("image_file", "mask_file", "caption")
MIN_IMAGES = 1  # one image is enough for a (pivotal-tuning) LoRA; fewer is the "no usable image" error
RECOMMENDED_MIN_RESOLUTION = 512
# Images are worked on at no more than this (or the resolution, if larger) on their short side: the crop ends at the
# resolution anyway, and face detection still sees faces in group photos.
WORKING_SHORT_SIDE = 1024


def _require_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise InputError(field, f"{value!r} is not allowed; use true or false")


@dataclass(frozen=True)
class PreprocessConfig:
    """The trainer inputs that shape the training set, validated. Field names are the contract's."""

    resolution: int = 512
    caption_prefix: str = "a photo of TOK, "
    token_string: str = "TOK"
    mask_target_prompts: str | None = None
    crop_based_on_salience: bool = True
    use_face_detection_instead: bool = False
    clipseg_temperature: float = 1.0
    input_images_filetype: str = "infer"
    min_images: int = MIN_IMAGES

    def __post_init__(self):
        # Bounds shared with generation: a multiple of 8 from 64 (tiny test runs) to 2048.
        check_side("resolution", self.resolution)
        if not isinstance(self.token_string, str) or not self.token_string or re.search(r"\s", self.token_string):
            raise InputError("token_string", f"{self.token_string!r} is not allowed; use one word, e.g. TOK")
        if not isinstance(self.caption_prefix, str) or not re.search(
            rf"(?<!\w){re.escape(self.token_string)}(?!\w)", self.caption_prefix
        ):
            raise InputError(
                "caption_prefix",
                f"{self.caption_prefix!r} does not contain token_string {self.token_string!r} as a word;"
                f" e.g. 'a photo of {self.token_string}, '",
            )
        if self.mask_target_prompts is not None and not isinstance(self.mask_target_prompts, str):
            raise InputError("mask_target_prompts", f"{self.mask_target_prompts!r} is not text")
        _require_bool("crop_based_on_salience", self.crop_based_on_salience)
        _require_bool("use_face_detection_instead", self.use_face_detection_instead)
        temperature = self.clipseg_temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise InputError(
                "clipseg_temperature", f"{temperature!r} is not allowed; use a positive number (0.5 to 1.0 recommended)"
            )
        if self.input_images_filetype not in archive.FILETYPES:
            raise InputError(
                archive.FILETYPE_FIELD,
                f"{self.input_images_filetype!r} is not allowed; use one of {', '.join(archive.FILETYPES)}",
            )
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
            image_file, mask_file = f"{index:04d}.src.png", f"{index:04d}.mask.png"
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
    limits = limits or limits_from_env()
    _check_out_dir(out_dir)
    if config.resolution < RECOMMENDED_MIN_RESOLUTION:
        log.warning(
            "resolution %d is below %d: SDXL learns poorly that small", config.resolution, RECOMMENDED_MIN_RESOLUTION
        )
    started = time.monotonic()

    # 1. Read the archive: images (EXIF-rotated RGB; large ones scaled down as they are read, to bound memory) and
    #    caption.csv captions matched by file name.
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
    images = [sample.image for sample in samples]

    # 2. Caption what caption.csv did not (BLIP, greedy), prefixed with caption_prefix.
    captions = caption_images(
        images,
        [sample.caption for sample in samples],
        config.caption_prefix,
        lambda: Captioner.load(models_dir, placement),
    )

    # 3. One loss mask per image: CLIPSeg, faces or uniform.
    masks = _masks(config, images, models_dir, placement)

    # 4. Square crops around the salient region or the faces; masks cropped alike.
    centers = _crop_centers(config, images, masks, models_dir)
    squares = [crop.square(i, m, c) for i, m, c in zip(images, masks, centers, strict=True)]
    kinds = provenance.mask_kinds(config.use_face_detection_instead, config.target_prompt, masks)
    sources = [(sample.name, sample.caption) for sample in samples]  # for the report: names and given captions
    del images, masks, samples  # only the squares are needed from here on

    # 5. Upscale the squares smaller than the resolution (Swin2SR x4, loaded only if needed), then resize the
    #    squares and their masks to the resolution.
    crops = [pair[0] for pair in squares]
    if any(needs_upscaling(image, config.resolution) for image in crops):
        crops = upscale_small(crops, config.resolution, Upscaler.load(models_dir, placement))
    pairs = [crop.resize_pair(i, pair[1], config.resolution) for i, pair in zip(crops, squares, strict=True)]

    # 6. Write the training set.
    _write(out_dir, [p[0] for p in pairs], [p[1] for p in pairs], captions)
    provenance.write_provenance(out_dir, [name for name, _ in sources], [given for _, given in sources], kinds)
    log.info("preprocess: %d images at %dpx in %s (%.1fs)", len(pairs), config.resolution, out_dir,
             time.monotonic() - started)  # fmt: skip
    return out_dir


def preprocess(
    archive_path: Path | str,
    out_dir: Path | str,
    *,
    resolution: int = 512,
    caption_prefix: str = "a photo of TOK, ",
    token_string: str = "TOK",
    mask_target_prompts: str | None = None,
    crop_based_on_salience: bool = True,
    use_face_detection_instead: bool = False,
    clipseg_temperature: float = 1.0,
    filetype: str = "infer",
    models_dir: Path | None = None,
    placement: Placement | None = None,
    limits: ArchiveLimits | None = None,
) -> Path:
    """Turn the uploaded archive into the training set in `out_dir` (see the module docstring); returns out_dir.
    Inputs are validated before any file is read. Models come from `models_dir` (the weight folder), offline."""
    config = PreprocessConfig(
        resolution=resolution,
        caption_prefix=caption_prefix,
        token_string=token_string,
        mask_target_prompts=mask_target_prompts,
        crop_based_on_salience=crop_based_on_salience,
        use_face_detection_instead=use_face_detection_instead,
        clipseg_temperature=clipseg_temperature,
        input_images_filetype=filetype,
    )
    return run(config, archive_path, out_dir, models_dir=models_dir, placement=placement, limits=limits)
