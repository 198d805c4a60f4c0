"""What a training will hold in memory, estimated before any model is loaded, and the caps on it.

The estimate counts what is certain to be allocated (model weights in training precision, gradients and AdamW
states of what trains, the cached latents, masks and text embeddings, one batch of pixels being encoded), not the
activations, so it is a lower bound: a training it refuses could not have finished, and one it lets through fails
late only on activations. Model sizes are read from the safetensors headers (no tensor is loaded).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sdxl import settings
from sdxl.errors import InputError
from sdxl.model import weights

log = logging.getLogger(__name__)

MEMORY_ENV = "SDXL_TRAINING_MEMORY_BYTES"  # overrides the detected free memory of the training device
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # as the trainer's LoRA
ENCODE_CHUNK = 4  # images the VAE encodes at once when latents are cached
FP32 = 4
ADAMW_STATE = 2 * FP32  # exp_avg and exp_avg_sq per trained parameter
TEXT_TOKENS, TEXT_WIDTH, POOLED_WIDTH = 77, 768 + 1280, 1280  # SDXL's concatenated text embeddings
GIB = 1 << 30


# --- model sizes from the safetensors headers ---------------------------------------------------------------------


def _header(path: Path) -> dict:
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header


def _shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over the folder's safetensors files (the fp16 variant when there is one)."""
    files = sorted(folder.glob("*.safetensors"))
    variant = [f for f in files if ".fp16." in f.name]
    shapes = {}
    for path in variant or files:
        shapes.update({name: info["shape"] for name, info in _header(path).items()})
    return shapes


def _numel(shape: list[int]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


@dataclass(frozen=True)
class ModelSizes:
    unet: int  # parameters
    text_encoders: int
    vae: int
    lora_per_rank: int  # LoRA parameters per unit of rank on the trainer's target layers
    token_embeddings: int  # both encoders' token-embedding matrices (textual inversion trains rows of these)

    @classmethod
    def read(cls, root: Path) -> ModelSizes:
        base = Path(root) / weights.BASE.folder
        unet = _shapes(base / "unet")
        encoders = {
            **_shapes(base / "text_encoder"),
            **{f"2.{k}": v for k, v in _shapes(base / "text_encoder_2").items()},
        }
        lora = sum(
            shape[0] + shape[1]
            for name, shape in unet.items()
            if len(shape) == 2 and any(name.endswith(f".{target}.weight") for target in LORA_TARGETS)
        )
        embeddings = sum(_numel(s) for name, s in encoders.items() if name.endswith("token_embedding.weight"))
        return cls(
            unet=sum(map(_numel, unet.values())),
            text_encoders=sum(map(_numel, encoders.values())),
            vae=sum(map(_numel, _shapes(Path(root) / weights.VAE.folder).values())),
            lora_per_rank=lora,
            token_embeddings=embeddings,
        )


# --- the estimate ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    training_state: int  # gradients and optimizer states of what trains
    caches: int  # latents, loss masks, text embeddings of every image
    encoding: int  # one chunk of pixels on its way through the VAE

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.caches + self.encoding

    def describe(self) -> str:
        parts = (("weights", self.weights), ("gradients and optimizer", self.training_state),
                 ("per-image caches", self.caches), ("encoding", self.encoding))  # fmt: skip
        return ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in parts)


def estimate(config, n_images: int, sizes: ModelSizes, half_precision_unet: bool = False) -> MemoryEstimate:
    """`config` is a TrainingConfig. `half_precision_unet`: a LoRA on CUDA keeps the frozen UNet in 16 bits."""
    unet_bytes = 2 if half_precision_unet and config.is_lora else FP32
    trained = sizes.lora_per_rank * config.lora_rank if config.is_lora else sizes.unet
    state = trained * (FP32 + ADAMW_STATE) + (trained * FP32 if config.is_lora else 0)  # LoRA weights are new
    if config.trains_text_encoders:
        state += sizes.token_embeddings * (FP32 + ADAMW_STATE)
    cells = (config.resolution // 8) ** 2
    per_image = cells * 4 * FP32 * 2 + cells * FP32  # latent mean and std (4 channels), pooled mask
    if not config.trains_text_encoders:
        per_image += (TEXT_TOKENS * TEXT_WIDTH + POOLED_WIDTH) * FP32
    return MemoryEstimate(
        weights=sizes.unet * unet_bytes + (sizes.text_encoders + sizes.vae) * FP32,
        training_state=state,
        caches=n_images * per_image,
        encoding=min(n_images, ENCODE_CHUNK) * 3 * config.resolution**2 * FP32,
    )


def _free_host_memory() -> int:
    with open("/proc/meminfo") as file:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in file}
    return info["MemAvailable"]


def available_memory(device) -> tuple[int, str]:
    """(bytes, where the number comes from) for the training device."""
    if os.environ.get(MEMORY_ENV, "").strip():
        return settings.positive_int(MEMORY_ENV, 0), f"setting {MEMORY_ENV}"
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0], f"free memory of {device}"
    return _free_host_memory(), "available host memory"


def check(config, n_images: int, weights_root: Path, device, half_precision_unet: bool = False) -> MemoryEstimate:
    """Refuse, naming the inputs, a training whose certain memory exceeds what the device has free."""
    needed = estimate(config, n_images, ModelSizes.read(weights_root), half_precision_unet)
    have, source = available_memory(device)
    log.info("memory: the training needs at least %.2f GiB (%s); %.2f GiB available (%s)",
             needed.total / GIB, needed.describe(), have / GIB, source)  # fmt: skip
    if needed.total > have:
        what = f"a LoRA of rank {config.lora_rank}" if config.is_lora else "a full UNet fine-tune (is_lora=false)"
        raise InputError(
            "input_images",
            f"{n_images} images at resolution {config.resolution} for {what} need at least"
            f" {needed.total / GIB:.2f} GiB ({needed.describe()}), but {have / GIB:.2f} GiB are available"
            f" ({source}); use fewer images, a lower resolution"
            + (", a lower lora_rank" if config.is_lora else " or is_lora=true"),
        )
    return needed
