"""A common target for the configs of a grid, and the cost of reaching it (METHOD.md §12).

T̂ε measures each run against its own final value, so a config that flattens early on a bad plateau has a
small T̂ε and a small ``predicted_cost_s``. The *cost to target* measures every config of a (dataset, loss)
against one value instead:

* the **target** of a criterion (``error``: the full-set error rate; ``loss``: the full-set loss) is given
  (``target_error`` / ``target_loss``, the same for every dataset and loss) or derived per (dataset, loss)
  from the grid's predictions: over the configs not predicted to diverge, with ``v`` their predicted final
  values (``predicted_final_error`` or ``predicted_final_loss``, one per config),
  ``target = min(v) + TARGET_MARGIN × (median(v) − min(v))`` with ``TARGET_MARGIN`` = 0.25 — a value the best
  configs reach and the median one does not;
* **steps to target**: the first logged step at which a curve is at or below the target (the predicted curve
  of the ``curves`` table for a prediction, each seed's real curve for a fine-tune); null when it never is
  within the budget, or the run diverges;
* **cost to target** = steps to target × step time (the predicted step time for a prediction, the run's own
  for a fine-tune): ``predicted_cost_to_target_s`` and ``actual_cost_to_target_s``.

pandas and numpy only. Bad input raises :class:`~ttp_ray.analysis.errors.AnalysisError`.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from .errors import AnalysisError

__all__ = [
    "TARGET_MARGIN",
    "TARGET_GROUPS",
    "FINAL_COLUMNS",
    "derive_targets",
    "steps_to_target",
    "with_cost_to_target",
    "actual_cost_to_target",
]

TARGET_MARGIN = 0.25  # target = min + TARGET_MARGIN x (median - min) of the predicted final values
TARGET_GROUPS = ("dataset", "loss")  # a derived target is one per (dataset, loss): loss scales differ
FINAL_COLUMNS = {"error": "predicted_final_error", "loss": "predicted_final_loss"}  # per criterion
_NO_SEED = -1  # predicted curves have no seed: grouped under this value, returned as null


def _as_str_dataset(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "dataset" in df.columns:
        df["dataset"] = df["dataset"].astype(str)
    return df


def _check_given(target_error: Optional[float], target_loss: Optional[float]) -> None:
    if target_error is not None and not (0.0 <= float(target_error) <= 1.0):
        raise AnalysisError(f"target_error: {target_error:g} is not allowed; allowed: a fraction in [0, 1]")
    if target_loss is not None and not (math.isfinite(float(target_loss)) and float(target_loss) >= 0.0):
        raise AnalysisError(f"target_loss: {target_loss:g} is not allowed; allowed: a finite value >= 0")


def derive_targets(pred: pd.DataFrame, *, target_error: Optional[float] = None, target_loss: Optional[float] = None,
                   margin: float = TARGET_MARGIN) -> pd.DataFrame:
    """The target of every (dataset, loss, criterion) of the prediction rows ``pred``: columns ``dataset``,
    ``loss``, ``criterion``, ``target``, ``target_rule`` (``'given'`` or ``'derived'``) and ``target_configs``
    (the configs a derived target was computed from: those not diverging with a finite final value).

    Given: ``target_error`` for criterion error, ``target_loss`` for criterion loss. Derived (see the module
    docstring): ``min(v) + margin × (median(v) − min(v))`` over the configs' predicted final values ``v``;
    NaN when no config qualifies."""
    _check_given(target_error, target_loss)
    pred = _as_str_dataset(pred)
    given = {"error": target_error, "loss": target_loss}
    rows = []
    for crit in sorted(set(pred.criterion)):
        if crit not in FINAL_COLUMNS:
            raise AnalysisError(f"criterion: {crit!r} has no target; allowed: {', '.join(FINAL_COLUMNS)}")
        sel = pred[pred.criterion == crit]
        for (ds, loss), g in sel.groupby(list(TARGET_GROUPS), sort=True):
            ok = g[~g.diverged.astype(bool)].drop_duplicates("config_id")
            v = ok[FINAL_COLUMNS[crit]].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if given[crit] is not None:
                target, rule = float(given[crit]), "given"
            else:
                lo = float(v.min()) if v.size else math.nan
                target, rule = (lo + margin * (float(np.median(v)) - lo) if v.size else math.nan), "derived"
            rows.append({"dataset": ds, "loss": loss, "criterion": crit, "target": target, "target_rule": rule,
                         "target_configs": int(v.size)})
    return pd.DataFrame(rows, columns=["dataset", "loss", "criterion", "target", "target_rule", "target_configs"])


def steps_to_target(curves: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """The first logged step at which each curve is at or below its target.

    ``curves``: rows of the ``curves`` table of one source (``dataset``, ``config_id``, ``seed``, ``step``,
    ``loss``, ``error``); ``targets``: rows (``dataset``, ``config_id``, ``criterion``, ``target``). Returns one
    row per (dataset, config_id, criterion, seed) with a curve: ``steps_to_target`` (float; NaN when the curve
    never reaches the target) and ``curve_points`` (logged points with a value). ``seed`` is null for
    predicted curves."""
    cols = ["dataset", "config_id", "criterion", "seed", "steps_to_target", "curve_points"]
    if curves.empty or targets.empty:
        return pd.DataFrame(columns=cols)
    curves = _as_str_dataset(curves)
    targets = _as_str_dataset(targets)[["dataset", "config_id", "criterion", "target"]].drop_duplicates(
        ["dataset", "config_id", "criterion"])
    keys = ["dataset", "config_id", "criterion", "seed"]
    out = []
    for crit, want in targets.groupby("criterion", sort=True):
        c = curves[["dataset", "config_id", "seed", "step", crit]].merge(want, on=["dataset", "config_id"])
        c = c[c[crit].notna()].copy()
        c["seed"] = c["seed"].astype("Float64").fillna(_NO_SEED).astype("int64")
        logged = c.groupby(keys, sort=True).size().rename("curve_points")
        hit = c[c[crit].to_numpy(dtype=float) <= c.target.to_numpy(dtype=float)]
        first = hit.groupby(keys, sort=True).step.min().rename("steps_to_target").astype(float)
        out.append(pd.concat([logged, first], axis=1).reset_index())
    res = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)
    res["seed"] = res["seed"].astype("Int64").mask(res["seed"] == _NO_SEED)
    return res[cols]


def with_cost_to_target(pred: pd.DataFrame, curves: pd.DataFrame, *, target_error: Optional[float] = None,
                        target_loss: Optional[float] = None, margin: float = TARGET_MARGIN) -> pd.DataFrame:
    """``pred`` (prediction rows) with the columns ``target``, ``target_rule``, ``predicted_steps_to_target``
    (Int64), ``predicted_cost_to_target_s`` (= steps to target × ``step_time_s``) and
    ``predicted_curve_points`` (0: no predicted curve in ``curves``). Targets: :func:`derive_targets`;
    curves: the ``predicted`` rows of ``curves``. Diverging rows get no steps and no cost."""
    pred = _as_str_dataset(pred)
    drop = [c for c in ("target", "target_rule", "target_configs", "predicted_steps_to_target",
                        "predicted_cost_to_target_s", "predicted_curve_points") if c in pred.columns]
    pred = pred.drop(columns=drop)
    targets = derive_targets(pred, target_error=target_error, target_loss=target_loss, margin=margin)
    out = pred.merge(targets[["dataset", "loss", "criterion", "target", "target_rule"]],
                     on=["dataset", "loss", "criterion"], how="left")
    c = curves[curves.source == "predicted"] if "source" in curves.columns else curves
    reached = steps_to_target(c, out[["dataset", "config_id", "criterion", "target"]].dropna(subset=["target"]))
    reached = reached.drop(columns="seed")
    out = out.merge(reached, on=["dataset", "config_id", "criterion"], how="left")
    div = out.diverged.astype(bool).to_numpy()
    steps = np.array(out.pop("steps_to_target"), dtype=float)
    steps[div] = np.nan
    out["predicted_steps_to_target"] = pd.array(np.where(np.isnan(steps), 0, steps).astype("int64"),
                                                dtype="Int64")
    out.loc[np.isnan(steps), "predicted_steps_to_target"] = pd.NA
    out["predicted_cost_to_target_s"] = steps * out.step_time_s.to_numpy(dtype=float)
    out["predicted_curve_points"] = out.pop("curve_points").fillna(0).astype("int64")
    out.index = pred.index
    return out


def actual_cost_to_target(gt: pd.DataFrame, curves: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Ground-truth rows ``gt`` with ``actual_steps_to_target`` (Int64) and ``actual_cost_to_target_s``
    (= steps × the run's ``step_time_s``), read off each seed's real curve (the ``actual`` rows of
    ``curves``) against ``targets`` (rows ``dataset``, ``loss``, ``criterion``, ``target``, as from
    :func:`derive_targets`: the predictions' targets, so both sides aim at the same value). Diverged runs
    get no steps and no cost."""
    gt = _as_str_dataset(gt)
    t = _as_str_dataset(targets)[["dataset", "loss", "criterion", "target"]]
    out = gt.drop(columns=[c for c in ("target",) if c in gt.columns]).merge(
        t, on=["dataset", "loss", "criterion"], how="left")
    c = curves[curves.source == "actual"] if "source" in curves.columns else curves
    reached = steps_to_target(c, out[["dataset", "config_id", "criterion", "target"]].dropna(subset=["target"]))
    out["seed"] = out["seed"].astype("Int64")
    out = out.merge(reached.drop(columns="curve_points"), on=["dataset", "config_id", "criterion", "seed"],
                    how="left")
    steps = np.array(out.pop("steps_to_target"), dtype=float)
    steps[out.diverged.astype(bool).to_numpy()] = np.nan
    out["actual_steps_to_target"] = pd.array(np.where(np.isnan(steps), 0, steps).astype("int64"), dtype="Int64")
    out.loc[np.isnan(steps), "actual_steps_to_target"] = pd.NA
    out["actual_cost_to_target_s"] = steps * out.step_time_s.to_numpy(dtype=float)
    out.index = gt.index
    return out
