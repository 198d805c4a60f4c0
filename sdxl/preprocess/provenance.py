"""Where each training image and its caption and mask came from: written by preprocessing, read by the training report.

Written beside captions.csv as `provenance.json` ({"images": {"0000.src.png": {...}}}); the training engine does not
need it (the folder contract is captions.csv and the images), so a folder without it still trains.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
MAX_PROVENANCE_BYTES = 4 << 20


def mask_kinds(use_faces: bool, target_prompt: str | None, masks) -> list[str]:
    """What each image's loss mask is: a face mask (or uniform when no face was found), CLIPSeg, or uniform."""
    if use_faces:
        return ["faces" if m.getextrema()[0] < 255 else "uniform (no face found)" for m in masks]
    if target_prompt:
        return [f"clipseg: {target_prompt!r}"] * len(masks)
    return ["uniform"] * len(masks)


def write_provenance(out_dir: Path, source_names: list[str], given_captions: list, masks: list[str]) -> None:
    images = {
        f"{index:04d}.src.png": {
            "source_file": name,
            "caption_source": "caption.csv" if given is not None else "BLIP",
            "mask": mask,
        }
        for index, (name, given, mask) in enumerate(zip(source_names, given_captions, masks, strict=True))
    }
    (Path(out_dir) / PROVENANCE_FILE).write_text(json.dumps({"images": images}, indent=2) + "\n")


def read_provenance(dataset_dir: Path) -> dict[str, dict]:
    """image file -> its provenance; empty when the folder has none (or an unreadable one)."""
    path = Path(dataset_dir) / PROVENANCE_FILE
    try:
        if not path.is_file() or path.stat().st_size > MAX_PROVENANCE_BYTES:
            return {}
        images = json.loads(path.read_text(encoding="utf-8")).get("images", {})
        return {str(k): v for k, v in images.items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError) as error:
        log.warning("report: %s is unreadable (%s); captions' sources are left out", path, error)
        return {}
