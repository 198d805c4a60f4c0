"""The tiny preprocessing models: production layout, loadable offline, the same seed writes the same bytes."""

import hashlib

import pytest
import torch

from sdxl.model import weights
from sdxl.model.random_weights.preprocessing import WRITERS


def _hashes(root, folders):
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def _write(root, seed):
    for step in WRITERS:
        torch.manual_seed(seed)
        step(root)
    return _hashes(root, FOLDERS)


FOLDERS = [spec.folder for spec in weights.TRAINING_WEIGHTS]
MODEL_FILES = {f"{folder}/model.safetensors" for folder in FOLDERS}


def test_same_seed_same_bytes_other_seed_other_weights(tiny_weights_dir, tmp_path):
    first = _hashes(tiny_weights_dir, FOLDERS)  # written by write_tiny_weights with its default seed, 0
    again, other = _write(tmp_path / "again", 0), _write(tmp_path / "other", 1)
    assert MODEL_FILES <= set(first)
    assert first == again
    assert {name for name in first if first[name] != other[name]} == MODEL_FILES


def test_tiny_set_has_every_required_file(tiny_weights_dir):
    weights.require(tiny_weights_dir, weights.TRAINING_WEIGHTS)  # raises naming what is missing


def test_required_files_are_checked(tmp_path):
    _write(tmp_path, 0)
    (tmp_path / weights.SEGMENTER.folder / "merges.txt").unlink()
    with pytest.raises(weights.WeightsMissingError, match="clipseg .* missing merges.txt"):
        weights.require(tmp_path, weights.TRAINING_WEIGHTS)


def test_upscaler_is_the_real_world_x4_architecture(tiny_weights_dir):
    from transformers import Swin2SRConfig

    config = Swin2SRConfig.from_pretrained(tiny_weights_dir / weights.UPSCALER.folder, local_files_only=True)
    assert (config.upscale, config.upsampler, config.window_size) == (4, "nearest+conv", 8)
