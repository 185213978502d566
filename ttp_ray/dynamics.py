"""Linearised training dynamics on a :class:`~ttp_ray.state.KernelState`, vectorised over many
configurations (METHOD.md §2–4, §11, supplement Algorithm 1, App. C, E, Prop. 1, 2). Pure torch/numpy/scipy:
nothing here knows about Ray.

Conventions (shared with :mod:`ttp_ray.objectives` and the real trainer)
------------------------------------------------------------------------
* ``L = (1/N) sum_i l_i``; mse ``l_i = 1/2 ||f_i - y_i||^2`` (summed over classes), ce the usual one.
  ``G = F - Y`` (mse) or ``softmax(F) - Y`` (ce), ``(N, C)``.
* GD on the linearised model: ``F_{t+1} = F_t - (eta/N) Theta G(F_t)``, ``Theta = V diag(lambda) V^T``
  (the state's eigenpairs; rows ``i*C + c``, or ``Theta_N (x) I_C`` with ``class_trace``, where
  ``Theta G = Theta_N @ G``). Everything is simulated in the low-rank coordinates
  ``F_t = F0 + V A_t`` (``A`` is ``(r,)``, or ``(r, C)`` with class_trace): one step costs O(NC r).
* Momentum exactly as ``torch.optim.SGD(lr, momentum=m)`` (dampening 0, no Nesterov):
  ``buf <- m buf + g; w <- w - lr buf`` (first step ``buf = g``). In function space with ``u = J buf``:
  ``u_{t+1} = m u_t + (1/N) Theta G_t``, ``F_{t+1} = F_t - lr u_{t+1}``.
* Batches: per epoch a fresh permutation of the N samples, consecutive chunks of B, drop_last
  (:func:`batch_schedule`; N // B steps per epoch). ``batch_size`` None or >= N is full-batch GD.
* Curves are logged at steps ``0, log_every, 2 log_every, ..., T`` (step 0 = before any update, the
  budget T always included): :func:`logged_steps`. Error = fraction misclassified (arg-max).

Methods (``SimOptions.method``)
-------------------------------
``ode``        gradient flow ``dF/dt = -(eta_eff/N) Theta G(F)``. In ``tau = eta_eff t`` the flow does not
               depend on the config at all, so *every* config of a loss shares one trajectory (the
               time-rescaling collapse, METHOD.md §4), read off at ``tau = eta_eff t``.
               mse: closed form (Prop. 2) ``L_t = (1/2N)[sum_k p_k exp(-2 eta_eff lambda_k t / N) + rest]``,
               ``p_k = ||v_k^T (Y - F0)||^2``, ``rest = ||Y - F0||^2 - sum_k p_k`` (residual outside the
               eigenvectors' span: constant). ce: one stiff integration of
               ``dA/dtau = -(1/N) diag(lambda) V^T (softmax(F0 + V A) - Y)`` for the whole grid. Default
               (``ode_solver='auto'``): scipy ``BDF`` (the stiff family LSODA switches to; the flow is
               stiff because ``tau`` runs to ``eta_eff_max T`` while the top modes relax in
               ``N / lambda_max``) given a sparse approximate Jacobian for its Newton iterations: the
               exact diagonal of ``-(1/N) diag(lambda) V^T H V`` (full kernel; ``H`` the block-diagonal
               softmax Hessian) or ``-(1/N) diag(lambda) (x) mean_i H_i`` (class trace). It costs
               O(N C^2 r) and a trivial factorisation, and only affects Newton convergence, not the
               error control; it is the fastest of the solvers tried (docs/CHOICES.md, "The CE ODE solver").
               The dense-Jacobian solvers (``'BDF'``, ``'LSODA'``, ``'Radau'``) and explicit ones
               (``'RK45'``, ``'RK23'``, ``'DOP853'``) remain options. F at the requested ``tau`` comes
               from the solver's dense output: it is a polynomial of low degree K-1 per solver step,
               so F is lifted at K Chebyshev nodes per step and interpolated exactly.
``discrete``   the exact discrete map. mse: residual modes ``(1 - eta lambda_k/N)^t`` (ELR) or, for
               heavy ball, the per-mode 2x2 recurrence ``a' = (1 - eta lambda/N) a + eta m b``,
               ``b' = m b - (lambda/N) a`` (a: residual, b: velocity), stepped between logged points by
               matrix powers. ce: the map stepped in the low-rank coordinates, batched over configs.
``sde``        supplement Prop. 1 with the ELR (Algorithm 1, line 3):
               ``dF = -(eta_eff/N) Theta G dt + (eta_eff/sqrt(B_eff)) J Sigma^(1/2) dn`` (t in steps).
               ``Sigma`` = population covariance of the per-sample gradients ``J_i^T g_i`` at t = 0; in the
               eigen features ``Z = V diag(sqrt(lambda))`` (a factor of ``Theta``) a noise draw is
               ``xi = N^-1/2 sum_i (u_i - u_bar) n_i``, ``u_i = Z_i^T g_i``, ``n_i ~ N(0, 1)`` iid (no matrix
               square root; ``cov xi = Sigma`` exactly), i.e. in A-coordinates
               ``N^-1/2 diag(lambda) V^T((n - n_bar) * G0)``.
               ``noise='rescaled'`` multiplies the covariance by ``L_t / L_0`` (per path; supplement
               App. C), ``'constant'`` keeps the t = 0 level (the ablation, wrong asymptote).
               Batches are drawn without replacement, so the minibatch-gradient covariance is
               ``Sigma (N - B) / (B (N - 1))`` (finite-population correction; ``fpc=False`` gives the
               paper's with-replacement ``Sigma / B``): ``B_eff = B (N - 1) / (N - B)``.
               In ``tau`` the SDE depends only on the temperature ``eta_eff / B_eff``: configs sharing it
               share one simulation (kept to groups whose ``eta_eff`` span at most ``max_tau_ratio``, so a
               group costs at most that many times T Euler–Maruyama steps). Euler–Maruyama takes one
               step per training step of the group's smallest ``eta_eff`` (the paper's ``dt = 1``),
               split into ``ceil(eta_eff lambda_max h / N)`` substeps only where that step would be
               unstable (``eta_eff lambda_max h / N >= 2``, ``h`` = 1 for mse, 1/2 for ce since the
               softmax Hessian is <= 1/2; with momentum only when ``elr_fallback`` is off, see below);
               other configs read the path at ``tau = eta_eff t`` (linear interpolation between grid
               points).
               All groups use the same per-path normal draws (common random numbers), so results do
               not depend on how configs are batched. A config with lr beyond
               ``SDE_SKIP_FACTOR x max_stable_lr(m)`` is not simulated: it is reported diverging at once
               (its curve is step 0 alone, ``note`` says so), since the substep count, and so the cost,
               would grow with lr for a curve of a config already flagged diverging.
``minibatch``  real SGD with heavy-ball momentum on the linear model ``F = F0 + Z b`` with
               the trainer's batch sampling (:func:`batch_schedule`, path p uses seed ``seed + p``, so
               path 0 reproduces a trainer run with seed ``seed``): ``g = (1/B) sum_{i in batch} Z_i^T g_i``.
               Features ``Z``: ``'eigen'`` (default: ``V diag(sqrt(lambda))``, the same Theta every other
               method uses; carried as ``A = sqrt(lambda) b`` so the step reads
               ``A <- A - lr buf``, ``buf <- m buf + (1/B) diag(lambda) V_B^T G_B``) or ``'sketch'`` (the
               state's Z). Costs O(B C r) per step (O(NC r) at logged steps). A chunk whose every
               trajectory has blown up stops there (checked every ``_DEAD_CHECK_EVERY`` logged points),
               not at the budget: mse SGD far beyond the limit is reported diverging at once.
``auto``       ``discrete`` for GD, ``minibatch`` for SGD (``sde`` when momentum_mode='elr', the paper's
               method): at equal accuracy on the embedded benchmark, the exact minibatch map does
               O(B C r) work per step where the sde does O(N C r) (METHOD.md §4, docs/CHOICES.md).

Momentum (``momentum_mode``): ``elr`` replaces ``(lr, m)`` by ``(lr/(1-m), 0)`` (App. E; the paper's method);
``heavy_ball`` is exact (discrete and minibatch only). ``auto`` = heavy_ball for minibatch, elr otherwise.
With the ELR the discrete map is unstable for ``eta_eff lambda_max h / N >= 2`` although real heavy ball
is stable up to ``lr < 2(1+m)N/lambda_max``; with ``elr_fallback`` (default) such configs are simulated
by exact heavy ball instead (noted in ``SimResult.note``), rather than reported as diverging. For the
``sde`` the same condition switches the config to ``minibatch`` with exact heavy ball: Euler–Maruyama
would need ``ceil(eta_eff lambda_max h / N)`` substeps per step there (slow), and exact heavy-ball SGD on
the linear model is what the ELR approximates.

Divergence: ``max_stable_lr = 2(1+m) N / lambda_max`` (METHOD.md §2, §13) is reported for every config; a config
with ``lr`` above it is ``diverged``, and so is one whose simulated loss becomes non-finite or exceeds
``blowup_factor * L_0`` (``blew_up``; its curves stop at the last logged point before that, so no
NaN/inf, and no value above the threshold, reaches a result). For ce the limit is conservative (the
softmax Hessian is <= 1/2, so the linear ce model tolerates up to twice that); such configs are still
reported as diverging (METHOD.md §2), with their (finite) curves.

Collapse: :func:`simulation_groups` / :func:`distinct_simulations` give the distinct simulations a grid
needs (ode: one per loss; discrete: one per ``eta_eff`` (elr) or ``(lr, m)`` (heavy ball); sde: one per
temperature (and ``eta_eff`` range); minibatch: one per ``(lr, m, B)``), ``simulate`` dedupes with them and
fans results back out.

Error curves of the closed forms (mse ode/discrete) need one lift ``F = F0 + V A`` per (config, logged
step), O(NC r) each; for big grids the rows of residual factors are first compressed to their numerical
rank (randomised range finder on the row space with an exact per-row check: every lifted F is within
``lowrank_tol * ||V^T (Y - F0)||`` (Frobenius, over all N*C outputs) of the exact one, i.e. float32
level; arg-max near-ties aside the errors are identical). Stepped methods get the error for free
from the F they compute anyway, except at logged steps of sde/minibatch with mse (one lift each).

Precision: closed forms, dense-output lifts and the ODE solver run in float64; the stepped methods (ce
discrete, sde, minibatch) in ``SimOptions.dtype`` (default: the state's dtype: float32 for the embedded
backbones' states, whose T_eps equal float64's within 1 %, tests/test_predict.py). Device: the state's (scipy
parts on the CPU); the stepped methods keep everything on it, the sde's noise included (drawn in float64,
so float32 and float64 runs see the same draws), and read their records back once per chunk. Layout: a chunk's
trajectories (configs x paths) sit side by side, coordinates ``(d, S, q)``, outputs ``(N, S, C)``, so a step is
one GEMM with the basis on each side; minibatch SGD steps every batch size of the chunk together (one row
gather per distinct batch size). Moving modes: a stepped simulation moves only the eigen modes with
``eta_eff lambda_k T / N >= mode_tol`` (the first-order fraction of a mode's residual the budget removes);
the others keep their initial value, and each config keeps its own modes inside a wider chunk, so results do
not depend on the batching. Memory: chunks of configs/rows are sized to ``SimOptions.memory_mb``; results do
not depend on the chunking.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .objectives import check_loss, loss_value, error_rate
from .sampling import batch_schedule
from .stability import elr_stability_ratio, max_stable_lr
from .state import KernelState

__all__ = [
    "METHODS",
    "MOMENTUM_MODES",
    "NOISE_MODELS",
    "FEATURES",
    "ODE_SOLVERS",
    "SimConfig",
    "SimOptions",
    "SimResult",
    "simulate",
    "logged_steps",
    "batch_schedule",
    "simulation_groups",
    "distinct_simulations",
    "effective_batch_size",
    "curve_values",
    "SimulationPlan",
    "resolve_plan",
    "flow_factors",
    "gd_factors",
    "heavy_ball_factors",
    "SDE_SKIP_FACTOR",
    "simulation_memory",
]

METHODS = ("auto", "ode", "discrete", "sde", "minibatch")
MOMENTUM_MODES = ("auto", "elr", "heavy_ball")
NOISE_MODELS = ("rescaled", "constant")
FEATURES = ("eigen", "sketch")
ODE_SOLVERS = ("auto", "BDF", "LSODA", "Radau", "RK45", "RK23", "DOP853")
# an sde config with lr beyond this multiple of max_stable_lr(m) is reported diverging without being simulated
# (Euler-Maruyama would take ceil(eta_eff lambda_max h / N) substeps per step there, its cost growing with lr);
# 4 leaves the ce linear model's factor-2 tolerance (hessian_bound 1/2, METHOD.md §2) simulated as before
SDE_SKIP_FACTOR = 4.0


# --------------------------------------------------------------------------------------------------
# public dataclasses
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """One training configuration: ``torch.optim.SGD(lr, momentum)`` with batch size ``batch_size``
    (None, or >= N: full-batch GD) on loss ``loss`` ('mse' | 'ce')."""

    lr: float
    momentum: float = 0.0
    batch_size: Optional[int] = None
    loss: str = "mse"

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: must be a positive finite number, got {self.lr}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1 or None (full batch), got {self.batch_size}")
        check_loss(self.loss)

    @property
    def effective_lr(self) -> float:
        """``lr / (1 - m)`` (supplement App. E)."""
        return self.lr / (1.0 - self.momentum)

    def is_full_batch(self, n: Optional[int]) -> bool:
        return self.batch_size is None or (n is not None and int(self.batch_size) >= n)


@dataclass(frozen=True)
class SimOptions:
    """How to simulate (see the module docstring for the equations)."""

    method: str = "auto"  # 'auto' | 'ode' | 'discrete' | 'sde' | 'minibatch'
    momentum_mode: str = "auto"  # 'auto' (heavy_ball for minibatch, else elr) | 'elr' | 'heavy_ball'
    elr_fallback: bool = True  # ELR map unstable but heavy ball stable -> simulate heavy ball
    noise: str = "rescaled"  # sde: 'rescaled' (cov * L_t/L_0) | 'constant' (ablation)
    fpc: bool = True  # sde: finite-population correction (N-B)/(N-1) of sampling without replacement
    features: str = "eigen"  # minibatch: 'eigen' (V sqrt(lambda)) | 'sketch' (state.sketch)
    paths: int = 8  # sde / minibatch: seeded sample paths
    seed: int = 0  # path p uses seed + p
    log_every: int = 1  # logged steps 0, log_every, ..., budget
    compute_error: bool = True  # also the error curve (costs one O(NC r) lift per logged point)
    spread: Tuple[float, float] = (0.1, 0.9)  # quantiles over paths reported as the spread
    blowup_factor: float = 1e3  # loss > blowup_factor * L_0 (or non-finite) -> blew up
    max_tau_ratio: float = 4.0  # sde: max eta_eff ratio inside one temperature group
    ode_solver: str = "auto"  # ce ode: 'auto' (BDF, sparse approximate Jacobian) | BDF | LSODA | Radau (dense) | RK45 | RK23 | DOP853
    ode_rtol: float = 1e-6
    ode_atol: float = 1e-8
    ode_dense_max: int = 5000  # largest r*q allowed for the dense-Jacobian solvers (BDF/LSODA/Radau)
    lowrank_tol: float = 1e-7  # 0 disables the compression of closed-form lifts
    lowrank_min_work: float = 2e9  # below this many flops the lifts are done exactly
    memory_mb: float = 1024.0  # cap for the working set of one chunk
    mode_tol: float = 1e-4  # stepped methods: modes with eta_eff lambda_k T / N below this keep their start value; 0: all move
    dtype: Optional[torch.dtype] = None  # stepped methods; None = the state's dtype

    def __post_init__(self):
        for name, val, allowed in (
            ("method", self.method, METHODS),
            ("momentum_mode", self.momentum_mode, MOMENTUM_MODES),
            ("noise", self.noise, NOISE_MODELS),
            ("features", self.features, FEATURES),
        ):
            if val not in allowed:
                raise ValueError(f"{name}: {val!r} is not one of {', '.join(allowed)}")
        if self.paths < 1:
            raise ValueError(f"paths: must be >= 1, got {self.paths}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")
        if not (0.0 <= self.spread[0] <= self.spread[1] <= 1.0):
            raise ValueError(f"spread: quantiles must satisfy 0 <= lo <= hi <= 1, got {self.spread}")
        if self.blowup_factor <= 1:
            raise ValueError(f"blowup_factor: must be > 1, got {self.blowup_factor}")
        if self.max_tau_ratio < 1:
            raise ValueError(f"max_tau_ratio: must be >= 1, got {self.max_tau_ratio}")
        if not self.mode_tol >= 0:
            raise ValueError(f"mode_tol: must be >= 0, got {self.mode_tol}")
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"ode_solver: {self.ode_solver!r} is not one of {', '.join(ODE_SOLVERS)}")


@dataclass
class SimResult:
    """Predicted curves of one config. ``loss``/``error`` are the mean over paths (stochastic methods);
    ``*_spread`` are the ``SimOptions.spread`` quantiles over paths, shape ``(2, len(steps))`` (None for
    deterministic methods). Curves of a config that blew up stop at the last logged point before the
    blow-up (``steps`` shorter than requested); nothing is NaN or infinite."""

    config: SimConfig
    steps: np.ndarray  # (L,) int64 logged steps
    loss: np.ndarray  # (L,) float64
    error: Optional[np.ndarray]  # (L,) float64, None when compute_error=False
    loss_spread: Optional[np.ndarray]
    error_spread: Optional[np.ndarray]
    diverged: bool  # lr > max_stable_lr, or blew_up
    blew_up: bool  # the simulation itself became non-finite or > blowup_factor * L_0
    max_stable_lr: float  # 2 (1 + m) N / lambda_max
    method: str  # 'ode' | 'discrete' | 'sde' | 'minibatch' (resolved)
    momentum_mode: str  # 'elr' | 'heavy_ball' (resolved)
    paths: int
    group: int  # index of the shared simulation (see simulation_groups)
    seconds: float  # wall time of the engine that produced it, shared evenly among its configs
    note: str = ""
    extras: Dict[str, Any] = field(default_factory=dict)  # what a predictor adds (e.g. its drift, its kernels)


# --------------------------------------------------------------------------------------------------
# small public helpers
# --------------------------------------------------------------------------------------------------


def logged_steps(budget_steps: int, log_every: int = 1) -> np.ndarray:
    """``0, log_every, 2 log_every, ..., budget`` (the budget always included)."""
    if budget_steps < 0:
        raise ValueError(f"budget_steps: must be >= 0, got {budget_steps}")
    s = np.arange(0, budget_steps + 1, log_every, dtype=np.int64)
    if s[-1] != budget_steps:
        s = np.append(s, np.int64(budget_steps))
    return s


def effective_batch_size(batch_size: int, n: Optional[int], fpc: bool = True) -> float:
    """``B_eff`` with ``cov(minibatch gradient) = Sigma / B_eff``: ``B (N-1)/(N-B)`` for sampling without
    replacement (``inf`` at B = N), ``B`` with replacement or when N is unknown."""
    b = float(batch_size)
    if not fpc or n is None:
        return b
    if b >= n:
        return math.inf
    return b * (n - 1) / (n - b)


def curve_values(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dataset loss and error (fraction misclassified) of outputs ``(..., N, C)``: the two curve values
    every method reports, in the :mod:`ttp_ray.objectives` convention."""
    return loss_value(outputs, targets, loss), error_rate(outputs, targets)


# --------------------------------------------------------------------------------------------------
# resolution of configs into simulations
# --------------------------------------------------------------------------------------------------


def _r(x: float) -> float:
    """Key rounding: equal to 12 significant digits counts as equal."""
    return float(f"{x:.12g}")


@dataclass(frozen=True)
class SimulationPlan:
    method: str
    mode: str
    loss: str
    eta: float  # step size simulated (eta_eff for elr)
    mom: float  # momentum simulated (0 for elr)
    batch: Optional[int]
    eta_eff: float
    temperature: float  # sde: eta_eff / B_eff
    note: str

    def key(self) -> tuple:
        if self.method == "ode":
            return ("ode", self.loss)
        if self.method == "discrete":
            return ("discrete", self.loss, _r(self.eta), _r(self.mom))
        if self.method == "minibatch":
            return ("minibatch", self.loss, _r(self.eta), _r(self.mom), int(self.batch))
        return ("sde", self.loss, _r(self.temperature))


def resolve_plan(cfg: SimConfig, opt: SimOptions, n: Optional[int], lambda_max: Optional[float]) -> SimulationPlan:
    """The one resolution of a config into what is simulated (docs/METHOD.md §3, §4, §11): the method (``auto``:
    discrete for full batch, minibatch otherwise, sde when ``momentum_mode='elr'``), ELR (``eta / (1 - m)``, no momentum) or exact heavy
    ball, with the fallbacks where the ELR map is unstable; ``n`` and ``lambda_max`` of the kernel simulated
    (a normalised spectrum, eigenvalues ``lambda / N``, passes ``n = 1``)."""
    full = cfg.is_full_batch(n)
    method = opt.method
    notes = []
    if method == "auto":
        if full:
            method = "discrete"
        else:
            # METHOD.md §4: exact minibatch SGD unless the ELR is asked for (the paper's SDE)
            method = "sde" if opt.momentum_mode == "elr" else "minibatch"
    elif method in ("sde", "minibatch") and full:
        notes.append(f"full batch: {method} -> discrete")
        method = "discrete"
    elif method in ("ode", "discrete") and not full:
        notes.append("deterministic method: minibatch noise ignored")
    mode = opt.momentum_mode
    if mode == "auto":
        mode = "heavy_ball" if method == "minibatch" else "elr"
    if mode == "heavy_ball" and method in ("ode", "sde"):
        raise ValueError(f"momentum_mode='heavy_ball' is exact only for the discrete and minibatch methods, not {method!r}")
    if cfg.momentum == 0.0:
        mode = "elr"  # identical dynamics; one key
    eta_eff = cfg.effective_lr
    if mode == "elr" and cfg.momentum > 0 and opt.elr_fallback and method in ("discrete", "minibatch", "sde"):
        if lambda_max is not None and n is not None and lambda_max > 0:
            x = elr_stability_ratio(eta_eff, lambda_max, n, cfg.loss)
            if x >= 2.0 and method == "sde":
                # Euler-Maruyama would need ceil(x) substeps per step, and the ELR is off there (App. E):
                # exact heavy-ball SGD on the linear model is both cheaper and exact
                method, mode = "minibatch", "heavy_ball"
                notes.append(f"elr unstable (eta_eff*lambda_max*h/N = {x:.3g} >= 2): sde -> exact minibatch heavy ball")
            elif x >= 2.0 and cfg.lr <= max_stable_lr(lambda_max, n, cfg.momentum):
                mode = "heavy_ball"
                notes.append(f"elr map unstable (eta_eff*lambda_max*h/N = {x:.3g} >= 2) but heavy ball is stable: exact heavy ball")
    if mode == "elr":
        eta, mom = eta_eff, 0.0
    else:
        eta, mom = cfg.lr, cfg.momentum
    batch = None if full else int(cfg.batch_size)
    temp = 0.0
    if method == "sde":
        temp = eta_eff / effective_batch_size(batch, n, opt.fpc)
    return SimulationPlan(method, mode, cfg.loss, eta, mom, batch, eta_eff, temp, "; ".join(notes))


def _group_plans(plans: Sequence[SimulationPlan], opt: SimOptions) -> List[List[int]]:
    by_key: Dict[tuple, List[int]] = {}
    for i, p in enumerate(plans):
        by_key.setdefault(p.key(), []).append(i)
    groups: List[List[int]] = []
    for key, idx in by_key.items():
        if key[0] != "sde":
            groups.append(idx)
            continue
        # split a temperature class into eta_eff ranges of at most max_tau_ratio
        idx = sorted(idx, key=lambda i: (plans[i].eta_eff, i))
        cur = [idx[0]]
        for i in idx[1:]:
            if plans[i].eta_eff > opt.max_tau_ratio * plans[cur[0]].eta_eff * (1 + 1e-12):
                groups.append(sorted(cur))
                cur = [i]
            else:
                cur.append(i)
        groups.append(sorted(cur))
    groups.sort(key=lambda g: g[0])
    return groups


def _as_options(method_or_options: Union[str, SimOptions, None]) -> SimOptions:
    if method_or_options is None:
        return SimOptions()
    if isinstance(method_or_options, SimOptions):
        return method_or_options
    return SimOptions(method=method_or_options)


def simulation_groups(
    configs: Sequence[SimConfig],
    options: Union[str, SimOptions, None] = "auto",
    n: Optional[int] = None,
    lambda_max: Optional[float] = None,
) -> List[List[int]]:
    """Indices of ``configs`` grouped by the simulation they share (first-appearance order). ``n`` (set
    size) decides which batch sizes are full batch and the sde's finite-population temperature;
    ``lambda_max`` decides the ELR fallback to heavy ball. Pass both (``state.n``, ``state.lambda_max``)
    for the count :func:`simulate` will actually run."""
    opt = _as_options(options)
    plans = [resolve_plan(c, opt, n, lambda_max) for c in configs]
    return _group_plans(plans, opt)


def distinct_simulations(
    configs: Sequence[SimConfig],
    options: Union[str, SimOptions, None] = "auto",
    n: Optional[int] = None,
    lambda_max: Optional[float] = None,
) -> int:
    """How many distinct simulations ``configs`` need (see :func:`simulation_groups`)."""
    return len(simulation_groups(configs, options, n, lambda_max))


# --------------------------------------------------------------------------------------------------
# low-rank coordinates
# --------------------------------------------------------------------------------------------------


class _Basis:
    """Low-rank coordinates ``F = F0 + lift(A)``. Coordinates ``A`` are ``(S, d, q)`` (S trajectories;
    q = 1 for the full kernel, C with class_trace); outputs ``(S, N, C)`` contiguous. ``proj(G) = M^T G``
    (unweighted); ``w`` weighs the gradient coordinates (lambda for the eigen basis, 1 for a sketch):
    a GD step is ``A <- A - (eta/N) w * proj(G)``."""

    def __init__(self, mat: torch.Tensor, w: torch.Tensor, class_trace: bool, n: int, c: int, orthonormal: bool):
        self.M = mat.contiguous()  # row gathers and GEMMs want row-major (SVD factors come column-major)
        self.w = w
        self.ct = class_trace
        self.n, self.c = n, c
        self.d = mat.shape[1]
        self.q = c if class_trace else 1
        self.orthonormal = orthonormal
        self.M3 = None if class_trace else self.M.view(n, c, self.d)

    def to(self, dtype) -> "_Basis":
        return _Basis(self.M.to(dtype), self.w.to(dtype), self.ct, self.n, self.c, self.orthonormal)

    def lift(self, A: torch.Tensor) -> torch.Tensor:
        S, d, q = A.shape
        if not self.ct:
            return (A.reshape(S, d) @ self.M.T).view(S, self.n, self.c)
        out = self.M @ A.permute(1, 0, 2).reshape(d, S * q)  # (N, S*C)
        return out.view(self.n, S, self.c).transpose(0, 1).contiguous()

    def proj(self, G: torch.Tensor) -> torch.Tensor:
        S = G.shape[0]
        if not self.ct:
            return (G.reshape(S, self.n * self.c) @ self.M).view(S, self.d, 1)
        out = self.M.T @ G.transpose(0, 1).reshape(self.n, S * self.c)  # (d, S*C)
        return out.view(self.d, S, self.c).transpose(0, 1)

    # minibatch rows; idx (P, B); coordinates (P, G, d, q); outputs (P, G, B, C)
    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        P, B = idx.shape
        if self.ct:
            return self.M.index_select(0, idx.reshape(-1)).view(P, B, self.d)
        return self.M3.index_select(0, idx.reshape(-1)).view(P, B * self.c, self.d)

    def lift_rows(self, R: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        P, G, d, q = A.shape
        if not self.ct:
            return (A.reshape(P, G, d) @ R.transpose(1, 2)).view(P, G, -1, self.c)
        out = R @ A.permute(0, 2, 1, 3).reshape(P, d, G * q)  # (P, B, G*C)
        return out.view(P, -1, G, self.c).transpose(1, 2).contiguous()

    def proj_rows(self, R: torch.Tensor, Gb: torch.Tensor) -> torch.Tensor:
        P, G, B, c = Gb.shape
        if not self.ct:
            return (Gb.reshape(P, G, B * c) @ R).view(P, G, self.d, 1)
        out = R.transpose(1, 2) @ Gb.transpose(1, 2).reshape(P, B, G * c)  # (P, d, G*C)
        return out.view(P, self.d, G, c).transpose(1, 2)


def _eigen_basis(state: KernelState, dtype) -> _Basis:
    lam = state.eigvals.to(dtype).clamp_min(0)
    return _Basis(state.eigvecs.to(dtype), lam, state.class_trace, state.n, state.num_classes, True)


def _sketch_basis(state: KernelState, dtype) -> _Basis:
    if state.sketch is None:
        raise ValueError("features='sketch' needs state.sketch (Theta ~ Z Z^T); this state has none")
    Z = state.sketch.to(dtype)
    return _Basis(Z, torch.ones(Z.shape[1], dtype=dtype, device=Z.device), state.class_trace, state.n, state.num_classes, False)


# --------------------------------------------------------------------------------------------------
# context shared by the engines
# --------------------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, state: KernelState, opt: SimOptions, steps: np.ndarray):
        self.state, self.opt, self.steps = state, opt, steps
        self.T = int(steps[-1])
        self.logged = np.zeros(self.T + 1, dtype=bool)  # step t is a logged point
        self.logged[steps] = True
        self.pos = np.full(self.T + 1, -1)  # step t -> its index in steps (-1: not logged)
        self.pos[steps] = np.arange(len(steps))
        self.n, self.c = state.n, state.num_classes
        self.device = state.f0.device
        self.cdtype = opt.dtype or (state.f0.dtype if state.f0.is_floating_point() else torch.float32)
        f64 = torch.float64
        self.y = state.targets.long().to(self.device)
        self.f0_64 = state.f0.to(f64)
        self.Y64 = torch.nn.functional.one_hot(self.y, self.c).to(f64)
        self.f0 = state.f0.to(self.cdtype)
        self.Y = self.Y64.to(self.cdtype)
        self.eig64 = _eigen_basis(state, f64)
        self._eigc = None
        r0 = self.Y64 - self.f0_64
        self.P64 = self.eig64.proj(r0.unsqueeze(0))[0]  # (d, q): V^T (Y - F0)
        self.r0sq = float((r0 ** 2).sum())
        self.rest = max(self.r0sq - float((self.P64 ** 2).sum()), 0.0)
        self.phat = self.P64.norm(dim=1)  # (d,)
        self.Pnorm = float(self.phat.norm())
        nz = self.phat.unsqueeze(1) > 0
        self.U64 = torch.where(nz, self.P64 / self.phat.clamp_min(1e-300).unsqueeze(1), torch.zeros_like(self.P64))
        self.liftP = self.eig64.lift(self.P64.unsqueeze(0))[0]  # (N, C)
        self.lambda_max = state.lambda_max
        self.L0 = {loss: float(loss_value(self.f0_64, self.y, loss)) for loss in ("mse", "ce")}
        self.cap = int(opt.memory_mb * 2 ** 20)
        self.item = torch.finfo(self.cdtype).bits // 8

    @property
    def eigc(self) -> _Basis:
        if self._eigc is None:
            self._eigc = self.eig64 if self.cdtype == torch.float64 else self.eig64.to(self.cdtype)
        return self._eigc

    def thr(self, loss: str) -> float:
        return self.opt.blowup_factor * max(self.L0[loss], 1e-300)


def _loss_err(F: torch.Tensor, y: torch.Tensor, Y: torch.Tensor, loss: str, want_err: bool):
    """``F`` (S, N, C) -> loss (S,), error (S,) or None, as float64 numpy."""
    if loss == "mse":
        lv = 0.5 * ((F - Y) ** 2).sum(-1).mean(-1)
    else:
        idx = y.view(1, -1, 1).expand(F.shape[0], -1, 1)
        lv = (torch.logsumexp(F, -1) - torch.gather(F, -1, idx).squeeze(-1)).mean(-1)
    ev = _err_only(F, y) if want_err else None
    return lv.to(torch.float64).cpu().numpy(), ev


def _sgd_update(A: torch.Tensor, g: torch.Tensor, eta, mom, buf: Optional[torch.Tensor]) -> None:
    """One ``torch.optim.SGD`` step in place: ``buf <- m buf + g; A <- A - lr buf`` (heavy ball), or
    ``A <- A - lr g`` without a momentum buffer."""
    if buf is not None:
        buf.mul_(mom).add_(g)
        A.sub_(eta * buf)
    else:
        A.sub_(eta * g)


def _err_only(F: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return (F.argmax(-1) != y.view(1, -1)).to(torch.float64).mean(-1).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# the stepped engines' layout: trajectories in the middle, everything on the device
# --------------------------------------------------------------------------------------------------
#
# Coordinates are (..., d, S, q) and outputs (..., N, S, C): S trajectories (configs x paths) side by side, so
# one step of all of them is one GEMM with the basis (N x d) on each side (no copies of the outputs); the
# full kernel's outputs are a transposed view of its (..., N C, S) product. Losses, errors, blow-up masks
# and records stay on the device; a chunk's records reach the host once, at its end.


def _lift(M: torch.Tensor, A: torch.Tensor, class_trace: bool, c: int) -> torch.Tensor:
    """``M A``: basis (or minibatch rows) ``M`` (..., rows, d) times coordinates ``A`` (..., d, S, q) ->
    outputs (..., n, S, C) (rows = n, or n C for the full kernel)."""
    *lead, d, s, q = A.shape
    out = M @ A.reshape(*lead, d, s * q)
    if class_trace:
        return out.view(*lead, -1, s, c)
    return out.view(*lead, -1, c, s).transpose(-1, -2)


def _proj(M: torch.Tensor, G: torch.Tensor, class_trace: bool) -> torch.Tensor:
    """``M^T G``: outputs-shaped ``G`` (..., n, S, C) -> coordinates (..., d, S, q)."""
    *lead, n, s, c = G.shape
    Mt = M.transpose(-1, -2)
    if class_trace:
        return (Mt @ G.reshape(*lead, n, s * c)).view(*lead, -1, s, c)
    return (Mt @ G.transpose(-1, -2).reshape(*lead, n * c, s)).view(*lead, -1, s, 1)


def _stepped_loss(F: torch.Tensor, y: torch.Tensor, Y: torch.Tensor, loss: str,
                  lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Loss of every trajectory of outputs ``F`` (..., N, S, C) -> (..., S) float64 (``lse`` = logsumexp(F, -1,
    keepdim=True) when known)."""
    if loss == "mse":
        lv = 0.5 * ((F - Y) ** 2).sum(-1).mean(-2)
    else:
        if lse is None:
            lse = torch.logsumexp(F, -1, keepdim=True)
        idx = y.view(-1, 1, 1).expand(*F.shape[:-1], 1)
        lv = (lse - torch.gather(F, -1, idx)).squeeze(-1).mean(-2)
    return lv.to(torch.float64)


def _stepped_error(F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Error rate of every trajectory of outputs ``F`` (..., N, S, C) -> (..., S) float64."""
    return (F.argmax(-1) != y.view(-1, 1)).to(torch.float64).mean(-2)


def _mse_loss_coords(ctx: "_Ctx", A: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """mse loss from eigen coordinates ``A`` (..., d, S, q): ``||r0 - V A||^2 = ||r0||^2 - 2 <P, A> + ||A||^2``
    with ``P = V^T (Y - F0)`` (d, 1, q) (the first d modes), -> (..., S) float64."""
    Ad = A.to(torch.float64)
    v = ctx.r0sq - 2.0 * (Ad * P).sum((-3, -1)) + (Ad * Ad).sum((-3, -1))
    return v / (2.0 * ctx.n)


class _Records:
    """Logged loss (and error) of trajectories, on the device until :meth:`host`. A trajectory whose loss is
    non-finite or above the blow-up threshold is retired: recorded as inf from then on (the caller zeroes its
    coordinates so it stays finite)."""

    def __init__(self, rows: int, shape: Tuple[int, ...], want_err: bool, device, fill=math.inf):
        self.loss = torch.full((rows, *shape), fill, dtype=torch.float64, device=device)
        self.err = torch.full((rows, *shape), math.nan, dtype=torch.float64, device=device) if want_err else None
        self.dead = torch.zeros(shape, dtype=torch.bool, device=device)

    def check(self, lv: torch.Tensor, thr: float) -> torch.Tensor:
        """Retire the trajectories that blew up; returns the loss with inf for every retired one."""
        self.dead = self.dead | ~torch.isfinite(lv) | (lv > thr)
        return torch.where(self.dead, math.inf, lv)

    def put(self, row: int, lv: torch.Tensor, ev: Optional[torch.Tensor]) -> None:
        self.loss[row] = lv
        if self.err is not None and ev is not None:
            self.err[row] = ev

    def host(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        return self.loss.cpu().numpy(), None if self.err is None else self.err.cpu().numpy()


def _moving_modes(ctx: "_Ctx", w: torch.Tensor, eta_eff_max: float, orthonormal: bool) -> int:
    """How many leading eigen modes move within the budget: ``eta_eff lambda_k T / N >= mode_tol`` (the fraction
    of mode k's residual gradient descent removes in T steps, to first order; METHOD.md §2). The others keep
    their initial value (their coordinates stay 0); ``mode_tol = 0`` or a non-eigen basis keeps them all."""
    d = int(w.shape[0])
    if ctx.opt.mode_tol <= 0 or not orthonormal or ctx.T == 0:
        return d
    scale = eta_eff_max * ctx.T / ctx.n
    return max(1, min(d, int((w.to(torch.float64) * scale >= ctx.opt.mode_tol).sum())))


def _rank_chunks(ranks: Sequence[int], per_item: Sequence[int], cap: int) -> List[List[int]]:
    """Items (indices into ``ranks``: a rank, or the sde's grid length) in chunks by ascending value, each of at most ``cap`` trajectories (``per_item``
    each): where the memory cap cuts a grid, configs of like rank share a chunk (its width is its largest rank).
    Cutting further by rank was measured no faster: narrower GEMMs and more steps cost what the width saves."""
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    chunks: List[List[int]] = []
    cur: List[int] = []
    used = 0
    for i in order:
        if cur and used + per_item[i] > cap:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += per_item[i]
    if cur:
        chunks.append(cur)
    return chunks


def _mode_mask(ranks: Sequence[int], d: int, device, dtype) -> Optional[torch.Tensor]:
    """(d, S, 1) with 1 for the modes each trajectory moves, or None when all move all d."""
    if min(ranks) >= d:
        return None
    r = torch.as_tensor(list(ranks), device=device)
    return (torch.arange(d, device=device).view(d, 1) < r.view(1, -1)).to(dtype).unsqueeze(-1)


# --------------------------------------------------------------------------------------------------
# engine: mse closed forms (ode, discrete elr, discrete heavy ball)
# --------------------------------------------------------------------------------------------------
#
# Every (simulation, logged point) is a row phi_s (d,) of per-mode residual factors: the residual is
# r_s = (r0 - V P) + V (phi_s * P), the outputs F_s = F0 + V ((1 - phi_s) * P). With p_hat_k = ||P_k||
# and U = P / p_hat (unit rows), the rows X_s = phi_s * p_hat give the loss
# L_s = (rest + ||X_s||^2) / 2N and F_s = F0 + lift(P) - lift(X_s * U), and an error in X_s of
# norm e changes F_s by exactly norm e (V orthonormal). For many rows, X ~ C W^T with W (d, rho)
# orthonormal (randomised range finder on X^T); the row error ||X_s||^2 - ||C_s||^2 is exact, so each
# row is accepted to ``lowrank_tol * ||P||`` and F_s = F0 + lift(P) - C_s @ lift(W * U).


def _compress_rows(X: torch.Tensor, tol_abs: float, max_rank: int, seed: int = 12345):
    """``X (M, d) ~ C W^T``: returns (C (M, rho), W (d, rho)) or None when the needed rank is too high."""
    M, d = X.shape
    nrm2 = (X * X).sum(1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = X.new_zeros(d, 0)
    Cm = X.new_zeros(M, 0)
    add = 48
    while W.shape[1] + add <= max_rank:
        Om = torch.randn(M, add, generator=g, dtype=X.dtype).to(X.device)
        Y = X.T @ Om  # (d, add): new directions of the row space
        for _ in range(2):  # block Gram-Schmidt against the accepted basis, twice for stability
            Y = Y - W @ (W.T @ Y)
        Wn, _ = torch.linalg.qr(Y)
        W = torch.cat([W, Wn], 1)
        Cm = torch.cat([Cm, X @ Wn], 1)
        err2 = nrm2 - (Cm * Cm).sum(1)
        if float(err2.max()) <= tol_abs ** 2:
            return Cm, W
        add = 32
    return None


def _closed_rows_eval(ctx: _Ctx, X: torch.Tensor, ok: torch.Tensor) -> np.ndarray:
    """Error of every row ``X_s = phi_s * p_hat`` (M, d) float64 (NaN where not ``ok``)."""
    M, d = X.shape
    out = np.full(M, np.nan)
    okn = ok.cpu().numpy()
    if not okn.any():
        return out
    X = X[ok] if not okn.all() else X
    m = X.shape[0]
    basis, N, C = ctx.eig64, ctx.n, ctx.c
    NC = N * C
    opt = ctx.opt
    U = ctx.U64  # (d, q)
    chunk = max(1, ctx.cap // (NC * 8 * 4))
    errs = np.empty(m)
    base = (ctx.f0_64 + ctx.liftP).unsqueeze(0)  # (1, N, C): F at phi = 0
    comp = None
    if opt.lowrank_tol > 0 and 2.0 * m * d * NC > opt.lowrank_min_work and m > 96:
        comp = _compress_rows(X, opt.lowrank_tol * max(ctx.Pnorm, 1e-300), max_rank=min(m, d, NC) // 4)
    if comp is not None:
        Cm, W = comp
        Hf = basis.lift(W.T.unsqueeze(-1) * U.unsqueeze(0)).reshape(W.shape[1], NC)  # (rho, N*C)
        base = base.reshape(1, NC)
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            F = torch.addmm(base, Cm[s:e], Hf, alpha=-1.0).view(e - s, N, C)
            errs[s:e] = _err_only(F, ctx.y)
    else:
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            F = base - basis.lift(X[s:e].unsqueeze(-1) * U.unsqueeze(0))  # (m, N, C)
            errs[s:e] = _err_only(F, ctx.y)
    out[okn] = errs
    return out


def _mat2_pow(m11, m12, m21, m22, e: int):
    """Elementwise 2x2 matrix power by squaring."""
    one, zero = torch.ones_like(m11), torch.zeros_like(m11)
    r11, r12, r21, r22 = one, zero, zero, one
    b11, b12, b21, b22 = m11, m12, m21, m22
    while e > 0:
        if e & 1:
            r11, r12, r21, r22 = (r11 * b11 + r12 * b21, r11 * b12 + r12 * b22, r21 * b11 + r22 * b21, r21 * b12 + r22 * b22)
        e >>= 1
        if e:
            b11, b12, b21, b22 = (b11 * b11 + b12 * b21, b11 * b12 + b12 * b22, b21 * b11 + b22 * b21, b21 * b12 + b22 * b22)
    return r11, r12, r21, r22


def flow_factors(out: torch.Tensor, neg_tau_over_n: torch.Tensor, lam: torch.Tensor) -> None:
    """Residual factor of every mode under gradient flow, ``exp(-tau lambda_k / N)`` (docs/METHOD.md §2),
    into ``out`` ``(len(tau), r)``, from ``-tau / N`` and the eigenvalues ``lambda_k`` of Θ."""
    torch.exp(torch.outer(neg_tau_over_n, lam), out=out)


def gd_factors(out: torch.Tensor, steps: torch.Tensor, lam: torch.Tensor, n: float, eta: float) -> None:
    """Residual factor of every mode under discrete GD, ``(1 - eta lambda_k / N)^t`` (docs/METHOD.md §2), into
    ``out`` ``(len(steps), r)``; ``steps`` a column ``(L, 1)`` of float64 step counts."""
    torch.pow((1.0 - eta * lam / n).unsqueeze(0), steps, out=out)


def heavy_ball_factors(out: torch.Tensor, first: int, lam: torch.Tensor, n: float, eta: float, mom: float,
                       steps: np.ndarray) -> None:
    """Residual factor of every mode under heavy ball at logged points ``first .. first + len(out)``
    into ``out`` (docs/METHOD.md §3): ``(a, b) <- [[1 - eta lam/N, eta m], [-lam/N, m]] (a, b)`` from
    ``(1, 0)``, jumping between logged steps by matrix powers."""
    x = lam / n
    m11, m12, m21, m22 = 1.0 - eta * x, torch.full_like(x, eta * mom), -x, torch.full_like(x, mom)
    a, b = torch.ones_like(x), torch.zeros_like(x)
    if first == 0:
        out[0] = a
    cache = {}
    for j in range(1, first + out.shape[0]):
        e = int(steps[j] - steps[j - 1])
        if e not in cache:
            cache[e] = _mat2_pow(m11, m12, m21, m22, e)
        p11, p12, p21, p22 = cache[e]
        a, b = p11 * a + p12 * b, p21 * a + p22 * b
        if j >= first:
            out[j - first] = a


def _run_mse_closed(ctx: _Ctx, jobs: List[Tuple[int, List[int]]], plans: List[SimulationPlan]) -> Dict[int, tuple]:
    """mse with method ode or discrete: rows of residual factors, loss in closed form, error by lifts."""
    steps = ctx.steps
    L = len(steps)
    lam = ctx.eig64.w
    d, n = lam.shape[0], ctx.n
    want_err = ctx.opt.compute_error
    thr = ctx.thr("mse")
    dev = lam.device
    tsteps = torch.as_tensor(steps, dtype=torch.float64, device=dev).unsqueeze(1)
    producers = []  # (n_rows, fill(out_view, first_row))
    row_of: Dict[int, Tuple[int, np.ndarray]] = {}  # config -> (producer, its rows)
    for gid, idx in jobs:
        pl = plans[idx[0]]
        if pl.method == "ode":
            # one flow for all configs, read at tau = eta_eff t
            taus = np.concatenate([plans[i].eta_eff * steps.astype(np.float64) for i in idx])
            uniq, inv = np.unique(np.array([_r(t) for t in taus]), return_inverse=True)
            ntau = torch.as_tensor(-uniq / n, dtype=torch.float64, device=dev)  # exp(-tau lam / N)

            def fill(out, s, ntau=ntau):
                flow_factors(out, ntau[s:s + out.shape[0]], lam)

            producers.append((len(uniq), fill))
            for k, i in enumerate(idx):
                row_of[i] = (len(producers) - 1, inv[k * L:(k + 1) * L])
        elif pl.mode == "elr":
            def fill(out, s, eta=pl.eta):
                gd_factors(out, tsteps[s:s + out.shape[0]], lam, n, eta)

            producers.append((L, fill))
            for i in idx:
                row_of[i] = (len(producers) - 1, np.arange(L))
        else:
            def fill(out, s, eta=pl.eta, mom=pl.mom):
                heavy_ball_factors(out, s, lam, n, eta, mom, steps)

            producers.append((L, fill))
            for i in idx:
                row_of[i] = (len(producers) - 1, np.arange(L))
    max_rows = max(64, ctx.cap // (d * 8 * 3))
    lv_p = [np.empty(nr) for nr, _ in producers]
    ev_p = [np.full(nr, np.nan) for nr, _ in producers]
    buf = torch.empty(min(max_rows, sum(nr for nr, _ in producers)), d, dtype=torch.float64, device=dev)
    pending = []  # (producer, first, stop, offset in buf)

    def flush(used):
        if used == 0:
            return
        X = buf[:used]
        X.mul_(ctx.phat)
        lvn = (((X * X).sum(1) + ctx.rest) / (2.0 * n)).cpu().numpy()
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(lvn) & (lvn <= thr)
        ev = _closed_rows_eval(ctx, X, torch.from_numpy(ok).to(dev)) if want_err else None
        for pi, s, e, off in pending:
            lv_p[pi][s:e] = lvn[off:off + e - s]
            if want_err:
                ev_p[pi][s:e] = ev[off:off + e - s]
        pending.clear()

    used = 0
    for pi, (nr, fill) in enumerate(producers):
        s = 0
        while s < nr:
            take = min(nr - s, buf.shape[0] - used)
            if take == 0:
                flush(used)
                used = 0
                continue
            fill(buf[used:used + take], s)
            pending.append((pi, s, s + take, used))
            used += take
            s += take
    flush(used)
    results: Dict[int, tuple] = {}
    for i, (pi, rows) in row_of.items():
        results[i] = (lv_p[pi][rows][None, :], ev_p[pi][rows][None, :] if want_err else None)
    return results


# --------------------------------------------------------------------------------------------------
# engine: ce, discrete map (elr / heavy ball), batched over simulations
# --------------------------------------------------------------------------------------------------


def _run_ce_discrete(ctx: _Ctx, jobs: List[Tuple[int, List[int]]], plans: List[SimulationPlan]) -> Dict[int, tuple]:
    basis = ctx.eigc
    steps = ctx.steps
    logged, pos = ctx.logged, ctx.pos
    N, C, q, ct = ctx.n, ctx.c, basis.q, basis.ct
    want_err = ctx.opt.compute_error
    thr = ctx.thr("ce")
    dev, dt = ctx.device, ctx.cdtype
    S_max = max(1, ctx.cap // ((N * C * 6 + basis.d * q * 4) * ctx.item))
    ranks = [_moving_modes(ctx, basis.w, plans[idx[0]].eta_eff, basis.orthonormal) for _, idx in jobs]
    f0, Y = ctx.f0.view(N, 1, C), ctx.Y.view(N, 1, C)
    results: Dict[int, tuple] = {}
    for members in _rank_chunks(ranks, [1] * len(jobs), S_max):
        chunk = [jobs[i] for i in members]
        S, d = len(chunk), max(ranks[i] for i in members)
        M, w = basis.M[:, :d], basis.w[:d]
        mask = _mode_mask([ranks[i] for i in members], d, dev, dt)
        eta = torch.tensor([plans[idx[0]].eta for _, idx in chunk], dtype=dt, device=dev).view(1, S, 1)
        mom = torch.tensor([plans[idx[0]].mom for _, idx in chunk], dtype=dt, device=dev).view(1, S, 1)
        use_buf = any(plans[idx[0]].mom != 0 for _, idx in chunk)
        wN = (w / N).view(d, 1, 1) if mask is None else (w / N).view(d, 1, 1) * mask
        A = torch.zeros(d, S, q, dtype=dt, device=dev)
        buf = torch.zeros_like(A) if use_buf else None
        rec = _Records(len(steps), (S,), want_err, dev)
        for t in range(ctx.T + 1):
            F = _lift(M, A, ct, C).add_(f0)  # (N, S, C)
            lse = torch.logsumexp(F, -1, keepdim=True)
            if logged[t]:
                lv = rec.check(_stepped_loss(F, ctx.y, Y, "ce", lse), thr)
                rec.put(pos[t], lv, _stepped_error(F, ctx.y) if want_err else None)
                A.masked_fill_(rec.dead.view(1, S, 1), 0)
                if buf is not None:
                    buf.masked_fill_(rec.dead.view(1, S, 1), 0)
            if t == ctx.T:
                break
            G = F.sub_(lse).exp_().sub_(Y)  # softmax(F) - Y, in place
            _sgd_update(A, _proj(M, G, ct).mul_(wN), eta, mom, buf)
        lrec, erec = rec.host()
        for s, (_, idx) in enumerate(chunk):
            for i in idx:
                results[i] = (lrec[:, s][None, :], erec[:, s][None, :] if want_err else None)
    return results


# --------------------------------------------------------------------------------------------------
# engine: ce, ode (one trajectory in tau for every config)
# --------------------------------------------------------------------------------------------------


def _ce_rhs_and_jac(ctx: _Ctx):
    """``dA/dtau = -(1/N) diag(lambda) V^T (softmax(F0 + V A) - Y)`` and its Jacobian
    ``-(1/N) diag(lambda) V^T H V`` (``H_i = diag(p_i) - p_i p_i^T``), flattened ``(d*q,)``."""
    basis = ctx.eig64
    N, C, d, q = ctx.n, ctx.c, basis.d, basis.q
    lamN = basis.w / N
    f0, Y = ctx.f0_64, ctx.Y64

    def F_of(y: np.ndarray) -> torch.Tensor:
        A = torch.as_tensor(y, dtype=torch.float64).to(ctx.device).view(1, d, q)
        return f0 + basis.lift(A)[0]

    def fun(t, y):
        G = torch.softmax(F_of(y), -1) - Y
        out = -lamN.view(d, 1) * basis.proj(G.unsqueeze(0))[0]
        return out.reshape(-1).cpu().numpy()

    # the Jacobian only steers the implicit solver's Newton iterations: float32 is ample
    V = basis.M.to(torch.float32)
    V3 = None if basis.ct else V.view(N, C, d)
    lamN32 = lamN.to(torch.float32)

    def jac(t, y):
        p = torch.softmax(F_of(y), -1).to(torch.float32)  # (N, C)
        if not basis.ct:
            HV = p.unsqueeze(-1) * V3 - p.unsqueeze(-1) * (p.unsqueeze(1) @ V3)  # (N, C, d)
            return (-lamN32.view(d, 1) * (V.T @ HV.reshape(N * C, d))).to(torch.float64).cpu().numpy()
        J = torch.empty(d, C, d, C, dtype=torch.float32, device=V.device)
        for c in range(C):
            for c2 in range(c, C):
                wgt = -p[:, c] * p[:, c2]
                if c == c2:
                    wgt = wgt + p[:, c]
                blk = V.T @ (wgt.unsqueeze(1) * V)
                J[:, c, :, c2] = blk
                if c2 != c:
                    J[:, c2, :, c] = blk
        J.mul_(-lamN32.view(d, 1, 1, 1))
        return J.reshape(d * C, d * C).to(torch.float64).cpu().numpy()

    def jac_approx(t, y):
        """Sparse stand-in for BDF's Newton iterations when the dense Jacobian is too big: the exact
        diagonal of -(1/N) diag(lambda) V^T H V (full kernel), or -(1/N) diag(lambda) (x) mean_i H_i
        (class trace, exact when all H_i are equal since V^T V = I)."""
        import scipy.sparse as sp

        p = torch.softmax(F_of(y), -1)  # (N, C)
        if not basis.ct:
            V3 = basis.M3  # (N, C, d)
            pv = (p.unsqueeze(-1) * V3).sum(1)  # (N, d): p_i^T v_ik
            diag = (p.unsqueeze(-1) * V3 * V3).sum((0, 1)) - (pv * pv).sum(0)
            return sp.diags((-lamN * diag).cpu().numpy(), format="csc")
        Hbar = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(1)).mean(0)  # (C, C)
        blocks = (-lamN.view(d, 1, 1) * Hbar.unsqueeze(0)).cpu().numpy()
        return sp.block_diag(list(blocks), format="csc")

    return fun, jac, jac_approx


def _run_ce_ode(ctx: _Ctx, jobs: List[Tuple[int, List[int]]], plans: List[SimulationPlan]) -> Dict[int, tuple]:
    from scipy.integrate import BDF, DOP853, LSODA, RK23, RK45, Radau

    opt = ctx.opt
    steps = ctx.steps.astype(np.float64)
    L = len(steps)
    idx_all = [i for _, idx in jobs for i in idx]
    taus = np.concatenate([plans[i].eta_eff * steps for i in idx_all])
    uniq, inv = np.unique(np.array([_r(t) for t in taus]), return_inverse=True)
    want_err = opt.compute_error
    lv_u = np.full(len(uniq), np.inf)
    ev_u = np.full(len(uniq), np.nan)
    basis = ctx.eig64
    n_unk = basis.d * basis.q
    thr = ctx.thr("ce")

    def emit(sel: np.ndarray, F: torch.Tensor):  # F (m, N, C)
        lv, ev = _loss_err(F, ctx.y, ctx.Y64, "ce", want_err)
        lv_u[sel] = lv
        if want_err:
            ev_u[sel] = ev

    k = 0
    if uniq[0] == 0.0:
        emit(np.array([0]), ctx.f0_64.unsqueeze(0))
        k = 1
    if k < len(uniq):
        fun, jac, jac_approx = _ce_rhs_and_jac(ctx)
        name = opt.ode_solver
        solvers = {"BDF": BDF, "LSODA": LSODA, "Radau": Radau, "RK45": RK45, "RK23": RK23, "DOP853": DOP853}
        kw = dict(rtol=opt.ode_rtol, atol=opt.ode_atol)
        if name == "auto":
            name, kw["jac"] = "BDF", jac_approx
        elif name in ("BDF", "LSODA", "Radau"):
            if n_unk > opt.ode_dense_max:
                raise ValueError(f"ode_solver={name!r} needs a dense {n_unk}x{n_unk} Jacobian (> ode_dense_max={opt.ode_dense_max}); use 'auto'")
            kw["jac"] = jac
        elif name not in solvers:
            raise ValueError(f"ode_solver: {name!r} is not one of auto, {', '.join(solvers)}")
        solver = solvers[name](fun, 0.0, np.zeros(n_unk), float(uniq[-1]), **kw)
        if name == "BDF" and opt.ode_solver == "BDF":
            _torch_lu(solver)
        while k < len(uniq) and solver.status == "running":
            solver.step()
            if solver.status == "failed":
                raise RuntimeError(f"ce ode ({name}) failed at tau={solver.t:.6g}: {getattr(solver, 'message', '')}")
            hi = len(uniq) if solver.status == "finished" else int(np.searchsorted(uniq, solver.t, side="right"))
            if hi <= k:
                continue
            sel = np.arange(k, hi)
            _emit_dense(ctx, solver.dense_output(), uniq[sel], sel, emit)
            k = hi
            if not np.isfinite(lv_u[hi - 1]) or lv_u[hi - 1] > thr:
                break
    results: Dict[int, tuple] = {}
    for kk, i in enumerate(idx_all):
        rows = inv[kk * L:(kk + 1) * L]
        results[i] = (lv_u[rows][None, :], ev_u[rows][None, :] if want_err else None)
    return results


def _torch_lu(solver) -> None:
    """Route scipy BDF's dense LU factor/solve through torch (LAPACK via MKL: several times faster
    than scipy's bundled OpenBLAS here); BDF treats the factorisation as opaque."""
    if not (hasattr(solver, "lu") and hasattr(solver, "solve_lu")) or getattr(solver, "nlu", None) is None:
        return

    def lu(A):
        solver.nlu += 1
        return torch.linalg.lu_factor(torch.from_numpy(np.ascontiguousarray(A)))

    def solve_lu(LU, b):
        rhs = torch.from_numpy(np.ascontiguousarray(b))
        vec = rhs.ndim == 1
        out = torch.linalg.lu_solve(LU[0], LU[1], rhs.unsqueeze(1) if vec else rhs)
        return (out.squeeze(1) if vec else out).numpy()

    solver.lu = lu
    solver.solve_lu = solve_lu


def _dense_degree(dense) -> int:
    """Upper bound on the polynomial degree (in t) of a scipy dense output over its step."""
    if hasattr(dense, "yh") and hasattr(dense, "p"):  # LSODA: Nordsieck array
        return len(dense.p) - 1
    order = getattr(dense, "order", None)
    return 13 if order is None else int(order) + 1


def _emit_dense(ctx: _Ctx, dense, taus: np.ndarray, sel: np.ndarray, emit):
    """F at ``taus`` (inside the solver's last step) from its dense output. That output is a polynomial
    of degree K-1 in t, so F is too: when there are more than K points, F is lifted only at K Chebyshev
    nodes of the step and interpolated (barycentric Lagrange, exact for such polynomials)."""
    basis = ctx.eig64
    d, q = basis.d, basis.q
    N, C = ctx.n, ctx.c
    m = len(taus)
    chunk = max(1, ctx.cap // (N * C * 8 * 3))

    def lift_at(ts: np.ndarray) -> torch.Tensor:  # (k,) -> (k, N, C), without F0
        Y = np.asarray(dense(ts)).reshape(d * q, len(ts))
        A = torch.as_tensor(np.ascontiguousarray(Y.T), dtype=torch.float64).to(ctx.device).view(-1, d, q)
        return basis.lift(A)

    K = _dense_degree(dense) + 1
    t0, t1 = float(dense.t_min), float(dense.t_max)
    if m > K and t1 > t0:
        j = np.arange(K)
        nodes = 0.5 * (t0 + t1) + 0.5 * (t1 - t0) * np.cos((2 * j + 1) * np.pi / (2 * K))
        wts = (-1.0) ** j * np.sin((2 * j + 1) * np.pi / (2 * K))  # barycentric weights (Chebyshev 1st kind)
        diff = taus[:, None] - nodes[None, :]
        exact = np.isclose(diff, 0.0, atol=1e-15 * max(1.0, abs(t1)))
        with np.errstate(divide="ignore", invalid="ignore"):
            Lm = wts[None, :] / diff
            Lm = Lm / Lm.sum(1, keepdims=True)
        hit = exact.any(1)
        if hit.any():
            Lm[hit] = exact[hit].astype(np.float64)
        H = lift_at(nodes).reshape(K, N * C)
        Lt = torch.as_tensor(Lm, dtype=torch.float64).to(ctx.device)
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            emit(sel[s:e], ctx.f0_64.unsqueeze(0) + (Lt[s:e] @ H).view(e - s, N, C))
        return
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        emit(sel[s:e], ctx.f0_64.unsqueeze(0) + lift_at(taus[s:e]))


# --------------------------------------------------------------------------------------------------
# engine: sde (Euler–Maruyama in tau, one simulation per temperature group, P paths each)
# --------------------------------------------------------------------------------------------------


def _path_generators(seed: int, paths: int, device) -> List[torch.Generator]:
    """One generator per path (path p: seed + p) on the device the noise is drawn on."""
    return [torch.Generator(device=device).manual_seed(int(seed) + p) for p in range(paths)]


def _run_sde(ctx: _Ctx, jobs: List[Tuple[int, List[int]]], plans: List[SimulationPlan]) -> Dict[int, tuple]:
    opt = ctx.opt
    basis = ctx.eigc
    N, C, d, q = ctx.n, ctx.c, basis.d, basis.q
    P = opt.paths
    steps = ctx.steps.astype(np.float64)
    lam_max = max(ctx.lambda_max, 0.0)
    info = []  # per group: EM step h, grid length, where every config reads the grid
    for gid, idx in jobs:
        pl = plans[idx[0]]
        e_min = min(plans[i].eta_eff for i in idx)
        e_max = max(plans[i].eta_eff for i in idx)
        x = elr_stability_ratio(e_min, lam_max, N, pl.loss)
        nsub = 1 if x < 2.0 else int(math.ceil(x))
        h = e_min / nsub
        interp, need = {}, set()
        for i in idx:
            gx = plans[i].eta_eff * steps / h
            lo = np.floor(gx + 1e-9).astype(np.int64)
            fr = gx - lo
            fr[np.abs(fr) < 1e-9] = 0.0
            interp[i] = (lo, fr)
            need.update(lo.tolist())
            need.update((lo[fr > 0] + 1).tolist())
        info.append(dict(idx=idx, loss=pl.loss, h=h, temp=pl.temperature, n_grid=max(need), need=need, interp=interp,
                         rank=_moving_modes(ctx, basis.w, e_max, basis.orthonormal)))
    G_max = max(1, ctx.cap // ((N * C * 6 + d * q * 4) * ctx.item * P))
    results: Dict[int, tuple] = {}
    for loss in ("mse", "ce"):
        items = [z for z in info if z["loss"] == loss]
        # chunks of similar grid length (a chunk runs to its longest grid)
        for members in _rank_chunks([z["n_grid"] for z in items], [1] * len(items), G_max):
            _sde_chunk(ctx, basis, [items[i] for i in members], loss, results)
    return results


def _sde_chunk(ctx: _Ctx, basis: _Basis, chunk: list, loss: str, results: dict) -> None:
    """Euler–Maruyama of a chunk of temperature groups x P paths (trajectory s = g P + p), one tensor program
    per grid step on the state's device; the noise is drawn there, in the working dtype."""
    opt = ctx.opt
    N, C, q, ct = ctx.n, ctx.c, basis.q, basis.ct
    P = opt.paths
    want_err = opt.compute_error
    ng = len(chunk)
    S = ng * P
    dt, dev = ctx.cdtype, ctx.device
    thr, L0 = ctx.thr(loss), ctx.L0[loss]
    ranks = [z["rank"] for z in chunk for _ in range(P)]
    d = max(ranks)
    M, w = basis.M[:, :d], basis.w[:d].view(d, 1, 1)
    mask = _mode_mask(ranks, d, dev, dt)  # modes a group does not move keep their coordinates at 0
    wm = w if mask is None else w * mask  # (d, 1 or S, 1): every per-step factor carries the mask, at no cost
    f0, Y = ctx.f0.view(N, 1, C), ctx.Y.view(N, 1, C)
    G0 = (torch.softmax(ctx.f0, -1) if loss == "ce" else ctx.f0) - ctx.Y  # (N, C) at t = 0
    h = torch.tensor([z["h"] for z in chunk], dtype=dt, device=dev).repeat_interleave(P)
    temp = torch.tensor([z["temp"] for z in chunk], dtype=dt, device=dev).repeat_interleave(P)
    n_max = max(z["n_grid"] for z in chunk)
    row_of = np.full(n_max + 1, -1)  # grid step -> its row in the records (-1: no config reads it)
    need_any = np.zeros(n_max + 1, dtype=bool)
    for z in chunk:
        need_any[sorted(z["need"])] = True
    row_of[need_any] = np.arange(int(need_any.sum()))
    rec = _Records(int(need_any.sum()), (S,), want_err, dev, fill=math.nan)
    A = torch.zeros(d, S, q, dtype=dt, device=dev)
    Pc = ctx.P64[:d].to(dt).unsqueeze(1)  # (d, 1, q)
    P64 = ctx.P64[:d].unsqueeze(1)
    gens = _path_generators(opt.seed, P, dev)
    rescale = opt.noise == "rescaled"
    sq = torch.sqrt(h * temp / N)  # sqrt(h * eta_eff / B_eff) * N^-1/2, (S,)
    hN = (h / N).view(1, S, 1)
    hNw = hN * wm  # (d, S, 1)
    fast_mse = loss == "mse" and basis.orthonormal
    U0 = None
    if fast_mse and not ct:
        # per-sample gradient coordinates u_i = w * M_i^T g0_i, (N, d): a draw is (n - n_bar) @ U0
        U0 = (basis.M3[:, :, :d] * G0.unsqueeze(-1)).sum(1) * basis.w[:d].view(1, d)
    for j in range(n_max + 1):
        need = bool(need_any[j])
        F = None
        if not fast_mse or (want_err and need):
            F = _lift(M, A, ct, C).add_(f0)  # (N, S, C)
        ev = None
        lse = None
        if fast_mse:
            lv = _mse_loss_coords(ctx, A, P64)
        else:
            lse = torch.logsumexp(F, -1, keepdim=True) if loss == "ce" else None
            lv = _stepped_loss(F, ctx.y, Y, loss, lse)
        lv = rec.check(lv, thr)
        if need:
            rec.put(int(row_of[j]), lv, _stepped_error(F, ctx.y) if want_err else None)
        if j == n_max:
            break
        # xi = N^-1/2 sum_i (n_i - n_bar) g0_i; one draw per path and grid step, shared by all groups
        # drawn in float64 whatever the working dtype: float32 and float64 runs see the same noise
        nz = torch.stack([torch.randn(N, generator=g, dtype=torch.float64, device=dev) for g in gens], 0)  # (P, N)
        nz = (nz - nz.mean(1, keepdim=True)).to(dt)
        amp = sq
        if rescale:
            ratio = torch.where(rec.dead, 0.0, lv.clamp_min(0.0) / max(L0, 1e-300))
            amp = sq * torch.sqrt(ratio).to(dt)
        if fast_mse:
            # proj(F - Y) = A - P for orthonormal V: the drift is diagonal; noise from the shared draws
            if U0 is not None:
                xi = (nz @ U0).T.unsqueeze(-1)  # (d, P, 1)
            else:
                xi = _proj(M, nz.T.unsqueeze(-1) * G0.unsqueeze(1), ct) * w  # (d, P, q)
            amp_d = amp.view(1, S, 1) if mask is None else amp.view(1, S, 1) * mask  # (1 or d, S, 1)
            A.sub_(hNw * (A - Pc)).sub_((amp_d.view(-1, ng, P, 1) * xi.reshape(d, 1, P, q)).reshape(d, S, q))
        else:
            noise_G = (amp.view(1, ng, P, 1) * nz.T.reshape(N, 1, P, 1)) * G0.view(N, 1, 1, C)  # (N, ng, P, C)
            Gt = (F.sub_(lse).exp_() if loss == "ce" else F) - Y
            A.sub_(wm * _proj(M, Gt.mul_(hN).add_(noise_G.reshape(N, S, C)), ct))
        A.masked_fill_(rec.dead.view(1, S, 1), 0)
    lrec_t, erec_t = rec.host()
    lrec = np.full((n_max + 1, S), np.nan)
    lrec[need_any] = lrec_t
    erec = None
    if want_err:
        erec = np.full((n_max + 1, S), np.nan)
        erec[need_any] = erec_t
    for g, z in enumerate(chunk):
        cols = slice(g * P, (g + 1) * P)
        for i in z["idx"]:
            lo, fr = z["interp"][i]
            results[i] = (_interp_rec(lrec[:, cols], lo, fr), _interp_rec(erec[:, cols], lo, fr) if want_err else None)


def _interp_rec(rec: np.ndarray, lo: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """(grid, P) recorded values -> (P, L) at fractional grid positions ``lo + fr``."""
    out = rec[lo].T.copy()
    m = fr > 0
    if m.any():
        a, b = out[:, m], rec[lo[m] + 1].T
        with np.errstate(invalid="ignore"):
            v = (1.0 - fr[m]) * a + fr[m] * b
        out[:, m] = np.where(np.isinf(a) | np.isinf(b), np.inf, v)
    return out


# --------------------------------------------------------------------------------------------------
# engine: exact minibatch SGD (+ heavy ball) on the linear model F = F0 + Z b
# --------------------------------------------------------------------------------------------------


def _run_minibatch(ctx: _Ctx, jobs: List[Tuple[int, List[int]]], plans: List[SimulationPlan]) -> Dict[int, tuple]:
    """Every (loss, batch size) of the grid in one program per chunk: the trajectories (P paths x G simulations)
    step together; each step gathers the rows of each batch size once per path (a loop over the distinct batch
    sizes, not over configs), and the logged evaluations lift all trajectories in one GEMM."""
    opt = ctx.opt
    basis = ctx.eigc if opt.features == "eigen" else _sketch_basis(ctx.state, ctx.cdtype)
    N, C, q = ctx.n, ctx.c, basis.q
    P = opt.paths
    G_max = max(1, ctx.cap // ((N * C * 4 + basis.d * q * 4) * ctx.item * P))
    ranks = [_moving_modes(ctx, basis.w, plans[idx[0]].eta_eff, basis.orthonormal) for _, idx in jobs]
    dev = ctx.device
    schedules: Dict[int, torch.Tensor] = {}  # batch size -> (T, P, B) on the device
    results: Dict[int, tuple] = {}
    for members in _rank_chunks(ranks, [1] * len(jobs), G_max):
        members = sorted(members, key=lambda i: (plans[jobs[i][1][0]].loss != "mse", plans[jobs[i][1][0]].batch, i))
        for B in {int(plans[jobs[i][1][0]].batch) for i in members} - set(schedules):
            schedules[B] = torch.stack([batch_schedule(N, B, ctx.T, opt.seed + p) for p in range(P)], 1).to(dev)
        _minibatch_chunk(ctx, basis, [jobs[i] for i in members], [ranks[i] for i in members], plans, schedules,
                         results)
    return results


_DEAD_CHECK_EVERY = 4  # logged points between two checks whether a chunk's trajectories all blew up (a device sync)


def _minibatch_chunk(ctx: _Ctx, basis: _Basis, chunk: List[Tuple[int, List[int]]], ranks: List[int],
                     plans: List[SimulationPlan], schedules: Dict[int, torch.Tensor], results: dict) -> None:
    opt = ctx.opt
    N, C, q, ct = ctx.n, ctx.c, basis.q, basis.ct
    P, G = opt.paths, len(chunk)
    want_err = opt.compute_error
    steps, logged, pos = ctx.steps, ctx.logged, ctx.pos
    dt, dev = ctx.cdtype, ctx.device
    d = max(ranks)
    M = basis.M[:, :d]
    M3 = None if ct else basis.M3[:, :, :d]
    pl = [plans[idx[0]] for _, idx in chunk]
    # contiguous runs of one (loss, batch size): the buckets a step loops over
    buckets: List[Tuple[int, int, int, str]] = []
    for g, p in enumerate(pl):
        if buckets and buckets[-1][2:] == (p.batch, p.loss):
            buckets[-1] = (buckets[-1][0], g + 1, p.batch, p.loss)
        else:
            buckets.append((g, g + 1, p.batch, p.loss))
    n_mse = sum(p.loss == "mse" for p in pl)  # sorted by loss: the mse simulations come first
    losses = [(lo, hi, loss) for lo, hi, loss in ((0, n_mse, "mse"), (n_mse, G, "ce")) if hi > lo]
    eta = torch.tensor([p.eta for p in pl], dtype=dt, device=dev).view(1, 1, G, 1)
    mom = torch.tensor([p.mom for p in pl], dtype=dt, device=dev).view(1, 1, G, 1)
    use_buf = any(p.mom != 0 for p in pl)
    w = basis.w[:d].view(1, d, 1, 1) / torch.tensor([float(p.batch) for p in pl], dtype=dt, device=dev).view(1, 1, G, 1)
    mask = _mode_mask(ranks, d, dev, dt)
    if mask is not None:
        w = w * mask.unsqueeze(0)  # modes a simulation does not move keep their coordinates at 0
    thr = torch.tensor([ctx.thr(p.loss) for p in pl], dtype=torch.float64, device=dev).view(1, G)
    A = torch.zeros(P, d, G, q, dtype=dt, device=dev)
    buf = torch.zeros_like(A) if use_buf else None
    rec = _Records(len(steps), (P, G), want_err, dev)
    fast = all(loss == "mse" for _, _, loss in losses) and basis.orthonormal and not want_err
    P64 = ctx.P64[:d].view(1, d, 1, q)
    f0, Y = ctx.f0.view(N, 1, C), ctx.Y.view(N, 1, C)
    U = torch.empty_like(A)
    for t in range(ctx.T + 1):
        if logged[t]:
            if fast:
                lv, ev = _mse_loss_coords(ctx, A, P64), None
            else:
                flat = A.permute(1, 0, 2, 3).reshape(d, P * G, q)  # every trajectory in one GEMM
                F = _lift(M, flat, ct, C).add_(f0).view(N, P, G, C)
                lv = torch.empty(P, G, dtype=torch.float64, device=dev)
                for lo, hi, loss in losses:
                    part = F[:, :, lo:hi].reshape(N, P * (hi - lo), C)
                    lv[:, lo:hi] = _stepped_loss(part, ctx.y, Y, loss).view(P, hi - lo)
                ev = (F.argmax(-1) != ctx.y.view(N, 1, 1)).to(torch.float64).mean(0) if want_err else None
            lv = rec.check(lv, thr)
            rec.put(pos[t], lv, ev)
            if pos[t] % _DEAD_CHECK_EVERY == 0 and bool(rec.dead.all()):
                break  # every trajectory blew up: the rest of the records stay inf (a diverging lr ends at once)
            A.masked_fill_(rec.dead.view(P, 1, G, 1), 0)
            if buf is not None:
                buf.masked_fill_(rec.dead.view(P, 1, G, 1), 0)
        if t == ctx.T:
            break
        for lo, hi, B, loss in buckets:
            idx_t = schedules[B][t]  # (P, B)
            R = M.index_select(0, idx_t.reshape(-1)).view(P, B, d) if ct else \
                M3.index_select(0, idx_t.reshape(-1)).view(P, B * C, d)
            Fb = _lift(R, A[:, :, lo:hi], ct, C).add_(ctx.f0[idx_t].unsqueeze(2))  # (P, B, g, C)
            if loss == "ce":
                Fb = Fb.sub_(torch.logsumexp(Fb, -1, keepdim=True)).exp_()
            U[:, :, lo:hi] = _proj(R, Fb.sub_(ctx.Y[idx_t].unsqueeze(2)), ct)
        _sgd_update(A, U.mul_(w), eta, mom, buf)
    lrec, erec = rec.host()
    for g, (_, idx) in enumerate(chunk):
        for i in idx:
            results[i] = (lrec[:, :, g].T.copy(), erec[:, :, g].T.copy() if want_err else None)


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def _finish(cfg: SimConfig, plan: SimulationPlan, steps: np.ndarray, lp: np.ndarray, ep: Optional[np.ndarray], ctx: _Ctx,
            gid: int, seconds: float) -> SimResult:
    opt = ctx.opt
    thr = ctx.thr(cfg.loss)
    with np.errstate(invalid="ignore"):
        bad = (~np.isfinite(lp) | (lp > thr)).any(0)
        if ep is not None:
            bad |= (~np.isfinite(ep)).any(0)
    blew = bool(bad.any())
    L = len(steps)
    keep = int(np.argmax(bad)) if blew else L  # the curve stops before the first blown-up point
    keep = max(keep, 1)  # step 0 is F0 itself: always finite
    lp, ep = lp[:, :keep], (ep[:, :keep] if ep is not None else None)
    paths = lp.shape[0]
    loss = lp.mean(0)
    err = ep.mean(0) if ep is not None else None
    lsp = esp = None
    if paths > 1 and keep > 0:
        qs = list(opt.spread)
        lsp = np.quantile(lp, qs, axis=0)
        esp = np.quantile(ep, qs, axis=0) if ep is not None else None
    msl = ctx.state.max_stable_lr(cfg.momentum)
    beyond = cfg.lr > msl
    note = plan.note
    if beyond:
        note = "; ".join(x for x in (note, f"lr {cfg.lr:.4g} > max_stable_lr {msl:.4g}") if x)
    if blew:
        note = "; ".join(x for x in (note, f"blew up at step {int(steps[int(np.argmax(bad))])}") if x)
    return SimResult(
        config=cfg,
        steps=steps[:keep].copy(),
        loss=loss,
        error=err,
        loss_spread=lsp,
        error_spread=esp,
        diverged=bool(beyond or blew),
        blew_up=blew,
        max_stable_lr=msl,
        method=plan.method,
        momentum_mode=plan.mode,
        paths=paths,
        group=gid,
        seconds=seconds,
        note=note,
    )


def simulation_memory(n: int, num_classes: int, rank: int, class_trace: bool, budget_steps: int, n_configs: int,
                      options: Optional[SimOptions] = None, max_batch: Optional[int] = None,
                      losses: Sequence[str] = ("mse", "ce"), full_batch: Optional[bool] = None) -> Dict[str, int]:
    """Bytes :func:`simulate` holds at its peak for ``n_configs`` configs on a state of ``n`` samples, ``num_classes``
    classes and ``rank`` eigenpairs: an upper estimate read off the arrays the batched engines allocate (float64
    assumed: a float32 state needs up to half the stepped part), so that a plan can be refused before it runs;
    docs/METHOD.md §15. ``max_batch``: the largest batch size below ``n`` (None: no SGD config); ``full_batch``:
    whether GD configs run too (None: when ``max_batch`` is None); ``losses``: the losses of the configs. By what
    drives them:

    * ``steps`` -- the per-step index arrays of the budget, and the sde's grid records (a chunk's grid, up to
      ``max_tau_ratio x T`` steps, per trajectory, and its host copy);
    * ``records`` -- every config's curves per path (loss, error; the chunk's device records, their host copies
      and the results);
    * ``working_set`` -- one chunk of stepped trajectories (ce GD, sde, minibatch: S trajectories of ``N x C``
      outputs, about 6 temporaries of that size each, and ``rank x q`` coordinates; S configs x paths, sized by
      the engines to ``memory_mb``, at least one config);
    * ``closed_form`` -- mse GD in closed form: a buffer of residual-factor rows (``configs x logged`` rows of
      ``rank``, at most ``memory_mb / 3``) and, for the error curve, the lifts of a chunk of rows to ``N x C``
      outputs (at most ``memory_mb / 4`` each, three alive at once);
    * ``ode`` -- ce gradient flow (``method: ode``): the implicit solver's Jacobians, ``(rank q)^2``;
    * ``batches`` -- the minibatch schedule, ``T x paths x B`` int64 (and its stacking copy);
    * ``basis`` -- the eigenbasis in float64 and in the working dtype, and the ``N x C`` arrays of the context."""
    opt = options or SimOptions()
    item = 8  # float64 closed forms and lifts; the stepped methods' dtype is at most that
    cap = int(opt.memory_mb * 2 ** 20)
    t, nc = int(budget_steps), int(n) * int(num_classes)
    q = num_classes if class_trace else 1
    rows = n if class_trace else nc
    logged = t // opt.log_every + 2
    stochastic = max_batch is not None and max_batch < n
    gd = (max_batch is None) if full_batch is None else bool(full_batch)
    paths = opt.paths if stochastic else 1
    stepped = stochastic or (gd and "ce" in losses and opt.method != "ode")
    unit = paths * (nc * 6 + rank * q * 4) * item  # one config's trajectories (sde, minibatch, ce discrete)
    working = max(unit, min(cap, n_configs * unit)) if stepped else 0
    per_chunk = max(1, min(n_configs, cap // max(unit, 1)))
    grid = 2 * 8 * (int(opt.max_tau_ratio * t) + 1) * per_chunk * paths if stochastic else 0
    closed = 0
    if gd and "mse" in losses and opt.method in ("auto", "discrete", "ode"):
        factor_rows = n_configs * logged
        closed = 2 * min(factor_rows, max(64, cap // (rank * 8 * 3))) * rank * 8  # the rows and their squares
        if opt.compute_error:  # F = base - lift(rows): the lift, the difference, the argmax's input alive at once
            closed += 3 * min(factor_rows, max(1, cap // (nc * 8 * 4))) * nc * 8
    ode = 5 * (rank * q) ** 2 * 8 if gd and "ce" in losses and opt.method == "ode" else 0
    return {
        "steps": 9 * (t + 1) + grid,
        "records": 3 * 2 * 8 * logged * paths * n_configs,
        "working_set": working,
        "closed_form": closed,
        "ode": ode,
        "batches": 2 * 8 * t * paths * int(max_batch) if stochastic else 0,
        "basis": 2 * rows * rank * item + 6 * nc * item,
    }


def _not_simulated(cfg: SimConfig, plan: SimulationPlan, steps: np.ndarray, ctx: _Ctx) -> SimResult:
    """The result of a config reported diverging without simulation (sde beyond ``SDE_SKIP_FACTOR`` x the
    limit): its curve is step 0 alone (F0's loss and error), as for a run that blows up at its first step."""
    msl = ctx.state.max_stable_lr(cfg.momentum)
    f0 = ctx.f0_64.unsqueeze(0)
    loss, err = _loss_err(f0, ctx.y, ctx.Y64, cfg.loss, ctx.opt.compute_error)
    note = "; ".join(x for x in (plan.note, f"lr {cfg.lr:.4g} > max_stable_lr {msl:.4g}",
                                 f"beyond {SDE_SKIP_FACTOR:g} x max_stable_lr: reported diverging, not simulated") if x)
    return SimResult(config=cfg, steps=steps[:1].copy(), loss=loss, error=err, loss_spread=None, error_spread=None,
                     diverged=True, blew_up=False, max_stable_lr=msl, method=plan.method, momentum_mode=plan.mode,
                     paths=ctx.opt.paths, group=-1, seconds=0.0, note=note)


def simulate(
    state: KernelState,
    configs: Sequence[SimConfig],
    budget_steps: int,
    options: Optional[SimOptions] = None,
) -> List[SimResult]:
    """Predicted loss/error curves of every config (results in the order of ``configs``), all run on
    ``state``'s device, deduplicated by :func:`simulation_groups` and batched over configs."""
    opt = options or SimOptions()
    configs = list(configs)
    if not configs:
        return []
    for c in configs:
        if not isinstance(c, SimConfig):
            raise TypeError(f"configs: expected SimConfig, got {type(c).__name__}")
    steps = logged_steps(int(budget_steps), opt.log_every)
    ctx = _Ctx(state, opt, steps)
    plans = [resolve_plan(c, opt, ctx.n, ctx.lambda_max) for c in configs]
    beyond = {i for i, (c, pl) in enumerate(zip(configs, plans))
              if pl.method == "sde" and c.lr > SDE_SKIP_FACTOR * ctx.state.max_stable_lr(c.momentum)}
    kept = [i for i in range(len(configs)) if i not in beyond]
    groups = [[kept[j] for j in g] for g in _group_plans([plans[i] for i in kept], opt)] if kept else []
    engines = {}
    for gid, idx in enumerate(groups):
        pl = plans[idx[0]]
        if pl.method in ("ode", "discrete") and pl.loss == "mse":
            name = "mse_closed"
        elif pl.method == "discrete":
            name = "ce_discrete"
        elif pl.method == "ode":
            name = "ce_ode"
        elif pl.method == "sde":
            name = "sde"
        else:
            name = "minibatch"
        engines.setdefault(name, []).append((gid, idx))
    runners = {
        "mse_closed": _run_mse_closed,
        "ce_discrete": _run_ce_discrete,
        "ce_ode": _run_ce_ode,
        "sde": _run_sde,
        "minibatch": _run_minibatch,
    }
    out: List[Optional[SimResult]] = [None] * len(configs)
    for i in beyond:
        out[i] = _not_simulated(configs[i], plans[i], steps, ctx)
    gid_of = {i: gid for gid, idx in enumerate(groups) for i in idx}
    with torch.no_grad():
        for name, jobs in engines.items():
            t0 = time.perf_counter()
            res = runners[name](ctx, jobs, plans)
            n_cfg = sum(len(idx) for _, idx in jobs)
            secs = (time.perf_counter() - t0) / max(n_cfg, 1)
            for _, idx in jobs:
                for i in idx:
                    lp, ep = res[i]
                    out[i] = _finish(configs[i], plans[i], steps, lp, ep, ctx, gid_of[i], secs)
    return out  # type: ignore[return-value]
