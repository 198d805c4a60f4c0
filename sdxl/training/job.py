"""A whole training from the client's upload: preprocess the archive, train, hand back trained_model.tar.

The Cog trainer (train.py) and the Kubernetes Job (deploy/train_job.py) run `train_from_archive`; it trains through
`launch.train_folder`, the same path `python -m sdxl.training` takes on a preprocessed folder. Scratch files (the
training set, the run folder) live in a private temporary folder removed in every case; the tar is written in its own
folder, only once complete. No checkpoints are written: the scratch folder does not outlive the training, so nothing
could resume from them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

from sdxl.formats import TRAINED_TAR
from sdxl.guard.private_dirs import private_dir
from sdxl.preprocess.config import DatasetInputs
from sdxl.training.config import TrainingConfig
from sdxl.training.launch import TrainingRun, train_folder, visible_gpus

log = logging.getLogger(__name__)

RESULTS_DIR = "sdxl-trained-models"  # under the temporary folder: the latest training's trained_model.tar


def fresh_result_dir() -> Path:
    """A private folder for this training's tar. The caller reads the tar after the training returns, so it cannot be
    removed here; the previous training's folder is removed instead (trainings run one at a time)."""
    # A fixed name under a shared folder: created 0700 and checked (ours, not a symlink) before it is cleaned.
    parent = private_dir(Path(tempfile.gettempdir()) / RESULTS_DIR, "TMPDIR")
    for previous in parent.iterdir():
        shutil.rmtree(previous, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=parent))


def preprocess_options(config: TrainingConfig) -> dict:
    """The preprocessing's inputs: the config's DatasetInputs, already checked (preprocess() names the file type
    `filetype`)."""
    options = {f.name: getattr(config, f.name) for f in fields(DatasetInputs)}
    options["filetype"] = options.pop("input_images_filetype")
    return options


def train_from_archive(config: TrainingConfig, input_images: Path, weights_root: Path) -> Path:
    """1. preprocess the archive, 2. train (data-parallel over every visible GPU), 3. hand back the tar's path."""
    from sdxl.preprocess import preprocess  # archive extraction, upscaling, captions, masks, crops: loaded when used

    config = config.with_seed()
    result_dir = fresh_result_dir()
    work = Path(tempfile.mkdtemp(prefix="sdxl-training-"))  # dataset and run folder: removed in every case
    try:
        dataset = preprocess(input_images, work / "dataset", **preprocess_options(config), models_dir=weights_root)
        tar_path = result_dir / TRAINED_TAR
        run = TrainingRun(config, dataset, weights_root, work / "run", tar_path, write_checkpoints=False)
        train_folder(run, visible_gpus())
        log.info("%s ready: %s", TRAINED_TAR, tar_path)
        return tar_path
    except BaseException:
        shutil.rmtree(result_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
