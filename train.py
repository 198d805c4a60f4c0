"""The Cog edge for trainings: declares the hosted `stability-ai/sdxl` trainer's inputs and returns
trained_model.tar. Served by `COG_TRAIN_TYPE_STUB=train.py:train python -m cog.server.http --x-mode train`.

It only translates: inputs -> TrainingConfig (validated before any work), then sdxl.preprocess (archive -> training
folder) and sdxl.training (folder -> tar). Scratch files live in a private temporary folder removed in every case;
the tar is returned from its own folder and only once it is complete. No checkpoints are written here: the scratch
folder does not outlive the training, so nothing could resume from them (`python -m sdxl.training` with a lasting
--output-dir writes them every checkpointing_steps).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path as LocalPath
from typing import Optional

from cog import BaseModel, Input, Path

from cog_inputs import FileInput, guard_worker_egress
from sdxl import file_inputs, weights
from sdxl.errors import InputError
from sdxl.private_dirs import private_dir
from sdxl.training.config import FILETYPES, LR_SCHEDULERS, TrainingConfig
from sdxl.training.export import TAR_NAME

log = logging.getLogger("sdxl.train")

RESULTS_DIR = "sdxl-trained-models"  # under the temporary folder: the latest training's trained_model.tar


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


def _num_processes() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def _fresh_result_dir() -> LocalPath:
    """A private folder for this training's tar. Cog reads the returned file after train() returns, so it cannot be
    removed here; the previous training's folder is removed instead (trainings run one at a time)."""
    # A fixed name under a shared folder: created 0700 and checked (ours, not a symlink) before it is cleaned.
    parent = private_dir(LocalPath(tempfile.gettempdir()) / RESULTS_DIR, "TMPDIR")
    for previous in parent.iterdir():
        shutil.rmtree(previous, ignore_errors=True)
    return LocalPath(tempfile.mkdtemp(prefix="run-", dir=parent))


def run_training(config: TrainingConfig, input_images: LocalPath, weights_root: LocalPath) -> LocalPath:
    """1. preprocess the archive, 2. train (data-parallel over every GPU), 3. hand back the tar's path."""
    # The preprocessing step (archive extraction, upscaling, captions, masks, crops), imported when used.
    from sdxl.preprocess import preprocess

    config = config.with_seed()
    result_dir = _fresh_result_dir()
    work = LocalPath(tempfile.mkdtemp(prefix="sdxl-training-"))  # dataset and checkpoints: removed in every case
    try:
        dataset = preprocess(
            input_images,
            work / "dataset",
            resolution=config.resolution,
            caption_prefix=config.caption_prefix,
            token_string=config.token_string,
            mask_target_prompts=config.mask_target_prompts,
            crop_based_on_salience=config.crop_based_on_salience,
            use_face_detection_instead=config.use_face_detection_instead,
            clipseg_temperature=config.clipseg_temperature,
            filetype=config.input_images_filetype,
            models_dir=weights_root,
        )
        tar_path = result_dir / TAR_NAME
        if _num_processes() > 1:
            from sdxl.training.launch import run_processes

            run_processes(
                config, dataset, weights_root, work / "run", _num_processes(), tar_path, write_checkpoints=False
            )
        else:
            from sdxl.training.loop import train as train_loop

            train_loop(config, dataset, weights_root, work / "run", tar_path=tar_path, write_checkpoints=False)
        log.info("trained_model.tar ready: %s", tar_path)
        return tar_path
    except BaseException:
        shutil.rmtree(result_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train(
    input_images: FileInput = Input(
        description="A .zip or .tar file of the training images (optionally a caption.csv)"
    ),
    seed: Optional[int] = Input(
        description="Random seed for reproducible training; empty for a random one", default=None
    ),
    resolution: int = Input(description="Square resolution to train at (multiple of 8)", default=512),
    train_batch_size: int = Input(description="Batch size per device", default=4),
    num_train_epochs: int = Input(description="Epochs to train; max_train_steps takes precedence", default=4000),
    max_train_steps: int = Input(description="Training steps; takes precedence over num_train_epochs", default=1000),
    is_lora: bool = Input(description="Train a LoRA; false = full fine-tune of the UNet", default=True),
    unet_learning_rate: float = Input(description="UNet learning rate for a full fine-tune", default=1e-6),
    ti_lr: float = Input(description="Learning rate of the new tokens' embeddings (textual inversion)", default=3e-4),
    lora_lr: float = Input(description="LoRA learning rate", default=1e-4),
    lora_rank: int = Input(description="LoRA rank", default=32),
    lr_scheduler: str = Input(description="Learning rate schedule", choices=list(LR_SCHEDULERS), default="constant"),
    lr_warmup_steps: int = Input(description="Warmup steps of the linear schedule", default=100),
    token_string: str = Input(description="The word that stands for the trained concept", default="TOK"),
    caption_prefix: str = Input(
        description="Prefix of automatic captions; must contain token_string", default="a photo of TOK, "
    ),
    mask_target_prompts: Optional[str] = Input(
        description="What matters in the images (e.g. 'photo of a dog'): CLIPSeg masks the loss to it", default=None
    ),
    crop_based_on_salience: bool = Input(
        description="Crop around the salient (masked) region; false = around detected faces", default=True
    ),
    use_face_detection_instead: bool = Input(description="Face masks instead of CLIPSeg masks", default=False),
    clipseg_temperature: float = Input(description="Blur of the CLIPSeg mask (0.5 to 1.0 recommended)", default=1.0),
    verbose: bool = Input(description="Log every step", default=True),
    checkpointing_steps: int = Input(description="Steps between checkpoints", default=200),
    input_images_filetype: str = Input(
        description="Archive type of input_images; infer reads it from the content",
        choices=list(FILETYPES),
        default="infer",
    ),
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
    with file_inputs.local_files({"input_images": input_images}, archive_limits) as files:
        if files["input_images"] is None:
            raise InputError("input_images", "is required: give an https:// URL or a data: URI of a .zip or .tar")
        return TrainingOutput(weights=Path(run_training(config, files["input_images"], weights_root)))
