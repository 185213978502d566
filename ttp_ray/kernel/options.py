"""How the kernel is to be estimated: :class:`KernelOptions` and the values its fields accept
(:data:`METHODS`, :data:`PROJECTIONS`, :data:`DTYPES`, :data:`EIGEN_SOLVERS`, :data:`ENGINES`).

Implements the choices of METHOD.md §6 (the kernel sketch); the estimators that read these options are in
:mod:`ttp_ray.kernel.estimators`. The default, ``method="sketch", projection="countsketch", k=2048,
class_trace=True, class_probes=1`` (engine auto, Gram matrix in float64, its eigh in float32), was chosen by measuring cost and accuracy with
``bench/kernel.py``: the figures and the reasoning are in docs/BENCHMARKS.md, section "Kernel".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

__all__ = [
    "METHODS",
    "ENGINES",
    "PROJECTIONS",
    "DTYPES",
    "EIGEN_SOLVERS",
    "KernelOptions",
]

METHODS = ("sketch", "exact")
ENGINES = ("auto", "hooks", "vmap")
PROJECTIONS = ("countsketch", "subset", "gaussian")
DTYPES = ("float32", "float64")
EIGEN_SOLVERS = ("gram", "svd")


@dataclass(frozen=True)
class KernelOptions:
    """How Theta is estimated (METHOD.md §6); every default stated here.

    * ``method``: ``"sketch"`` (projected per-sample gradients, the default) or ``"exact"``;
    * ``projection``: one of :data:`PROJECTIONS` (sketch only);
    * ``k``: sketch width (columns of Z);
    * ``class_trace``: estimate ``Theta_N`` (``N x N``, Theta ~ Theta_N (x) I_C) instead of the full
      ``NC x NC`` Theta;
    * ``class_probes``: vjps per sample for a class-trace sketch, 1..C (C: exact class trace in
      expectation over the projection; fewer: also random over the class probes). Ignored otherwise;
    * ``seed``: seeds the projection and the class probes;
    * ``memory_cap_mb``: bound on the per-batch working set (per-sample gradients, activations,
      projection temporaries; for ``exact`` also the held Jacobian panel). Z itself (``rows x k``) and
      the exact Theta are outputs and not counted;
    * ``batch_size``: samples per batch; ``None`` derives it from ``memory_cap_mb``;
    * ``dtype``: dtype of the eigen step (SVD of Z / eigh of Theta) and of the exact Gram accumulation;
    * ``eig_rtol``: eigenvalues ``<= eig_rtol * lambda_max`` are dropped (numerically zero); the exact
      path's eigh additionally uses at least ``10 * eps(dtype)``;
    * ``eigen_solver``: how the thin SVD of Z is computed (:func:`eigendecompose_sketch`), ``"gram"``
      or ``"svd"``;
    * ``eigh_dtype``: dtype of the ``eigh`` of the sketch's Gram matrix (solver ``"gram"``; the Gram itself
      is formed in ``dtype``). ``float32`` (default) halves the time of that eigh, the eigen step's larger
      part; T̂ε matched float64's within 1 % on the accuracy grid (docs/BENCHMARKS.md, section "Kernel").
      ``float64`` for the exact solve. The exact path is unaffected (its eigh runs in ``dtype``);
    * ``outer_width``: sketch only. A ``Linear`` / ``Conv2d`` weight with one output position (its per-sample
      gradient is one outer product ``delta a^T``, e.g. a ResNet's last stage on small images) and more than
      ``outer_width`` inputs is sketched from ``delta (R a)^T`` with a Gaussian ``R`` (``outer_width x fan_in``,
      ``E[R^T R] = I``; exact on the output side): ``out x outer_width`` entries per sample instead of
      ``out x fan_in``, never materialised. Still unbiased, with more variance on those layers; measured no
      worse against the exact kernel (docs/BENCHMARKS.md, section "Kernel"). ``0``: off (the count sketch
      sees every per-sample gradient);
    * ``engine``: per-sample gradient engine (:class:`PerSampleGradients`): ``"auto"`` (hooks when the
      model's trainable layers allow it, else vmap; recorded in meta), ``"hooks"`` or ``"vmap"``. Same
      numbers either way, so not part of the cache key.
    """

    method: str = "sketch"
    projection: str = "countsketch"
    k: int = 2048
    class_trace: bool = True
    class_probes: int = 1
    seed: int = 0
    memory_cap_mb: float = 512.0
    batch_size: Optional[int] = None
    dtype: str = "float64"
    eig_rtol: float = 1e-9
    eigen_solver: str = "gram"
    eigh_dtype: str = "float32"
    outer_width: int = 64
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection: {self.projection!r} is not one of {', '.join(PROJECTIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.eigh_dtype not in DTYPES:
            raise ValueError(f"eigh_dtype: {self.eigh_dtype!r} is not one of {', '.join(DTYPES)}")
        if int(self.k) < 1:
            raise ValueError(f"k: must be >= 1, got {self.k}")
        if int(self.class_probes) < 1:
            raise ValueError(f"class_probes: must be >= 1, got {self.class_probes}")
        if not self.memory_cap_mb > 0:
            raise ValueError(f"memory_cap_mb: must be > 0, got {self.memory_cap_mb}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1 or None, got {self.batch_size}")
        if self.eigen_solver not in EIGEN_SOLVERS:
            raise ValueError(f"eigen_solver: {self.eigen_solver!r} is not one of {', '.join(EIGEN_SOLVERS)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if int(self.outer_width) < 0:
            raise ValueError(f"outer_width: must be >= 0 (0: off), got {self.outer_width}")
        if not 0 <= self.eig_rtol < 1:
            raise ValueError(f"eig_rtol: must be in [0, 1), got {self.eig_rtol}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def result_fields(self) -> Dict[str, Any]:
        """The options that change the result (cache key); batch size and memory cap do not."""
        out = {"method": self.method, "class_trace": bool(self.class_trace), "dtype": self.dtype,
               "eig_rtol": float(self.eig_rtol)}
        if self.method == "sketch":
            out.update(projection=self.projection, k=int(self.k), seed=int(self.seed),
                       eigen_solver=self.eigen_solver)
            if self.eigen_solver == "gram":
                out["eigh_dtype"] = self.eigh_dtype
            if self.outer_width:
                out["outer_width"] = int(self.outer_width)
            if self.class_trace:
                out["class_probes"] = int(self.class_probes)
        return out
