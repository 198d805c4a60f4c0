"""Pick where the models run and in which precision."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPE_ENV = "SDXL_DTYPE"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def choose_placement() -> Placement:
    """CUDA in fp16 by default (the VAE is the fp16-safe one); CPU always in fp32, where half precision is slow."""
    if not torch.cuda.is_available():
        return Placement(torch.device("cpu"), torch.float32)
    name = os.environ.get(DTYPE_ENV, "fp16")
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV}={name!r} is not one of {sorted(DTYPES)}")
    return Placement(torch.device("cuda"), DTYPES[name])
