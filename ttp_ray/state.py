"""The per-dataset state every prediction starts from: initial outputs F0 and the eigendecomposition of
the empirical NTK Theta (METHOD.md §2, §6). Computed once per (model, dataset, kernel options) by
:mod:`ttp_ray.kernel`, cached on disk there and held by Ray actors in :mod:`ttp_ray.sweep`.

Index conventions:

* full kernel (``class_trace=False``): Theta is ``NC x NC`` and row ``i*C + c`` is sample i, class c
  (row-major flattening of an ``(N, C)`` output array, ``F.reshape(-1)``);
* class-trace kernel (``class_trace=True``): Theta ~ Theta_N (x) I_C with
  ``Theta_N(x, x') = (1/C) tr Theta(x, x')`` (N x N), exact for the linear head's own parameters.

Eigenvalues are those of Theta itself (``J J^T``, not divided by N); the dynamics divide by N
(``F <- F - (eta/N) Theta G``, METHOD.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .stability import max_stable_lr

__all__ = ["KernelState"]


@dataclass
class KernelState:
    f0: torch.Tensor  # (N, C) outputs of the pre-trained net + new head at w0
    targets: torch.Tensor  # (N,) int64 labels
    num_classes: int
    eigvals: torch.Tensor  # (r,) descending, >= 0
    eigvecs: torch.Tensor  # (N*C, r) or (N, r) with class_trace; orthonormal columns
    class_trace: bool
    sketch: Optional[torch.Tensor] = None  # Z with Theta ~ Z Z^T: (N*C, k) or (N, k); None for exact
    meta: Dict[str, Any] = field(default_factory=dict)  # how it was computed, timings, fingerprint

    @property
    def n(self) -> int:
        return int(self.f0.shape[0])

    @property
    def lambda_max(self) -> float:
        return float(self.eigvals[0]) if self.eigvals.numel() else 0.0

    def max_stable_lr(self, momentum: float = 0.0) -> float:
        """Largest stable lr of discrete GD on the linearised MSE model (:func:`ttp_ray.stability.max_stable_lr`)
        at this kernel's ``lambda_max`` (class-trace or full, as the state was computed)."""
        return max_stable_lr(self.lambda_max, self.n, momentum)

    def residual(self) -> torch.Tensor:
        """Initial residual ``Y - F0`` as an ``(N, C)`` array."""
        y = torch.nn.functional.one_hot(self.targets.long(), self.num_classes).to(self.f0.dtype)
        return y - self.f0

    def residual_projections(self) -> torch.Tensor:
        """``v_k . (Y - F0)`` for each eigenvector: shape (r,) for the full kernel, (r, C) with class_trace."""
        r = self.residual().to(self.eigvecs.dtype)  # F0 may be float32 while eigenpairs are float64
        if self.class_trace:
            return self.eigvecs.T @ r
        return self.eigvecs.T @ r.reshape(-1)

    def to(self, device=None, dtype=None) -> "KernelState":
        def mv(t):
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype or t.dtype)
            return t.to(device=device)

        return KernelState(
            f0=mv(self.f0),
            targets=mv(self.targets),
            num_classes=self.num_classes,
            eigvals=mv(self.eigvals),
            eigvecs=mv(self.eigvecs),
            class_trace=self.class_trace,
            sketch=mv(self.sketch),
            meta=dict(self.meta),
        )
