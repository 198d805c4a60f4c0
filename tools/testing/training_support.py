"""Helpers for the training tests: a training folder in the preprocessing contract's format, small configs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl.training.config import TrainingConfig


def make_dataset(folder: Path, n: int = 3, resolution: int = 64, captions: list[str] | None = None) -> Path:
    """`NNNN.src.png` (RGB), `NNNN.mask.png` (L, white = loss counts) and captions.csv, seeded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n * 1000 + resolution)
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        mask = np.zeros((resolution, resolution), dtype=np.uint8)
        mask[resolution // 4 : 3 * resolution // 4, resolution // 4 : 3 * resolution // 4] = 255
        Image.fromarray(image).save(folder / f"{i:04d}.src.png")
        Image.fromarray(mask).save(folder / f"{i:04d}.mask.png")
        caption = captions[i] if captions else f"a photo of TOK, example {i}"
        rows.append((f"{i:04d}.src.png", f"{i:04d}.mask.png", caption))
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image_file", "mask_file", "caption"])
        writer.writerows(rows)
    return folder


RED, BLUE = (230, 40, 40), (30, 60, 220)


def layout_dataset(folder: Path, n: int = 2) -> Path:
    """n noisy copies of one layout (red left half, blue right half), 64 px; captions "a photo of TOK"; no masks."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = np.zeros((64, 64, 3), dtype=np.int64)
        image[:, :32], image[:, 32:] = RED, BLUE
        image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:04d}.src.png")
        rows.append((f"{i:04d}.src.png", "", "a photo of TOK"))
    with open(folder / "captions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image_file", "mask_file", "caption"])
        writer.writerows(rows)
    return folder


def small_config(**overrides) -> TrainingConfig:
    """Tiny, fast, seeded; learning rates high enough that a few steps visibly change the model."""
    values = dict(
        seed=7,
        resolution=64,
        train_batch_size=2,
        max_train_steps=3,
        lora_rank=4,
        lora_lr=1e-2,
        ti_lr=1e-2,
        unet_learning_rate=1e-3,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        checkpointing_steps=2,
        verbose=True,
    )
    values.update(overrides)
    return TrainingConfig(**values)


class Recorder:
    """A step hook that keeps, per step, the learning rates, the loss and a copy of what trains."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.steps, self.lrs, self.losses, self.states = [], [], [], []
        self.trainer = None

    def __call__(self, info) -> None:
        self.trainer = info.trainer
        self.steps.append(info.step)
        self.lrs.append(info.lrs)
        self.losses.append(info.loss)
        self.states.append({k: v.detach().clone() for k, v in info.trainer.trainable_state().items()})
        if info.step == self.fail_at:
            raise RuntimeError(f"injected failure after step {info.step}")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class PredictorLatents:
    """Latents drawn the way the predictor draws them. A trained tar takes the predictor's own weights path: served
    as `replicate_weights` from a loopback server, fetched into the weights cache, checked, its LoRA and tokens
    applied by sdxl.trained and its trained word rewritten in the prompt. The base pipeline then samples what a
    text-to-image request would (64 px, seeds from one CPU generator, empty negative prompt), stopping before the VAE.
    Needs SDXL_ALLOW_LOOPBACK_HTTP=1 while it fetches."""

    def __init__(self, weights_root: Path, cache_dir: Path):
        from sdxl.model.loading import load_pipelines
        from sdxl.trained.trained_weights import TrainedWeights
        from sdxl.trained.weights_cache import WeightsCache
        from tools.testing.file_server import FileServer

        self.pipes = load_pipelines(weights_root)
        self.adapters = TrainedWeights(self.pipes, WeightsCache(cache_dir))
        self.server = FileServer()
        self.served = 0

    def close(self) -> None:
        self.server.close()

    def draw(self, prompt: str, seeds: int, tar: Path | None = None, lora_scale: float = 1.0, **sampling):
        """[seeds, 4, 8, 8] latents for `prompt`, with the trained weights in `tar` (None: the base model)."""
        from sdxl.trained.request import AdapterRequest

        url = None
        if tar is not None:
            self.served += 1
            url = self.server.serve(f"/{self.served}/trained_model.tar", Path(tar).read_bytes())
        with self.adapters.applied(AdapterRequest(replicate_weights=url, lora_scale=lora_scale)) as applied:
            text = applied.rewrite_text(prompt)
            return self._sample(text, seeds, **sampling)  # on this thread, as the loading and the weights

    @torch.inference_mode()
    def _sample(self, prompt: str, seeds: int, steps: int = 10, guidance: float = 7.5) -> torch.Tensor:
        return self.pipes.text2img(
            prompt=[prompt] * seeds,
            negative_prompt=[""] * seeds,
            width=64,
            height=64,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        ).images


def with_random_lora(tar: Path, destination: Path, seed: int = 0) -> Path:
    """A copy of a LoRA run's trained tar whose LoRA points in random directions: every up (lora_B) matrix replaced by
    seeded Gaussian noise of the same Frobenius norm; the tokens and every other file kept. It changes the UNet as much
    as the trained LoRA does, and learned nothing."""
    import io
    import json
    import struct
    import tarfile

    from safetensors.torch import load, save

    from sdxl.formats import LORA_FILE

    generator = torch.Generator().manual_seed(seed)
    with tarfile.open(tar) as source, tarfile.open(destination, "w") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name == LORA_FILE:
                (header_size,) = struct.unpack("<Q", data[:8])
                metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__")
                tensors = load(data)
                for key in [k for k in tensors if "lora_B" in k]:
                    noise = torch.randn(tensors[key].shape, generator=generator)
                    tensors[key] = (noise * tensors[key].norm() / noise.norm()).contiguous()
                data = save(tensors, metadata=metadata)
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return destination
