"""Seeded, randomly initialised models saved in the production weight layout, so every production code path runs
without a download. They draw noise: only the shapes and the code paths are real.

  architectures  SDXL-shaped configurations at three sizes: tiny (tests, scripts/run.sh), mid (CPU benchmarks),
                 full (SDXL 1.0's own shapes, for GPU benchmarks)
  pipeline       the prediction models at any of those sizes: base, VAE, refiner, safety checker, CLIP tokenizers
  preprocessing  tiny stand-ins for the trainer's preprocessing models (Swin2SR, BLIP, CLIPSeg)
  control        tiny ControlNets (canny, depth; their zero convolutions randomised) and a tiny Depth Anything
  optional       the optional prediction models: the 9-channel inpainting UNet, the IP-Adapter and its image encoder

`write_tiny_weights` writes the whole tiny set; `write_random_weights` the prediction models at a chosen size.
The same seed writes the same bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdxl.model.random_weights.architectures import TINY
from sdxl.model.random_weights.control import write_controlnets, write_depth_estimator
from sdxl.model.random_weights.optional import WRITERS as OPTIONAL_WRITERS
from sdxl.model.random_weights.pipeline import SEED, write_random_weights
from sdxl.model.random_weights.preprocessing import WRITERS as PREPROCESSING_WRITERS

__all__ = ["SEED", "write_random_weights", "write_tiny_weights"]

log = logging.getLogger(__name__)


def write_tiny_weights(root: Path, seed: int = SEED) -> Path:
    """Write the whole tiny set (prediction, ControlNet, inpainting UNet, IP-Adapter and preprocessing models) under
    `root`; the same seed, the same bytes."""
    root = write_random_weights(root, TINY, seed)
    for step in [*PREPROCESSING_WRITERS, write_depth_estimator, *OPTIONAL_WRITERS]:
        torch.manual_seed(seed)
        step(root)
    write_controlnets(root, seed)
    log.info("tiny weights written to %s", root)
    return root
