"""Pick where the models run and in which precision."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPE_ENV = "SDXL_DTYPE"
CPU_THREADS_ENV = "SDXL_CPU_THREADS"  # torch intra-op threads on CPU; the Cog server's worker runs best on cores - 1
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
        threads = os.environ.get(CPU_THREADS_ENV)
        if threads:
            if not threads.isdigit() or int(threads) < 1:
                raise ValueError(f"{CPU_THREADS_ENV}={threads!r} is not a positive integer")
            torch.set_num_threads(int(threads))
        return Placement(torch.device("cpu"), torch.float32)
    name = os.environ.get(DTYPE_ENV, "fp16")
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV}={name!r} is not one of {sorted(DTYPES)}")
    return Placement(torch.device("cuda"), DTYPES[name])
