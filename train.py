"""The Cog edge for trainings: declares the hosted `stability-ai/sdxl` trainer's inputs and returns
trained_model.tar. Served by `COG_TRAIN_TYPE_STUB=train.py:train python -m cog.server.http --x-mode train`.

It only translates: the inputs (described once in sdxl.training.config and sdxl.preprocess.config), by name ->
TrainingConfig, validated before any work, then sdxl.training.job (archive -> preprocessing -> training -> tar), the path deploy/train_job.py takes too.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from cog import BaseModel, Path

from cog_inputs import FileInput, field, guard_worker_egress
from cog_scratch import discard_finished_request_folders, request_finished
from sdxl.errors import InputError
from sdxl.inputs import file_inputs
from sdxl.model import weights
from sdxl.preprocess import config as dataset
from sdxl.training import config as spec
from sdxl.training.config import TrainingConfig
from sdxl.training.job import train_from_archive


class TrainingOutput(BaseModel):
    weights: Path


def _log_to_stdout() -> None:
    """Cog shows the process's output as the training's logs."""
    logger = logging.getLogger("sdxl")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "name", "") == "sdxl-train" for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.name = "sdxl-train"
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def train(
    input_images: FileInput = field(spec.INPUT_IMAGES),
    seed: Optional[int] = field(spec.SEED),
    resolution: int = field(dataset.RESOLUTION),
    train_batch_size: int = field(spec.TRAIN_BATCH_SIZE),
    num_train_epochs: int = field(spec.NUM_TRAIN_EPOCHS),
    max_train_steps: int = field(spec.MAX_TRAIN_STEPS),
    is_lora: bool = field(spec.IS_LORA),
    unet_learning_rate: float = field(spec.UNET_LEARNING_RATE),
    ti_lr: float = field(spec.TI_LR),
    lora_lr: float = field(spec.LORA_LR),
    lora_rank: int = field(spec.LORA_RANK),
    lr_scheduler: str = field(spec.LR_SCHEDULER),
    lr_warmup_steps: int = field(spec.LR_WARMUP_STEPS),
    token_string: str = field(dataset.TOKEN_STRING),
    caption_prefix: str = field(dataset.CAPTION_PREFIX),
    mask_target_prompts: Optional[str] = field(dataset.MASK_TARGET_PROMPTS),
    crop_based_on_salience: bool = field(dataset.CROP_BASED_ON_SALIENCE),
    use_face_detection_instead: bool = field(dataset.USE_FACE_DETECTION_INSTEAD),
    clipseg_temperature: float = field(dataset.CLIPSEG_TEMPERATURE),
    verbose: bool = field(spec.VERBOSE),
    checkpointing_steps: int = field(spec.CHECKPOINTING_STEPS),
    input_images_filetype: str = field(dataset.INPUT_IMAGES_FILETYPE),
) -> TrainingOutput:
    _log_to_stdout()
    guard_worker_egress()
    # 1. Validate every input before any work (errors name the field, the value and what is allowed).
    config = TrainingConfig(
        seed=seed,
        resolution=resolution,
        train_batch_size=train_batch_size,
        num_train_epochs=num_train_epochs,
        max_train_steps=max_train_steps,
        is_lora=is_lora,
        unet_learning_rate=unet_learning_rate,
        ti_lr=ti_lr,
        lora_lr=lora_lr,
        lora_rank=lora_rank,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps,
        token_string=token_string,
        caption_prefix=caption_prefix,
        mask_target_prompts=mask_target_prompts,
        crop_based_on_salience=crop_based_on_salience,
        use_face_detection_instead=use_face_detection_instead,
        clipseg_temperature=clipseg_temperature,
        verbose=verbose,
        checkpointing_steps=checkpointing_steps,
        input_images_filetype=input_images_filetype,
    )
    # 2. The base weights must be there: a training never downloads them.
    weights_root = weights.weights_dir()
    weights.require(weights_root, (weights.BASE, weights.VAE))
    # 3. Fetch the archive (https URL or data: URI, under the network policy), preprocess, train, return the tar.
    archive_limits = file_inputs.FileInputLimits.for_archives()
    discard_finished_request_folders()
    try:
        with file_inputs.local_files({"input_images": input_images}, archive_limits) as files:
            if files["input_images"] is None:
                raise InputError("input_images", "is required: give an https:// URL or a data: URI of a .zip or .tar")
            return TrainingOutput(weights=Path(train_from_archive(config, files["input_images"], weights_root)))
    finally:
        request_finished()  # this server holds no request folder back while it waits for the next
