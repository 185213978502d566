"""Seeds derived from one user seed and a few tags, identical on every platform and run.

The random parts of the kernel sketch (METHOD.md §6) draw from them: the projections of
:mod:`ttp_ray.kernel.projections` and the class probes of :mod:`ttp_ray.kernel.gradients`, so that a
sketch is reproducible from its options alone.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["sub_seed", "cpu_generator"]


def sub_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed derived from ``seed`` and tags, identical on every platform and run."""
    h = hashlib.sha256(repr((int(seed),) + tuple(tags)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def cpu_generator(seed: int, *tags: Any) -> torch.Generator:
    """A CPU generator seeded with :func:`sub_seed` of ``seed`` and ``tags``."""
    return torch.Generator(device="cpu").manual_seed(sub_seed(seed, *tags))

