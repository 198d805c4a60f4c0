"""The download script's offline parts: checksum verification, pickle-to-safetensors conversion, the dry run."""

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("download_weights", ROOT / "scripts" / "download_weights.py")
download_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download_weights)


def test_verify_names_files_that_differ_or_are_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    assert download_weights.verify(tmp_path, {"unet/w.safetensors": good}) == []
    assert download_weights.verify(tmp_path, {"unet/w.safetensors": "0" * 64}) == ["unet/w.safetensors"]
    assert download_weights.verify(tmp_path, {"gone.bin": good}) == ["gone.bin"]


def test_pickled_checkpoint_becomes_safetensors(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    download_weights.convert_pickle_to_safetensors(tmp_path)
    assert not (tmp_path / "pytorch_model.bin").exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_dry_run_lists_pinned_revisions_without_network(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "download_weights.py"), "--dry-run", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "stabilityai/stable-diffusion-xl-base-1.0@462165984030d82259a11f4367a4eed129e94a7b" in out
    assert "madebyollin/sdxl-vae-fp16-fix" in out and "safety-checker" in out


def test_a_sha256_pinned_in_the_registry_is_checked_even_where_the_hub_lists_none(tmp_path, monkeypatch):
    """The hub is stood in for (no network here): its snapshot writes the file, its metadata lists no sha256."""
    import dataclasses

    import huggingface_hub

    from sdxl import weights

    name = weights.FACE_DETECTOR.required_files[0]

    def snapshot(repo_id, revision, allow_patterns, local_dir, max_workers):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / name).write_bytes(b"not the published model")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(download_weights, "expected_hashes", lambda spec: {})
    with pytest.raises(SystemExit, match=f"checksum mismatch for {name}"):
        download_weights.download(weights.FACE_DETECTOR, tmp_path)
    matching = dataclasses.replace(
        weights.FACE_DETECTOR, sha256=((name, hashlib.sha256(b"not the published model").hexdigest()),)
    )
    download_weights.download(matching, tmp_path / "other")  # the same bytes pass when they are what is pinned
