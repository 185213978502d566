"""ttp-ray inside Ray Tune: train the configs a sweep's predictions rank best, each for its predicted budget.

A thin layer over the core (:mod:`ttp_ray.finetune`, :mod:`ttp_ray.analysis`) and Ray Tune; the scheduling is
Tune's own. Three pieces, usable on their own in a user's ``Tuner``:

* **the search** -- :func:`candidates` orders a sweep's prediction rows as ``ttp-ray rank`` does (default: the
  predicted cost to a common target, METHOD.md §12) and keeps the ``top`` ranked configs per dataset: configs
  predicted to diverge, never to reach the target (or ε, when ranking by T̂ε) or to end above
  ``max_final_error`` are not ranked, so never tried. :func:`param_space` turns them into a Tune
  ``param_space`` (one ``tune.grid_search`` over the configs, in ranked order: Tune's own variant generator
  starts them in that order, and ``Tuner.restore`` needs nothing of ours);
* **the stopper** -- :class:`PredictedBudgetStopper` gives each trial its predicted budget: ``margin`` × the
  predicted steps of the ranking (steps to the target, or T̂ε), or, where the predictor gives the row an interval
  T̂ε e^{±w} (:data:`INTERVAL_HIGH`, METHOD.md §14), its upper bound (T̂ε e^w; steps to the target × e^w),
  never more than the spec's budget; it stops the trial there, or as soon as its real curve reaches the target
  (ranking by cost to target);
* **the trainable** -- :func:`train_trial` runs the project's real fine-tuning (:func:`ttp_ray.finetune.finetune`)
  and reports ``step``, ``loss``, ``error``, ``train_seconds`` (the optimiser steps' wall time so far) and
  ``diverged`` at every logged step through ``tune.report``, with a checkpoint (weights, optimiser state,
  minibatch position, curve so far; ``torch.save``, read back with ``weights_only=True``) every
  ``checkpoint_every`` logged steps, so Tune's reporters, schedulers (ASHA: ``time_attr="step"``),
  checkpoints and ``Tuner.restore`` work unchanged.

:func:`run_tune` is ``ttp-ray tune SPEC --top K``: run (or resume) the sweep SPEC into OUT, train the top K
configs per dataset as Tune trials on the same Ray (local on 127.0.0.1, or ``address``), Tune's storage under
``OUT/tune``, and write each finished trial as the sweep writes a fine-tune: ``ground_truth`` rows and the
real curve (:func:`ttp_ray.sweep.work.ground_truth_tables`), parts ``tune-<config_id>-s<seed>``, so ``validate``,
``plot`` and the notebook include them. A run stopped before its budget has no T_ε (its ``last_step`` says
where it stopped); its cost to the target is read off its curve like any other. A re-run skips the configs
whose ground truth is on disk (from an earlier tune or from the sweep itself) and restores an interrupted Tune
experiment (``Tuner.restore``: unfinished trials resume from their last checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .analysis import (DEFAULT_RANK_KEY, RANK_KEYS, TARGET_RANK_KEYS, default_selection, fmt, load_sweep, rank,
                       validation_table)
from .preflight import ResourceLimits
from .sweep.output import TUNE_DIR, SweepOutput
from .sweep.spec import SweepSpec

__all__ = [
    "TuneOptions",
    "StopRule",
    "TrialSetup",
    "TunedConfig",
    "TuneOutcome",
    "SweepIncomplete",
    "INTERVAL_HIGH",
    "STATE_FILE",
    "candidates",
    "stop_rules",
    "TRIAL_KEYS",
    "trial_config",
    "param_space",
    "PredictedBudgetStopper",
    "train_trial",
    "trainable",
    "trial_finished",
    "trial_run",
    "trial_tables",
    "part_name",
    "done_configs",
    "check_options",
    "run_tune",
    "tune_text",
]

INTERVAL_HIGH = "predicted_steps_high"  # a row's T̂ε interval upper bound, T̂ε e^w capped at T (METHOD.md §14)
STATE_FILE = "finetune.pt"  # the file in a trial's Tune checkpoint: finetune()'s snapshot, torch.save'd
PART_PREFIX = "tune"  # ground-truth parts of tuned runs: part-tune-<config_id>-s<seed>.parquet
_SWEEP_PART_PREFIX = "gt"  # the sweep's own fine-tunes (ttp_ray.sweep.plan.GroundTruthRun.run_id)


@dataclass(frozen=True)
class TuneOptions:
    """What ``ttp-ray tune`` trains and for how long; every default stated."""

    top: int = 3  # configs trained per dataset, best-ranked first
    by: str = DEFAULT_RANK_KEY  # the ranking (ttp_ray.analysis.RANK_KEYS)
    criterion: Optional[str] = None  # None: the spec's first (as `ttp-ray rank`)
    eps: Optional[float] = None  # None: the spec's first
    target_error: Optional[float] = None  # None: derived per (dataset, loss) from the grid (METHOD.md §12)
    target_loss: Optional[float] = None
    max_final_error: Optional[float] = None  # configs predicted to end above it are not tried
    margin: float = 1.2  # a trial's budget: margin x its predicted steps (without an interval upper bound)
    full_budget: bool = False  # no stopper: every trial runs the spec's whole budget (T_eps measured too)
    seed: int = 0  # minibatch order of the runs
    checkpoint_every: int = 10  # logged steps between two checkpoints of a trial
    max_concurrent_trials: Optional[int] = None  # None: as many as the trials' resources allow
    datasets: Tuple[str, ...] = ()  # () = every dataset of the sweep
    verbose: int = 1  # Ray Tune's console output: 0 silent, 1 status, 2 every result

    def __post_init__(self):
        if not (isinstance(self.top, int) and self.top >= 1):
            raise ValueError(f"top: must be an integer >= 1, got {self.top!r}")
        if self.by not in RANK_KEYS:
            raise ValueError(f"by: {self.by!r} is not allowed; allowed: {', '.join(RANK_KEYS)}")
        if not (self.margin >= 1.0 and math.isfinite(self.margin)):
            raise ValueError(f"margin: must be a finite number >= 1, got {self.margin}")
        if self.max_final_error is not None and not 0.0 <= self.max_final_error <= 1.0:
            raise ValueError(f"max_final_error: must be a fraction in [0, 1], got {self.max_final_error}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed: must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1):
            raise ValueError(f"checkpoint_every: must be an integer >= 1, got {self.checkpoint_every!r}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials: must be >= 1 or None, got {self.max_concurrent_trials}")
        if self.verbose not in (0, 1, 2, 3):
            raise ValueError(f"verbose: must be 0, 1, 2 or 3, got {self.verbose!r}")

    @property
    def to_target(self) -> bool:
        """Ranking by the cost to a common target: the budget is steps to the target, and reaching it stops."""
        return self.by in TARGET_RANK_KEYS


# ------------------------------------------------------------------------------------------------ the search

def _budget_column(by: str) -> str:
    return "predicted_steps_to_target" if by in TARGET_RANK_KEYS else "predicted_steps"


def candidates(pred, curves, options: TuneOptions = TuneOptions(), manifest: Optional[Mapping[str, Any]] = None):
    """The configs to train, best first: the ranked rows of :func:`ttp_ray.analysis.rank` (one (criterion, ε): the
    options', else the spec's first) for ``options.by``, the ``top`` best per dataset, with the columns
    ``trial_budget_steps`` (the stopper's budget: margin × the predicted steps, or the interval's upper bound, at
    least 1, at most the budget; see the module docstring), ``trial_budget_rule`` (which), ``trial_metric`` and
    ``trial_stop_value`` (the target; null when ranking by T̂ε). ``pred`` and ``curves``: the sweep's
    ``predictions`` and ``curves`` tables (pandas). Bad options raise :class:`~ttp_ray.analysis.AnalysisError`."""
    import numpy as np

    crit, eps = options.criterion, options.eps
    if crit is None or eps is None:
        first = default_selection(pred, dict(manifest or {}))
        crit, eps = crit or first[0], first[1] if eps is None else eps
    ranked = rank(pred, by=options.by, curves=curves, target_error=options.target_error,
                  target_loss=options.target_loss, criterion=crit, eps=eps, datasets=list(options.datasets) or None,
                  max_final_error=options.max_final_error)
    ranked = ranked[ranked["rank"].notna()]
    top = ranked.groupby("dataset", sort=False).head(options.top).copy()
    col = _budget_column(options.by)
    point = top[col].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    upper = np.full(len(top), np.nan)
    if INTERVAL_HIGH in top.columns:  # the interval is a band on the time axis, T̂ε e^{±w} (METHOD.md §14)
        high = top[INTERVAL_HIGH].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        if col == "predicted_steps":
            upper = high
        else:  # steps to the target x e^w, where the band is not cut at the budget (there e^w > high / T̂ε)
            t_eps = top.predicted_steps.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                e_w = np.where((high < top.budget_steps.to_numpy(dtype=float)) & (t_eps > 0), high / t_eps, np.nan)
            upper = point * e_w
    rule = np.where(np.isfinite(upper), f"interval ({INTERVAL_HIGH})", f"{options.margin:g} x {col}")
    want = np.where(np.isfinite(upper), upper, options.margin * point)
    # the stopper acts at the first report at or past the budget: at least one step, at most the spec's budget
    steps = np.minimum(top.budget_steps.to_numpy(dtype=float), np.maximum(1.0, np.ceil(np.round(want, 9))))
    top["trial_budget_steps"] = np.where(options.full_budget, top.budget_steps.to_numpy(dtype=float),
                                         steps).astype("int64")
    top["trial_budget_rule"] = np.where(options.full_budget, "full budget", rule)
    top["trial_metric"] = crit
    top["trial_stop_value"] = top["target"] if options.to_target and not options.full_budget else np.nan
    return top.reset_index(drop=True)


@dataclass(frozen=True)
class StopRule:
    """One trial's stop: at the first report at or past ``budget_steps``, or when ``metric`` <= ``value``."""

    budget_steps: int
    metric: Optional[str] = None  # 'loss' | 'error'; None: the budget only
    value: Optional[float] = None


def stop_rules(cands) -> Dict[str, StopRule]:
    """config_id -> :class:`StopRule` of the rows of :func:`candidates`."""
    out = {}
    for r in cands.itertuples(index=False):
        value = float(r.trial_stop_value) if r.trial_stop_value is not None and math.isfinite(
            float(r.trial_stop_value)) else None
        out[str(r.config_id)] = StopRule(int(r.trial_budget_steps), r.trial_metric if value is not None else None,
                                         value)
    return out


TRIAL_KEYS = ("config_id", "dataset", "model", "loss", "lr", "lr_fraction", "momentum", "batch_size", "budget_steps",
              "seed")  # a trial's config (flat: Tune's reporters show each as a column)


def trial_config(row: Mapping[str, Any], seed: int = 0) -> Dict[str, Any]:
    """A prediction row (``config_id``, ``dataset``, ``model``, ``loss``, ``lr``, ...) as a trial's config
    (:data:`TRIAL_KEYS`): plain values, ``batch_size`` None for full batch."""
    full = bool(row["full_batch"])
    return {"config_id": str(row["config_id"]), "dataset": str(row["dataset"]), "model": str(row["model"]),
            "loss": str(row["loss"]), "lr": float(row["lr"]), "lr_fraction": _lr_fraction(row),
            "momentum": float(row["momentum"]), "batch_size": None if full else int(row["batch_size"]),
            "budget_steps": int(row["budget_steps"]), "seed": int(seed)}


def _lr_fraction(row: Mapping[str, Any]) -> Optional[float]:
    """A row's lr fraction of the stability limit; None for an absolute lr grid (null / NaN in the table)."""
    frac = row.get("lr_fraction")
    return None if frac is None or (isinstance(frac, float) and math.isnan(frac)) else float(frac)


@dataclass(frozen=True)
class _TrialField:
    """``tune.sample_from`` of one key of a trial's config: its value for the trial's (grid-searched) config_id."""

    key: str
    values: Tuple[Tuple[str, Any], ...]

    def __call__(self, config: Mapping[str, Any]) -> Any:
        return dict(self.values)[config["config_id"]]


def param_space(rows, seed: int = 0) -> Dict[str, Any]:
    """Tune's ``param_space`` over ``rows`` (a DataFrame of prediction rows, e.g. :func:`candidates`, in the order
    to try them): ``config_id`` a ``tune.grid_search`` in that order (Tune's variant generator starts the trials
    so), every other key of :data:`TRIAL_KEYS` a ``tune.sample_from`` of the config's own value."""
    from ray import tune as ray_tune

    configs = [trial_config(r, seed) for r in rows.to_dict("records")]
    space: Dict[str, Any] = {"config_id": ray_tune.grid_search([c["config_id"] for c in configs])}
    for key in TRIAL_KEYS[1:]:
        space[key] = ray_tune.sample_from(_TrialField(key, tuple((c["config_id"], c[key]) for c in configs)))
    return space


# ----------------------------------------------------------------------------------------------- the stopper

def _stopper_base():
    from ray.tune import Stopper

    return Stopper


class PredictedBudgetStopper(_stopper_base()):
    """A Ray Tune ``Stopper``: each trial (by its ``config_id``) stops at the first report at or past its
    predicted budget, or once its ``metric`` is at or below its target (:class:`StopRule`). Trials it has no rule
    for run on. Never stops the whole experiment."""

    def __init__(self, rules: Mapping[str, StopRule]):
        self.rules = dict(rules)

    @classmethod
    def from_candidates(cls, cands) -> "PredictedBudgetStopper":
        return cls(stop_rules(cands))

    def __call__(self, trial_id: str, result: Dict[str, Any]) -> bool:
        rule = self.rules.get(str(result.get("config", {}).get("config_id")))
        if rule is None or "step" not in result:
            return False
        if rule.metric is not None and result.get(rule.metric) is not None and result[rule.metric] <= rule.value:
            return True
        return int(result["step"]) >= rule.budget_steps

    def stop_all(self) -> bool:
        return False


# --------------------------------------------------------------------------------------------- the trainable

@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs beyond its config: the sweep spec (datasets as entries, backbone head seed,
    trainable part, logging interval, device preference) and how often to checkpoint."""

    spec: SweepSpec
    checkpoint_every: int = 10  # logged steps
    fail_marker: Optional[str] = None  # test hook: the first trial past a checkpoint creates this file and fails

    @property
    def log_every(self) -> int:
        return self.spec.ground_truth.log_every or self.spec.simulation.log_every

    def finetune_config(self, run: Mapping[str, Any]):
        from .finetune import FinetuneConfig

        return FinetuneConfig(lr=float(run["lr"]), momentum=float(run["momentum"]), batch_size=run["batch_size"],
                              loss=run["loss"], steps=int(run["budget_steps"]), seed=int(run["seed"]),
                              log_every=self.log_every, trainable=self.spec.kernel.trainable)


def train_trial(config: Dict[str, Any], setup: Optional[TrialSetup] = None) -> None:
    """The Ray Tune function trainable: fine-tune ``config`` (a :func:`trial_config`) for real, reporting every
    logged step; resumes from the trial's checkpoint when Tune restores it."""
    import ray
    import torch
    from ray import tune as ray_tune

    from .finetune import finetune
    from .models import build_finetune_model, load_dataset_for_model
    from .sweep.work import pick_device

    if setup is None:
        raise ValueError("setup: train_trial needs a TrialSetup (tune.with_parameters(train_trial, setup=...))")
    run = config
    entry = next(d for d in setup.spec.datasets if d.label == run["dataset"])
    ds = load_dataset_for_model(entry.ref, run["model"], adapt=entry.input)
    model = build_finetune_model(run["model"], ds.num_classes, setup.spec.kernel.head_seed)
    cfg = setup.finetune_config(run)
    device = pick_device(setup.spec.resources.device, len(ray.get_gpu_ids()) > 0)
    resume = None
    checkpoint = ray_tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, weights_only=True)
    logged = [0]

    def on_log(point) -> None:
        metrics = {"step": point.step, "loss": point.loss, "error": point.error,
                   "train_seconds": point.train_seconds, "diverged": False}
        logged[0] += 1
        if logged[0] % setup.checkpoint_every == 0 and point.step < cfg.steps:
            with tempfile.TemporaryDirectory() as d:
                torch.save(point.snapshot(), Path(d) / STATE_FILE)
                ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(d))
            _maybe_fail(setup.fail_marker)
        else:
            ray_tune.report(metrics)

    res = finetune(model, ds, cfg, device=device, on_log=on_log, resume=resume)
    if res.diverged:  # finetune() stops without logging the diverged point: say so once, at the last good one
        last = len(res.steps) - 1
        ray_tune.report({"step": int(res.steps[last]) if last >= 0 else 0,
                         "loss": float(res.loss[last]) if last >= 0 else math.nan,
                         "error": float(res.error[last]) if last >= 0 else math.nan,
                         "train_seconds": res.train_seconds, "diverged": True})


def _maybe_fail(marker: Optional[str]) -> None:
    """Test hook: with ``marker`` set, the first trial to get here creates it and raises (as a crashed trial)."""
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        raise RuntimeError("test hook: the trial fails once after its checkpoint")


def trainable(setup: TrialSetup):
    """:func:`train_trial` bound to ``setup`` with each trial's resources (the spec's ``ground_truth.cpus`` and
    ``gpus``; 'auto': one GPU when the connected Ray has one), ready for ``Tuner(trainable(setup), ...)`` and
    ``Tuner.restore(path, trainable(setup))``. Call it connected to Ray."""
    import ray
    from ray import tune as ray_tune

    gt = setup.spec.ground_truth
    gpus = (1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0) if gt.gpus == "auto" else float(gt.gpus)
    return ray_tune.with_resources(ray_tune.with_parameters(train_trial, setup=setup), {"cpu": gt.cpus, "gpu": gpus})


# ------------------------------------------------------------------------------------- results -> the tables

def trial_finished(result) -> bool:
    """Whether a Tune ``Result`` is of a trial that ended (ran its budget, diverged, or was stopped by the
    stopper or a scheduler), not one that errored or was interrupted."""
    return result.error is None and bool(result.metrics.get("done")) and result.metrics_dataframe is not None


def trial_run(result, setup: TrialSetup, n: int):
    """The :class:`~ttp_ray.finetune.FinetuneResult` of a finished trial, rebuilt from its reported history
    (a step reported twice, as after a restore from a checkpoint, counts once, the last report)."""
    import numpy as np

    from .finetune import FinetuneResult

    df = result.metrics_dataframe
    df = df[df["step"].notna()].drop_duplicates("step", keep="last").sort_values("step")
    diverged = bool(df["diverged"].astype(bool).any())
    steps = df["step"].to_numpy(dtype=np.int64)
    train_seconds = float(df["train_seconds"].iloc[-1]) if len(df) else 0.0
    run = result.metrics["config"]
    return FinetuneResult(config=setup.finetune_config(run), n=int(n), steps=steps,
                          loss=df["loss"].to_numpy(dtype=float), error=df["error"].to_numpy(dtype=float),
                          diverged=diverged, step_time_s=train_seconds / max(1, int(steps[-1]) if len(steps) else 1),
                          train_seconds=train_seconds, total_seconds=float(result.metrics.get("time_total_s", 0.0)),
                          device=str(result.metrics.get("node_ip", "")))


def trial_tables(spec: SweepSpec, row: Mapping[str, Any], run, device: str = "") -> Tuple[Any, Any]:
    """The ``ground_truth`` and ``curves`` parts of one tuned run (``run``: :func:`trial_run`) of the config of the
    prediction row ``row``, in the sweep's schemas (:func:`ttp_ray.sweep.work.ground_truth_tables`)."""
    from .sweep.work import ground_truth_tables

    columns = {"config_id": str(row["config_id"]), "model": row["model"], "loss": row["loss"], "lr": float(row["lr"]),
               "lr_fraction": _lr_fraction(row),
               "momentum": float(row["momentum"]), "batch_size": int(row["batch_size"]),
               "full_batch": bool(row["full_batch"]), "effective_lr": float(row["effective_lr"]),
               "eps_mode": spec.simulation.eps_mode, "budget_steps": int(row["budget_steps"]), "n": int(row["n"]),
               "max_stable_lr": float(row["max_stable_lr"]), "seed": int(run.config.seed), "device": device or None}
    return ground_truth_tables(spec, columns, run)


def part_name(config_id: str, seed: int, prefix: str = PART_PREFIX) -> str:
    """The part (file ``part-<name>.parquet``) of a tuned run in ``ground_truth`` and ``curves``."""
    return f"{prefix}-{config_id}-s{seed}"


def done_configs(out, cands, seed: int) -> Dict[str, str]:
    """config_id -> 'tune' | 'sweep' for the candidates whose real run of ``seed`` is already in ``OUT/ground_truth``
    (a part of an earlier ``ttp-ray tune``, or of the sweep's own ground truth)."""
    have = SweepOutput(out).completed_keys("ground_truth")
    done = {}
    for r in cands.itertuples(index=False):
        for prefix, source in ((PART_PREFIX, "tune"), (_SWEEP_PART_PREFIX, "sweep")):
            if f"{r.dataset}/{part_name(r.config_id, seed, prefix)}" in have:
                done[str(r.config_id)] = source
                break
    return done


# ---------------------------------------------------------------------------------------------- the command

@dataclass
class TunedConfig:
    """One candidate after :func:`run_tune`: its prediction row, its stop rule and what its real run gave."""

    row: Dict[str, Any]
    rule: StopRule
    source: str  # 'tuned' (this call) | 'tune' (an earlier call) | 'sweep' (the sweep's own) | 'failed' | '-'
    train_seconds: Optional[float] = None  # the run's optimiser-step time (this call's runs)


class SweepIncomplete(RuntimeError):
    """The sweep :func:`run_tune` trains from did not finish: its failures, and whether a re-run may fix them
    (else every one was bad input found inside a worker)."""

    def __init__(self, failures: Tuple[str, ...], retryable: bool):
        self.failures, self.retryable = tuple(failures), bool(retryable)
        advice = "re-run the same command to retry it" if retryable else "fix the input it names: a re-run fails " \
                                                                         "the same way"
        super().__init__(f"the sweep is incomplete ({len(self.failures)} failure(s), first: {self.failures[0]}); "
                         f"{advice}")


@dataclass
class TuneOutcome:
    out: Path
    criterion: str
    eps: float
    by: str
    configs: List[TunedConfig]
    comparison: Any  # pandas DataFrame: predicted against real, one row per candidate (see tune_text)
    experiment: Optional[str]  # OUT/tune/<name> of this call's Tune experiment (None: nothing left to train)
    restored: bool  # whether the experiment was restored (Tuner.restore) rather than started
    failures: List[str]  # '<config_id>: why', one per trial that did not finish
    sweep_seconds: float  # wall time of the sweep step (predicting, or finding it done)
    kernel_seconds: float  # the kernel states' computation, as the manifest recorded it (cached or not)
    shard_seconds: float  # the prediction shards this call ran (actor-side; 0 when the sweep was already done)
    tune_seconds: float  # wall time of the Tune step
    trial_train_seconds: float  # optimiser-step seconds of this call's trials


def _experiment_name(spec: SweepSpec, options: TuneOptions, configs: Sequence[Dict[str, Any]],
                     rules: Mapping[str, StopRule]) -> str:
    blob = json.dumps({"spec": spec.identity_hash(), "configs": list(configs),
                       "rules": {k: asdict(v) for k, v in sorted(rules.items())},
                       "checkpoint_every": options.checkpoint_every}, sort_keys=True, default=str)
    return f"{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _trial_dirname(trial) -> str:
    """Tune's trial folder: the config id and Tune's trial id (short, stable, readable)."""
    return f"{trial.config['config_id']}_{trial.trial_id}"


def check_options(spec: SweepSpec, options: TuneOptions) -> None:
    """What of ``options`` the spec decides, checked before the sweep runs: ``criterion`` among its criteria,
    ``eps`` among its eps, ``datasets`` among its dataset labels (one-line ``ValueError`` naming the option)."""
    if options.criterion is not None and options.criterion not in spec.criteria:
        raise ValueError(f"criterion: {options.criterion!r} is not one of the spec's criteria; allowed: "
                         f"{', '.join(spec.criteria)}")
    if options.eps is not None and not any(math.isclose(options.eps, e, rel_tol=1e-9) for e in spec.eps):
        raise ValueError(f"eps: {options.eps:g} is not one of the spec's eps; allowed: "
                         f"{', '.join(f'{e:g}' for e in spec.eps)}")
    labels = [d.label for d in spec.datasets]
    for name in options.datasets:
        if name not in labels:
            raise ValueError(f"dataset: {name!r} is not a dataset of the spec; allowed: {', '.join(labels)}")


def _connect(spec: SweepSpec, address: Optional[str], num_cpus: Optional[int], sweep_kwargs: Dict[str, Any]):
    """Run (or resume) the sweep and leave this process connected to the Ray it ran on; returns (sweep result,
    whether this call started Ray and must stop it). A local Ray starts only after the sweep's preflight (the
    sweep starts it, and keeps it for the trials; or, when the sweep is done already, it starts here)."""
    import logging

    import ray

    from .sweep.driver import run_sweep, start_local_ray

    if ray.is_initialized():
        return run_sweep(spec, **sweep_kwargs), False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # the sweep attaches (and detaches) itself, checking the data where it lives
        result = run_sweep(spec, address=address, **sweep_kwargs)
        ray.init(address=address, logging_level=logging.WARNING)
        return result, True
    result = run_sweep(spec, num_cpus=num_cpus, keep_ray=True, **sweep_kwargs)  # preflight first, then Ray
    if not ray.is_initialized():  # nothing was left to predict: the sweep started no Ray
        start_local_ray(num_cpus, spec.resources.object_store_mb)
    return result, True


def run_tune(spec: SweepSpec, out: Optional[str] = None, *, options: TuneOptions = TuneOptions(),
             address: Optional[str] = None, num_cpus: Optional[int] = None, fresh: bool = False,
             progress: bool = True, echo: Callable[[str], None] = print,
             limits: ResourceLimits = ResourceLimits(), _fail_marker: Optional[str] = None) -> TuneOutcome:
    """``ttp-ray tune``: see the module docstring. ``fresh`` discards OUT's sweep (and its tune runs) first.
    ``limits``: the sweep's resource bounds (its preflight, before Ray starts: :func:`ttp_ray.sweep.driver.run_sweep`).
    ``_fail_marker`` is a test hook (:attr:`TrialSetup.fail_marker`: one trial fails once after a checkpoint)."""
    import ray

    t0 = time.perf_counter()
    out_dir = Path(out or spec.output_dir())
    check_options(spec, options)
    sweep, started = _connect(spec, address, num_cpus, {"out": str(out_dir), "fresh": fresh, "progress": progress,
                                                        "echo": echo, "limits": limits})
    try:
        sweep_seconds = time.perf_counter() - t0
        if sweep.failures:
            raise SweepIncomplete(tuple(sweep.failures), sweep.retryable)
        tables = load_sweep(out_dir, tables=("predictions", "curves"))
        cands = candidates(tables.predictions, tables.curves, options, tables.manifest)
        crit = str(cands.criterion.iloc[0]) if len(cands) else str(options.criterion or "")
        eps = float(cands.eps.iloc[0]) if len(cands) else math.nan
        rules = stop_rules(cands)
        done = done_configs(out_dir, cands, options.seed)
        pending = cands[~cands.config_id.isin(list(done))]
        setup = TrialSetup(spec, options.checkpoint_every, fail_marker=_fail_marker)
        configs = {str(r["config_id"]): TunedConfig(r, rules[str(r["config_id"])], done.get(str(r["config_id"]), "-"))
                   for r in cands.to_dict("records")}
        failures: Dict[str, str] = {}
        experiment, restored, t1 = None, False, time.perf_counter()
        trial_seconds = 0.0
        if len(pending):
            experiment, restored, runs, failures = _run_trials(spec, options, setup, cands, pending, rules, out_dir,
                                                               progress, echo)
            for cid, run in runs.items():
                configs[cid].source, configs[cid].train_seconds = "tuned", run.train_seconds
                trial_seconds += run.train_seconds
            for cid in failures:
                configs[cid].source = "failed"
        tune_seconds = time.perf_counter() - t1
    finally:
        if started:
            ray.shutdown()
    comparison = _comparison(out_dir, cands, configs, options)
    return TuneOutcome(out_dir, crit, eps, options.by, list(configs.values()), comparison, experiment, restored,
                       [f"{cid}: {why}" for cid, why in failures.items()], sweep_seconds, _kernel_seconds(out_dir), sweep.shard_seconds, tune_seconds,
                       trial_seconds)


def _run_trials(spec: SweepSpec, options: TuneOptions, setup: TrialSetup, cands, pending, rules: Dict[str, StopRule],
                out_dir: Path, progress: bool, echo: Callable[[str], None]):
    """The Tune step of :func:`run_tune`: the experiment named by all the candidates (so a re-run with the same
    candidates finds it), restored when it exists (finished trials are skipped, the others resume from their last
    checkpoint), else started with the ``pending`` ones; each finished trial of ``pending`` is written to OUT.
    Returns (experiment path, restored, config_id -> run written, config_id -> why it did not finish)."""
    from ray import tune as ray_tune

    all_rules = {} if options.full_budget else rules
    name = _experiment_name(spec, options, [trial_config(r, options.seed) for r in cands.to_dict("records")],
                            all_rules)
    storage = (out_dir / TUNE_DIR).resolve()
    experiment = str(storage / name)
    fn = trainable(setup)
    restored = bool(ray_tune.Tuner.can_restore(experiment))
    if restored:
        echo(f"restoring the Tune experiment {experiment}")
        tuner = ray_tune.Tuner.restore(experiment, fn, resume_unfinished=True, resume_errored=True)
    else:
        run_rules = {k: v for k, v in all_rules.items() if k in set(pending.config_id)}
        tuner = ray_tune.Tuner(
            fn, param_space=param_space(pending, options.seed),
            tune_config=ray_tune.TuneConfig(max_concurrent_trials=options.max_concurrent_trials, reuse_actors=True,
                                            trial_dirname_creator=_trial_dirname),
            run_config=ray_tune.RunConfig(name=name, storage_path=str(storage),
                                          verbose=options.verbose if progress else 0,
                                          stop=PredictedBudgetStopper(run_rules) if run_rules else None,
                                          checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1)))
    results = tuner.fit()
    output = SweepOutput(out_dir)
    by_id = {str(r["config_id"]): r for r in pending.to_dict("records")}
    runs, failures = {}, {}
    for result in results:
        cid = str((result.config or {}).get("config_id", ""))
        if cid not in by_id:  # a trial of the restored experiment already written
            continue
        if not trial_finished(result):
            why = f"failed ({type(result.error).__name__})" if result.error is not None else "did not finish"
            failures[cid] = f"trial {why}; re-run the same command to resume it from its last checkpoint"
            continue
        row = by_id[cid]
        run = trial_run(result, setup, row["n"])
        gt, curve = trial_tables(spec, row, run, device=run.device)
        output.write_parts(str(row["dataset"]), part_name(cid, options.seed), {"curves": curve, "ground_truth": gt})
        runs[cid] = run
    return experiment, restored, runs, failures


def _kernel_seconds(out: Path) -> float:
    """The kernel computation of every (dataset, model) state of the sweep in ``out``, as its manifest recorded it
    (the time it took when computed, also when this call loaded it from the disk cache)."""
    from .tables import read_manifest

    units = (read_manifest(out) or {}).get("datasets", {})
    return float(sum(float(u.get("kernel_seconds") or 0.0) for u in units.values()))


def _comparison(out: Path, cands, configs: Mapping[str, TunedConfig], options: TuneOptions):
    """Predicted against real, one row per candidate: the validation join of the candidates' real runs
    (:func:`ttp_ray.analysis.validation_table`) at the candidates' (criterion, ε)."""
    import pandas as pd

    t = load_sweep(out, tables=("predictions", "ground_truth", "curves"))
    if not len(cands):
        return pd.DataFrame()
    gt = t.ground_truth[t.ground_truth.config_id.isin(list(cands.config_id))
                        & (t.ground_truth.seed == options.seed)]
    base = cands[["rank", "dataset", "config_id", "loss", "lr", "lr_fraction", "momentum", "batch_size", "budget_steps",
                  "full_batch", "criterion", "eps", "target", "predicted_steps", "predicted_cost_s",
                  "predicted_steps_to_target", "predicted_cost_to_target_s", "predicted_final_error",
                  "trial_budget_steps", "trial_budget_rule"]].copy()
    base["source"] = [configs[c].source for c in base.config_id]
    if gt.empty:
        base["stopped"] = ""
        return base
    val = validation_table(t.predictions, gt, t.curves, target_error=options.target_error,
                           target_loss=options.target_loss)
    crit, eps = str(cands.criterion.iloc[0]), float(cands.eps.iloc[0])
    val = val[(val.criterion == crit) & val.eps.sub(eps).abs().le(1e-12 * max(1.0, abs(eps)))]
    val = val.drop_duplicates(["dataset", "config_id"])
    last = gt.drop_duplicates(["dataset", "config_id"])[["dataset", "config_id", "last_step"]]
    real = val[["dataset", "config_id", "actual_steps", "actual_steps_to_target", "actual_cost_to_target_s",
                "actual_cost_s", "actual_final_loss", "actual_final_error", "actual_step_time_s", "actual_diverged",
                "status"]]
    df = base.merge(real, on=["dataset", "config_id"], how="left").merge(last, on=["dataset", "config_id"], how="left")
    df["stopped"] = _stopped(df, crit, options.to_target and not options.full_budget)
    return df


def _stopped(df, criterion: str, to_target: bool):
    """Why each real run ended, from its rows: 'diverged', 'full budget' (the spec's), 'target' (its last
    value of the criterion at or below the target), 'budget' (the stopper's), 'stopped' (else: a scheduler, or
    an older run's other budget); '' without a real run."""
    import numpy as np

    last = df.last_step.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    final = df[f"actual_final_{criterion}"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    target = df.target.to_numpy(dtype=float)
    # parts written before last_step existed are the sweep's own runs: whole budget or diverged
    whole = np.isnan(last) | (last >= df.budget_steps.to_numpy(dtype=float))
    return np.select(
        [df.status.isna().to_numpy(), df.actual_diverged.eq(True).to_numpy(), whole,
         to_target & (final <= target), last >= df.trial_budget_steps.to_numpy(dtype=float)],
        ["", "diverged", "full budget", "target", "budget"], default="stopped")


def tune_text(outcome: TuneOutcome) -> str:
    """Predicted against real cost for every candidate, the pick per dataset (the cheapest real run to the target),
    and what the step cost."""
    df = outcome.comparison
    to_target = outcome.by in TARGET_RANK_KEYS
    lines = []
    if df is None or not len(df):
        return "no config to train: none is ranked (every config diverges, never reaches, or ends above " \
               "max_final_error)"
    what = "cost to the target" if to_target else "T_hat x step time"
    lines.append(f"predicted against real {what} ({outcome.criterion}, eps {outcome.eps:g}); budget: the "
                 f"stopper's (steps); stopped: why the run ended")
    lines.append(f"  {'#':>3s} {'dataset':16s} {'loss':4s} {'lr':>9s} {'frac':>5s} {'mom':>4s} {'B':>5s} "
                 f"{'target':>7s} {'pred_steps':>10s} {'pred_s':>8s} {'budget':>6s} {'last':>5s} {'real_steps':>10s} "
                 f"{'real_s':>8s} {'real_err':>8s} {'stopped':>11s} {'from':>6s}")
    for r in df.itertuples(index=False):
        p_steps = r.predicted_steps_to_target if to_target else r.predicted_steps
        p_cost = r.predicted_cost_to_target_s if to_target else r.predicted_cost_s
        a_steps = getattr(r, "actual_steps_to_target" if to_target else "actual_steps", None)
        a_cost = getattr(r, "actual_cost_to_target_s" if to_target else "actual_cost_s", None)
        frac = fmt(r.lr_fraction, "g", "")
        lines.append(
            f"  {fmt(r.rank, 'd'):>3s} {str(r.dataset)[:16]:16s} {r.loss:4s} {r.lr:9.4g} {frac:>5s} {r.momentum:4g} "
            f"{int(r.batch_size):5d} {fmt(r.target, '.4g'):>7s} {fmt(p_steps, '.0f'):>10s} {fmt(p_cost, '.3g'):>8s} "
            f"{int(r.trial_budget_steps):6d} {fmt(getattr(r, 'last_step', None), '.0f'):>5s} "
            f"{fmt(a_steps, '.0f'):>10s} {fmt(a_cost, '.3g'):>8s} "
            f"{fmt(getattr(r, 'actual_final_error', None), '.3f'):>8s} {r.stopped or '-':>11s} {r.source:>6s}")
    if "actual_cost_to_target_s" in df.columns:
        for ds, g in df.groupby("dataset", sort=True):
            col = "actual_cost_to_target_s" if to_target else "actual_cost_s"
            ok = g[g[col].notna()]
            if not len(ok):
                lines.append(f"pick {ds}: none of the {len(g)} trained config(s) reached "
                             f"{'the target' if to_target else 'eps'} within its budget")
                continue
            best = ok.sort_values([col, "rank"], kind="stable").iloc[0]
            lines.append(f"pick {ds}: {best.config_id} (rank {fmt(best['rank'], 'd')}): real {fmt(best[col], '.3g')} s "
                         f"to {'the target' if to_target else 'eps'}, predicted "
                         f"{fmt(best['predicted_cost_to_target_s' if to_target else 'predicted_cost_s'], '.3g')} s")
    lines.append(f"compute: kernel {outcome.kernel_seconds:.1f} s (as computed), prediction shards "
                 f"{outcome.shard_seconds:.1f} s (this call), trials {outcome.trial_train_seconds:.1f} s of optimiser "
                 f"steps (this call); wall: sweep step {outcome.sweep_seconds:.1f} s, Tune {outcome.tune_seconds:.1f} s")
    if outcome.experiment:
        lines.append(f"Tune experiment: {outcome.experiment} ({'restored' if outcome.restored else 'new'}); real "
                     f"runs: {outcome.out}/ground_truth (parts {PART_PREFIX}-*), in `ttp-ray validate` and `plot`")
    return "\n".join(lines)
