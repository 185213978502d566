"""One seam for every predictor: prepare once per (model, dataset), predict a batch of configs.

A :class:`Predictor` is a frozen dataclass of its own options (every default stated) that says which configs
it simulates itself (:meth:`Predictor.unsupported`), which predictor takes the others (``fallback``), what
extra work it costs beyond the Θ0 sketch (``extra_work``), and how to simulate a batch of configs on a
:class:`PreparedPredictor`. ``prepare`` does the per-dataset work once (F0 and the Θ eigendecomposition, or
the subset's extrapolated spectrum); the prepared object then predicts shard after shard, caching what it
shares across configs (the drift of one reference run per (loss, budget), one flow path per (loss, budget)).

``ttp-ray predict --predictor NAME``, the sweep's ``predictor:`` field and the benches select through
:data:`PREDICTORS` and :func:`get_predictor`; rows are built by one function,
:func:`ttp_ray.predict.prediction_rows`.

========================  ===============================================================  ==========
name                      what it simulates                                                 fallback
========================  ===============================================================  ==========
``frozen``                the linearised dynamics on the frozen kernel Θ0 (§2–§4)           —
``subset``                MSE GD on a spectrum extrapolated from a subset's kernel (§7)      —
``drift``                 full-batch GD: frozen ODE warped by one real run's drift (§9)      frozen
``relinearised``          full-batch GD, re-linearised per config along its path (§10)       frozen
``flow``                  full-batch GD on one re-linearised flow path per loss (§10)        frozen
``probed`` (default)      every config: frozen dynamics warped by real probes' drift (§14)  —
========================  ===============================================================  ==========
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .drift import DRIFT_METHOD, DriftOptions, KernelDrift, calibrate_drift, reference_drift, simulate_with_drift
from .dynamics import SimConfig, SimResult, simulate
from .inputs import AdaptOptions
from .kernel import KernelOptions
from .probe import ProbeOptions, ProbeRun, ProbedDrift, drift_summary, probe_drift, run_probe, warp_results
from .predict import (PredictedConfig, PredictSettings, check_request, load_state, load_subset_state,
                      predicted_configs, simulate_subset, subset_row_fields)
from .progress import Progress, resolve
from .relinearise import (FLOW_METHOD, RelinearisationOptions, RelinearisedResult, flow_path, relinearised_curves,
                          simulate_on_flow_path)
from .stability import hessian_bound, max_stable_lr
from .subset import DEFAULT_ALPHA, SubsetOptions

__all__ = [
    "PredictionInputs",
    "Predictor",
    "PreparedPredictor",
    "FrozenKernel",
    "SubsetExtrapolation",
    "DriftWarp",
    "Relinearised",
    "FlowRelinearised",
    "ProbedWarp",
    "PREDICTORS",
    "DEFAULT_PREDICTOR",
    "get_predictor",
]


@dataclass(frozen=True)
class PredictionInputs:
    """What a predictor prepares from: one backbone on one dataset; every default stated."""

    model: str  # backbone name (``ttp-ray models``)
    dataset: Any  # a dataset reference (``ttp-ray datasets``) or an ImageDataset
    kernel: KernelOptions = field(default_factory=KernelOptions)
    head_seed: int = 0
    trainable: str = "all"  # 'all' | 'head'
    device: str = "cpu"
    cache: bool = True  # kernel states from and to the disk cache
    allow_download: bool = False
    adapt: AdaptOptions = field(default_factory=AdaptOptions)  # a dataset name's images brought to the backbone


@dataclass
class PreparedPredictor:
    """A predictor bound to one (model, dataset): the state it predicts from and what it shares across configs.

    ``base`` is a :class:`~ttp_ray.predict.PreparedState` (frozen Θ0) or a
    :class:`~ttp_ray.predict.PreparedSubset` (extrapolated spectrum); ``shared`` holds what a predictor computes
    once per (loss, budget) and every config reuses; ``work`` counts the extra work done beyond the Θ0 sketch.
    """

    predictor: "Predictor"
    base: Any
    shared: Dict[Any, Any] = field(default_factory=dict)
    work: Dict[str, float] = field(default_factory=dict)

    # ---- the facts every caller reads
    @property
    def n(self) -> int:
        return int(self.base.n)

    @property
    def limit(self) -> Tuple[float, float]:
        """``(lambda_max, N)`` the stability limit is computed from: the kernel's, or a normalised spectrum's
        ``(lambda_max / N, 1)`` (so that every caller computes the very same limit)."""
        spectrum = getattr(self.base, "spectrum", None)
        if spectrum is not None:
            return float(spectrum.lambda_max), 1.0
        return float(self.base.state.lambda_max), float(self.base.state.n)

    @property
    def limit_from(self) -> str:
        """Which lambda_max the stability limit is computed from: ``class-trace kernel`` (the default sketch; its
        lambda_max is below the full kernel's, so its limit is higher), ``full kernel`` or ``extrapolated spectrum``."""
        if getattr(self.base, "spectrum", None) is not None:
            return "extrapolated spectrum"
        return "class-trace kernel" if self.base.state.class_trace else "full kernel"

    @property
    def lambda_max(self) -> float:
        """``lambda_max`` of Θ on the full set (not divided by N)."""
        lam, n = self.limit
        return lam * self.n / n

    def max_stable_lr(self, momentum: float = 0.0) -> float:
        """``2(1+m) N / lambda_max`` (:func:`ttp_ray.stability.max_stable_lr`)."""
        return max_stable_lr(*self.limit, momentum)

    @property
    def state(self):
        return self.base.state

    @property
    def model(self):
        return self.base.model

    @property
    def dataset(self):
        return self.base.dataset

    @property
    def kernel_seconds(self) -> float:
        return float(self.base.kernel_seconds)

    @property
    def cache_hit(self) -> bool:
        return bool(self.base.cache_hit)

    def count(self, what: str, amount: float) -> None:
        """Add ``amount`` to the extra work counter ``what`` (e.g. ``finetune_steps``, ``per_sample_gradients``)."""
        self.work[what] = self.work.get(what, 0.0) + float(amount)

    # ---- the one entry point
    def predict(self, configs: Sequence[SimConfig], *, budget_steps: int, eps_list: Sequence[float],
                settings: PredictSettings = PredictSettings(), progress: Optional[Progress] = None
                ) -> List[PredictedConfig]:
        """T̂ε rows of every config: the predictor simulates those it supports, its ``fallback`` the others
        (one-line ``ValueError`` naming the field where there is none); results in the order of ``configs``.
        ``progress``: one task over the configs (default: the ambient one, :func:`ttp_ray.progress.current`)."""
        configs = list(configs)
        check_request(self.n, configs, budget_steps, eps_list)
        pred = self.predictor
        reasons = [pred.unsupported(c, self.n, settings) for c in configs]
        own = [i for i, r in enumerate(reasons) if r is None]
        rest = [i for i, r in enumerate(reasons) if r is not None]
        if rest and pred.fallback is None:
            raise ValueError(reasons[rest[0]])
        results: List[Optional[SimResult]] = [None] * len(configs)
        with resolve(progress).task(f"simulating {len(configs)} config(s) over {int(budget_steps)} steps "
                                    f"({pred.name})", total=len(configs), unit="configs") as task:
            for idx, by in ((own, pred), (rest, get_predictor(pred.fallback) if rest else None)):
                if idx:
                    for i, res in zip(idx, by.simulate(self, [configs[i] for i in idx], int(budget_steps), settings)):
                        results[i] = res
                    task.advance(len(idx))
        thinned = [_thin(r, settings.sim.log_every, int(budget_steps)) for r in results]
        return predicted_configs(thinned, self.n, budget_steps=budget_steps, eps_list=eps_list, settings=settings,
                                 extra={"limit_from": self.limit_from, **pred.row_fields(self, settings)})


class Predictor(ABC):
    """A way to predict curves of configs on one (model, dataset); subclasses are frozen dataclasses of options."""

    name: ClassVar[str]
    fallback: ClassVar[Optional[str]] = None  # predicts the configs this one does not support
    extra_work: ClassVar[str] = "none beyond the Θ0 sketch"  # what it costs per (dataset, backbone), in words
    needs_full_kernel: ClassVar[bool] = False  # default kernel: the full NC x NC sketch instead of the class trace
    revision: ClassVar[int] = 1  # raised when the predictor's results change: a sweep's resume identity includes it

    def unsupported(self, config: SimConfig, n: int, settings: PredictSettings) -> Optional[str]:
        """None when this predictor simulates ``config`` itself, else a one-line reason naming the field."""
        return None

    def prepare(self, inputs: PredictionInputs) -> PreparedPredictor:
        """The per-dataset state (F0 and the Θ0 eigendecomposition, from the disk cache when there)."""
        base = load_state(inputs.model, inputs.dataset, inputs.kernel, head_seed=inputs.head_seed,
                          trainable=inputs.trainable, device=inputs.device, cache=inputs.cache,
                          allow_download=inputs.allow_download, adapt=inputs.adapt)
        return PreparedPredictor(self, base)

    def rebind(self, prepared: PreparedPredictor) -> PreparedPredictor:
        """This predictor on the per-dataset state another one prepared (no new kernel); shared work is not carried."""
        if isinstance(self, SubsetExtrapolation) != hasattr(prepared.base, "spectrum"):
            raise ValueError(f"predictor: {self.name!r} cannot reuse the state prepared for {prepared.predictor.name!r}")
        return PreparedPredictor(self, prepared.base)

    @abstractmethod
    def simulate(self, prepared: PreparedPredictor, configs: List[SimConfig], budget_steps: int,
                 settings: PredictSettings) -> List[SimResult]:
        """Curves of ``configs`` (all supported), in their order."""

    def row_fields(self, prepared: PreparedPredictor, settings: PredictSettings) -> Dict[str, Any]:
        """Columns this predictor adds to every prediction row (beyond the common ones)."""
        return {}

    def describe(self) -> Dict[str, Any]:
        """The predictor's name and options (for output and provenance)."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]


def _full_batch_only(name: str, config: SimConfig, n: int) -> Optional[str]:
    if config.is_full_batch(n):
        return None
    return f"batch_size: the {name} predictor simulates full-batch GD only (B = N = {n}), got {config.batch_size}"


def _thin(res: SimResult, log_every: int, budget_steps: int) -> SimResult:
    """Keep the logged points ``0, log_every, ..., budget`` (and the last one reached) of a per-step curve."""
    if log_every <= 1 or len(res.steps) < 2 or res.steps[1] - res.steps[0] != 1:
        return res
    keep = res.steps % log_every == 0
    keep[-1] = True

    def cut(a):
        return None if a is None else (a[..., keep] if a.ndim > 1 else a[keep])

    return replace(res, steps=res.steps[keep], loss=res.loss[keep], error=cut(res.error),
                   loss_spread=cut(res.loss_spread), error_spread=cut(res.error_spread))


def _as_sim_result(r: RelinearisedResult, group: int) -> SimResult:
    """A re-linearised curve in the common result type (deterministic, one path)."""
    return SimResult(config=r.config, steps=np.asarray(r.steps), loss=np.asarray(r.loss), error=np.asarray(r.error),
                     loss_spread=None, error_spread=None, diverged=bool(r.diverged), blew_up=bool(r.diverged),
                     max_stable_lr=float(r.max_stable_lr), method=r.method, momentum_mode="heavy_ball", paths=1,
                     group=group, seconds=float(r.seconds), note=r.note,
                     extras={"kernels": r.kernels, "rejected_segments": r.rejected, "segment_ends": list(r.segment_ends),
                             "kernel_seconds": float(r.kernel_seconds)})


# --------------------------------------------------------------------------------------------- the predictors

@dataclass(frozen=True)
class FrozenKernel(Predictor):
    """The linearised dynamics on the frozen kernel Θ0 (docs/METHOD.md §2–§4): ``settings.sim`` says how
    (discrete map, ODE, SDE, minibatch; ELR or heavy ball). Every config type; no extra work."""

    name: ClassVar[str] = "frozen"

    def simulate(self, prepared, configs, budget_steps, settings):
        return simulate(prepared.state, configs, budget_steps, settings.sim)


@dataclass(frozen=True)
class SubsetExtrapolation(Predictor):
    """MSE full-batch GD on the full set's spectrum extrapolated from the kernel of ``size`` samples
    (docs/METHOD.md §7); loss curve only. The kernel costs a subset's sketch and one forward pass over the set."""

    name: ClassVar[str] = "subset"
    extra_work: ClassVar[str] = "one forward pass over the full set (the kernel is the subset's)"
    size: int = 0  # N0, samples whose kernel is computed (required: 0 < N0 < N)
    alpha: float = DEFAULT_ALPHA  # exponent correction of the spectrum
    seed: int = 0  # which class-balanced subset

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size > 0):
            raise ValueError(f"kernel_subset: must be a positive number of samples below the dataset size, got {self.size}")
        SubsetOptions(alpha=self.alpha)  # its own checks

    def unsupported(self, config, n, settings):
        if config.loss != "mse":
            return f"loss: subset extrapolation (METHOD.md §7) predicts the mse loss only, got {config.loss!r}"
        return _full_batch_only("subset", config, n)

    def prepare(self, inputs):
        base = load_subset_state(inputs.model, inputs.dataset, self.size, inputs.kernel,
                                 options=SubsetOptions(alpha=self.alpha), subset_seed=self.seed,
                                 head_seed=inputs.head_seed, trainable=inputs.trainable, device=inputs.device,
                                 cache=inputs.cache, allow_download=inputs.allow_download, adapt=inputs.adapt)
        prepared = PreparedPredictor(self, base)
        prepared.count("forward_samples", base.n)
        return prepared

    def simulate(self, prepared, configs, budget_steps, settings):
        return simulate_subset(prepared.base.spectrum, configs, budget_steps, settings)

    def row_fields(self, prepared, settings):
        return subset_row_fields(prepared.base.spectrum, settings)


@dataclass(frozen=True)
class DriftWarp(Predictor):
    """Full-batch GD: the frozen ODE (ELR) read at a warped time, the warp calibrated by one real plain-GD run at
    ``reference_fraction`` x max_stable_lr(0) per (loss, budget) (docs/METHOD.md §9). Minibatch configs: frozen."""

    name: ClassVar[str] = "drift"
    fallback: ClassVar[Optional[str]] = "frozen"
    extra_work: ClassVar[str] = "one real full-batch fine-tune of the budget per (loss, budget)"
    reference_fraction: float = 0.6  # the reference run's lr, as a fraction of max_stable_lr(0)
    options: DriftOptions = field(default_factory=DriftOptions)

    def __post_init__(self):
        f = self.reference_fraction
        if not (isinstance(f, (int, float)) and 0 < f <= 1):
            raise ValueError(f"drift_reference: must be a fraction of max_stable_lr(0) in (0, 1], got {f}")

    def unsupported(self, config, n, settings):
        return _full_batch_only("drift", config, n)

    def use_reference(self, prepared: PreparedPredictor, loss: str, budget_steps: int, reference: SimConfig,
                      run) -> KernelDrift:
        """Calibrate the drift of (loss, budget) on a real full-batch run already made (a
        :class:`~ttp_ray.finetune.FinetuneResult` with ``grad_norm_sq`` and ``outputs``) instead of running one."""
        drift = calibrate_drift(prepared.state, reference, run.loss, run.grad_norm_sq, run.outputs, self.options)
        prepared.shared[("drift", loss, int(budget_steps))] = (drift, run)
        return drift

    def drift(self, prepared: PreparedPredictor, loss: str, budget_steps: int) -> Tuple[KernelDrift, Any]:
        """The drift of (loss, budget), its reference run made once per prepared predictor."""
        key = ("drift", loss, int(budget_steps))
        if key not in prepared.shared:
            t0 = time.perf_counter()
            drift, run = reference_drift(prepared.model, prepared.dataset, prepared.state, loss, self.reference_fraction,
                                         budget_steps, trainable=prepared.base.trainable, device=prepared.base.device,
                                         options=self.options)
            drift.seconds = time.perf_counter() - t0
            prepared.shared[key] = (drift, run)
            prepared.count("finetune_steps", budget_steps)
            prepared.count("per_sample_gradients", budget_steps * prepared.n)
        return prepared.shared[key]

    def simulate(self, prepared, configs, budget_steps, settings):
        out: List[Optional[SimResult]] = [None] * len(configs)
        for loss in sorted({c.loss for c in configs}):
            idx = [i for i, c in enumerate(configs) if c.loss == loss]
            drift, run = self.drift(prepared, loss, budget_steps)
            info = {"drift": {"reference_lr": float(drift.reference.get("lr", math.nan)),
                              "reference_fraction": self.reference_fraction, "reference_diverged": bool(run.diverged),
                              "reference_seconds": float(drift.seconds), "scale_min": float(drift.scale.min()),
                              "scale_max": drift.max_scale}}
            for i, res in zip(idx, simulate_with_drift(prepared.state, [configs[i] for i in idx], budget_steps, drift,
                                                       self.options)):
                out[i] = replace(res, extras={**res.extras, **info})
        return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Relinearised(Predictor):
    """Full-batch GD re-linearised along each config's own predicted path: a kernel sketch per segment, segments
    sized by local error control (docs/METHOD.md §10). About a fine-tune's cost per config. Minibatch: frozen."""

    name: ClassVar[str] = "relinearised"
    fallback: ClassVar[Optional[str]] = "frozen"
    extra_work: ClassVar[str] = "per config: a kernel sketch per segment (up to max_kernels) and its forward passes"
    needs_full_kernel: ClassVar[bool] = True
    options: RelinearisationOptions = field(default_factory=RelinearisationOptions)

    def unsupported(self, config, n, settings):
        return _full_batch_only("relinearised", config, n)

    def simulate(self, prepared, configs, budget_steps, settings):
        opts = replace(self.options, kernel=prepared.base.kernel)
        out = []
        for i, cfg in enumerate(configs):
            r = relinearised_curves(prepared.model, prepared.dataset, cfg, budget_steps, opts,
                                    trainable=prepared.base.trainable, device=prepared.base.device)
            prepared.count("kernel_sketches", r.kernels + r.rejected)
            out.append(_as_sim_result(r, i))
        return out


@dataclass(frozen=True)
class FlowRelinearised(Predictor):
    """Full-batch GD on one re-linearised gradient-flow path per (loss, budget), traced by plain GD at
    ``reference_fraction`` x max_stable_lr(0) and shared by every config through its flow time
    ``tau = eta_eff t`` (docs/METHOD.md §10). Minibatch: frozen."""

    name: ClassVar[str] = "flow"
    fallback: ClassVar[Optional[str]] = "frozen"
    extra_work: ClassVar[str] = "one re-linearised path per (loss, budget): kernel sketches along it"
    needs_full_kernel: ClassVar[bool] = True
    reference_fraction: float = 0.5
    options: RelinearisationOptions = field(default_factory=RelinearisationOptions)

    def unsupported(self, config, n, settings):
        return _full_batch_only("flow", config, n)

    def simulate(self, prepared, configs, budget_steps, settings):
        tau_max = max(c.effective_lr for c in configs) * budget_steps
        out: List[Optional[SimResult]] = [None] * len(configs)
        for loss in sorted({c.loss for c in configs}):
            idx = [i for i, c in enumerate(configs) if c.loss == loss]
            key = ("flow", loss, round(tau_max, 12))
            if key not in prepared.shared:
                ref_lr = self.reference_fraction * prepared.max_stable_lr(0.0)
                prepared.shared[key] = flow_path(prepared.model, prepared.dataset, loss, tau_max, ref_lr,
                                                 replace(self.options, kernel=prepared.base.kernel),
                                                 trainable=prepared.base.trainable, device=prepared.base.device)
                prepared.count("kernel_sketches", len(prepared.shared[key].sketches))
            path = prepared.shared[key]
            for i, r in zip(idx, simulate_on_flow_path(path, [configs[i] for i in idx], budget_steps)):
                out[i] = replace(_as_sim_result(r, i), max_stable_lr=prepared.max_stable_lr(configs[i].momentum))
        return out  # type: ignore[return-value]


MAX_EXTRA_EPOCHS = 10.0  # the probed predictor's real work per (loss, budget), all probes together, in epochs (N)
DEFAULT_EDGE_EPOCHS = 5.0  # the edge probes' default share of it
EDGE_SEED_OFFSET = 101  # edge probes draw their batches from probe.seed + this (not the drift probes' order)


@dataclass(frozen=True)
class ProbedWarp(Predictor):
    """Every config type (GD and SGD, any momentum, MSE and CE): the frozen dynamics of ``settings.sim`` read at a
    warped time, the warp measured by short real minibatch probes at a few effective lrs per (loss, budget),
    within ``probe.work_epochs`` x N per-sample gradients (docs/METHOD.md §14). Each row carries the predicted
    drift and an interval for T̂ε."""

    name: ClassVar[str] = "probed"
    revision: ClassVar[int] = 4  # 2: edge probes decide beyond the limit; 3: a wider interval at the edge; 4: and below the probes (§14)
    extra_work: ClassVar[str] = ("per (loss, budget): real minibatch probe steps, at most probe.work_epochs x N "
                                 "per-sample gradients")
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    max_horizon: float = 8.0  # the frozen curves run to at most this many budgets (when s > 1 the warp reads ahead)
    substeps: int = 20  # Euler substeps per step of dt'/dt = s
    stability_cap: bool = True  # s <= max_stable_lr(m) / (lr h): the kernel grows up to the edge of stability (§14)
    edge_factor: float = 2.0  # lr up to this x max_stable_lr(m): the catapult phase, predicted at the edge (§14); above: diverges
    edge_fraction: float = 0.9  # ... simulated at this fraction of max_stable_lr(m)
    edge_momentum: float = 0.0  # unprobed beyond the limit: momentum up to this is the catapult phase (at the edge), above it diverges
    edge_probe_steps: int = 64  # beyond the limit (up to edge_factor): a real minibatch run of this many steps at the config's own lr decides (§14); 0: none
    probe_all_edges: bool = True  # probe plain GD/SGD beyond the limit too (else only momentum above edge_momentum)
    edge_work_epochs: Optional[float] = None  # per-sample gradients of those runs per (loss, budget), in epochs (N each); None: min(5, 10 - probe.work_epochs)
    interval_scale: float = 0.125  # T̂ε interval: T̂ε exp(±k (1 + |log s|)); k: 80 % coverage on digits-5to9 (docs/CHOICES.md)
    edge_interval: float = 0.3  # ... + this where the predicted kernel reaches the stability cap (a catapult may come): 80 % on digits-5to9
    beyond_interval: float = 0.15  # ... + this x drift_beyond_probes (e-folds of loss below every probe's lowest level): 80 % of rows beyond 1 on digits-5to9

    def __post_init__(self):
        if not self.max_horizon >= 1:
            raise ValueError(f"max_horizon: must be >= 1 (budgets), got {self.max_horizon}")
        if self.substeps < 1:
            raise ValueError(f"substeps: must be >= 1, got {self.substeps}")
        if not self.edge_factor >= 1:
            raise ValueError(f"edge_factor: must be >= 1 (1: every config beyond the limit diverges), got {self.edge_factor}")
        if not 0 <= self.edge_momentum < 1:
            raise ValueError(f"edge_momentum: must be in [0, 1), got {self.edge_momentum}")
        if not 0 < self.edge_fraction < 1:
            raise ValueError(f"edge_fraction: must be in (0, 1), got {self.edge_fraction}")
        if not self.interval_scale >= 0:
            raise ValueError(f"interval_scale: must be >= 0, got {self.interval_scale}")
        if not self.edge_interval >= 0:
            raise ValueError(f"edge_interval: must be >= 0, got {self.edge_interval}")
        if not self.beyond_interval >= 0:
            raise ValueError(f"beyond_interval: must be >= 0, got {self.beyond_interval}")
        if self.edge_probe_steps < 0:
            raise ValueError(f"edge_probe_steps: must be >= 0 (0: no probe), got {self.edge_probe_steps}")
        if self.edge_work_epochs is not None and not 0 <= self.edge_work_epochs <= MAX_EXTRA_EPOCHS - self.probe.work_epochs:
            raise ValueError(f"edge_work_epochs: must be in [0, {MAX_EXTRA_EPOCHS - self.probe.work_epochs:g}] (with "
                             f"probe.work_epochs = {self.probe.work_epochs:g}, the extra work is at most "
                             f"{MAX_EXTRA_EPOCHS:g} N), got {self.edge_work_epochs}")

    @property
    def edge_epochs(self) -> float:
        """The edge probes' bound in epochs: ``edge_work_epochs``, or min(5, 10 - probe.work_epochs)."""
        if self.edge_work_epochs is not None:
            return float(self.edge_work_epochs)
        return min(DEFAULT_EDGE_EPOCHS, MAX_EXTRA_EPOCHS - self.probe.work_epochs)

    def drift(self, prepared: PreparedPredictor, loss: str, budget_steps: int) -> ProbedDrift:
        """The probed drift of (loss, budget), measured once per prepared predictor and counted in ``work``."""
        key = ("probed", loss, int(budget_steps))
        if key not in prepared.shared:
            drift = probe_drift(prepared.model, prepared.dataset, prepared.state, loss, budget_steps, self.probe,
                                trainable=prepared.base.trainable, device=prepared.base.device)
            prepared.shared[key] = drift
            prepared.count("per_sample_gradients", drift.per_sample_gradients)
            prepared.count("probe_steps", sum(len(r.level) for r in drift.runs))
        return prepared.shared[key]

    def edge_probe(self, prepared: PreparedPredictor, config: SimConfig, budget_steps: int) -> Optional[ProbeRun]:
        """A real minibatch run at ``config``'s own (lr, momentum), ``edge_probe_steps`` steps (§14, beyond the
        limit): did it diverge? Shared per (loss, budget): at one momentum a lower lr that diverged, or a higher one
        that trained, decides without a new run. None when the runs of (loss, budget) would pass
        ``edge_work_epochs`` x N per-sample gradients (or ``edge_probe_steps`` is 0)."""
        book = prepared.shared.setdefault(("edge", config.loss, int(budget_steps)), {})
        m, lr = float(config.momentum), float(config.lr)
        for (m2, lr2), run in sorted(book.items()):
            if m2 == m and ((run.diverged and lr2 <= lr) or (not run.diverged and lr2 >= lr)):
                return run
        n = prepared.n
        steps = min(self.edge_probe_steps, int(budget_steps))
        bound = int(self.edge_epochs * n)
        if steps < 1:
            return None
        b = max(1, min(self.probe.batch_size, n, bound // steps))  # on a small set the batch shrinks to fit
        used = sum(r.per_sample_gradients for r in book.values())
        if used + steps * b > bound:
            return None
        with resolve(None).task(f"probing lr {lr:.4g} (momentum {m:g}, {config.loss}) beyond the stability limit: "
                                f"a real run of {steps} steps, B {b}", total=steps, unit="steps") as task:
            run = run_probe(prepared.model, prepared.dataset, prepared.state, config.loss, m, lr, steps, b,
                            trainable=prepared.base.trainable, device=prepared.base.device, norm_batches=0,
                            level_window=self.probe.level_window, seed=self.probe.seed + EDGE_SEED_OFFSET,
                            on_step=task.advance)
        book[m, lr] = run
        prepared.count("per_sample_gradients", run.per_sample_gradients)
        prepared.count("probe_steps", len(run.level))
        prepared.count("edge_probes", 1)
        return run

    def edge_work(self, prepared: PreparedPredictor, loss: str, budget_steps: int) -> int:
        """Per-sample gradients spent so far by the edge probes of (loss, budget)."""
        return int(sum(r.per_sample_gradients for r in prepared.shared.get(("edge", loss, int(budget_steps)), {}).values()))

    def _simulated(self, prepared: PreparedPredictor, config: SimConfig, budget_steps: int
                   ) -> Tuple[SimConfig, float, Optional[str], bool]:
        """(the config the frozen dynamics run, its lr over the limit, a note, whether it is predicted to diverge)
        (§14, beyond the limit): up to ``edge_factor`` times the limit, a config whose own edge probe trained (or,
        unprobed, plain GD/SGD: the catapult phase) is simulated at the edge of stability; one whose probe diverged,
        or unprobed with momentum, diverges."""
        limit = prepared.max_stable_lr(config.momentum)
        f = self._over_limit(prepared, config)
        if not 1.0 < f <= self.edge_factor:
            return config, f, None, False
        edge = replace(config, lr=self.edge_fraction * limit)
        at_edge = (f"predicted at the edge of stability ({self.edge_fraction:g} x the limit; docs/METHOD.md §14)")
        run = self.edge_probe(prepared, config, budget_steps) if self.probe_all_edges or config.momentum > self.edge_momentum else None
        if run is None and config.momentum <= self.edge_momentum:
            return edge, f, f"lr is {f:.2f} x the linearised stability limit (the catapult phase): {at_edge}", False
        if run is None:
            why = (f"not probed (edge probes would pass {self.edge_epochs:g} N per-sample gradients)"
                   if self.edge_probe_steps else "not probed (edge_probe_steps is 0)")
            return config, f, f"lr is {f:.2f} x the linearised stability limit with momentum {config.momentum:g}; {why}", True
        steps = len(run.level) + int(run.diverged)
        if run.diverged:
            return config, f, (f"lr is {f:.2f} x the linearised stability limit: a real run at this lr and momentum "
                               f"(momentum {run.momentum:g}, lr {run.lr:.4g}) diverged at step {steps}"), True
        return edge, f, (f"lr is {f:.2f} x the linearised stability limit: a real run of {steps} steps at lr "
                         f"{run.lr:.4g}, momentum {run.momentum:g} trained; {at_edge}"), False

    @staticmethod
    def _over_limit(prepared, config: SimConfig) -> float:
        """The config's lr over the linearised stability limit at its momentum, max_stable_lr(m)."""
        return config.lr / prepared.max_stable_lr(config.momentum)

    def simulate(self, prepared, configs, budget_steps, settings):
        out: List[Optional[SimResult]] = [None] * len(configs)
        for loss in sorted({c.loss for c in configs}):
            idx = [i for i, c in enumerate(configs) if c.loss == loss]
            # §14: above edge_factor x the limit a config is flagged whatever the drift: none to measure for them
            beyond_edge = all(self._over_limit(prepared, configs[i]) > self.edge_factor for i in idx)
            drift = None if beyond_edge else self.drift(prepared, loss, budget_steps)
            ahead = 1.0 if drift is None else min(self.max_horizon, max(1.0, max(float(np.max(s)) for s in drift.scales)))
            step = settings.sim.log_every
            horizon = step * int(math.ceil(math.ceil(budget_steps * ahead) / step))
            # edge probes in order of what one run decides (§14): momentum first (unprobed, it is flagged); there
            # the highest lr first (if it trains, every lower one does), plain GD/SGD the lowest first (if it
            # diverges, every higher one does; unprobed, the catapult rule says it trains)
            order = sorted(idx, key=lambda i: (-configs[i].momentum, configs[i].lr * (
                -1.0 if configs[i].momentum > self.edge_momentum else 1.0)))
            decided = {i: self._simulated(prepared, configs[i], budget_steps) for i in order}
            runs = [decided[i] for i in idx]
            lins = simulate(prepared.state, [r[0] for r in runs], horizon, settings.sim)
            own = {"extra_gradients": (0 if drift is None else drift.per_sample_gradients)
                   + self.edge_work(prepared, loss, budget_steps)}
            warped = []  # (i, sim_cfg, note, lin, cap) of the configs that are warped
            for i, (sim_cfg, f, note, diverges), lin in zip(idx, runs, lins):
                cfg = configs[i]
                if lin.diverged or diverges:
                    keep = lin.steps <= budget_steps
                    out[i] = replace(lin, config=cfg, steps=lin.steps[keep], loss=lin.loss[keep],
                                     error=None if lin.error is None else lin.error[keep], loss_spread=None,
                                     error_spread=None, method=f"probed-{lin.method}", diverged=True,
                                     note=note or lin.note, extras={**lin.extras, "row_fields": own})
                    continue
                # §14: the kernel grows at most to the edge of stability, lr h s lambda_max / N <= 2 (1 + m)
                cap = (prepared.max_stable_lr(cfg.momentum) / (sim_cfg.lr * hessian_bound(loss))
                       if self.stability_cap else math.inf)
                warped.append((i, sim_cfg, note, lin, cap))
            curves = warp_results([w[3] for w in warped], drift, budget_steps, self.substeps, [w[4] for w in warped])
            for (i, sim_cfg, note, lin, cap), c in zip(warped, curves):
                cfg = configs[i]
                info = drift_summary(drift, c["loss"], sim_cfg.effective_lr)
                s_end = float(min(info["drift_final"], cap))
                spread = max(abs(math.log(min(info["drift_max"], cap))), abs(math.log(min(max(info["drift_min"], 1e-12), cap))))
                # the kernel ends the run at the edge of stability: the real run may catapult and settle late (§14)
                at_edge = info["drift_final"] >= 0.98 * cap
                beyond = drift.levels_beyond(c["loss"])  # below every probe's lowest level s is held (§14)
                note = note or lin.note or (f"the predicted kernel reaches the edge of stability (drift {s_end:.3g}): "
                                            f"a catapult may delay the real run; interval widened" if at_edge else "")
                out[i] = replace(lin, config=cfg, steps=c["steps"], loss=c["loss"], error=c["error"],
                                 loss_spread=c["loss_spread"], error_spread=c["error_spread"],
                                 method=f"probed-{lin.method}", note=note,
                                 extras={**lin.extras, "drift": info,
                                         "row_fields": {**own, "predicted_drift": s_end, "drift_beyond_probes": beyond},
                                         # at the edge the real step lies between the edge's and its own (§14)
                                         "interval_log_halfwidth": self.interval_scale * (1.0 + spread)
                                         + abs(math.log(cfg.lr / sim_cfg.lr)) + (self.edge_interval if at_edge else 0.0)
                                         + self.beyond_interval * beyond})
        return out  # type: ignore[return-value]


PREDICTORS: Dict[str, type] = {p.name: p for p in (FrozenKernel, SubsetExtrapolation, DriftWarp, Relinearised,
                                                   FlowRelinearised, ProbedWarp)}
DEFAULT_PREDICTOR = "probed"  # docs/METHOD.md §14; "frozen" was the default before (docs/CHOICES.md)


def get_predictor(name: Union[str, Predictor, None] = None, **options: Any) -> Predictor:
    """The predictor ``name`` (default :data:`DEFAULT_PREDICTOR`) with ``options``; one-line ``ValueError``
    naming ``predictor`` or the option otherwise."""
    if isinstance(name, Predictor):
        return name
    name = DEFAULT_PREDICTOR if name is None else name
    if name not in PREDICTORS:
        raise ValueError(f"predictor: {name!r} is not one of {', '.join(PREDICTORS)}")
    cls = PREDICTORS[name]
    allowed = {f.name: f for f in fields(cls)}
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"predictor.{bad[0]}: not an option of {name!r}; allowed: {', '.join(allowed) or 'none'}")
    options = dict(options)
    for key, value in options.items():  # an option that is itself a dataclass may be given as a mapping (YAML)
        f = allowed[key]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(value, Mapping) and is_dataclass(default):
            known = {g.name for g in fields(default)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"predictor.{key}.{unknown[0]}: not an option; allowed: {', '.join(sorted(known))}")
            options[key] = replace(default, **value)
    try:
        return cls(**options)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
