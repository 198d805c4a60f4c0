"""Run a training on a preprocessed folder, in this process or in several data-parallel ones (`accelerate launch`
over `python -m sdxl.training`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from sdxl.training.config import TrainingConfig

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `sdxl/`, importable by every process


def accelerate_command(num_processes: int) -> list[str]:
    """accelerate's torchrun launcher (`--multi_gpu`); on a CPU-only machine the processes use gloo."""
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"),
        *("--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no"),
        *("--mixed_precision", "no"),  # silences a warning only: the Accelerator picks its own precision
    ]


def training_arguments(
    config: TrainingConfig, dataset_dir: Path, weights_root: Path, output_dir: Path, tar_path: Path | None = None
) -> list[str]:
    """`python -m sdxl.training` options for this run; the seed must be concrete so every process agrees."""
    if config.seed is None:
        raise ValueError("resolve the seed (config.with_seed()) before launching processes")
    arguments = ["--dataset", str(dataset_dir), "--output-dir", str(output_dir), "--weights", str(weights_root)]
    if tar_path is not None:
        arguments += ["--tar", str(tar_path)]
    for f in fields(config):
        value = getattr(config, f.name)
        arguments += [f"--{f.name}", "none" if value is None else str(value)]
    return arguments


def run_processes(
    config: TrainingConfig,
    dataset_dir: Path,
    weights_root: Path,
    output_dir: Path,
    num_processes: int,
    tar_path: Path | None = None,
    timeout: float | None = None,
    keep_checkpoints: bool = False,
    write_checkpoints: bool = True,
) -> None:
    """Train in `num_processes` processes; raise if any of them fails."""
    command = accelerate_command(num_processes) + ["-m", "sdxl.training"]
    command += training_arguments(config.with_seed(), dataset_dir, weights_root, output_dir, tar_path)
    command += ["--keep-checkpoints"] if keep_checkpoints else []
    command += [] if write_checkpoints else ["--no-checkpoints"]
    log.info("launching %d training processes: %s", num_processes, " ".join(command))
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    completed = subprocess.run(command, timeout=timeout, check=False, env={**os.environ, "PYTHONPATH": path})
    if completed.returncode:
        raise RuntimeError(f"the {num_processes}-process training failed with exit status {completed.returncode}")


def visible_gpus() -> int:
    """The data-parallel processes a served training uses: one per visible GPU (one process on a CPU)."""
    import torch

    return max(1, torch.cuda.device_count())


def train_folder(
    config: TrainingConfig,
    dataset_dir: Path,
    weights_root: Path,
    output_dir: Path,
    num_processes: int = 1,
    tar_path: Path | None = None,
    *,
    keep_checkpoints: bool = False,
    write_checkpoints: bool = True,
) -> None:
    """Train on a preprocessed folder: here, or in `num_processes` data-parallel processes launched through
    accelerate (unless this process already is one of them)."""
    checkpointing = dict(keep_checkpoints=keep_checkpoints, write_checkpoints=write_checkpoints)
    if num_processes > 1 and "LOCAL_RANK" not in os.environ:
        run_processes(config, dataset_dir, weights_root, output_dir, num_processes, tar_path, **checkpointing)
        return
    from sdxl.training.loop import train  # torch, diffusers, peft: loaded when a process trains

    train(config, dataset_dir, weights_root, output_dir, tar_path=tar_path, **checkpointing)
