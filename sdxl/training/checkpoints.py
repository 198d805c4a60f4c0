"""Checkpoints a restarted run resumes from: `OUTPUT/checkpoints/checkpoint-STEP/`, written by accelerator.save_state.

Only what trains is stored (LoRA or UNet parameters that require grad, the new tokens' rows), not the frozen base:
accelerate's own model files are replaced by `trainable.safetensors` through its save/load pre-hooks. The optimizer
and lr scheduler states come from accelerate. A checkpoint is written under a `.partial` name and renamed when
complete, so a run killed while saving never resumes from half a checkpoint; only the newest one is kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"  # {"step", "num_processes", "config"}
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def latest(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    folder = checkpoints_dir(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def register_hooks(
    accelerator,
    get_trainable: Callable[[], dict[str, torch.Tensor]],
    set_trainable: Callable[[dict[str, torch.Tensor]], None],
) -> None:
    """Make save_state/load_state store the trainable tensors instead of whole prepared models."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in get_trainable().items()},
                Path(output_dir) / TRAINABLE_FILE,
            )
        weights.clear()  # accelerate would otherwise write every prepared model in full

    def load_hook(models, input_dir):
        set_trainable(load_file(Path(input_dir) / TRAINABLE_FILE))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save(accelerator, output_dir: Path, step: int, state: dict) -> Path:
    """Every process calls this; the main one publishes the checkpoint and drops older ones."""
    # Not accelerate's ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=1): it names folders by a
    # save counter (checkpoint_<n>, not the step that resuming reads), writes in place (a run killed while saving
    # leaves a half checkpoint that looks complete), and deletes the old checkpoint before the new one is written.
    folder = checkpoints_dir(output_dir)
    final = folder / f"checkpoint-{step}"
    partial = folder / f"checkpoint-{step}.partial"
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for older in folder.glob("checkpoint-*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
        log.info("checkpoint at step %d: %s", step, final)
    accelerator.wait_for_everyone()
    return final


def remove_partial(output_dir: Path) -> None:
    """Left by a run killed while saving; never resumed from."""
    for partial in checkpoints_dir(output_dir).glob("checkpoint-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def remove_all(output_dir: Path) -> None:
    shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)
