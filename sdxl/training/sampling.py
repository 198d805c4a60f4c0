"""Which examples and which noise each step uses, as pure functions of (seed, step, process).

Nothing depends on a global random state, so a run resumed from a checkpoint draws exactly what the uninterrupted
run would have drawn, and every process of a data-parallel run takes its own slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import math

import torch


def _derived_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded from `parts` (e.g. seed, "noise", step, process)."""
    return torch.Generator().manual_seed(_derived_seed(*parts))


def per_process_batch(train_batch_size: int, n_examples: int, num_processes: int) -> int:
    """train_batch_size, or fewer when the images cannot fill a batch on every process."""
    return max(1, min(train_batch_size, math.ceil(n_examples / num_processes)))


def steps_per_epoch(n_examples: int, batch: int, num_processes: int) -> int:
    return math.ceil(n_examples / (batch * num_processes))


def batch_indices(seed: int, step: int, n_examples: int, batch: int, num_processes: int, process: int) -> torch.Tensor:
    """This process's example indices for `step` (0-based): epochs are seeded permutations; the last batch of an
    epoch wraps around to its start so every batch is full."""
    per_epoch = steps_per_epoch(n_examples, batch, num_processes)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=generator(seed, "epoch", epoch))
    first = position * batch * num_processes + process * batch
    return order[torch.arange(first, first + batch) % n_examples]
