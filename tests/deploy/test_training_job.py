"""deploy/train_job.py, the command of the Kubernetes training Job, run as the Job runs it (tiny weights, CPU)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
from PIL import Image

from tools.testing.cog_server import ROOT

CONTRACT_FILES = ["lora.safetensors", "embeddings.pti", "special_params.json", "training_params.json"]
TINY = dict(resolution=64, max_train_steps=1, lora_rank=2, train_batch_size=1, seed=1)


def write_zip(path, n: int = 2, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(f"photos/{i}.png", png.getvalue())


def run_job(tmp_path, weights_dir, config: dict) -> subprocess.CompletedProcess:
    (tmp_path / "training.json").write_text(json.dumps(config))
    command = [sys.executable, "deploy/train_job.py", "--input-images", str(tmp_path / "input_images.zip")]
    command += ["--config", str(tmp_path / "training.json"), "--output", str(tmp_path / "out" / "trained_model.tar")]
    env = {**os.environ, "SDXL_WEIGHTS_DIR": str(weights_dir), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_job_writes_the_tar_to_the_volume_and_leaves_no_scratch(tiny_weights_dir, tmp_path):
    write_zip(tmp_path / "input_images.zip")
    started = time.monotonic()
    done = run_job(tmp_path, tiny_weights_dir, TINY)
    elapsed = time.monotonic() - started  # measured: 47 s here (torch import, preprocessing, 1 step)
    assert done.returncode == 0, done.stderr[-3000:]
    with tarfile.open(tmp_path / "out" / "trained_model.tar") as tar:
        assert (
            tar.getnames()[: len(CONTRACT_FILES)] == CONTRACT_FILES
        )  # the contract's files first; then files for other tools
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["trained_model.tar"]  # no .part left
    assert [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()] == []  # scratch and the result folder removed
    assert elapsed < 300


def test_a_bad_config_fails_before_any_work_naming_the_field(tiny_weights_dir, tmp_path):
    write_zip(tmp_path / "input_images.zip")
    done = run_job(tmp_path, tiny_weights_dir, {**TINY, "resolution": 500})
    assert done.returncode == 2
    assert "resolution" in done.stderr
    assert not (tmp_path / "out").exists()
