"""Predicting the loss curve of a large set from a subset: spectral extrapolation (METHOD.md §7,
supplement App. D, Figures 7 and 11). Pure numpy/torch: nothing here knows about Ray.

The idea (App. D): the eigenvalues of Theta, *normalised by the set size*, follow a power law that
settles as N grows, and the projections of the residual on the eigenvectors follow a noisier one. From
the kernel of a subset of ``N0`` samples and one forward pass over the full set of ``N`` samples (for
``F0``), predict the full set's spectrum and projections, then its MSE loss curve in closed form.

Normalisation (used everywhere in this module)
----------------------------------------------
``lambda_k`` are the eigenvalues of ``Theta`` itself (:mod:`ttp_ray.state`); this module works with
``l_k = lambda_k / N`` and with ``q_k = p_k / N``, ``p_k = ||v_k^T (Y - F0)||^2`` (summed over the C
columns with the class-trace kernel, whose eigenvectors are ``N``-vectors). With ``||v_k|| = 1`` over N
samples both settle as N grows (``p_k`` itself grows like N), so the paper's ``p'_k ~ p_k`` holds for the
normalised ones. ``eta lambda_k / N`` of METHOD.md §2 is ``eta l_k`` and the MSE curve of discrete GD is

    L_t = 1/2 [ sum_k q_k (1 - eta l_k)^(2t) + rest ]      (ODE: exp(-2 eta l_k t))          (Prop. 2)

(``rest``: residual outside the modes, constant; 0 for an extrapolated spectrum whose modes are a
complete basis). The number of modes on the full set is ``N`` (class trace) or ``N C`` (full kernel).

The extrapolation (App. D)
--------------------------
1. Eigenvalues. Fit ``l'_k = c k^-s`` to the subset's normalised eigenvalues over an index range
   ``[k_lo, k_hi]`` (:func:`fit_power_law`: least squares in log-log, points weighted ``1/k`` so that
   each decade of k counts the same, Huber-reweighted). Predict with the corrected exponent

       l_hat_k = c k^(-s + alpha (N0/N - 1)) = c k^-(s + delta),   delta = alpha (1 - N0/N) >= 0,

   i.e. the predicted full-set spectrum decays *faster* than the subset's (N0 < N). The leading
   ``head`` modes keep the subset's measured eigenvalues under the same correction,
   ``l_hat_k = l'_k k^-delta`` (exactly the paper's law with the fitted ``c k^-s`` replaced by the
   measured value): the first few modes of a pre-trained net do not follow the power law at all (the
   shared-gradient mode carries much of the residual), and the top one sets the stability limit
   (``k^-delta = 1`` at k = 1, so ``max_stable_lr`` is the subset's). ``head=0`` gives the paper's pure
   power law (it wrecks the top mode: docs/CHOICES.md).
2. Projections. ``q_hat_k = q'_k`` for ``k < k0`` (``k0 = min(100, r0 // 2)``, r0 the subset's rank) and
   ``a k^-b`` for ``k >= k0`` with ``a, b`` fixed by continuity at ``k0`` (``a k0^-b = q'_k0``, or the
   mean of ``q'`` over a window around k0) and by the sum ``sum_k q_hat_k = ||Y - F0||^2 / N`` on the
   full set (:func:`fit_tail`, :func:`extrapolate_projections`). Two rules for the tail's mass, both
   meeting the paper's two constraints exactly:

   * ``"norm"`` (the paper's literal rule): ``||Y - F0||^2/N - sum_{k<k0} q'_k``. A difference of two
     numbers of order ``L_0`` whose error (the subset's sampling noise in the head, mostly the top mode)
     can be as large as the tail itself, even negative (then it falls back to ``"ratio"``);
   * ``"ratio"`` (default): every subset projection is scaled by ``rho = (||Y - F0||^2/N) /
     (||Y0 - F0'||^2/N0)`` and the tail carries the scaled subset mass beyond k0 (the default: the more
     accurate of the two, docs/CHOICES.md).

Choices
-------
* ``alpha = 0.05`` (:data:`DEFAULT_ALPHA`), below the paper's [0.1, 0.2] (its ResNets on CIFAR), and the
  ``"ratio"`` tail rule: chosen on measurements, docs/CHOICES.md ("Subset extrapolation") and
  docs/BENCHMARKS.md section "subset" (``bench/subset.py``).
* The subset's power law does not reach far on these nets (the full spectrum flattens where the subset's
  fitted slope does not): the extrapolated curve has the right late *level* but not always the right late
  *shape*.

What it does not do
-------------------
* No error curve: the error (arg-max of ``F_t``) needs the full set's eigenvectors; only the loss is
  predicted, so T_eps rows are for the criterion ``loss`` only.
* Cross-entropy is refused (``loss``): the ce dynamics are non-linear in ``F`` and need the full set's
  eigenvectors too; App. D is MSE only.
* SGD (``batch_size < N``) is refused: the SDE noise covariance needs the full set's per-sample features
  (METHOD.md §4); all a spectrum gives is the noise-free curve, whose distance to SGD depends on the
  temperature lr/B (measured on digits-5to9 in docs/CHOICES.md; not known in general), so it is not returned
  as an SGD prediction.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .dynamics import (SimConfig, SimOptions, SimResult, flow_factors, gd_factors, heavy_ball_factors, logged_steps,
                       resolve_plan)
from .stability import max_stable_lr
from .state import KernelState

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_K0",
    "TAIL_MASS_RULES",
    "SUBSET_METHOD",
    "PowerLaw",
    "TailLaw",
    "SubsetOptions",
    "Spectrum",
    "ExtrapolatedSpectrum",
    "fit_power_law",
    "corrected_exponent",
    "extrapolate_spectrum",
    "fit_tail",
    "extrapolate_projections",
    "state_spectrum",
    "default_fit_range",
    "extrapolate_state",
    "initial_outputs",
    "mse_loss_fn",
    "simulate_spectrum",
]

DEFAULT_ALPHA = 0.05  # measured (bench/subset.py, docs/BENCHMARKS.md "subset"); the paper: [0.1, 0.2]
DEFAULT_K0 = 100
TAIL_MASS_RULES = ("norm", "ratio")
SUBSET_METHOD = "subset-extrapolated"  # the ``method`` recorded in result rows
_B_MAX = 1e4  # steepest tail exponent tried (a k^-b with b -> inf is "no tail")
_B_MIN = -4.0  # most rising tail allowed (see fit_tail)


# --------------------------------------------------------------------------------------------------
# power laws
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLaw:
    """``v_k = c k^-s`` fitted over ``k_lo <= k <= k_hi`` (1-based indices)."""

    c: float
    s: float
    k_lo: int
    k_hi: int
    rms_log_residual: float  # weighted rms of log(v_k) - log(c k^-s) over the fitted points
    points: int

    def __call__(self, k) -> np.ndarray:
        k = np.asarray(k, dtype=np.float64)
        return self.c * k ** (-self.s)


def fit_power_law(values: Sequence[float], k_range: Optional[Tuple[int, int]] = None, *, robust: bool = True,
                  iterations: int = 50) -> PowerLaw:
    """Fit ``values[k-1] ~ c k^-s`` over ``k_range = (k_lo, k_hi)`` (1-based, inclusive; default all).

    Least squares on ``log v_k = log c - s log k`` with weights ``1/k`` (the indices are dense in
    ``log k`` like ``k``, so this gives every decade the same weight), and with ``robust`` Huber
    reweighting (threshold 1.345 robust standard deviations of the log residuals) so that a few
    outlying modes do not tilt the slope. Non-positive values are skipped. (METHOD.md §7, App. D.)
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    k_lo, k_hi = (1, v.size) if k_range is None else (int(k_range[0]), int(k_range[1]))
    k_lo, k_hi = max(k_lo, 1), min(k_hi, v.size)
    k = np.arange(k_lo, k_hi + 1, dtype=np.float64)
    y = v[k_lo - 1:k_hi]
    ok = np.isfinite(y) & (y > 0)
    k, y = k[ok], np.log(y[ok])
    if k.size < 2:
        raise ValueError(f"k_range: a power law needs >= 2 positive values in [{k_lo}, {k_hi}], got {k.size}")
    X = np.stack([np.ones_like(k), -np.log(k)], 1)
    w0 = 1.0 / k
    w = w0.copy()
    theta = np.zeros(2)
    for _ in range(iterations if robust else 1):
        sw = np.sqrt(w)
        theta_new = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[0]
        r = y - X @ theta_new
        converged = np.allclose(theta_new, theta, rtol=0, atol=1e-12)
        theta = theta_new
        if not robust or converged:
            break
        scale = 1.4826 * np.median(np.abs(r - np.median(r)))
        delta = 1.345 * max(scale, 1e-12)
        w = w0 * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
    r = y - X @ theta
    rms = float(np.sqrt(np.sum(w0 * r * r) / np.sum(w0)))
    return PowerLaw(c=float(math.exp(theta[0])), s=float(theta[1]), k_lo=k_lo, k_hi=k_hi, rms_log_residual=rms,
                    points=int(k.size))


def corrected_exponent(s: float, alpha: float, n0: int, n: int) -> float:
    """The exponent of the full set's power law (App. D): ``-s + alpha (N0/N - 1)`` as a decay rate,
    i.e. ``s + alpha (1 - N0/N)``; larger than ``s`` (steeper) when ``N0 < N``."""
    return float(s + alpha * (1.0 - n0 / n))


def extrapolate_spectrum(subset_eigvals: Sequence[float], count: int, *, n0: int, n: int, alpha: float,
                         fit: PowerLaw, head: int) -> np.ndarray:
    """Predicted normalised eigenvalues ``l_hat_k``, k = 1..count, of the full set (App. D):
    ``c k^-(s + delta)`` with ``delta = alpha (1 - N0/N)``; the first ``head`` take the subset's measured
    normalised values under the same correction, ``l'_k k^-delta``. ``subset_eigvals`` are the subset's
    eigenvalues divided by N0, descending."""
    lam0 = np.asarray(subset_eigvals, dtype=np.float64)
    delta = alpha * (1.0 - n0 / n)
    k = np.arange(1, int(count) + 1, dtype=np.float64)
    out = fit.c * k ** (-(fit.s + delta))
    h = max(0, min(int(head), lam0.size, int(count)))
    out[:h] = lam0[:h] * k[:h] ** (-delta)
    return out


# --------------------------------------------------------------------------------------------------
# projections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TailLaw:
    """``q_hat_k = a k^-b`` for ``k0 <= k <= count``: continuity ``a k0^-b = anchor`` and tail sum ``mass``."""

    a: float
    b: float
    k0: int
    count: int
    anchor: float  # q_hat at k0 (the subset's q'_k0, or its mean over a window around k0)
    mass: float  # the tail sum asked for
    achieved: float  # the tail sum obtained (== mass unless clipped)
    clipped: bool  # mass outside what a non-increasing power law through the anchor can carry

    def __call__(self, k) -> np.ndarray:
        k = np.asarray(k, dtype=np.float64)
        return self.anchor * (k / self.k0) ** (-self.b)


def _tail_sum(b: float, k0: int, count: int) -> float:
    k = np.arange(k0, count + 1, dtype=np.float64)
    return float(np.sum(np.exp(-b * np.log(k / k0))))


def fit_tail(anchor: float, k0: int, count: int, mass: float) -> TailLaw:
    """``a, b`` with ``a k0^-b = anchor`` and ``sum_{k=k0}^{count} a k^-b = mass`` (App. D).

    ``g(b) = sum_k (k/k0)^-b`` decreases from ``g(B_MIN)`` to 1 (b -> inf), so the pair is unique for
    ``anchor < mass <= anchor g(B_MIN)``, ``B_MIN = -4``. A negative b (a rising tail: more mass than a
    flat tail through the anchor holds, i.e. a noisy-low anchor; the extra mass then sits in the slowest
    modes, almost frozen) is allowed so that both constraints hold; outside that range b is clipped (to
    ``B_MIN``, or to ``b -> inf``: no tail beyond the anchor) and the tail is marked ``clipped``.
    """
    k0, count = int(k0), int(count)
    if not (1 <= k0 <= count):
        raise ValueError(f"k0: must be in 1..{count}, got {k0}")
    if not anchor > 0:
        raise ValueError(f"anchor: the projection at k0 must be > 0, got {anchor}")
    ratio = mass / anchor
    g_min, g_max = _tail_sum(_B_MAX, k0, count), _tail_sum(_B_MIN, k0, count)
    if ratio >= g_max:
        b, clipped = _B_MIN, ratio > g_max * (1 + 1e-9)
    elif ratio <= g_min:
        b, clipped = _B_MAX, ratio < g_min * (1 - 1e-9)
    elif count == k0:
        b, clipped = 0.0, False
    else:
        from scipy.optimize import brentq

        # g is monotone decreasing in b; solve in u = asinh(b) for a well-scaled bracket
        f = lambda u: math.log(_tail_sum(math.sinh(u), k0, count)) - math.log(ratio)  # noqa: E731
        u = brentq(f, math.asinh(_B_MIN), math.asinh(_B_MAX), xtol=1e-14, rtol=1e-13, maxiter=500)
        b, clipped = math.sinh(u), False
    a = anchor * math.exp(min(b * math.log(k0), 700.0))
    achieved = anchor * _tail_sum(b, k0, count)
    return TailLaw(a=float(a), b=float(b), k0=k0, count=count, anchor=float(anchor), mass=float(mass),
                   achieved=float(achieved), clipped=bool(clipped))


def _anchor(proj: np.ndarray, k0: int, window: int) -> float:
    w = max(1, int(window))
    lo = max(1, k0 - w // 2)
    hi = min(proj.size, lo + w - 1)
    return float(np.mean(proj[lo - 1:hi]))


def extrapolate_projections(subset_proj: Sequence[float], count: int, total_mass: float, *, k0: int,
                            subset_mass: Optional[float] = None, tail_mass: str = "ratio",
                            anchor_window: int = 1) -> Tuple[np.ndarray, TailLaw, Dict[str, Any]]:
    """Predicted normalised projections ``q_hat_k``, k = 1..count (App. D).

    ``q_hat_k = rho q'_k`` for ``k < k0``, ``a k^-b`` for ``k >= k0`` with ``a k0^-b = rho * anchor``
    (``anchor``: ``q'_k0``, or the mean of ``q'`` over ``anchor_window`` modes centred on k0) and
    ``sum_k q_hat_k = total_mass`` (``||Y - F0||^2 / N`` on the full set). ``tail_mass``:

    * ``"ratio"`` (default; measured less noisy, module docstring): ``rho = total_mass / subset_mass``
      (``subset_mass = ||Y0 - F0'||^2 / N0``, all of the subset's residual, also outside its modes) and
      tail mass ``rho (subset_mass - sum_{k<k0} q'_k)``;
    * ``"norm"`` (the paper's literal rule, ``rho = 1``): tail mass ``total_mass - sum_{k<k0} q'_k``. When
      that is below what a tail through the anchor holds (the subset's head already carries more than the
      full set's norm, a sampling accident) it falls back to ``"ratio"`` (recorded in the info).

    Returns ``(q_hat, tail, info)``; ``info`` says which rule was used and the masses.
    """
    q0 = np.asarray(subset_proj, dtype=np.float64).reshape(-1)
    count, k0 = int(count), int(k0)
    if tail_mass not in TAIL_MASS_RULES:
        raise ValueError(f"tail_mass: {tail_mass!r} is not one of {', '.join(TAIL_MASS_RULES)}")
    if not (1 <= k0 <= min(q0.size, count)):
        raise ValueError(f"k0: must be in 1..{min(q0.size, count)} (subset modes, full-set modes), got {k0}")
    head = q0[:k0 - 1]
    anchor = _anchor(q0, k0, anchor_window)
    if not anchor > 0:
        raise ValueError(f"anchor_window: the subset projections around k0={k0} are all zero; use another k0")
    rule, rho = tail_mass, 1.0
    tail = None
    if rule == "norm":
        tail = fit_tail(anchor, k0, count, total_mass - float(head.sum()))
        if tail.clipped and tail.b > 0:  # head (plus anchor) above the full set's norm: cannot hold both
            rule = "ratio"
    if rule == "ratio":
        if subset_mass is None:
            subset_mass = float(q0.sum())
        if not subset_mass > 0:
            raise ValueError(f"subset_mass: must be > 0, got {subset_mass}")
        rho = float(total_mass) / float(subset_mass)
        tail = fit_tail(rho * anchor, k0, count, rho * (float(subset_mass) - float(head.sum())))
    out = np.empty(count, dtype=np.float64)
    out[:k0 - 1] = rho * head
    k = np.arange(k0, count + 1, dtype=np.float64)
    out[k0 - 1:] = tail.anchor * np.exp(-tail.b * np.log(k / k0))
    info = {"tail_mass_rule": rule, "tail_mass_asked": tail_mass, "rho": rho, "head_mass": float(rho * head.sum()),
            "tail_mass": tail.mass, "tail_achieved": tail.achieved, "tail_clipped": tail.clipped,
            "total_mass": float(total_mass), "sum": float(out.sum())}
    return out, tail, info


# --------------------------------------------------------------------------------------------------
# spectra and their MSE curves
# --------------------------------------------------------------------------------------------------


def mse_loss_fn(eigvals: Sequence[float], projections: Sequence[float], rest: float = 0.0, *, lr: float,
                momentum: float = 0.0, method: str = "discrete", momentum_mode: str = "elr",
                chunk_elems: int = 4_000_000) -> Callable[[Sequence[int]], np.ndarray]:
    """A closure ``steps -> L_t`` for GD on the linearised MSE model over a normalised spectrum
    (METHOD.md §2, §3; supplement Prop. 2): ``L_t = 1/2 [sum_k q_k phi_k(t)^2 + rest]`` with

    * ``discrete`` + ``elr``: ``phi = (1 - eta l_k)^t``, ``eta = lr / (1 - m)``;
    * ``discrete`` + ``heavy_ball``: ``phi = a_t`` of ``a' = (1 - lr l) a + lr m b``, ``b' = m b - l a``
      from ``(1, 0)`` (exact ``torch.optim.SGD`` momentum, per mode);
    * ``ode``: ``phi = exp(-eta l_k t)``.

    ``eigvals`` are ``l_k = lambda_k / N`` and ``projections`` ``q_k = p_k / N`` (module docstring).
    """
    lam = np.asarray(eigvals, dtype=np.float64).reshape(-1)
    q = np.asarray(projections, dtype=np.float64).reshape(-1)
    if lam.shape != q.shape:
        raise ValueError(f"projections: shape {q.shape} does not match eigvals {lam.shape}")
    if method not in ("discrete", "ode"):
        raise ValueError(f"method: {method!r} is not one of discrete, ode")
    if momentum_mode not in ("elr", "heavy_ball"):
        raise ValueError(f"momentum_mode: {momentum_mode!r} is not one of elr, heavy_ball")
    if momentum_mode == "heavy_ball" and method == "ode":
        raise ValueError("momentum_mode: 'heavy_ball' is exact only for the discrete method, not 'ode'")
    eta = lr / (1.0 - momentum) if momentum_mode == "elr" else lr
    keep = q > 0
    lam_t = torch.as_tensor(lam[keep], dtype=torch.float64)
    q_t = torch.as_tensor(q[keep], dtype=torch.float64)
    heavy = momentum_mode == "heavy_ball" and momentum > 0

    def loss_at(steps: Sequence[int]) -> np.ndarray:
        # L_t = 1/2 [sum_k q_k phi_k(t)^2 + rest] with the residual factors phi_k of ttp_ray.dynamics, over
        # normalised eigenvalues (lambda_k / N: the factors of a set of N = 1)
        t = np.asarray(steps, dtype=np.int64).reshape(-1)
        order = np.argsort(t, kind="stable")
        grid = np.concatenate([[0], t[order]])  # heavy ball walks from step 0
        out = np.empty(t.size)
        chunk = max(1, chunk_elems // max(lam_t.numel(), 1))
        for s in range(1, grid.size, chunk):
            rows = grid[s:s + chunk]
            phi = torch.empty(rows.size, lam_t.numel(), dtype=torch.float64)
            if heavy:
                heavy_ball_factors(phi, s, lam_t, 1.0, eta, momentum, grid)
            elif method == "ode":
                flow_factors(phi, torch.as_tensor(-eta * rows.astype(np.float64)), lam_t)
            else:
                gd_factors(phi, torch.as_tensor(rows, dtype=torch.float64).unsqueeze(1), lam_t, 1.0, eta)
            out[order[s - 1:s - 1 + rows.size]] = 0.5 * (((phi * phi) @ q_t).numpy() + rest)
        return out

    return loss_at


@dataclass(frozen=True)
class Spectrum:
    """A normalised spectrum: ``eigvals = lambda_k / N`` (descending), ``projections = p_k / N``, ``rest``
    (normalised residual outside the modes, constant) on a set of ``n`` samples."""

    eigvals: np.ndarray
    projections: np.ndarray
    rest: float
    n: int

    @property
    def lambda_max(self) -> float:
        """Largest normalised eigenvalue (``lambda_max / N``)."""
        return float(self.eigvals[0]) if self.eigvals.size else 0.0

    def max_stable_lr(self, momentum: float = 0.0) -> float:
        """``2 (1 + m) / (lambda_max / N)`` (:func:`ttp_ray.stability.max_stable_lr` of normalised eigenvalues)."""
        return max_stable_lr(self.lambda_max, 1.0, momentum)

    @property
    def initial_loss(self) -> float:
        """``L_0 = 1/2 (sum_k q_k + rest) = ||Y - F0||^2 / 2N``."""
        return 0.5 * (float(self.projections.sum()) + self.rest)

    def loss_fn(self, lr: float, momentum: float = 0.0, *, method: str = "discrete",
                momentum_mode: str = "elr") -> Callable[[Sequence[int]], np.ndarray]:
        """:func:`mse_loss_fn` over this spectrum."""
        return mse_loss_fn(self.eigvals, self.projections, self.rest, lr=lr, momentum=momentum, method=method,
                           momentum_mode=momentum_mode)


@dataclass(frozen=True)
class ExtrapolatedSpectrum(Spectrum):
    """The full set's spectrum predicted from a subset (METHOD.md §7), and how it was obtained."""

    n0: int = 0
    num_classes: int = 0
    class_trace: bool = True
    alpha: float = DEFAULT_ALPHA
    delta: float = 0.0  # alpha (1 - N0/N): added to the fitted decay exponent
    k0: int = DEFAULT_K0
    head: int = 0  # leading modes that keep the subset's measured eigenvalues (corrected by k^-delta)
    eig_fit: Optional[PowerLaw] = None
    tail: Optional[TailLaw] = None
    total_mass: float = 0.0  # ||Y - F0||^2 / N on the full set
    subset_mass: float = 0.0  # ||Y0 - F0'||^2 / N0 on the subset
    subset_rank: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def exponent(self) -> float:
        """The predicted decay rate ``s + alpha (1 - N0/N)``."""
        return float(self.eig_fit.s + self.delta) if self.eig_fit is not None else float("nan")

    def summary(self) -> Dict[str, Any]:
        """Plain JSON-able description (for result rows and the CLI)."""
        out = {"kernel_subset": int(self.n0), "n": int(self.n), "alpha": float(self.alpha),
               "delta": float(self.delta), "k0": int(self.k0), "head": int(self.head),
               "subset_rank": int(self.subset_rank), "modes": int(self.eigvals.size),
               "total_mass": float(self.total_mass), "subset_mass": float(self.subset_mass)}
        if self.eig_fit is not None:
            out.update(fit_c=self.eig_fit.c, fit_s=self.eig_fit.s, fit_k_lo=self.eig_fit.k_lo,
                       fit_k_hi=self.eig_fit.k_hi, fit_rms_log_residual=self.eig_fit.rms_log_residual,
                       exponent=self.exponent)
        if self.tail is not None:
            out.update(tail_a=self.tail.a, tail_b=self.tail.b, tail_clipped=self.tail.clipped)
        out.update({k: v for k, v in self.meta.items() if isinstance(v, (int, float, str, bool, type(None)))})
        return out


@dataclass(frozen=True)
class SubsetOptions:
    """How a subset's spectrum is extrapolated to the full set (METHOD.md §7); every default stated.

    * ``alpha``: exponent correction ``l_hat_k = c k^-(s + alpha (1 - N0/N))``; :data:`DEFAULT_ALPHA`;
    * ``k0``: projections ``q'_k`` kept below ``min(k0, r0 // 2)`` (App. D: 100; r0 the subset's rank: the
      last half of a small subset's modes, bent by its finite size, is folded into the tail; bench: better
      T_eps and curves at N0 = N/10), power-law tail from there;
    * ``head``: leading eigenvalues kept measured (times ``k^-delta``); ``None``: ``k0 - 1`` (the same
      modes as the projections), 0: the paper's pure power law;
    * ``fit_range``: ``(k_lo, k_hi)`` of the eigenvalue fit; ``None``: :func:`default_fit_range`;
    * ``tail_mass``: ``"ratio"`` (default, measured) or ``"norm"`` (the paper's literal rule; noisier, see
      :func:`extrapolate_projections` and the bench);
    * ``anchor_window``: modes averaged around k0 for the continuity anchor (1: ``q'_k0`` itself).
    """

    alpha: float = DEFAULT_ALPHA
    k0: int = DEFAULT_K0
    head: Optional[int] = None
    fit_range: Optional[Tuple[int, int]] = None
    tail_mass: str = "ratio"
    anchor_window: int = 1

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha: must be a finite number >= 0, got {self.alpha}")
        if int(self.k0) < 1:
            raise ValueError(f"k0: must be >= 1, got {self.k0}")
        if self.head is not None and int(self.head) < 0:
            raise ValueError(f"head: must be >= 0 or None, got {self.head}")
        if self.fit_range is not None:
            lo, hi = self.fit_range
            if not (1 <= int(lo) < int(hi)):
                raise ValueError(f"fit_range: must be (k_lo, k_hi) with 1 <= k_lo < k_hi, got {self.fit_range}")
        if self.tail_mass not in TAIL_MASS_RULES:
            raise ValueError(f"tail_mass: {self.tail_mass!r} is not one of {', '.join(TAIL_MASS_RULES)}")
        if int(self.anchor_window) < 1:
            raise ValueError(f"anchor_window: must be >= 1, got {self.anchor_window}")


def default_fit_range(rank: int, num_classes: int, class_trace: bool = True) -> Tuple[int, int]:
    """``(k_lo, k_hi)`` for the eigenvalue fit: past the class-structure head (``k_lo = 2C`` modes of the
    class-trace kernel, ``2C^2`` of the full kernel, whose modes come about C-fold) up to a third of the
    subset's rank (beyond, the finite-size drop-off of the last modes bends the log-log slope; bench:
    digits and synthetic spectra are straightest over this range). At least 6 points."""
    mult = 1 if class_trace else int(num_classes)
    k_lo = 2 * int(num_classes) * mult
    k_hi = int(rank) // 3
    if k_hi - k_lo < 5:
        k_hi = max(k_hi, min(int(rank), 6))
        k_lo = max(1, k_hi - max(5, k_hi // 2))
    return k_lo, k_hi


def _projections_sq(state: KernelState) -> np.ndarray:
    r = state.residual().to(torch.float64)
    v = state.eigvecs.to(torch.float64)
    if state.class_trace:
        return ((v.T @ r) ** 2).sum(1).numpy()
    return ((v.T @ r.reshape(-1)) ** 2).numpy()


def state_spectrum(state: KernelState) -> Spectrum:
    """The normalised spectrum of a kernel state (``lambda_k / N``, ``p_k / N``, residual outside the
    eigenvectors / N): the "naive" curve of the set the state was computed on."""
    n = state.n
    lam = state.eigvals.to(torch.float64).numpy() / n
    q = _projections_sq(state) / n
    total = float((state.residual().to(torch.float64) ** 2).sum()) / n
    return Spectrum(eigvals=lam, projections=q, rest=max(total - float(q.sum()), 0.0), n=n)


def extrapolate_state(subset_state: KernelState, full_f0: torch.Tensor, full_targets: torch.Tensor,
                      options: SubsetOptions = SubsetOptions()) -> ExtrapolatedSpectrum:
    """Predict the full set's normalised spectrum from a subset's kernel state (METHOD.md §7, App. D).

    ``full_f0`` (N, C) are the outputs of the same model at w0 on the full set and ``full_targets`` its
    labels (one forward pass: :func:`initial_outputs`); the subset is any ``N0 < N`` of its samples.
    """
    t0 = time.perf_counter()
    n0, c = subset_state.n, subset_state.num_classes
    f0 = torch.as_tensor(full_f0).to(torch.float64)
    n = int(f0.shape[0])
    if f0.ndim != 2 or f0.shape[1] != c:
        raise ValueError(f"full_f0: expected shape (N, {c}), got {tuple(f0.shape)}")
    if int(torch.as_tensor(full_targets).numel()) != n:
        raise ValueError(f"full_targets: expected {n} labels, got {int(torch.as_tensor(full_targets).numel())}")
    if not n0 < n:
        raise ValueError(f"kernel_subset: N0 = {n0} must be smaller than the dataset size N = {n}")
    y = torch.nn.functional.one_hot(torch.as_tensor(full_targets).long(), c).to(torch.float64)
    total_mass = float(((y - f0) ** 2).sum()) / n
    sub = state_spectrum(subset_state)
    r0 = int(sub.eigvals.size)
    lo, hi = options.fit_range or default_fit_range(r0, c, subset_state.class_trace)
    if r0 < 6 or hi > r0:
        raise ValueError(f"kernel_subset: the subset kernel has {r0} modes, too few for the fit range "
                         f"[{lo}, {hi}]; use a larger N0 (or a larger sketch k)")
    fit = fit_power_law(sub.eigvals, (lo, hi))
    count = n if subset_state.class_trace else n * c
    k0 = min(int(options.k0), max(1, r0 // 2))
    head = k0 - 1 if options.head is None else min(int(options.head), r0)
    delta = float(options.alpha) * (1.0 - n0 / n)
    lam = extrapolate_spectrum(sub.eigvals, count, n0=n0, n=n, alpha=options.alpha, fit=fit, head=head)
    subset_mass = float(sub.projections.sum()) + sub.rest
    q, tail, info = extrapolate_projections(sub.projections, count, total_mass, k0=k0, subset_mass=subset_mass,
                                            tail_mass=options.tail_mass, anchor_window=options.anchor_window)
    meta = dict(info)
    meta.update(method=SUBSET_METHOD, extrapolate_seconds=time.perf_counter() - t0)
    return ExtrapolatedSpectrum(
        eigvals=lam, projections=q, rest=0.0, n=n, n0=n0, num_classes=c, class_trace=subset_state.class_trace,
        alpha=float(options.alpha), delta=delta, k0=k0, head=head, eig_fit=fit, tail=tail,
        total_mass=total_mass, subset_mass=subset_mass, subset_rank=r0, meta=meta)


@torch.no_grad()
def initial_outputs(model: torch.nn.Module, dataset, *, device="cpu", batch_size: int = 2048) -> torch.Tensor:
    """``F0 = f(X; w0)`` on the whole dataset, ``(N, C)`` on the CPU: the one forward pass the
    extrapolation needs on the full set (model in eval mode, batch-norm statistics frozen)."""
    if model.training:
        raise ValueError("model: must be in eval mode (batch-norm statistics frozen, METHOD.md §1); call model.eval()")
    outs = []
    for s in range(0, len(dataset), batch_size):
        outs.append(model(dataset.images(slice(s, s + batch_size)).to(device)).detach().cpu())
    return torch.cat(outs)


def _check_config(cfg: SimConfig, n: int) -> None:
    if cfg.loss != "mse":
        raise ValueError(f"loss: subset extrapolation (METHOD.md §7) predicts the mse loss only, got {cfg.loss!r}")
    if not cfg.is_full_batch(n):
        raise ValueError(f"batch_size: subset extrapolation predicts full-batch GD only (B = N = {n}), "
                         f"got {cfg.batch_size}")


def simulate_spectrum(spectrum: Spectrum, configs: Sequence[SimConfig], budget_steps: int,
                      options: Optional[SimOptions] = None, *, method_name: Optional[str] = None
                      ) -> List[SimResult]:
    """MSE GD curves of ``configs`` over a normalised spectrum, as :class:`~ttp_ray.dynamics.SimResult`
    (loss only: ``error`` is None), so that :mod:`ttp_ray.training_time` reads T̂ε off them exactly as
    off every other curve. Methods and momentum as :mod:`ttp_ray.dynamics` (``auto`` -> ``discrete``,
    ELR with the heavy-ball fallback, ``ode``); divergence: ``lr > max_stable_lr`` or a loss above
    ``blowup_factor * L_0`` (the curve stops before it). ``method_name`` is recorded in ``SimResult.method``
    (default: :data:`SUBSET_METHOD` for an :class:`ExtrapolatedSpectrum`, else the dynamics method).
    Raises ``ValueError`` naming ``loss`` for ce and ``batch_size`` for SGD (module docstring)."""
    opt = options or SimOptions()
    steps = logged_steps(int(budget_steps), opt.log_every)
    n = spectrum.n
    for c in configs:
        if not isinstance(c, SimConfig):
            raise TypeError(f"configs: expected SimConfig, got {type(c).__name__}")
        _check_config(c, n)
    out = []
    cache: Dict[tuple, Tuple[np.ndarray, float]] = {}
    l0 = spectrum.initial_loss
    thr = opt.blowup_factor * max(l0, 1e-300)
    for i, cfg in enumerate(configs):
        plan = resolve_plan(cfg, opt, 1, spectrum.lambda_max)  # normalised eigenvalues: the limits of N = 1
        method, mode, eta, mom, note = plan.method, plan.mode, plan.eta, plan.mom, plan.note
        key = (method, mode, float(f"{eta:.12g}"), float(f"{mom:.12g}"))
        t0 = time.perf_counter()
        if key not in cache:
            fn = mse_loss_fn(spectrum.eigvals, spectrum.projections, spectrum.rest, lr=eta, momentum=mom,
                             method=method, momentum_mode=mode)
            cache[key] = (fn(steps), time.perf_counter() - t0)
        loss, secs = cache[key]
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(loss) | (loss > thr)
        blew = bool(bad.any())
        keep = max(int(np.argmax(bad)), 1) if blew else loss.size
        msl = spectrum.max_stable_lr(cfg.momentum)
        beyond = cfg.lr > msl
        notes = [x for x in (note,) if x]
        if beyond:
            notes.append(f"lr {cfg.lr:.4g} > max_stable_lr {msl:.4g}")
        if blew:
            notes.append(f"blew up at step {int(steps[int(np.argmax(bad))])}")
        name = method_name or (SUBSET_METHOD if isinstance(spectrum, ExtrapolatedSpectrum) else method)
        out.append(SimResult(config=cfg, steps=steps[:keep].copy(), loss=loss[:keep].copy(), error=None,
                             loss_spread=None, error_spread=None, diverged=bool(beyond or blew), blew_up=blew,
                             max_stable_lr=msl, method=name, momentum_mode=mode, paths=1,
                             group=list(cache).index(key), seconds=secs, note="; ".join(notes)))
    return out
