"""Piecewise re-linearisation: follow the network's kernel as it moves (full-batch GD; METHOD.md §10, §2).

The linearised predictor (:mod:`ttp_ray.dynamics`) keeps Θ at its value at w0. Outside the linear regime Θ
does not stay there: with momentum 0.9 and an effective lr several times the plain-GD limit it shrinks (MSE)
or grows (cross-entropy on the batch-norm backbone) within tens of steps (by how much, and what it costs
T̂ε: docs/ACCURACY.md, ``bench/kernel_drift.py``).

This module re-linearises along the predicted trajectory, like an ODE integrator with step-size control,
where a "step" is a segment of L optimiser steps simulated on the kernel of its start point:

1. at weights w_k (momentum buffer ``p_k``, a weight-space vector): F_k = f(w_k) and a sketch Z_k of the
   full kernel, Θ_k ~ Z_k Z_k^T (:func:`ttp_ray.kernel.kernel_sketch`), one per accepted segment;
2. simulate L steps of exact heavy ball on the linearisation at w_k, in function space:
   ``u <- m u + (1/N) Θ_k G(F)``, ``F <- F - lr u``, with ``u_0 = J_k p_k`` (one jvp), logging L_t and
   the error at every step;
3. map the segment back to weight space exactly as the linearised model moves (METHOD.md §1 momentum
   convention, ``p <- m p + J^T G / N``, ``w <- w - lr p``): with ``b_s = m b_{s-1} + G_s / N``,
   ``w' = w_k - lr (sum_{s=1..L} m^s p_k + J_k^T sum_s b_s)`` and ``p' = m^L p_k + J_k^T b_L`` (one
   backward pass over the data with two cotangents);
4. local error control: ``e = ||f(w') - f(w_k) - J_k (w' - w_k)|| / ||J_k (w' - w_k)||`` (one more jvp),
   the real network against its own linearisation at the end of the segment. ``e > tolerance``: halve L
   and redo step 2 (no new kernel); otherwise accept (the curve's point at the segment end is the real
   f(w')), and double L when ``e < tolerance / 2``.

Divergence: a segment whose simulated loss blows up is halved like any other; a one-step segment is exact
GD, so the real network at w' decides, as in training (``finetune.DIVERGENCE_FACTOR``).

With L = 1 the weights follow real GD exactly (the vjp is the true gradient), so the method interpolates
between the frozen-kernel predictor (one segment) and training itself; ``max_kernels`` bounds the cost.
The price is one kernel per accepted segment *per config*: the frozen-kernel predictor shares one
eigendecomposition across a whole grid, this does not. Full-batch GD only (with minibatches a segment
of the same length costs more than the training it predicts, on the embedded default).

:func:`flow_path` and :func:`simulate_on_flow_path` share the drift between configs instead: one
re-linearised gradient-flow path per (dataset, loss), read by each full-batch config at its own flow time
tau = eta_eff t (METHOD.md §4, §10). Where that holds and where it does not (MSE at a large effective lr,
whose drift is not on the flow): docs/ACCURACY.md.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .dynamics import SimConfig
from .finetune import DIVERGENCE_FACTOR
from .kernel import KernelOptions, PerSampleGradients, kernel_sketch
from .models import functional_model
from .objectives import error_rate, loss_value, output_gradient
from .stability import max_stable_lr

__all__ = ["RelinearisationOptions", "RelinearisedResult", "relinearised_curves", "RELINEARISED_METHOD",
           "FlowPath", "flow_path", "simulate_on_flow_path", "FLOW_METHOD"]

RELINEARISED_METHOD = "relinearised"
FLOW_METHOD = "flow-relinearised"


@dataclass(frozen=True)
class RelinearisationOptions:
    """Segment control of :func:`relinearised_curves`; every default stated."""

    tolerance: float = 0.3  # accepted local error ||f(w') - f(w_k) - J_k dw|| / ||J_k dw|| at a segment end
    first_segment: int = 8  # optimiser steps of the first segment
    max_segment: int = 0  # longest segment in steps; 0: the whole remaining budget
    max_kernels: int = 24  # kernel sketches per config at most; then the rest of the budget is one segment
    # how each Θ_k is sketched: the full NC x NC kernel. With the class trace the weights, which move by the
    # true J^T, and the simulated outputs, which move by Θ_N (x) I_C, part ways segment by segment
    # (docs/ACCURACY.md: the real loss jumps at segment ends)
    kernel: KernelOptions = field(default_factory=lambda: KernelOptions(class_trace=False))
    batch_size: int = 512  # samples per forward / jvp / vjp batch

    def __post_init__(self):
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"tolerance: must be a finite number > 0, got {self.tolerance}")
        if self.first_segment < 1:
            raise ValueError(f"first_segment: must be a positive number of steps, got {self.first_segment}")
        if self.max_segment < 0:
            raise ValueError(f"max_segment: must be >= 0 (0: no limit), got {self.max_segment}")
        if self.max_kernels < 1:
            raise ValueError(f"max_kernels: must be >= 1, got {self.max_kernels}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.kernel.method != "sketch":
            raise ValueError(f"kernel.method: re-linearisation sketches each kernel; got {self.kernel.method!r}, allowed: sketch")


@dataclass
class RelinearisedResult:
    """Curves logged at every step 0..T (truncated at divergence) and what they cost."""

    config: SimConfig
    steps: np.ndarray
    loss: np.ndarray
    error: np.ndarray
    diverged: bool
    kernels: int  # kernel states computed (accepted segments)
    rejected: int  # segments redone shorter
    segment_ends: List[int]  # step at the end of every accepted segment
    kernel_seconds: float
    seconds: float
    note: str = ""
    max_stable_lr: float = float("inf")  # 2(1+m)N/lambda_max of the kernel at w0 (METHOD.md §2)
    method: str = RELINEARISED_METHOD  # or FLOW_METHOD (simulated on a shared flow path)


def _top_eigenvalue(z: torch.Tensor, iters: int = 50) -> float:
    """Largest eigenvalue of ``Z Z^T`` by power iteration on ``Z^T Z`` (k x k products only)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z.shape[1], dtype=z.dtype, generator=g).to(z.device)
    lam = 0.0
    for _ in range(iters):
        w = z.T @ (z @ v)
        lam = float(torch.linalg.norm(w))
        if lam == 0.0:
            return 0.0
        v = w / lam
    return lam


def _sketch_product(z: torch.Tensor, G: torch.Tensor, class_trace: bool, n: int) -> torch.Tensor:
    """``(1/N) Θ G`` with ``Θ ~ Z Z^T``: ``Z`` is ``N x k`` (class trace, Θ_N (x) I_C) or ``NC x k`` (rows i*C + c)."""
    if class_trace:
        return z @ (z.T @ G) / n
    return (z @ (z.T @ G.reshape(-1))).reshape(G.shape) / n


def _blew_up(loss: float, initial: float) -> bool:
    """The trainer's divergence rule (``finetune.DIVERGENCE_FACTOR``), for a predicted loss."""
    return not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(initial, 1e-12)


def _batched_outputs(apply, params, x: torch.Tensor, bs: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([apply(params, x[s:s + bs]) for s in range(0, x.shape[0], bs)]).double()


def _jvp_outputs(apply, params, tangent, x: torch.Tensor, bs: int) -> torch.Tensor:
    """``J(w) p`` for every sample, (N, C): forward-mode AD, batched."""
    out = []
    for s in range(0, x.shape[0], bs):
        xb = x[s:s + bs]
        _, t = torch.func.jvp(lambda p: apply(p, xb), (params,), (tangent,))
        out.append(t.detach())
    return torch.cat(out).double()


def _vjp_params(apply, params, cotangents: List[torch.Tensor], x: torch.Tensor, bs: int
                ) -> List[Dict[str, torch.Tensor]]:
    """``J(w)^T c`` for each ``(N, C)`` cotangent c (one forward per batch, one backward per cotangent)."""
    names = list(params)
    acc = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in cotangents]
    for s in range(0, x.shape[0], bs):
        ps = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        f = apply(ps, x[s:s + bs])
        for j, c in enumerate(cotangents):
            g = torch.autograd.grad((f * c[s:s + bs].to(f.dtype)).sum(), [ps[n] for n in names],
                                    retain_graph=j < len(cotangents) - 1)
            for n, gi in zip(names, g):
                acc[j][n] += gi
    return acc


def relinearised_curves(model: torch.nn.Module, dataset, config: SimConfig, budget_steps: int,
                        options: RelinearisationOptions = RelinearisationOptions(), *, trainable: str = "all",
                        device: str = "cpu",
                        on_kernel: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None
                        ) -> RelinearisedResult:
    """Loss and error curves of full-batch GD (heavy ball) predicted by piecewise re-linearisation.

    ``on_kernel(t, Z, F)``, if given, receives every kernel sketch, the outputs there and the step t it was
    taken at (a segment start; :func:`flow_path` keeps them).

    ``model`` is not modified (a copy moves). ``config.batch_size`` must be None (or >= N).
    """
    t_start = time.perf_counter()
    n = len(dataset)
    if config.batch_size is not None and config.batch_size < n:
        raise ValueError(f"batch_size: re-linearisation simulates full-batch GD only; got {config.batch_size} < N = {n}")
    if budget_steps <= 0:
        raise ValueError(f"budget_steps: must be a positive integer, got {budget_steps}")
    net = copy.deepcopy(model).to(device).eval()
    x = dataset.x.to(device)
    y = torch.as_tensor(dataset.targets).long().to(device)
    lr, m, loss = float(config.lr), float(config.momentum), config.loss
    bs = options.batch_size
    buf: Optional[Dict[str, torch.Tensor]] = None  # weight-space momentum buffer p_k
    losses, errors = [], []  # at steps 0, 1, ..., t: the segments tile the budget from step 0
    ends: List[int] = []
    kernels = rejected = 0
    kernel_s = 0.0
    diverged = False
    note = ""
    t = 0
    seg = options.first_segment
    l0 = None
    max_stable = float("inf")
    ko = options.kernel
    c = int(dataset.num_classes)
    while t < budget_steps:
        t0 = time.perf_counter()
        grads = PerSampleGradients.from_module(net, trainable, ko.engine)
        sk = kernel_sketch(grads, dataset, c, k=ko.k, projection=ko.projection, class_trace=ko.class_trace,
                           class_probes=ko.class_probes, seed=ko.seed, memory_cap_mb=ko.memory_cap_mb,
                           batch_size=ko.batch_size, outer_width=ko.outer_width)
        Z = sk.z.to(device=device, dtype=torch.float64)  # Θ_k ~ Z Z^T; no eigendecomposition needed here
        Fk = sk.f0.to(device=device, dtype=torch.float64)
        if on_kernel is not None:
            on_kernel(t, Z, Fk)
        kernel_s += time.perf_counter() - t0
        kernels += 1
        if kernels == 1:
            lam_max = _top_eigenvalue(Z)
            max_stable = max_stable_lr(lam_max, n, m)  # of the first sketch's lambda_max (power iteration)
        params, apply = functional_model(net, trainable)
        if l0 is None:
            l0 = float(loss_value(Fk, y, loss))
            losses.append(l0)
            errors.append(float(error_rate(Fk, y)))
        u0 = torch.zeros_like(Fk) if buf is None else _jvp_outputs(apply, params, buf, x, bs)
        last = kernels >= options.max_kernels  # the kernel budget is spent: this segment runs to the end
        remaining = budget_steps - t
        planned = min(seg, remaining, options.max_segment or remaining)
        L = remaining if last else planned
        if last and remaining > planned:
            note = f"max_kernels ({options.max_kernels}) reached: steps {t}..{budget_steps} share one kernel"
        while True:  # simulate a segment; shorten it until the real network agrees with its linearisation
            F, u = Fk.clone(), u0.clone()
            b = torch.zeros_like(Fk)
            bsum = torch.zeros_like(Fk)
            msum = 0.0
            seg_loss, seg_err = [], []
            bad = False
            for s in range(1, L + 1):
                G = output_gradient(F, y, loss)
                u = m * u + _sketch_product(Z, G, ko.class_trace, n)
                F = F - lr * u
                b = m * b + G / n
                bsum += b
                msum += m ** s
                lv = float(loss_value(F, y, loss))
                if _blew_up(lv, l0):
                    bad = True
                    L = s
                    break
                seg_loss.append(lv)
                seg_err.append(float(error_rate(F, y)))
            if bad and last:
                diverged = True
                break
            if bad and L > 1:
                rejected += 1
                L = max(1, L // 2)
                continue
            # a one-step segment is exact GD in weight space: the real network at w' decides divergence below
            d, nb = _vjp_params(apply, params, [bsum, b], x, bs)
            new_w = {k: params[k] - lr * (d[k] + (msum * buf[k] if buf is not None else 0.0)) for k in params}
            new_buf = {k: nb[k] + ((m ** L) * buf[k] if buf is not None else 0.0) for k in params}
            f_new = _batched_outputs(apply, new_w, x, bs)
            # the segment's second-order remainder f(w') - f(w_k) - J_k (w' - w_k), relative to the first-order
            # move J_k (w' - w_k): the kernel sketch's own error does not enter it
            first = _jvp_outputs(apply, params, {k: new_w[k] - params[k] for k in params}, x, bs)
            err = float(torch.linalg.norm(f_new - Fk - first)) / max(float(torch.linalg.norm(first)), 1e-12)
            if last or L == 1 or err <= options.tolerance:
                break
            rejected += 1
            L = max(1, L // 2)
        if diverged:
            note = f"diverged at step {t + L}"
            break
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name in new_w:
                    p.copy_(new_w[name])
        buf = new_buf
        lv_end = float(loss_value(f_new, y, loss))
        if _blew_up(lv_end, l0):
            diverged = True
            note = f"diverged at step {t + L}"
            break
        # interior points from the linearisation, the segment end from the real network at w'
        losses.extend(seg_loss[:-1] + [lv_end])
        errors.extend(seg_err[:-1] + [float(error_rate(f_new, y))])
        t += L
        ends.append(t)
        seg = 2 * L if err < options.tolerance / 2 else L
    return RelinearisedResult(
        config=config, steps=np.arange(len(losses), dtype=np.int64), loss=np.asarray(losses),
        error=np.asarray(errors), diverged=diverged, kernels=kernels, rejected=rejected, segment_ends=ends,
        kernel_seconds=kernel_s, seconds=time.perf_counter() - t_start, note=note, max_stable_lr=max_stable)


# --------------------------------------------------------------------------------------------------
# One re-linearised gradient-flow path per (dataset, loss), shared by every full-batch config.
# METHOD.md §4's collapse: in flow time tau = eta_eff t every GD config follows the same gradient flow, so
# the kernel it meets at step t is, to first order, the flow's kernel at tau = eta_eff t. The path is
# re-linearised once (plain GD with a small reference lr stands in for the flow) and each config is then
# simulated on the kernel of its own tau: the drift is paid for once per loss, not once per config.
# --------------------------------------------------------------------------------------------------


@dataclass
class FlowPath:
    """Kernel sketches taken along one re-linearised gradient-flow path, keyed by flow time tau."""

    loss: str
    taus: np.ndarray  # (K,) ascending flow time of each sketch, taus[0] = 0
    sketches: List[torch.Tensor]  # Z_k, Θ(tau_k) ~ Z_k Z_k^T (NC x k, or N x k with the class trace)
    class_trace: bool
    f0: torch.Tensor  # (N, C) outputs at w0
    targets: torch.Tensor  # (N,)
    reference_lr: float  # the plain-GD lr that traced the path
    seconds: float
    note: str = ""

    def index(self, tau: float) -> int:
        """The sketch in force at flow time ``tau`` (the last one taken at or before it)."""
        return int(np.searchsorted(self.taus, tau, side="right") - 1)


def flow_path(model: torch.nn.Module, dataset, loss: str, tau_max: float, reference_lr: float,
              options: RelinearisationOptions = RelinearisationOptions(), *, trainable: str = "all",
              device: str = "cpu") -> FlowPath:
    """Trace the gradient flow to ``tau_max`` by re-linearised plain GD at ``reference_lr`` (small against the
    stability limit, so GD is close to the flow) and keep every kernel sketch with its tau = lr t."""
    if not (reference_lr > 0 and tau_max > 0):
        raise ValueError(f"reference_lr, tau_max: must be > 0, got {reference_lr}, {tau_max}")
    steps = int(math.ceil(tau_max / reference_lr))
    taken: List[tuple] = []
    res = relinearised_curves(model, dataset, SimConfig(lr=reference_lr, momentum=0.0, batch_size=None, loss=loss),
                              steps, options, trainable=trainable, device=device,
                              on_kernel=lambda t, z, f: taken.append((t * reference_lr, z, f)))
    note = res.note if not res.diverged else f"the reference path diverged ({res.note}); later taus reuse its last kernel"
    return FlowPath(loss=loss, taus=np.array([tau for tau, _, _ in taken]), sketches=[z for _, z, _ in taken],
                    class_trace=options.kernel.class_trace, f0=taken[0][2].cpu(),  # outputs at w0
                    targets=torch.as_tensor(dataset.targets).long(), reference_lr=float(reference_lr),
                    seconds=res.seconds, note=note)


def simulate_on_flow_path(path: FlowPath, configs: Sequence[SimConfig], budget_steps: int) -> List[RelinearisedResult]:
    """Exact heavy ball in function space for each full-batch config, on the path's kernel at its own
    flow time: ``u <- m u + (1/N) Θ(eta_eff t) G(F)``, ``F <- F - lr u`` (METHOD.md §2-§4, §10)."""
    y = path.targets
    n = int(path.f0.shape[0])
    out = []
    for cfg in configs:
        if cfg.batch_size is not None and cfg.batch_size < n:
            raise ValueError(f"batch_size: the flow path predicts full-batch GD only; got {cfg.batch_size} < N = {n}")
        t0 = time.perf_counter()
        lr, m, eta = float(cfg.lr), float(cfg.momentum), float(cfg.effective_lr)
        F = path.f0.double().clone()
        u = torch.zeros_like(F)
        losses, errors = [float(loss_value(F, y, cfg.loss))], [float(error_rate(F, y))]
        diverged = False
        for t in range(budget_steps):
            z = path.sketches[path.index(eta * t)]
            u = m * u + _sketch_product(z, output_gradient(F, y, cfg.loss), path.class_trace, n)
            F = F - lr * u
            lv = float(loss_value(F, y, cfg.loss))
            if _blew_up(lv, losses[0]):
                diverged = True
                break
            losses.append(lv)
            errors.append(float(error_rate(F, y)))
        used = sorted({path.index(eta * s) for s in range(len(losses))})
        out.append(RelinearisedResult(
            config=cfg, steps=np.arange(len(losses)), loss=np.asarray(losses), error=np.asarray(errors),
            diverged=diverged, kernels=len(used), rejected=0, segment_ends=[], kernel_seconds=0.0,
            seconds=time.perf_counter() - t0, note=f"diverged at step {len(losses)}" if diverged else path.note,
            method=FLOW_METHOD))
    return out
