"""Minibatch sampling shared by the real trainer and the exact minibatch simulation of the linearised
model, so both see the same batches for the same seed (METHOD.md §1, §4).

Each epoch draws a fresh permutation of the N samples from a seeded generator and cuts it into
consecutive batches of B, dropping the last partial batch (N // B steps per epoch). The trainer
treats B = N as full-batch gradient descent and does not sample at all.
"""
from __future__ import annotations

import torch

__all__ = ["batch_schedule", "steps_per_epoch"]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def batch_schedule(n: int, batch_size: int, steps: int, seed: int = 0) -> torch.Tensor:
    """Indices of every step's minibatch, ``(steps, batch_size)`` int64: per epoch ``torch.randperm(n)``
    from one CPU ``torch.Generator`` seeded with ``seed``, consecutive chunks of ``batch_size``, the last
    partial chunk dropped (``n // batch_size`` steps per epoch)."""
    n, b, steps = int(n), int(batch_size), int(steps)
    if b < 1 or b > n:
        raise ValueError(f"batch_size: must be in 1..{n}, got {b}")
    per_epoch = steps_per_epoch(n, b)
    g = torch.Generator().manual_seed(int(seed))
    epochs = -(-steps // per_epoch) if steps > 0 else 0
    chunks = [torch.randperm(n, generator=g)[: per_epoch * b].view(per_epoch, b) for _ in range(epochs)]
    if not chunks:
        return torch.empty(0, b, dtype=torch.int64)
    return torch.cat(chunks)[:steps]
