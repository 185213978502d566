"""Minibatch sampling shared by the real trainer and the exact minibatch simulation of the linearised
model, so both see the same batches for the same seed (METHOD.md §1, §4).

Each epoch draws a fresh permutation of the N samples from a seeded generator and cuts it into
consecutive batches of B, dropping the last partial batch (N // B steps per epoch). B = N is
full-batch gradient descent (every step sees every sample, in order).
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["batch_schedule", "steps_per_epoch"]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def batch_schedule(n: int, batch_size: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index tensors of length ``batch_size`` (int64), epoch by epoch."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size: must be in 1..{n}, got {batch_size}")
    if batch_size == n:
        full = torch.arange(n)
        for _ in range(steps):
            yield full
        return
    g = torch.Generator().manual_seed(seed)
    per_epoch = steps_per_epoch(n, batch_size)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for j in range(per_epoch):
            if done >= steps:
                return
            yield perm[j * batch_size:(j + 1) * batch_size]
            done += 1
