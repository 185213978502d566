"""The kernel's drift measured by short real minibatch probes, shared by a whole grid (docs/METHOD.md §14).

The frozen-kernel predictor keeps Θ at Θ0. The real kernel moves: it grows with cross-entropy (the logits
scale up), it shrinks with MSE at large steps (the catapult), and how much depends on the loss reached and
on the step size (docs/ACCURACY.md). :mod:`ttp_ray.drift` measures that on one full-batch fine-tune of the
whole budget, which at N = 50,000 costs more than the configs it predicts. This module measures it with a
bounded amount of real work instead: a few **probes**, short real minibatch heavy-ball runs on the full
data set at chosen effective learning rates, whose total number of per-sample gradients is at most
``work_epochs`` x N.

1. **The batch Rayleigh quotient** (§14, eq. 14.1). A probe step computes ``grad_w L_B`` on its batch B, and
   ``||grad_w L_B||^2 = G_B^T Θ_t[B, B] G_B / |B|^2`` with ``G_B`` the output gradients at the batch's own
   outputs. Against the frozen kernel at the same outputs, ``q_t = |B|^2 ||grad_w L_B||^2 / (G_B^T Θ0[B, B]
   G_B)`` is how much faster the real network lowers the loss than its linearisation at w0 would, along the
   direction the loss moves in. Θ0[B, B] comes from the state's eigendecomposition; the gradient is the
   step's own, so the quotient costs nothing beyond the step. It is normalised by its median over a few
   batches at w0 (so the kernel estimate's own error at w0 cancels): ``s_t = q_t / q_0``.
2. **s as a function of the loss and the effective lr.** Each probe gives ``s`` against its running loss
   level (the batch losses' running mean, an unbiased estimate of the full-set loss). Between probes, ``log s``
   is interpolated linearly in ``log eta_eff`` at the same loss level, and held at the nearest probe outside
   their range (:meth:`ProbedDrift.scale_at`).
3. **Warp** (§9): a config's frozen curve (any simulator: discrete map, SDE, minibatch) is read at the warped
   time ``t'(t)``, ``dt'/dt = s(L(t'), eta_eff)``: if Θ_t = s Θ0 the frozen dynamics run in warped time.

What it assumes, and where that is measured to fail, is in docs/ACCURACY.md; :func:`drift_summary` gives each
config the drift it was predicted with, which the rows carry (``predicted_drift``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .models import trainable_names
from .objectives import loss_value, output_gradient
from .progress import resolve as resolve_progress
from .sampling import batch_schedule

__all__ = ["ProbeOptions", "ProbeRun", "ProbedDrift", "batch_quadratic", "run_probe", "probe_drift", "drift_summary",
           "warp_result", "warp_results"]


MIN_PROBE_STEPS = 8  # a probe takes at least this many steps (its batch shrinks on small sets to fit the work bound)


@dataclass(frozen=True)
class ProbeOptions:
    """How the drift is probed; every default stated. ``probes`` are (momentum, fraction of max_stable_lr(m))."""

    probes: Tuple[Tuple[float, float], ...] = ((0.0, 0.5), (0.9, 0.3))
    batch_size: int = 64  # probe batch (at most N)
    work_epochs: float = 5.0  # per-sample gradients of all probes together, in epochs (N each); at most 10
    max_steps: int = 0  # steps per probe at most (0: the prediction budget)
    norm_batches: int = 4  # batches at w0 whose median quotient normalises s (counted as work)
    smooth: int = 9  # running-median window over a probe's quotients, in order of loss level
    level_window: int = 5  # running-mean window of batch losses giving the loss level
    seed: int = 0  # batch order of the probes
    covering: bool = False  # at each loss level use only the probes that reached it (ProbedDrift.scale_at)

    def __post_init__(self):
        if not self.probes:
            raise ValueError("probes: needs at least one (momentum, lr fraction) pair")
        for m, f in self.probes:
            if not 0 <= m < 1:
                raise ValueError(f"probes: momentum must be in [0, 1), got {m}")
            if not 0 < f <= 1:
                raise ValueError(f"probes: lr fraction must be in (0, 1], got {f}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if not 0 < self.work_epochs <= 10:
            raise ValueError(f"work_epochs: must be in (0, 10] (epochs of per-sample gradients), got {self.work_epochs}")
        for name in ("max_steps", "norm_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("smooth", "level_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class ProbeRun:
    """One probe: per step its loss level and drift scale s (relative to w0)."""

    momentum: float
    lr: float
    batch_size: int
    level: np.ndarray  # (K,) running-mean batch loss before each step
    scale: np.ndarray  # (K,) s_t = q_t / q_0
    quotient0: float  # the median quotient at w0 (the normalisation)
    diverged: bool
    per_sample_gradients: int
    seconds: float

    @property
    def effective_lr(self) -> float:
        return self.lr / (1.0 - self.momentum)


def batch_quadratic(state):
    """``(idx, G_B) -> G_B^T Θ0[B, B] G_B`` from the state's eigenpairs (class trace: the classes add up;
    full kernel: rows ``i*C + c``); float64 on the CPU."""
    V = state.eigvecs.to(device="cpu", dtype=torch.float64)
    lam = state.eigvals.to(device="cpu", dtype=torch.float64).clamp_min(0)
    C = int(state.num_classes)

    def quadratic(idx: torch.Tensor, G: torch.Tensor) -> float:
        G = G.to(device="cpu", dtype=torch.float64)
        if state.class_trace:
            proj = V[idx].T @ G  # (r, C)
        else:
            rows = (idx.unsqueeze(1) * C + torch.arange(C)).reshape(-1)
            proj = (V[rows].T @ G.reshape(-1)).unsqueeze(1)
        return float((lam.unsqueeze(1) * proj.pow(2)).sum())

    return quadratic


def _running(x: np.ndarray, window: int, fn) -> np.ndarray:
    if window <= 1 or len(x) < 3:
        return x
    h = window // 2
    return np.array([fn(x[max(0, i - h):i + h + 1]) for i in range(len(x))])


def run_probe(model, dataset, state, loss: str, momentum: float, lr: float, steps: int, batch_size: int, *,
              trainable: str = "all", device: str = "cpu", norm_batches: int = 4, level_window: int = 5,
              seed: int = 0, on_step: Optional[Callable[[int], None]] = None) -> ProbeRun:
    """Fine-tune a copy of ``model`` for ``steps`` real heavy-ball minibatch steps and record, at each, the
    running loss level and the batch Rayleigh quotient against Θ0 (module docstring, step 1)."""
    t0 = time.perf_counter()
    n = len(dataset)
    b = min(int(batch_size), n)
    net = copy.deepcopy(model).to(device).eval()  # eval: batch norm frozen, as in the trainer and the kernel
    names = set(trainable_names(net, trainable))
    params = [p for name, p in net.named_parameters() if name in names]
    for name, p in net.named_parameters():
        p.requires_grad_(name in names)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=0.0, nesterov=False, weight_decay=0.0)
    y_all = dataset.targets
    quadratic = batch_quadratic(state)
    schedule = batch_schedule(n, b, norm_batches + steps, seed=seed)

    def quotient(idx) -> Tuple[float, float]:
        out = net(dataset.images(idx).to(device))
        yb = y_all[idx].to(device)
        lb = loss_value(out, yb, loss)
        opt.zero_grad(set_to_none=True)
        lb.backward()
        g2 = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        quad = quadratic(idx, output_gradient(out.detach().double(), yb, loss))
        return float(lb.detach()), b * b * g2 / max(quad, 1e-300)

    step_done = on_step or (lambda n: None)
    q0 = []
    for i in range(norm_batches):  # at w0: no step taken
        q0.append(quotient(schedule[i])[1])
        step_done(1)
    quotient0 = float(np.median(q0)) if q0 else 1.0
    losses, quots = [], []
    diverged = False
    first = None
    for i in range(norm_batches, norm_batches + steps):
        lb, q = quotient(schedule[i])
        first = lb if first is None else first
        if not (math.isfinite(lb) and math.isfinite(q)) or lb > 1e3 * max(first, 1e-12):
            diverged = True
            break
        losses.append(lb)
        quots.append(q)
        opt.step()
        step_done(1)
    level = _running(np.asarray(losses), level_window, np.mean)
    scale = np.asarray(quots) / max(quotient0, 1e-300)
    return ProbeRun(momentum=float(momentum), lr=float(lr), batch_size=b, level=level, scale=scale,
                    quotient0=quotient0, diverged=diverged, per_sample_gradients=b * (norm_batches + len(losses)),
                    seconds=time.perf_counter() - t0)


@dataclass
class ProbedDrift:
    """``s(L, eta_eff)`` from probes at a few effective lrs (ascending), each ``s`` against sorted loss levels."""

    loss: str
    effective_lrs: np.ndarray  # (P,) ascending
    levels: List[np.ndarray]  # per probe, ascending loss levels
    scales: List[np.ndarray]  # per probe, s at those levels (> 0)
    runs: List[ProbeRun] = field(default_factory=list)
    covering: bool = True  # interpolate only between the probes that reached a level (else between all)

    def _probe_scale(self, p: int, loss_value) -> np.ndarray:
        x = np.log(np.maximum(np.asarray(loss_value, dtype=np.float64), 1e-300))
        return np.interp(x, np.log(np.maximum(self.levels[p], 1e-300)), self.scales[p])

    def scale_at(self, loss_value, effective_lr: float) -> np.ndarray:
        """``s`` at loss level(s) ``loss_value`` for ``effective_lr`` (module docstring, step 2): at each level,
        ``log s`` is interpolated in ``log eta_eff`` between the probes that reached that level (held at the
        nearest one outside their range); a level no probe reached takes the probe that went lowest."""
        L = np.atleast_1d(np.asarray(loss_value, dtype=np.float64))
        e = np.log(self.effective_lrs)
        x = math.log(max(effective_lr, 1e-300))
        per_probe = np.stack([self._probe_scale(p, L) for p in range(len(e))])  # (P, len(L))
        lows = np.array([lv.min() for lv in self.levels])
        reached = L[None, :] >= lows[:, None] * (1 - 1e-9)  # (P, len(L))
        lowest = int(np.argmin(lows))
        out = np.empty(len(L))
        # the levels that interpolate between the same probes, at once (one x: the same bracket for all of them)
        patterns = reached.T if self.covering else np.ones((1, len(e)), dtype=bool)
        keys, which = np.unique(patterns, axis=0, return_inverse=True)
        which = which.reshape(-1) if self.covering else np.zeros(len(L), dtype=np.int64)
        for g, key in enumerate(keys):
            cols = np.flatnonzero(which == g)
            idx = np.flatnonzero(key)
            if len(idx) == 0:
                out[cols] = per_probe[lowest, cols]
                continue
            logs = _interp_columns(x, e[idx], np.log(per_probe[np.ix_(idx, cols)]))
            out[cols] = [math.exp(v) for v in logs.tolist()]  # math.exp, as one np.interp per level was read
        return out.reshape(np.shape(loss_value)) if np.ndim(loss_value) else out[0]

    @property
    def per_sample_gradients(self) -> int:
        return int(sum(r.per_sample_gradients for r in self.runs))

    @property
    def lowest_level(self) -> float:
        """The lowest loss level any probe reached: below it ``s`` is held, not measured (:meth:`scale_at`)."""
        return float(min(lv.min() for lv in self.levels))

    def levels_beyond(self, loss_curve) -> float:
        """How far below every probe's lowest level ``loss_curve`` goes, in e-folds of the loss:
        ``max(0, log(lowest_level / min L))`` (0 where the curve stays within what the probes measured)."""
        curve = np.asarray(loss_curve, dtype=np.float64)
        curve = curve[np.isfinite(curve)]
        if not len(curve):
            return 0.0
        return max(0.0, math.log(max(self.lowest_level, 1e-300) / max(float(curve.min()), 1e-300)))


def _interp_columns(x: float, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp(x, xp, fp[:, j])`` for every column j of ``fp`` (rows: the points ``xp``, ascending), in
    np.interp's own arithmetic: the end values held outside ``xp``, an exact hit returns its value, else
    ``slope (x - xp[j]) + fp[j]`` on the bracket ``xp[j] <= x < xp[j + 1]`` (from the other end if that is NaN)."""
    if len(xp) == 1 or x < xp[0]:
        return fp[0].copy()
    if x >= xp[-1]:
        return fp[-1].copy()
    j = int(np.searchsorted(xp, x, side="right")) - 1
    if xp[j] == x:
        return fp[j].copy()
    slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    res = slope * (x - xp[j]) + fp[j]
    bad = np.isnan(res)
    if bad.any():
        other = slope * (x - xp[j + 1]) + fp[j + 1]
        other = np.where(np.isnan(other) & (fp[j] == fp[j + 1]), fp[j], other)
        res = np.where(bad, other, res)
    return res


def probe_drift(model, dataset, state, loss: str, budget_steps: int, options: ProbeOptions = ProbeOptions(), *,
                trainable: str = "all", device: str = "cpu") -> ProbedDrift:
    """Run ``options.probes`` (each ``momentum``, ``fraction x max_stable_lr(momentum)`` of ``state``) within
    ``work_epochs x N`` per-sample gradients in all, and fit ``s(L, eta_eff)``."""
    n = len(dataset)
    per_probe = int(options.work_epochs * n) // len(options.probes)
    # the batch shrinks on a small set so that MIN_PROBE_STEPS steps fit the work bound (never exceeded)
    b = max(1, min(options.batch_size, n, per_probe // (options.norm_batches + MIN_PROBE_STEPS)))
    steps = per_probe // b - options.norm_batches
    steps = max(1, min(steps, options.max_steps or int(budget_steps)))
    runs = []
    total = len(options.probes) * (steps + options.norm_batches)
    with resolve_progress(None).task(f"probing the kernel's drift ({loss}: {len(options.probes)} real runs of "
                                     f"{steps} steps, B {b})", total=total, unit="steps") as task:
        for i, (m, f) in enumerate(options.probes):
            runs.append(run_probe(model, dataset, state, loss, m, f * state.max_stable_lr(m), steps, b,
                                  trainable=trainable, device=device, norm_batches=options.norm_batches,
                                  level_window=options.level_window, seed=options.seed + i, on_step=task.advance))
    runs.sort(key=lambda r: r.effective_lr)
    levels, scales = [], []
    for r in runs:
        lv, sc = r.level, r.scale
        if len(lv) == 0:
            lv, sc = np.array([1.0]), np.array([1.0])
        order = np.argsort(lv, kind="stable")
        lv, sc = lv[order], _running(sc[order], options.smooth, np.median)
        levels.append(lv)
        scales.append(np.maximum(sc, 1e-6))
    return ProbedDrift(loss=loss, effective_lrs=np.array([r.effective_lr for r in runs]), levels=levels,
                       scales=scales, runs=runs, covering=options.covering)


def drift_summary(drift: ProbedDrift, loss_curve: np.ndarray, effective_lr: float) -> Dict[str, float]:
    """The drift a config was predicted with: s at the start and the end of its predicted curve, and its range."""
    s = drift.scale_at(np.asarray(loss_curve, dtype=np.float64), effective_lr)
    return {"drift_final": float(s[-1]), "drift_min": float(s.min()), "drift_max": float(s.max())}


def _warped_time(st: np.ndarray, s_curve: np.ndarray, budget_steps: int, substeps: int) -> np.ndarray:
    """t'(t), t = 0..T: explicit Euler of dt'/dt = s(t'), ``substeps`` steps per step, s read off ``s_curve`` on the
    grid ``st`` exactly as ``np.interp`` reads it (the bracket st[j] <= t' < st[j+1], ``slope (t' - st[j]) + s[j]``,
    the end values held), t' held at the end of the grid. In plain floats: t' only grows, so the bracket only moves
    forward, with no search and no array call per substep."""
    xp, fp = st.tolist(), s_curve.tolist()
    last = len(xp) - 1
    slopes = [(fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]) for j in range(last)]
    h, tp, j = 1.0 / substeps, 0.0, 0
    out = [0.0] * (budget_steps + 1)
    for t in range(1, budget_steps + 1):
        for _ in range(substeps):
            while j < last and tp >= xp[j + 1]:
                j += 1
            if j >= last:
                s = fp[last]
            elif tp < xp[0]:
                s = fp[0]
            else:
                s = slopes[j] * (tp - xp[j]) + fp[j]
            tp += h * s
        out[t] = min(tp, xp[last])
    return np.array(out)


WARP_BATCH_MIN = 64  # configs from which the warp steps them together as arrays (below: one float loop each)


def _warped_times(st: np.ndarray, s_curves: np.ndarray, budget_steps: int, substeps: int) -> np.ndarray:
    """:func:`_warped_time` for many configs on one grid ``st`` (``s_curves``: one row each), the same floats: from
    :data:`WARP_BATCH_MIN` rows on, each Euler substep is a few array operations over all of them (each row's
    bracket moves forward on its own), which is cheaper than a float loop per row."""
    s_curves = np.asarray(s_curves, dtype=np.float64)
    if len(s_curves) < WARP_BATCH_MIN:
        return np.stack([_warped_time(st, c, budget_steps, substeps) for c in s_curves]) if len(s_curves) \
            else np.zeros((0, budget_steps + 1))
    xp = np.asarray(st, dtype=np.float64)
    n, m = s_curves.shape
    last = m - 1
    slopes = np.zeros((n, m))  # slopes[:, j] on the bracket j, as _warped_time computes them
    slopes[:, :last] = (s_curves[:, 1:] - s_curves[:, :-1]) / (xp[1:] - xp[:-1])
    flat_slope, flat_s, row = slopes.ravel(), s_curves.ravel(), np.arange(n) * m
    upper = np.append(xp[1:], np.inf)  # st[j + 1]; past the end a bracket never moves
    h = 1.0 / substeps
    tp, j = np.zeros(n), np.zeros(n, dtype=np.int64)
    out = np.zeros((n, budget_steps + 1))
    for t in range(1, budget_steps + 1):
        for _ in range(substeps):
            move = tp >= upper[j]
            while move.any():
                j += move
                move = tp >= upper[j]
            k = row + j
            s = flat_slope[k] * (tp - xp[j]) + flat_s[k]
            s = np.where(j >= last, s_curves[:, last], np.where(tp < xp[0], s_curves[:, 0], s))
            tp = tp + h * s
        out[:, t] = np.minimum(tp, xp[last])
    return out


def warp_results(results, drift: ProbedDrift, budget_steps: int, substeps: int = 20,
                 caps: Optional[List[float]] = None) -> List[Dict[str, np.ndarray]]:
    """Per-step curves 0..T of each of ``results`` (frozen :class:`~ttp_ray.dynamics.SimResult` s run to a longer
    horizon) read at its warped time ``t'(t)``, ``dt'/dt = s(L(t'), eta_eff)`` (module docstring, step 3), by
    explicit Euler with ``substeps`` steps per step (:func:`_warped_time`, all configs on one grid at once); the
    spreads (quantiles over paths) are read at the same ``t'``. ``caps`` bound each one's s (the edge of
    stability, §14; default none)."""
    caps = [math.inf] * len(results) if caps is None else list(caps)
    # s along each frozen curve, tabulated once: the Euler steps then only interpolate (§9)
    s_curves = [np.minimum(drift.scale_at(res.loss, float(res.config.effective_lr)), cap)
                for res, cap in zip(results, caps)]
    grids: Dict[Tuple[float, ...], List[int]] = {}
    for i, res in enumerate(results):
        grids.setdefault(tuple(np.asarray(res.steps, dtype=np.float64).tolist()), []).append(i)
    warped: List[Optional[np.ndarray]] = [None] * len(results)
    for grid, members in grids.items():
        times = _warped_times(np.array(grid), np.stack([s_curves[i] for i in members]), budget_steps, substeps)
        for i, out in zip(members, times):
            warped[i] = out
    curves = []
    for res, s_curve, out in zip(results, s_curves, warped):
        st = res.steps.astype(np.float64)

        def at(curve):
            if curve is None:
                return None
            curve = np.asarray(curve)
            if curve.ndim == 1:
                return np.interp(out, st, curve)
            return np.stack([np.interp(out, st, c) for c in curve])

        curves.append({"steps": np.arange(budget_steps + 1), "loss": at(res.loss), "error": at(res.error),
                       "loss_spread": at(res.loss_spread), "error_spread": at(res.error_spread), "warped_steps": out,
                       "scale": np.interp(out, st, s_curve)})
    return curves


def warp_result(res, drift: ProbedDrift, budget_steps: int, substeps: int = 20, cap: float = math.inf
                ) -> Dict[str, np.ndarray]:
    """:func:`warp_results` of one result."""
    return warp_results([res], drift, budget_steps, substeps, [cap])[0]
