"""Run a training on a preprocessed folder, in this process or in several data-parallel ones (`accelerate launch`
over `python -m sdxl.training`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, fields, replace
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


@dataclass(frozen=True)
class TrainingRun:
    """One training on a preprocessed folder: its inputs, where it reads and writes, and its checkpoints' fate."""

    config: TrainingConfig
    dataset_dir: Path
    weights_root: Path
    output_dir: Path  # checkpoints, and the tar unless tar_path says otherwise
    tar_path: Path | None = None
    keep_checkpoints: bool = False  # after a success
    write_checkpoints: bool = True  # False when output_dir does not outlive the run: nothing could resume from them

    def arguments(self) -> list[str]:
        """`python -m sdxl.training` options for this run; the seed must be concrete so every process agrees."""
        if self.config.seed is None:
            raise ValueError("resolve the seed (config.with_seed()) before launching processes")
        arguments = ["--dataset", str(self.dataset_dir), "--output-dir", str(self.output_dir)]
        arguments += ["--weights", str(self.weights_root)]
        arguments += ["--tar", str(self.tar_path)] if self.tar_path is not None else []
        arguments += ["--keep-checkpoints"] if self.keep_checkpoints else []
        arguments += [] if self.write_checkpoints else ["--no-checkpoints"]
        for f in fields(self.config):
            value = getattr(self.config, f.name)
            arguments += [f"--{f.name}", "none" if value is None else str(value)]
        return arguments


def run_processes(run: TrainingRun, num_processes: int, timeout: float | None = None) -> None:
    """Train in `num_processes` processes; raise if any of them fails."""
    run = replace(run, config=run.config.with_seed())
    command = accelerate_command(num_processes) + ["-m", "sdxl.training", *run.arguments()]
    log.info("launching %d training processes: %s", num_processes, " ".join(command))
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    completed = subprocess.run(command, timeout=timeout, check=False, env={**os.environ, "PYTHONPATH": path})
    if completed.returncode:
        raise RuntimeError(f"the {num_processes}-process training failed with exit status {completed.returncode}")


def visible_gpus() -> int:
    """The data-parallel processes a served training uses: one per visible GPU (one process on a CPU)."""
    import torch

    return max(1, torch.cuda.device_count())


def train_folder(run: TrainingRun, num_processes: int = 1) -> None:
    """Train on a preprocessed folder: here, or in `num_processes` data-parallel processes launched through
    accelerate (unless this process already is one of them)."""
    if num_processes > 1 and "LOCAL_RANK" not in os.environ:
        run_processes(run, num_processes)
        return
    from sdxl.training.loop import train  # torch, diffusers, peft: loaded when a process trains

    checkpointing = dict(keep_checkpoints=run.keep_checkpoints, write_checkpoints=run.write_checkpoints)
    train(run.config, run.dataset_dir, run.weights_root, run.output_dir, tar_path=run.tar_path, **checkpointing)
