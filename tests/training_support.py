"""Helpers for the training tests: a training folder in the preprocessing contract's format, small configs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl.training.config import TrainingConfig


def make_dataset(folder: Path, n: int = 3, resolution: int = 64, captions: list[str] | None = None) -> Path:
    """`NNNN.src.png` (RGB), `NNNN.mask.png` (L, white = loss counts) and captions.csv, seeded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n * 1000 + resolution)
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        mask = np.zeros((resolution, resolution), dtype=np.uint8)
        mask[resolution // 4 : 3 * resolution // 4, resolution // 4 : 3 * resolution // 4] = 255
        Image.fromarray(image).save(folder / f"{i:04d}.src.png")
        Image.fromarray(mask).save(folder / f"{i:04d}.mask.png")
        caption = captions[i] if captions else f"a photo of TOK, example {i}"
        rows.append((f"{i:04d}.src.png", f"{i:04d}.mask.png", caption))
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image_file", "mask_file", "caption"])
        writer.writerows(rows)
    return folder


def small_config(**overrides) -> TrainingConfig:
    """Tiny, fast, seeded; learning rates high enough that a few steps visibly change the model."""
    values = dict(
        seed=7,
        resolution=64,
        train_batch_size=2,
        max_train_steps=3,
        lora_rank=4,
        lora_lr=1e-2,
        ti_lr=1e-2,
        unet_learning_rate=1e-3,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        checkpointing_steps=2,
        verbose=True,
    )
    values.update(overrides)
    return TrainingConfig(**values)


class Recorder:
    """A step hook that keeps, per step, the learning rates, the loss and a copy of what trains."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.steps, self.lrs, self.losses, self.states = [], [], [], []
        self.trainer = None

    def __call__(self, info) -> None:
        self.trainer = info.trainer
        self.steps.append(info.step)
        self.lrs.append(info.lrs)
        self.losses.append(info.loss)
        self.states.append({k: v.detach().clone() for k, v in info.trainer.trainable_state().items()})
        if info.step == self.fail_at:
            raise RuntimeError(f"injected failure after step {info.step}")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
