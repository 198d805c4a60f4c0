"""trained_model.tar is written atomically, and progress lines follow `verbose`."""

import logging
import tarfile

import pytest
import torch

from sdxl.training import export
from sdxl.training.export import TrainedWeights, write_trained_model_tar
from sdxl.training.progress import Progress
from tools.testing.training_support import files_under


def _weights(**unet) -> TrainedWeights:
    return TrainedWeights(
        embeddings={"text_encoders_0": torch.ones(2, 32), "text_encoders_1": torch.ones(2, 48)},
        token_map={"TOK": "<s0><s1>"},
        training_params={"seed": 1},
        **unet,
    )


def test_full_fine_tune_tar_members_are_plain_files(tmp_path):
    tar_path = write_trained_model_tar(
        tmp_path / "trained_model.tar", _weights(unet_state_dict={"a.weight": torch.ones(3)})
    )
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "unet.safetensors",
        "embeddings.pti",
        "special_params.json",
        "training_params.json",
        "embeddings_sdxl.safetensors",  # the tokens for other tools (sdxl/training/interop.py)
    ]
    assert all(m.isreg() and m.mode == 0o644 and m.uid == 0 and m.mtime == 0 for m in members)
    assert files_under(tmp_path) == ["trained_model.tar"]


def test_exactly_one_unet_part_required(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        write_trained_model_tar(tmp_path / "t.tar", _weights())
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_export_leaves_nothing_and_keeps_an_older_tar(tmp_path, monkeypatch, interruption):
    destination = tmp_path / "trained_model.tar"
    destination.write_bytes(b"the previous complete tar")

    def interrupted(staging, names, partial):
        partial.write_bytes(b"half")
        raise interruption("stopped while tarring")

    monkeypatch.setattr(export, "_tar", interrupted)
    with pytest.raises(interruption):
        write_trained_model_tar(destination, _weights(unet_state_dict={"a.weight": torch.ones(3)}))
    assert files_under(tmp_path) == ["trained_model.tar"]
    assert destination.read_bytes() == b"the previous complete tar"


@pytest.mark.parametrize("verbose, lines", [(True, 100), (False, 10)])
def test_progress_lines_follow_verbose(caplog, verbose, lines):
    caplog.set_level(logging.INFO, logger="sdxl.training.progress")
    progress = Progress(total=100, start=0, verbose=verbose)
    for done in range(1, 101):
        progress.update(done, 0.5, [1e-4])
    assert len(caplog.records) == lines
    last = caplog.records[-1].getMessage()
    assert last.startswith("step 100/100 | loss 0.50000 | lr 1.00e-04 |") and "steps/s | ETA 0:00:00" in last
