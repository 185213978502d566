"""The projections of a kernel sketch (METHOD.md §6): each maps the flattened per-sample gradients of one
parameter tensor at a time into the k columns of ``Z``, so that ``E[Z Z^T] = J J^T`` and no ``D x k``
matrix is ever formed. :data:`PROJECTION_CLASSES` maps each name of
:data:`~ttp_ray.kernel.options.PROJECTIONS` to its class:

* ``countsketch`` (:class:`CountSketch`): each coordinate of each parameter tensor hashed to one of k
  buckets with a random sign (unit scale: ``E[Z Z^T] = J J^T``); O(D) state, O(rows * D) work whatever k;
* ``subset`` (:class:`CoordinateSubset`): k coordinates drawn without replacement, split over the
  parameter tensors in proportion to their size, each rescaled by ``sqrt(d_t / k_t)``; ``k >= D`` gives
  J itself;
* ``gaussian`` (:class:`GaussianBlocks`): dense N(0, 1/k) projection regenerated from the seed in
  ``k x chunk`` blocks on every batch (O(rows * D * k) work: the textbook reference, slow).

Before any of them, :func:`input_side_projection` may reduce a single-position weight's per-sample gradient
``delta a^T`` to ``delta (R a)^T`` (``KernelOptions.outer_width``; METHOD.md §6).

The random draws come from :mod:`ttp_ray.kernel.seeds`; the streaming over samples that feeds them is
:func:`ttp_ray.kernel.estimators.kernel_sketches`.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .seeds import cpu_generator, sub_seed

__all__ = [
    "Projection",
    "CountSketch",
    "CoordinateSubset",
    "GaussianBlocks",
    "PROJECTION_CLASSES",
    "input_side_projection",
]


class Projection:
    """Maps each parameter tensor's flattened gradient rows ``(rows, L_t)`` into the sketch's columns.

    Use: ``ws = begin(rows)``, ``accumulate(t, g, ws)`` for every tensor t, ``finish(ws) -> (rows, width)``.
    """

    kind = ""

    def __init__(self, lengths: Sequence[int], k: int, seed: int, dtype: torch.dtype, device) -> None:
        self.lengths, self.k, self.seed, self.dtype, self.device = list(lengths), int(k), int(seed), dtype, device

    @property
    def width(self) -> int:
        return self.k

    def workspace_columns(self) -> int:
        return self.width

    def begin(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.workspace_columns(), dtype=self.dtype, device=self.device)

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def finish(self, ws: torch.Tensor) -> torch.Tensor:
        return ws


class CountSketch(Projection):
    """Coordinate j of tensor t goes to bucket ``h_t(j)`` with sign ``s_t(j)``: ``E[Z Z^T] = J J^T``.

    The sign is folded into the bucket index (``h + k [s < 0]`` into a ``2k``-wide workspace, then
    ``Z = W[:, :k] - W[:, k:]``): one ``index_add_`` per tensor and no signed copy of the gradients.
    """

    kind = "countsketch"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.index = []
        for t, length in enumerate(self.lengths):
            g = cpu_generator(self.seed, "countsketch", t, length, self.k)
            bucket = torch.randint(0, self.k, (length,), generator=g)
            negative = torch.randint(0, 2, (length,), generator=g)
            self.index.append((bucket + self.k * negative).to(self.device))

    def workspace_columns(self) -> int:
        return 2 * self.k

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:
        ws.index_add_(1, self.index[t], g)

    def finish(self, ws: torch.Tensor) -> torch.Tensor:
        return ws[:, :self.k] - ws[:, self.k:]


class CoordinateSubset(Projection):
    """k_t coordinates of tensor t (k_t proportional to its size), rescaled by ``sqrt(L_t / k_t)``."""

    kind = "subset"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.alloc = _proportional_allocation(self.lengths, self.k)
        self.index, self.scale, self.offset = [], [], []
        off = 0
        for t, (length, kt) in enumerate(zip(self.lengths, self.alloc)):
            g = cpu_generator(self.seed, "subset", t, length, self.k)
            idx = torch.sort(torch.randperm(length, generator=g)[:kt]).values
            self.index.append(idx.to(self.device))
            self.scale.append(math.sqrt(length / kt))
            self.offset.append(off)
            off += kt
        self._width = off

    @property
    def width(self) -> int:
        return self._width

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:
        off, kt = self.offset[t], self.alloc[t]
        ws[:, off:off + kt] = g.index_select(1, self.index[t]) * self.scale[t]


class GaussianBlocks(Projection):
    """Dense N(0, 1/k) projection, regenerated from the seed in ``k x chunk`` blocks on every batch
    (a device generator: the numbers differ between CPU and CUDA, the distribution does not)."""

    kind = "gaussian"
    chunk_bytes = 32 * 2**20

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:
        length = self.lengths[t]
        item = torch.empty((), dtype=self.dtype).element_size()
        chunk = max(1, min(length, self.chunk_bytes // (self.k * item)))
        for j, start in enumerate(range(0, length, chunk)):
            stop = min(length, start + chunk)
            gen = torch.Generator(device=self.device).manual_seed(sub_seed(self.seed, "gaussian", t, j, chunk))
            block = torch.randn(self.k, stop - start, generator=gen, device=self.device, dtype=self.dtype)
            ws.addmm_(g[:, start:stop], block.T, alpha=1.0 / math.sqrt(self.k))


def _proportional_allocation(lengths: Sequence[int], k: int) -> List[int]:
    """Split k over tensors in proportion to their lengths (largest remainder), each in 1..L_t."""
    total = sum(lengths)
    if k >= total:
        return list(lengths)
    k = max(k, len(lengths))
    raw = [k * length / total for length in lengths]
    alloc = [min(length, max(1, int(math.floor(r)))) for r, length in zip(raw, lengths)]
    order = sorted(range(len(lengths)), key=lambda t: raw[t] - math.floor(raw[t]), reverse=True)
    i = 0
    while sum(alloc) < k and i < 10 * len(lengths) + k:
        t = order[i % len(order)]
        if alloc[t] < lengths[t]:
            alloc[t] += 1
        i += 1
    while sum(alloc) > k:  # the max(1, .) floor can overshoot when there are many tiny tensors
        t = max(range(len(alloc)), key=lambda j: alloc[j])
        alloc[t] -= 1
    return alloc


PROJECTION_CLASSES = {cls.kind: cls for cls in (CountSketch, CoordinateSubset, GaussianBlocks)}


def input_side_projection(fan_in: int, width: int, seed: int, tensor: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``R`` (``width x fan_in``), N(0, 1/width) entries, ``E[R^T R] = I``: the input side of a weight's per-sample
    gradient ``delta a^T`` becomes ``delta (R a)^T`` (exact on the output side), so that
    ``E[<G_i R^T, G_j R^T>] = <G_i, G_j>`` and the sketch stays unbiased (METHOD.md §6). Seeded per tensor."""
    g = cpu_generator(seed, "input-side", tensor, fan_in, width)
    return (torch.randn(width, fan_in, generator=g, dtype=torch.float64) / math.sqrt(width)).to(dtype=dtype,
                                                                                                device=device)
