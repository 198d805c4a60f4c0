"""Pick where the models run, in which precision, and (on CPU) with how many threads.

torch's CPU thread count is a per-thread setting; all model work runs on one thread (sdxl.model.compute), which sets it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPE_ENV = "SDXL_DTYPE"
CPU_THREADS_ENV = "SDXL_CPU_THREADS"  # torch intra-op threads on CPU (default: the usable cores)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    cpu_threads: int = 0  # torch intra-op threads on CPU (default: the usable cores); 0 on CUDA

    def use_cpu_threads(self) -> None:
        """Give the calling thread (the compute thread) the configured CPU threads."""
        if not self.is_cuda and torch.get_num_threads() != self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def choose_placement() -> Placement:
    """CUDA in fp16 by default (the VAE is the fp16-safe one); CPU always in fp32, where half precision is slow."""
    if not torch.cuda.is_available():
        threads = os.environ.get(CPU_THREADS_ENV) or str(len(os.sched_getaffinity(0)))
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"{CPU_THREADS_ENV}={threads!r} is not a positive integer")
        return Placement(torch.device("cpu"), torch.float32, cpu_threads=int(threads))
    name = os.environ.get(DTYPE_ENV, "fp16")
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV}={name!r} is not one of {sorted(DTYPES)}")
    return Placement(torch.device("cuda"), DTYPES[name])
