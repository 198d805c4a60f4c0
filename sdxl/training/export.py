"""Write trained_model.tar atomically: files are staged in a temporary folder, tarred to a temporary name next to
the destination, then renamed. A failure or cancel at any point leaves neither a partial tar nor staging files.

The tar holds regular files only, at its top level:
  lora.safetensors     the UNet LoRA as StableDiffusionXLPipeline.save_lora_weights writes it (keys `unet.`...)
  unet.safetensors     instead of the LoRA, for a full fine-tune: the whole UNet state dict (diffusers names)
  embeddings.pti       safetensors: text_encoders_0 [n_new_tokens, te1 width], text_encoders_1 [n, te2 width]
  special_params.json  the token map, e.g. {"TOK": "<s0><s1>"}
  training_params.json the inputs the run used
and, for other tools and for people (the predictor skips these; see sdxl/training/interop.py and report.py):
  lora_kohya.safetensors       the UNet LoRA in the kohya layout A1111 / Forge / ComfyUI load (LoRA runs)
  embeddings_sdxl.safetensors  the learned tokens as an SDXL embedding file (clip_l, clip_g)
  report/                      loss.png, samples.png, report.json: how the run went (when a report was made)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl.formats import (
    EMBEDDINGS_FILE,
    KOHYA_LORA_FILE,
    LORA_FILE,
    REPORT_DIR,
    SDXL_EMBEDDING_FILE,
    SPECIAL_PARAMS_FILE,
    TRAINED_TAR,
    TRAINING_PARAMS_FILE,
    UNET_FILE,
)
from sdxl.training import interop

log = logging.getLogger(__name__)

TAR_NAME = TRAINED_TAR


@dataclass
class TrainedWeights:
    embeddings: dict[str, torch.Tensor]  # tokens.EMBEDDING_KEYS -> rows
    token_map: dict[str, str]
    training_params: dict
    unet_lora_layers: dict[str, torch.Tensor] | None = None  # LoRA run (diffusers format, no `unet.` prefix)
    unet_state_dict: dict[str, torch.Tensor] | None = None  # full fine-tune
    lora_alpha: float | None = None  # the LoRA's alpha (the kohya file carries it); None: alpha = rank
    report_dir: Path | None = None  # a folder of report files, tarred under report/


def _write_files(staging: Path, trained: TrainedWeights) -> list[str]:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    if (trained.unet_lora_layers is None) == (trained.unet_state_dict is None):
        raise ValueError("exactly one of unet_lora_layers and unet_state_dict must be given")
    if trained.unet_lora_layers is not None:
        StableDiffusionXLPipeline.save_lora_weights(
            staging, unet_lora_layers=trained.unet_lora_layers, weight_name=LORA_FILE, safe_serialization=True
        )
        unet_file = LORA_FILE
        save_file(interop.kohya_lora(trained.unet_lora_layers, _alpha(trained)), staging / KOHYA_LORA_FILE)
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in trained.unet_state_dict.items()}, staging / UNET_FILE)
        unet_file = UNET_FILE
    save_file(trained.embeddings, staging / EMBEDDINGS_FILE)
    (staging / SPECIAL_PARAMS_FILE).write_text(json.dumps(trained.token_map) + "\n")
    (staging / TRAINING_PARAMS_FILE).write_text(json.dumps(trained.training_params, indent=2, sort_keys=True) + "\n")
    save_file(interop.sdxl_embedding(trained.embeddings), staging / SDXL_EMBEDDING_FILE)
    names = [unet_file, EMBEDDINGS_FILE, SPECIAL_PARAMS_FILE, TRAINING_PARAMS_FILE]
    names += [KOHYA_LORA_FILE] if trained.unet_lora_layers is not None else []
    return names + [SDXL_EMBEDDING_FILE] + _stage_report(staging, trained.report_dir)


def _alpha(trained: TrainedWeights) -> float:
    if trained.lora_alpha is not None:
        return trained.lora_alpha
    down = next(v for k, v in trained.unet_lora_layers.items() if "down" in k or "lora_A" in k)
    return float(down.shape[0])


def _stage_report(staging: Path, report_dir: Path | None) -> list[str]:
    """The report's regular files (top level only), copied under report/ in a fixed order."""
    if report_dir is None:
        return []
    (staging / REPORT_DIR).mkdir()
    names = []
    for file in sorted(p for p in Path(report_dir).iterdir() if p.is_file() and not p.is_symlink()):
        shutil.copyfile(file, staging / REPORT_DIR / file.name)
        names.append(f"{REPORT_DIR}/{file.name}")
    return names


def _tar(staging: Path, names: list[str], destination: Path) -> None:
    """Reproducible members: regular files, fixed owner, mode and time."""
    with open(destination, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = (staging / name).stat().st_size
            info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
            with open(staging / name, "rb") as file:
                tar.addfile(info, file)
        tar.close()
        raw.flush()
        os.fsync(raw.fileno())


def write_trained_model_tar(destination: Path, trained: TrainedWeights) -> Path:
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=destination.parent))
    partial = destination.with_name(f".{destination.name}.{staging.name.removeprefix('.staging-')}.partial")
    try:
        names = _write_files(staging, trained)
        _tar(staging, names, partial)
        os.replace(partial, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        partial.unlink(missing_ok=True)
    log.info("wrote %s (%.1f MB): %s", destination, destination.stat().st_size / 1e6, ", ".join(names))
    return destination
