"""Load a preprocessing model and its processor from the weight folder: offline, once per preprocessing run."""

from __future__ import annotations

import logging
from pathlib import Path

from sdxl import weights
from sdxl.device import Placement, choose_placement

log = logging.getLogger(__name__)


def load(spec: weights.WeightSpec, model_cls, processor_cls, models_dir: Path | None, placement: Placement | None):
    """(processor, model in eval mode on the placement). A missing or incomplete folder fails naming what is missing
    and the command that fetches it; nothing is ever downloaded here."""
    root = Path(models_dir or weights.weights_dir())
    weights.require(root, (spec,))
    folder = root / spec.folder
    placement = placement or choose_placement()
    processor = processor_cls.from_pretrained(folder, local_files_only=True)
    model = model_cls.from_pretrained(folder, local_files_only=True, dtype=placement.dtype)
    model = model.to(placement.device).eval()
    log.info(
        "loaded %s from %s (%s params, %s, %s)",
        spec.name,
        folder,
        f"{model.num_parameters():,}",
        placement.device,
        placement.dtype,
    )
    return processor, model
