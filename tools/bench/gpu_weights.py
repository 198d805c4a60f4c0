"""Random full-size SDXL weights for the GPU benchmark, written as fast as the machine allows.

The modules are built by the library's own writer (sdxl.model.random_weights, the production layout) with torch's default
device set to the GPU, so their random initialisation runs there in milliseconds instead of minutes on the CPU;
each is saved in fp16 straight from the GPU. Every row loads as the server does (base, refiner and checker), so the
whole set is written, once per machine: a second run with the same --weights-dir reuses it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from sdxl.model import weights
from sdxl.model.random_weights import write_random_weights
from sdxl.model.random_weights.architectures import ARCHITECTURES

log = logging.getLogger("benchmark")


def _folder_gib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30


def _already_written(folder: Path, arch_name: str) -> bool:
    marker = folder / weights.RANDOM_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("architecture") == arch_name


def _write(folder: Path, arch_name: str, device: torch.device) -> str:
    """Build on `device` (the GPU: fast init), falling back to the CPU if that fails; returns where it was built."""
    arch, dtype = ARCHITECTURES[arch_name], torch.float16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        write_random_weights(folder, arch, dtype=dtype)
        return "cpu"
    try:
        with torch.device(device):
            write_random_weights(folder, arch, dtype=dtype)
        return str(device)
    except Exception as error:  # noqa: BLE001 - the CPU build is slower but the same files
        log.warning("building the random weights on %s failed (%s); building on the CPU", device, error)
        write_random_weights(folder, arch, dtype=dtype)
        return f"cpu, after the GPU build failed: {type(error).__name__}: {error}"[:160]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def ensure_random_weights(folder: Path, arch_name: str, device: torch.device) -> dict:
    """The weights in `folder` (written unless already there for `arch_name`) and facts about writing them."""
    folder.mkdir(parents=True, exist_ok=True)
    if _already_written(folder, arch_name):
        return {"write_weights_s": 0.0, "weights_built_on": "reused", "weights_gib": _folder_gib(folder)}
    started = time.perf_counter()
    built_on = _write(folder, arch_name, device)
    seconds = time.perf_counter() - started
    gib = _folder_gib(folder)
    log.info(
        "random %s weights: %.2f GiB written in %.1f s (%.2f GiB/s, built on %s)",
        arch_name,
        gib,
        seconds,
        gib / seconds,
        built_on,
    )
    return {"write_weights_s": seconds, "weights_built_on": built_on, "weights_gib": gib}
