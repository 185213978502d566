"""Predict training time without training: model + dataset → kernel state → simulated curves → T̂ε.

This is Algorithm 1 of the supplement end to end (METHOD.md §2–§5), vectorised over a grid of
(lr, momentum, batch size, loss) for one dataset state:

1. :func:`load_state` computes (or loads from the disk cache) the per-dataset state: F0 and the
   eigendecomposition of the empirical NTK Θ (:mod:`ttp_ray.kernel`);
2. :func:`predict_grid` simulates the linearised dynamics of every config (:mod:`ttp_ray.dynamics`,
   deduplicated by the time-rescaling collapse) and reads T̂ε off each predicted curve with the very
   function that reads T_ε off real curves (:mod:`ttp_ray.training_time`).

Nothing here knows about Ray; :mod:`ttp_ray.sweep` distributes these two calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .data import ImageDataset
from .dynamics import SimConfig, SimOptions, SimResult, simulate
from .kernel import KernelOptions, kernel_state
from .inputs import AdaptOptions
from .models import FinetuneModel, build_finetune_model, load_dataset_for_model
from .state import KernelState
from .tables import prediction_rows
from .training_time import CRITERIA, EPS_MODES, TIME_DEFINITIONS

__all__ = ["PredictSettings", "PreparedState", "PredictedConfig", "load_state", "predict_grid", "predict_one",
           "predicted_configs", "prediction_rows", "check_request"]


@dataclass(frozen=True)
class PredictSettings:
    """How predicted curves become T̂ε rows; every default stated."""

    sim: SimOptions = field(default_factory=SimOptions)  # dynamics method, momentum mode, noise, paths...
    eps_mode: str = "absolute"  # 'absolute' | 'relative' (eps times the curve's drop L_0 - L_T)
    criteria: Tuple[str, ...] = CRITERIA  # ('loss', 'error')
    definition: str = "threshold"  # 'threshold' (Algorithm 1) | 'plateau' (supplement App. C)
    window: int = 0  # plateau definition: look-back in steps

    def __post_init__(self):
        if self.eps_mode not in EPS_MODES:
            raise ValueError(f"eps_mode: {self.eps_mode!r} is not one of {', '.join(EPS_MODES)}")
        bad = [c for c in self.criteria if c not in CRITERIA]
        if bad or not self.criteria:
            raise ValueError(f"criteria: {bad or '[]'} not allowed; allowed: {', '.join(CRITERIA)}")
        if self.definition not in TIME_DEFINITIONS:
            raise ValueError(f"definition: {self.definition!r} is not one of {', '.join(TIME_DEFINITIONS)}")
        if self.window < 0:
            raise ValueError(f"window: must be >= 0, got {self.window}")
        if self.definition == "plateau" and self.window <= 0:
            raise ValueError(f"window: must be a positive number of steps with definition 'plateau', got {self.window}")


@dataclass
class PreparedState:
    """Everything a prediction needs for one (model, dataset): the kernel state and its provenance."""

    state: KernelState
    model: FinetuneModel  # at w0 (pre-trained backbone + seeded head), for step-time measurement
    dataset: ImageDataset
    model_name: str
    dataset_name: str
    kernel_seconds: float  # wall time to obtain the state now (cache load or computation)
    cache_hit: bool
    kernel: KernelOptions = field(default_factory=KernelOptions)  # how the state was computed
    trainable: str = "all"
    device: str = "cpu"

    @property
    def n(self) -> int:
        return self.state.n

    def max_stable_lr(self, momentum: float = 0.0) -> float:
        return self.state.max_stable_lr(momentum)


def load_state(model: str, dataset, kernel: KernelOptions = KernelOptions(), *, subset: Optional[int] = None,
               head_seed: int = 0, trainable: str = "all", device: str = "cpu", cache: bool = True,
               allow_download: bool = False, adapt: AdaptOptions = AdaptOptions()) -> PreparedState:
    """Load dataset (a name: as the backbone takes it, :func:`ttp_ray.models.load_dataset_for_model`) and
    backbone, then the kernel state (disk cache first; METHOD.md §6)."""
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset_for_model(
        dataset, model, adapt=adapt, subset=subset, download=allow_download)
    net = build_finetune_model(model, ds.num_classes, head_seed, allow_download=allow_download)
    t0 = time.perf_counter()
    state = kernel_state(net, ds, kernel, device=device, trainable=trainable, cache=cache)
    seconds = time.perf_counter() - t0
    hit = bool(state.meta.get("cache", {}).get("hit", False))
    name = dataset if isinstance(dataset, str) else ds.name
    return PreparedState(state=state, model=net, dataset=ds, model_name=model, dataset_name=str(name),
                         kernel_seconds=seconds, cache_hit=hit, kernel=kernel, trainable=trainable, device=device)


@dataclass
class PredictedConfig:
    """The predicted curves of one config and its T̂ε rows (one per criterion and eps)."""

    config: SimConfig
    result: SimResult
    rows: List[Dict[str, object]]

    @property
    def diverged(self) -> bool:
        return self.result.diverged


def check_request(n: int, configs: Sequence[SimConfig], budget_steps: int, eps_list: Sequence[float]) -> None:
    """One-line ``ValueError`` naming the field for a budget, an eps list or a batch size no predictor takes."""
    if budget_steps <= 0:
        raise ValueError(f"budget_steps: must be a positive integer, got {budget_steps}")
    if not eps_list or any(e <= 0 for e in eps_list):
        raise ValueError(f"eps: every value must be > 0, got {list(eps_list)}")
    for c in configs:
        if c.batch_size is not None and c.batch_size > n:
            raise ValueError(f"batch_size: must be in 1..{n} (the dataset size) or 'full', got {c.batch_size}")


def predict_grid(prepared, configs: Sequence[SimConfig], *, budget_steps: int, eps_list: Sequence[float],
                 settings: PredictSettings = PredictSettings()) -> List[PredictedConfig]:
    """Simulate every config on one state (vectorised, collapsed) and read T̂ε off each curve.

    ``prepared`` is a :class:`PreparedState` or a bare :class:`KernelState`.
    """
    state = prepared.state if isinstance(prepared, PreparedState) else prepared
    n = state.n
    check_request(n, configs, budget_steps, eps_list)
    return predicted_configs(simulate(state, list(configs), budget_steps, settings.sim), n, budget_steps=budget_steps,
                             eps_list=eps_list, settings=settings)


def predicted_configs(results: Sequence[SimResult], n: int, *, budget_steps: int, eps_list: Sequence[float],
                      settings: PredictSettings = PredictSettings(), extra: Optional[Dict[str, object]] = None
                      ) -> List[PredictedConfig]:
    """T̂ε rows read off simulated curves (any simulator's :class:`SimResult`, e.g. ``ttp_ray.drift``'s)."""
    out = []
    for res in results:
        if not np.all(np.isfinite(res.loss)):  # the dynamics promise NaN-free curves; never pass one on
            raise RuntimeError(f"dynamics returned a non-finite loss for {res.config}")
        out.append(PredictedConfig(res.config, res, prediction_rows(res, n, budget_steps, eps_list, settings, extra)))
    return out


def predict_one(prepared, config: SimConfig, *, budget_steps: int, eps_list: Sequence[float],
                settings: PredictSettings = PredictSettings()) -> PredictedConfig:
    return predict_grid(prepared, [config], budget_steps=budget_steps, eps_list=eps_list, settings=settings)[0]


# --------------------------------------------------------------------------------------------------
# Predicting on the full set from a subset's kernel (METHOD.md §7, supplement App. D; issue 5).
# The sweep's ``kernel: {subset: N0}`` and ``ttp-ray predict --kernel-subset N0`` call these two.
# --------------------------------------------------------------------------------------------------

from .subset import SUBSET_METHOD, ExtrapolatedSpectrum, SubsetOptions, extrapolate_state, initial_outputs  # noqa: E402
from .subset import simulate_spectrum  # noqa: E402


@dataclass
class PreparedSubset:
    """The full set's spectrum extrapolated from the kernel of ``n0`` of its samples, and provenance.
    Duck-types :class:`PreparedState` where the CLI and the sweep read it (``state`` is the *subset's*
    kernel state; ``n`` and ``max_stable_lr`` are the full set's, predicted)."""

    spectrum: ExtrapolatedSpectrum
    subset: PreparedState  # the subset's kernel state, model and subset dataset
    dataset: ImageDataset  # the full set
    model_name: str
    dataset_name: str
    kernel_seconds: float  # subset kernel (cache load or computation) + full-set forward pass + extrapolation
    forward_seconds: float  # the one forward pass over the full set (F0)
    cache_hit: bool  # of the subset kernel

    @property
    def state(self) -> KernelState:
        return self.subset.state

    @property
    def model(self) -> FinetuneModel:
        return self.subset.model

    @property
    def n(self) -> int:
        return self.spectrum.n

    def max_stable_lr(self, momentum: float = 0.0) -> float:
        return self.spectrum.max_stable_lr(momentum)


def load_subset_state(model: str, dataset, n0: int, kernel: KernelOptions = KernelOptions(), *,
                      options: SubsetOptions = SubsetOptions(), subset_seed: int = 0, subset: Optional[int] = None,
                      head_seed: int = 0, trainable: str = "all", device: str = "cpu", cache: bool = True,
                      allow_download: bool = False, adapt: AdaptOptions = AdaptOptions()) -> PreparedSubset:
    """Kernel of a seeded class-balanced subset of ``n0`` samples, F0 on the full set (one forward pass),
    and the extrapolated full-set spectrum (:func:`ttp_ray.subset.extrapolate_state`, METHOD.md §7)."""
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset_for_model(
        dataset, model, adapt=adapt, subset=subset, download=allow_download)
    if not 0 < int(n0) < len(ds):
        raise ValueError(f"kernel_subset: must be an integer in 1..{len(ds) - 1} (below the dataset size), got {n0}")
    t0 = time.perf_counter()
    sub = load_state(model, ds.subset(int(n0), subset_seed), kernel, head_seed=head_seed, trainable=trainable,
                     device=device, cache=cache, allow_download=allow_download)
    t1 = time.perf_counter()
    f0 = initial_outputs(sub.model, ds, device=device)
    fwd = time.perf_counter() - t1
    spectrum = extrapolate_state(sub.state, f0, ds.targets, options)
    spectrum.meta.update(subset_seed=int(subset_seed), forward_seconds=fwd)
    name = dataset if isinstance(dataset, str) else ds.name
    return PreparedSubset(spectrum=spectrum, subset=sub, dataset=ds, model_name=model, dataset_name=str(name),
                          kernel_seconds=time.perf_counter() - t0, forward_seconds=fwd, cache_hit=sub.cache_hit)


def predict_subset_grid(prepared: PreparedSubset, configs: Sequence[SimConfig], *, budget_steps: int,
                        eps_list: Sequence[float], settings: PredictSettings = PredictSettings()
                        ) -> List[PredictedConfig]:
    """T̂ε rows of every config on the extrapolated full-set spectrum (``prepared``: a :class:`PreparedSubset`
    or a bare :class:`~ttp_ray.subset.ExtrapolatedSpectrum`): the same fields as
    :func:`predict_grid` with ``method = "subset-extrapolated"``, plus ``dynamics`` (discrete | ode),
    ``kernel_subset`` (N0) and ``subset_alpha``. Loss only (criterion ``loss``; no error curve without
    the full set's eigenvectors); mse and full-batch GD only (``ValueError`` naming ``loss`` /
    ``batch_size`` otherwise)."""
    spec = prepared.spectrum if isinstance(prepared, PreparedSubset) else prepared
    check_request(spec.n, configs, budget_steps, eps_list)
    results = simulate_subset(spec, list(configs), budget_steps, settings)
    return predicted_configs(results, spec.n, budget_steps=budget_steps, eps_list=eps_list, settings=settings,
                             extra=subset_row_fields(spec, settings))


def simulate_subset(spectrum: ExtrapolatedSpectrum, configs: Sequence[SimConfig], budget_steps: int,
                    settings: PredictSettings) -> List[SimResult]:
    """Loss curves on an extrapolated spectrum (``criteria`` must include ``loss``: no error curve without the
    full set's eigenvectors)."""
    if "loss" not in settings.criteria:
        raise ValueError(f"criteria: subset extrapolation predicts the loss curve only, got {list(settings.criteria)}")
    return simulate_spectrum(spectrum, configs, budget_steps, settings.sim, method_name=SUBSET_METHOD)


def subset_row_fields(spectrum: ExtrapolatedSpectrum, settings: PredictSettings) -> Dict[str, object]:
    """The columns a subset prediction adds to its rows: ``dynamics``, ``kernel_subset`` (N0), ``subset_alpha``."""
    return {"dynamics": "ode" if settings.sim.method == "ode" else "discrete", "kernel_subset": int(spectrum.n0),
            "subset_alpha": float(spectrum.alpha)}


def predict_subset_one(prepared: PreparedSubset, config: SimConfig, *, budget_steps: int, eps_list: Sequence[float],
                       settings: PredictSettings = PredictSettings()) -> PredictedConfig:
    return predict_subset_grid(prepared, [config], budget_steps=budget_steps, eps_list=eps_list, settings=settings)[0]


__all__ += ["PreparedSubset", "load_subset_state", "predict_subset_grid", "predict_subset_one", "simulate_subset",
            "subset_row_fields"]
