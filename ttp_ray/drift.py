"""Kernel drift calibrated by one real reference run, applied as a time warp (full-batch GD; METHOD.md §9, §2, §4).

The frozen-kernel predictor (:mod:`ttp_ray.dynamics`) keeps Θ at its value at w0. On the embedded default
the kernel moves (docs/ACCURACY.md, "Modelling the drift", measures by how much): with cross-entropy on the
batch-norm backbone the real loss decreases ever faster than the frozen kernel's as the loss falls. The re-linearised
predictors (:mod:`ttp_ray.relinearise`) follow that drift but pay kernels per config or per path.

This module models the drift by one number per loss level and pays for it with one real fine-tuning run per
(dataset, backbone, loss), shared by every config:

1. **Calibration** (:func:`calibrate_drift`). Along gradient flow ``dL/dtau = -||grad_w L||^2 = -G^T Θ G / N^2``
   (flow time tau = eta_eff t). The reference run logs the real ``||grad_w L(w_t)||^2`` and outputs f(w_t);
   the frozen kernel's rate at the same outputs is ``G^T Θ0 G / N^2``. Their ratio (relative to t = 0) is the
   drift scale s at the run's loss L_t: how much faster (s > 1) or slower the real network lowers the loss than
   its linearisation at w0 would from the same point.
2. **Warp** (:func:`warp_curves`). If Θ_t = s Θ_0 with s a function of the loss only, the dynamics in the
   warped time ``sigma = int s dtau`` are those of the frozen kernel (ODE and SDE alike: the drift and the
   diffusion scale together). A config's curve is then its frozen ODE curve read at ``t'(t)``, with
   ``dt'/dt = s(L_lin(t'))``.

It is a model with a stated assumption, not a law: s is measured on one trajectory and assumed to depend on
the loss alone. docs/ACCURACY.md measures where that holds (cross-entropy, where the drift is the logits'
growth) and where it does not (momentum 0.9 near the stability limit, where the drift depends on the step
size too). ODE with the effective learning rate only: a warp of a discrete map would change its stability.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from .dynamics import SimConfig, SimOptions, SimResult, simulate
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .objectives import output_gradient

__all__ = ["DriftOptions", "KernelDrift", "calibrate_drift", "warp_curves", "simulate_with_drift", "kernel_quadratic",
           "reference_drift", "check_reference_fraction",
           "DRIFT_METHOD"]

DRIFT_METHOD = "ode-drift"


@dataclass(frozen=True)
class DriftOptions:
    """How the drift is calibrated and applied; every default stated."""

    smooth: int = 5  # running-median window over the reference run's steps (gradient norms are noisy)
    substeps: int = 20  # Euler substeps per optimiser step for dt'/dt = s(L_lin(t'))
    max_horizon: int = 64  # longest frozen ODE curve, in budgets (caps t' when s is large)
    log_points: int = 20000  # most logged points of the long frozen ODE curve (every step below this)

    def __post_init__(self):
        if self.smooth < 1:
            raise ValueError(f"smooth: must be >= 1, got {self.smooth}")
        if self.substeps < 1:
            raise ValueError(f"substeps: must be >= 1, got {self.substeps}")
        if self.max_horizon < 1:
            raise ValueError(f"max_horizon: must be >= 1 (budgets), got {self.max_horizon}")
        if self.log_points < 10:
            raise ValueError(f"log_points: must be >= 10, got {self.log_points}")


@dataclass
class KernelDrift:
    """Drift scale ``s(L)`` at loss levels seen by the reference run (ascending in L)."""

    loss: str
    levels: np.ndarray  # (K,) ascending loss levels
    scale: np.ndarray  # (K,) s at each level, > 0
    reference: Dict[str, float] = field(default_factory=dict)  # lr, momentum, steps of the reference run
    seconds: float = 0.0

    def scale_at(self, loss_value) -> np.ndarray:
        """``s(L)``: interpolated in log L; held at the end values outside the reference's range."""
        x = np.log(np.maximum(np.asarray(loss_value, dtype=np.float64), 1e-300))
        return np.interp(x, np.log(np.maximum(self.levels, 1e-300)), self.scale)

    @property
    def max_scale(self) -> float:
        return float(np.max(self.scale))


def _running_median(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < 3:
        return x
    h = window // 2
    return np.array([np.median(x[max(0, i - h):i + h + 1]) for i in range(len(x))])


def _long_ode(state, configs: Sequence[SimConfig], horizon: int, options: DriftOptions) -> List[SimResult]:
    """The frozen-kernel ODE (ELR) of ``configs`` to ``horizon`` steps, logged at every step up to
    ``log_points`` points (then evenly; the curves are read by interpolation). One call, so configs that
    share a flow share the simulation (METHOD.md §4)."""
    every = max(1, int(math.ceil(horizon / options.log_points)))
    horizon = every * int(math.ceil(horizon / every))
    return simulate(state, configs, horizon, SimOptions(method="ode", momentum_mode="elr", log_every=every))


def kernel_quadratic(state) -> Callable[[torch.Tensor], float]:
    """``G -> G^T Θ0 G`` for ``(N, C)`` output gradients, with Θ0 the state's eigendecomposition (class
    trace: ``Θ_N (x) I_C``, so the classes add up); the eigenpairs are converted once, on the CPU."""
    V = state.eigvecs.to(device="cpu", dtype=torch.float64)
    lam = state.eigvals.to(device="cpu", dtype=torch.float64).clamp_min(0).unsqueeze(1)

    def quadratic(G: torch.Tensor) -> float:
        G = G.to(device="cpu", dtype=torch.float64)
        proj = V.T @ G if state.class_trace else (V.T @ G.reshape(-1)).unsqueeze(1)  # (r, C) or (r, 1)
        return float((lam * proj.pow(2)).sum())

    return quadratic


def calibrate_drift(state, reference: SimConfig, loss: np.ndarray, grad_norm_sq: np.ndarray, outputs: np.ndarray,
                    options: DriftOptions = DriftOptions()) -> KernelDrift:
    """``s_t = N^2 ||grad_w L(w_t)||^2 / (G_t^T Θ0 G_t)``, relative to its value at t = 0, at the reference
    run's loss levels (module docstring, step 1).

    ``G_t`` is the output gradient at the run's own outputs f(w_t): since grad_w L = J^T G / N, the ratio is
    the Rayleigh quotient of the real kernel J_t J_t^T against the frozen one along the direction the loss
    moves in. Dividing by s_0 leaves the frozen kernel's own estimation error out (the frozen prediction is
    right at t = 0 by construction). ``loss``, ``grad_norm_sq`` and ``outputs`` are the reference's
    ``FinetuneResult.loss``, ``.grad_norm_sq`` and ``.outputs`` (full batch, every step); ``state`` is the kernel
    state the predictions use.
    """
    t0 = time.perf_counter()
    if reference.batch_size is not None and reference.batch_size < state.n:
        raise ValueError(f"reference: the drift is calibrated on a full-batch run; got batch_size {reference.batch_size}")
    if grad_norm_sq is None or outputs is None:
        raise ValueError("reference: needs grad_norm_sq and outputs (finetune(..., record_outputs=True), full batch)")
    m = min(len(grad_norm_sq), len(outputs), len(loss))
    if m < 2:
        raise ValueError("reference: needs at least two steps with gradients")
    y = state.targets.long().cpu()
    n = state.n
    quadratic = kernel_quadratic(state)
    s = np.empty(m)
    for t in range(m):
        G = output_gradient(torch.as_tensor(outputs[t], dtype=torch.float64), y, reference.loss)
        s[t] = n * n * float(grad_norm_sq[t]) / max(quadratic(G), 1e-300)
    s = _running_median(s / s[0], options.smooth)
    s[0] = 1.0  # at w0 the frozen kernel is the real one by definition (the smoothing must not move it)
    levels = np.asarray(loss[:m], dtype=np.float64)
    order = np.argsort(levels, kind="stable")
    return KernelDrift(loss=reference.loss, levels=levels[order], scale=np.maximum(s[order], 1e-6),
                       reference={"lr": float(reference.lr), "momentum": float(reference.momentum), "steps": float(m)},
                       seconds=time.perf_counter() - t0)


def check_reference_fraction(fraction: float) -> float:
    """``fraction`` if it is a valid reference learning rate, as a fraction of max_stable_lr(0), else ValueError."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: must be a fraction of max_stable_lr(0) in (0, 1], got {fraction}")
    return fraction


def reference_drift(model, dataset, state, loss: str, fraction: float, budget_steps: int, *, trainable: str = "all",
                    device: str = "cpu", options: DriftOptions = DriftOptions()) -> Tuple[KernelDrift, FinetuneResult]:
    """Run the reference for real (plain full-batch GD at ``fraction`` x max_stable_lr(0) of ``state``, ``budget_steps``
    steps, on a copy of ``model``) and calibrate ``s(L)`` on it; returns the drift and the run."""
    check_reference_fraction(fraction)
    ref = SimConfig(lr=fraction * state.max_stable_lr(0.0), momentum=0.0, batch_size=None, loss=loss)
    real = finetune(copy.deepcopy(model), dataset, FinetuneConfig(lr=ref.lr, loss=loss, steps=int(budget_steps),
                                                                  trainable=trainable),
                    device=device, record_outputs=True)
    return calibrate_drift(state, ref, real.loss, real.grad_norm_sq, real.outputs, options), real


def warp_curves(lin: SimResult, drift: KernelDrift, budget_steps: int, options: DriftOptions = DriftOptions()
                ) -> Dict[str, np.ndarray]:
    """Curves at steps 0..T read off the frozen curve ``lin`` at ``t'(t)``, ``dt'/dt = s(L_lin(t'))`` (step 2)."""
    st = lin.steps.astype(np.float64)
    tp = 0.0
    out = np.zeros(budget_steps + 1)
    h = 1.0 / options.substeps
    for t in range(1, budget_steps + 1):
        for _ in range(options.substeps):  # explicit Euler in t; s changes slowly along the curve
            tp += h * float(drift.scale_at(np.interp(tp, st, lin.loss)))
        out[t] = min(tp, st[-1])
    curves = {"steps": np.arange(budget_steps + 1), "loss": np.interp(out, st, lin.loss), "warped_steps": out}
    if lin.error is not None:
        curves["error"] = np.interp(out, st, lin.error)
    return curves


def simulate_with_drift(state, configs: Sequence[SimConfig], budget_steps: int, drift: KernelDrift,
                        options: DriftOptions = DriftOptions()) -> List[SimResult]:
    """Each full-batch config's frozen ODE (ELR) curve, warped by ``drift``; method ``ode-drift``.

    Configs beyond the frozen kernel's stability limit stay reported as diverging (the warp does not move
    the limit). The frozen curve runs to ``budget * max(1, max s)`` steps, at most ``max_horizon`` budgets.
    """
    configs = list(configs)
    for cfg in configs:
        if cfg.loss != drift.loss:
            raise ValueError(f"loss: the drift was calibrated for {drift.loss!r}, the config has {cfg.loss!r}")
        if cfg.batch_size is not None and cfg.batch_size < state.n:
            raise ValueError(f"batch_size: the drift warp predicts full-batch GD only; got {cfg.batch_size} < N = {state.n}")
    if not configs:
        return []
    t0 = time.perf_counter()
    horizon = int(math.ceil(budget_steps * min(max(1.0, drift.max_scale), options.max_horizon))) + 1
    lins = _long_ode(state, configs, horizon, options)
    share = (time.perf_counter() - t0) / len(configs)
    out = []
    for lin in lins:
        t1 = time.perf_counter()
        if lin.diverged:
            out.append(replace(lin, method=DRIFT_METHOD, seconds=share))
            continue
        c = warp_curves(lin, drift, budget_steps, options)
        note = "" if c["warped_steps"][-1] < lin.steps[-1] else "the warped time ran past the frozen curve's horizon"
        out.append(replace(lin, steps=c["steps"], loss=c["loss"], error=c.get("error"), loss_spread=None,
                           error_spread=None, method=DRIFT_METHOD, seconds=share + time.perf_counter() - t1, note=note))
    return out
