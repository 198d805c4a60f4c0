"""Load a preprocessing model and its processor from the weight folder: offline, once per preprocessing run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sdxl.model import weights
from sdxl.model.device import Placement, choose_placement

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


@dataclass(frozen=True)
class PreprocessModel:
    """A loaded preprocessing model and its processor. A subclass names its weights and its transformers classes
    (imported when it loads, so importing the step costs nothing)."""

    processor: object
    model: object  # a torch.nn.Module in eval mode

    weights_spec: ClassVar[weights.WeightSpec]
    model_class: ClassVar[str]  # a transformers class name
    processor_class: ClassVar[str]

    @classmethod
    def load(cls, models_dir: Path | None = None, placement: Placement | None = None):
        import transformers

        model_cls, processor_cls = getattr(transformers, cls.model_class), getattr(transformers, cls.processor_class)
        return cls(*load(cls.weights_spec, model_cls, processor_cls, models_dir, placement))
