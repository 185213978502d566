"""Analysis of a sweep's output, the numbers: load its tables, rank configs, validate predictions against real
fine-tunes, fit the spectrum.

Pure functions over the pandas DataFrames of a sweep's tables (:mod:`ttp_ray.tables`: ``predictions``,
``ground_truth``, ``curves``, ``spectra``) that return DataFrames and dicts. pandas and numpy only: nothing
here imports matplotlib (the figures are in :mod:`ttp_ray.analysis.plots`), Ray, click, or torch (except
:func:`fit_spectrum`, which reuses :func:`ttp_ray.subset.fit_power_law`).

Formulas (METHOD.md §5, §7, §12):

* predicted cost ``Ĉ = T̂ε × step_time_s`` (column ``predicted_cost_s`` of the sweep; the step time is
  measured for (model, dataset, B, loss) on the actor's device);
* predicted cost to a common target = (first logged step at which the predicted curve reaches the target)
  × ``step_time_s`` (:mod:`ttp_ray.analysis.targets`: the target rule), the default ranking key;
* Pareto front: configs not dominated in (cost to target or to their plateau, predicted final error);
* ranking quality over the fine-tuned configs: Spearman's ρ of predicted and real cost (the Pearson r of
  their average ranks), top-1 regret = real cost of the predicted-cheapest config ÷ the cheapest real cost,
  top-3 hit = the truly cheapest config is among the 3 predicted cheapest;
* relative error ``|T̂ε − Tε| / Tε`` per (config, criterion, ε, ground-truth seed); its mean and median;
* Pearson ``r = cov(T̂ε, Tε) / (sd(T̂ε) sd(Tε))`` over the same rows;
* spectrum: ``λ_k / N`` against ``k`` (eigenvalues of Θ normalised by the set size), fitted by the power law
  ``λ_k / N ≈ c k^(−s)``.

Bad input (a criterion, ε or dataset the sweep does not have, an OUT that is not a sweep directory, no
ground truth) raises :class:`AnalysisError` (a ``ValueError``) whose message is one line naming the field
and the allowed values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .targets import FINAL_COLUMNS, TARGET_GROUPS, actual_cost_to_target, derive_targets, with_cost_to_target

__all__ = [
    "AnalysisError",
    "RANK_KEYS",
    "TARGET_RANK_KEYS",
    "STEP_RANK_KEYS",
    "DEFAULT_RANK_KEY",
    "PLATEAUS",
    "GROUP_KEYS",
    "RANKING_GROUPS",
    "RANKING_OBJECTIVES",
    "VALIDATION_FILE",
    "SweepTables",
    "dataset_as_str",
    "load_sweep",
    "default_selection",
    "select",
    "flag",
    "elr_over_gd_limit",
    "rank",
    "pareto_front",
    "regime_label",
    "rank_display",
    "validation_table",
    "pooled_step_time",
    "STEP_TIME_GROUP",
    "validation_metrics",
    "ranking_metrics",
    "ranking_summary",
    "write_validation",
    "validated_configs",
    "fit_spectrum",
    "fmt",
    "to_jsonable",
]

TARGET_RANK_KEYS = ("predicted_cost_to_target_s", "predicted_steps_to_target")  # need the curves table
STEP_RANK_KEYS = ("predicted_cost_s", "predicted_steps", "predicted_final_error")  # prediction rows alone
RANK_KEYS = TARGET_RANK_KEYS + STEP_RANK_KEYS
DEFAULT_RANK_KEY = "predicted_cost_to_target_s"
PLATEAUS = "plateaus above target"  # the flag of a config whose predicted curve never reaches the target
GROUP_KEYS = ("dataset", "loss", "regime")  # the slices of validation_metrics; regime = GD | SGD
RANKING_GROUPS = ("dataset", "model", "loss", "criterion", "eps")  # the groups of ranking_metrics
RANKING_OBJECTIVES = {  # objective -> (predicted, real) steps columns of validation_table; cost = steps x step time
    "cost_to_target": ("predicted_steps_to_target", "actual_steps_to_target"),
    "cost": ("predicted_steps", "actual_steps"),
}
VALIDATION_FILE = "validation.parquet"  # in ttp_ray.sweep.output.DERIVED: --fresh removes it
_JOIN = ["dataset", "config_id", "criterion", "eps"]


# --------------------------------------------------------------------------------------------- loading

@dataclass
class SweepTables:
    """A sweep's output directory read into pandas (``dataset`` as a plain string column)."""

    root: Path
    manifest: Dict[str, Any]
    predictions: pd.DataFrame
    ground_truth: pd.DataFrame
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    spectra: pd.DataFrame = field(default_factory=pd.DataFrame)


def dataset_as_str(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``dataset`` as str (``pd.read_parquet`` gives a categorical from the hive partition)."""
    if "dataset" in df.columns and not df.empty:
        df = df.copy()
        df["dataset"] = df["dataset"].astype(str)
    return df


def load_sweep(out: Union[str, Path], tables: Sequence[str] = ("predictions", "ground_truth", "curves", "spectra")
               ) -> SweepTables:
    """Read ``OUT`` (the ``--out`` of ``ttp-ray sweep``): its manifest and the named tables (others empty)."""
    from ..tables import MANIFEST, ManifestError, read_manifest, read_table

    root = Path(out)
    if not root.is_dir():
        raise AnalysisError(f"OUT: {root} is not a directory; expected the --out directory of `ttp-ray sweep`")
    try:
        manifest = read_manifest(root)
    except ManifestError:
        manifest = None
    if manifest is None:
        raise AnalysisError(f"OUT: {root} is not a ttp-ray sweep directory (no valid {MANIFEST}); expected the "
                            f"--out directory of `ttp-ray sweep`")
    got = {t: dataset_as_str(read_table(root, t).to_pandas()) if t in tables else pd.DataFrame()
           for t in ("predictions", "ground_truth", "curves", "spectra")}
    if "predictions" in tables and got["predictions"].empty:
        raise AnalysisError(f"OUT: {root} holds no predictions yet; run (or resume) `ttp-ray sweep SPEC --out {root}`")
    return SweepTables(root, manifest, **got)


# --------------------------------------------------------------------------------------------- ranking

def _fmt_values(values: Iterable) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def default_selection(pred: pd.DataFrame, manifest: Optional[Dict[str, Any]] = None) -> Tuple[str, float]:
    """The (criterion, ε) shown when none is asked for: the spec's first ones (as ``ttp-ray sweep``'s summary)."""
    spec = (manifest or {}).get("spec", {})
    crits = [c for c in spec.get("criteria", []) if c in set(pred.criterion)] or sorted(set(pred.criterion))
    eps_vals = [float(e) for e in spec.get("eps", []) if np.isclose(pred.eps, float(e)).any()] or sorted(set(pred.eps))
    return crits[0], float(eps_vals[0])


def select(df: pd.DataFrame, *, criterion: Optional[str] = None, eps: Optional[float] = None,
           datasets: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Rows of ``df`` with this criterion, ε (compared with a relative tolerance of 1e-9) and datasets;
    ``None`` keeps all. A value the table does not hold is an :class:`AnalysisError` naming the allowed ones."""
    df = dataset_as_str(df)
    if criterion is not None:
        have = sorted(set(df.criterion))
        if criterion not in have:
            raise AnalysisError(f"criterion: {criterion!r} is not in this sweep; allowed: {_fmt_values(have)}")
        df = df[df.criterion == criterion]
    if eps is not None:
        have = sorted(set(df.eps))
        hit = np.isclose(df.eps.to_numpy(dtype=float), float(eps), rtol=1e-9, atol=0.0)
        if not hit.any():
            raise AnalysisError(f"eps: {eps:g} is not in this sweep; allowed: {_fmt_values(have)}")
        df = df[hit]
    if datasets:
        have = sorted(set(df.dataset))
        bad = [d for d in datasets if d not in have]
        if bad:
            raise AnalysisError(f"dataset: {', '.join(map(repr, bad))} not in this sweep; allowed: {', '.join(have)}")
        df = df[df.dataset.isin(list(datasets))]
    return df


def flag(pred: pd.DataFrame) -> pd.Series:
    """Per prediction row: ``'diverges'`` (lr beyond the stability limit 2(1+m)N/λ_max, or a non-finite
    curve), ``'not reached'`` (T̂ε not reached within the budget) or ``''``."""
    out = pd.Series("", index=pred.index, dtype=object)
    out[pred.predicted_steps.isna()] = "not reached"
    out[pred.diverged.astype(bool)] = "diverges"
    return out


def elr_over_gd_limit(pred: pd.DataFrame) -> pd.Series:
    """``eta/(1-m) / (2N/lambda_max)``: the effective lr as a multiple of the plain-GD stability limit,
    ``= effective_lr (1+m) / max_stable_lr``. Above 1 the run leaves the regime where the linearisation holds
    best: on the embedded benchmark T̂ε was within 9 % on average at <= 1, 35-53 % at 3.8-11.4 (docs/ACCURACY.md)."""
    return pred.effective_lr * (1.0 + pred.momentum) / pred.max_stable_lr


def _ensure_target_columns(df: pd.DataFrame, by: str, curves: Optional[pd.DataFrame], target_error: Optional[float],
                           target_loss: Optional[float]) -> pd.DataFrame:
    """``df`` with the cost-to-target columns (:func:`ttp_ray.analysis.targets.with_cost_to_target`): computed
    from ``curves`` when given, else they must be there already."""
    if curves is not None:
        return with_cost_to_target(df, curves, target_error=target_error, target_loss=target_loss)
    if target_error is not None or target_loss is not None:
        raise AnalysisError("curves: a target needs the sweep's curves table (load_sweep(OUT).curves); "
                            "allowed: pass curves=")
    if "predicted_cost_to_target_s" not in df.columns:
        raise AnalysisError(f"curves: ranking by {by} needs the sweep's curves table (load_sweep(OUT).curves); "
                            f"allowed: pass curves=, or by= one of {', '.join(STEP_RANK_KEYS)}")
    return df


def rank(pred: pd.DataFrame, by: str = DEFAULT_RANK_KEY, *, curves: Optional[pd.DataFrame] = None,
         target_error: Optional[float] = None, target_loss: Optional[float] = None,
         criterion: Optional[str] = None, eps: Optional[float] = None, datasets: Optional[Sequence[str]] = None,
         max_final_error: Optional[float] = None) -> pd.DataFrame:
    """The prediction rows of one (criterion, ε) ordered for a decision, with columns ``rank`` and ``flag``.

    ``by`` (:data:`RANK_KEYS`), ascending, ties by ``config_id``:

    * ``predicted_cost_to_target_s`` (default) or ``predicted_steps_to_target``: the cost (steps) for the
      predicted curve to reach a common target of the criterion (:mod:`ttp_ray.analysis.targets`: given as
      ``target_error`` / ``target_loss``, or derived per (dataset, loss) as min + 0.25 × (median − min) of the
      non-diverging configs' predicted final values; METHOD.md §12). Needs ``curves`` (the sweep's curves
      table) unless ``pred`` already has the columns; adds ``target``, ``target_rule``,
      ``predicted_steps_to_target``, ``predicted_cost_to_target_s``. Ties by the predicted final value of the
      criterion, then ``config_id``. Unranked, after the ranked ones: configs whose curve never reaches the
      target (``'plateaus above target'``), then the diverging ones (``'diverges'``);
    * ``predicted_cost_s`` (T̂ε × step time), ``predicted_steps`` (T̂ε) or ``predicted_final_error``: T̂ε is
      measured against each run's own final value. Unranked: configs without a value of ``by``
      (``'no <by>'``), those not reaching ε (``'not reached'``) and the diverging ones (``'diverges'``).

    Ranked rows are numbered ``rank`` = 1, 2, ...; the others have ``rank`` null and a ``flag``.
    ``criterion`` / ``eps`` ``None``: the rows must hold one only. Also adds ``elr_over_gd_limit``
    (:func:`elr_over_gd_limit`: how far to trust each row). ``max_final_error``: configs whose predicted final
    error exceeds it are not ranked either (flag ``'final error > x'``).
    """
    if max_final_error is not None and not (0.0 <= max_final_error <= 1.0):
        raise AnalysisError(f"max_final_error: {max_final_error:g} is not allowed; allowed: a fraction in [0, 1]")
    if by not in RANK_KEYS:
        raise AnalysisError(f"by: {by!r} is not allowed; allowed: {', '.join(RANK_KEYS)}")
    df = select(pred, criterion=criterion, eps=eps, datasets=datasets).copy()
    for col, val in (("criterion", criterion), ("eps", eps)):
        if val is None and df[col].nunique() > 1:
            raise AnalysisError(f"{col}: the sweep has several ({_fmt_values(sorted(set(df[col])))}); pick one")
    to_target = by in TARGET_RANK_KEYS
    if to_target or curves is not None or target_error is not None or target_loss is not None:
        df = _ensure_target_columns(df, by, curves, target_error, target_loss)  # shown beside any key
    df["flag"] = flag(df)
    df["elr_over_gd_limit"] = elr_over_gd_limit(df)
    sort = ["_group", by, "config_id"]
    if to_target:
        df.loc[df["flag"] == "not reached", "flag"] = ""  # T̂ε does not matter here; the target does
        live = df["flag"] == ""
        no_curve = live & (df.predicted_curve_points == 0)
        df.loc[no_curve, "flag"] = f"no {by}"
        df.loc[live & ~no_curve & df[by].isna(), "flag"] = PLATEAUS
        order = {"": 0, f"no {by}": 2, PLATEAUS: 3, "diverges": 4}
        df["_final"] = df[FINAL_COLUMNS[str(df.criterion.iloc[0])]] if len(df) else np.nan
        sort = ["_group", by, "_final", "config_id"]
    else:
        missing = (df["flag"] == "") & df[by].isna()
        df.loc[missing, "flag"] = f"no {by}"
        order = {"": 0, f"no {by}": 2, "not reached": 3, "diverges": 4}
    if max_final_error is not None:
        too_bad = f"final error > {max_final_error:g}"
        df.loc[(df["flag"] == "") & (df.predicted_final_error > max_final_error), "flag"] = too_bad
        order[too_bad] = 1
    df["_group"] = df["flag"].map(order)
    df = df.sort_values(sort, kind="stable", na_position="last")
    ranked = (df["_group"] == 0).to_numpy()
    df["rank"] = pd.array(np.where(ranked, np.cumsum(ranked), 0), dtype="Int64")
    df.loc[~ranked, "rank"] = pd.NA
    return df.drop(columns=[c for c in ("_group", "_final") if c in df.columns]).reset_index(drop=True)


def pareto_front(ranked: pd.DataFrame, groups: Sequence[str] = TARGET_GROUPS) -> pd.DataFrame:
    """The configs of ``ranked`` (rows of :func:`rank` with the cost-to-target columns, one (criterion, ε))
    that no other config of their ``groups`` (default (dataset, loss), the groups a derived target is per)
    dominates in (cost, ``predicted_final_error``), both lower-is-better: ``b`` dominates ``a`` when it is no
    worse in both and better in one.

    The cost (column ``pareto_cost_s``) is the predicted cost to the target when the curve reaches it, else
    the cost to the config's own plateau (``predicted_cost_s``), else the whole budget
    (``budget_steps × step_time_s``: the final error is what the budget buys). Diverging configs and
    those without a final error are not candidates. Sorted by ``groups``, then ascending cost."""
    if "predicted_cost_to_target_s" not in ranked.columns:
        raise AnalysisError("ranked: pareto_front needs the cost-to-target columns; allowed: the output of "
                            "rank(pred, curves=...)")
    df = ranked[~ranked.diverged.astype(bool) & ranked.predicted_final_error.notna()].copy()
    budget = df.budget_steps.to_numpy(dtype=float) * df.step_time_s.to_numpy(dtype=float)
    cost = df.predicted_cost_to_target_s.to_numpy(dtype=float)
    plateau = df.predicted_cost_s.to_numpy(dtype=float)
    df["pareto_cost_s"] = np.where(np.isfinite(cost), cost, np.where(np.isfinite(plateau), plateau, budget))
    keep = []
    for _, g in df.groupby(list(groups), sort=True):
        c, e = g.pareto_cost_s.to_numpy(dtype=float), g.predicted_final_error.to_numpy(dtype=float)
        for i in range(len(g)):
            dominated = (c <= c[i]) & (e <= e[i]) & ((c < c[i]) | (e < e[i]))
            if not dominated.any():
                keep.append(g.index[i])
    front = df.loc[keep]
    return front.sort_values(list(groups) + ["pareto_cost_s", "predicted_final_error", "config_id"],
                             kind="stable").reset_index(drop=True)


def fmt(x, spec: str = ".4g", none: str = "-") -> str:
    """``format(x, spec)``, or ``none`` for None / NaN / NA."""
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) or pd.isna(x) else format(x, spec)


def regime_label(elr_over_limit: float) -> str:
    """The display of :func:`elr_over_gd_limit`: ``'linear'`` at most 1 (the regime where T̂ε is most reliable),
    else the ratio (``'3.8×'``); ``'-'`` when unknown."""
    if elr_over_limit is None or pd.isna(elr_over_limit):
        return "-"
    return "linear" if elr_over_limit <= 1.0 else f"{elr_over_limit:.2g}×"


def rank_display(ranked: pd.DataFrame) -> pd.DataFrame:
    """Rows of :func:`rank` as strings for a terminal table (units in the headers). With the cost-to-target
    columns: steps (``to target``) and cost to the target, the predicted final error beside them, then T̂ε
    (steps; its cost is ``predicted_cost_s`` in the frame); ``regime`` is :func:`regime_label` of
    ``elr_over_gd_limit``."""
    to_target = "predicted_cost_to_target_s" in ranked.columns
    rows = []
    for r in ranked.itertuples(index=False):
        b = f"full ({int(r.batch_size)})" if bool(r.full_batch) else str(int(r.batch_size))
        row = {"#": fmt(r.rank, "d", ""), "dataset": str(r.dataset), "loss": r.loss, "lr": fmt(r.lr),
               "lr/max": fmt(r.lr_fraction, "g", ""), "mom": fmt(r.momentum, "g"), "B": b}
        if to_target:
            row.update({"to target": fmt(r.predicted_steps_to_target, "d"),
                        "step (ms)": fmt(r.step_time_s * 1e3, ".3g"),
                        "cost to target (s)": fmt(r.predicted_cost_to_target_s, ".3g"),
                        "final err": fmt(r.predicted_final_error, ".3f"),
                        "T̂ε": fmt(r.predicted_steps, ".0f")})
        else:
            row.update({"T̂ε (steps)": fmt(r.predicted_steps, ".0f"), "T̂ε/T": fmt(r.predicted_fraction, ".2f"),
                        "step (ms)": fmt(r.step_time_s * 1e3, ".3g"), "cost (s)": fmt(r.predicted_cost_s, ".3g"),
                        "final loss": fmt(r.predicted_final_loss, ".3g"),
                        "final err": fmt(r.predicted_final_error, ".3f")})
        row.update({"regime": regime_label(r.elr_over_gd_limit), "flag": r.flag, "config_id": r.config_id})
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ validation

STEP_TIME_GROUP = ("dataset", "model", "full_batch", "batch_size")  # what a step's time depends on (not lr, not m)


def pooled_step_time(gt: pd.DataFrame) -> pd.DataFrame:
    """Ground-truth rows with ``step_time_s`` the median over the runs of the same (dataset, model, batch size)
    (:data:`STEP_TIME_GROUP`), the run's own kept as ``run_step_time_s``, and ``actual_cost_s`` recomputed from
    it. A step's time does not depend on the lr or the momentum, so the real cost of a config is its steps x the
    step time of its batch size; one run slowed by a loaded machine (a shared box measured 40x) must not decide
    a ranking. Groups of one run keep their own."""
    gt = gt.copy()
    keys = [k for k in STEP_TIME_GROUP if k in gt.columns]
    gt["run_step_time_s"] = gt.step_time_s.astype(float)
    pooled = gt.groupby(keys, dropna=False, sort=False)["run_step_time_s"].transform("median")
    gt["step_time_s"] = pooled.where(pooled.notna(), gt.run_step_time_s)
    gt["actual_cost_s"] = gt.actual_steps.astype(float) * gt.step_time_s
    return gt


def validation_table(pred: pd.DataFrame, gt: pd.DataFrame, curves: Optional[pd.DataFrame] = None, *,
                     target_error: Optional[float] = None, target_loss: Optional[float] = None) -> pd.DataFrame:
    """Ground-truth rows joined with their predictions on (dataset, config_id, criterion, ε): one row per
    (config, criterion, ε, seed), with ``relative_error = |T̂ε − Tε| / Tε`` where both are finite and Tε > 0.

    ``status``: ``compared`` (relative error defined), ``both diverged`` (the prediction was right to refuse
    a number), ``predicted diverged`` / ``actual diverged`` (one side only), ``stopped early`` (a run of
    ``ttp-ray tune`` stopped before its budget: no Tε), ``not reached``, ``T = 0`` (real Tε is 0: no relative
    error), ``no prediction``. ``regime`` is ``GD`` (full batch) or ``SGD``. The real side's step time
    ``actual_step_time_s`` (and so ``actual_cost_s`` and ``actual_cost_to_target_s``) is the median over the runs
    of one (dataset, model, batch size) (:func:`pooled_step_time`; each run's own: ``run_step_time_s``).

    With ``curves`` (the sweep's curves table, predicted and real): the cost to a common target too
    (:mod:`ttp_ray.analysis.targets`; the target is derived from the whole grid's predictions, or given):
    ``target``, ``target_rule``, ``predicted_steps_to_target``, ``predicted_cost_to_target_s`` (the predicted
    curve), ``actual_steps_to_target``, ``actual_cost_to_target_s`` (each seed's real curve, the same target).
    """
    pred, gt = dataset_as_str(pred), dataset_as_str(gt)
    if gt.empty:
        raise AnalysisError("ground_truth: this sweep has no ground-truth rows; enable `ground_truth:` in the "
                            "sweep spec and re-run `ttp-ray sweep` (resuming adds the fine-tunes)")
    gt = pooled_step_time(gt)
    pcols = _JOIN + ["predicted_steps", "predicted_fraction", "diverged", "predicted_final_loss",
                     "predicted_final_error", "step_time_s", "predicted_cost_s", "method"]
    target_cols: List[str] = []
    if curves is not None:
        pred = with_cost_to_target(pred, curves, target_error=target_error, target_loss=target_loss)
        gt = actual_cost_to_target(gt, curves, derive_targets(pred, target_error=target_error,
                                                              target_loss=target_loss))
        pcols += ["target", "target_rule", "predicted_steps_to_target", "predicted_cost_to_target_s"]
        gt = gt.drop(columns="target")
        target_cols = ["target", "target_rule", "predicted_steps_to_target", "actual_steps_to_target",
                       "predicted_cost_to_target_s", "actual_cost_to_target_s"]
    elif target_error is not None or target_loss is not None:
        raise AnalysisError("curves: a target needs the sweep's curves table (load_sweep(OUT).curves); "
                            "allowed: pass curves=")
    p = pred[pcols].rename(columns={"diverged": "predicted_diverged", "step_time_s": "predicted_step_time_s"})
    g = gt.rename(columns={"diverged": "actual_diverged", "step_time_s": "actual_step_time_s"})
    m = g.merge(p, on=_JOIN, how="left", validate="many_to_one", indicator=True)
    m["regime"] = np.where(m.full_batch.astype(bool), "GD", "SGD")
    ps, ts = m.predicted_steps.astype(float), m.actual_steps.astype(float)
    pdiv = m.predicted_diverged.eq(True).to_numpy()
    adiv = m.actual_diverged.eq(True).to_numpy()
    last = (m.last_step if "last_step" in m.columns else pd.Series(np.nan, index=m.index)).astype(float)
    stopped = (last < m.budget_steps.astype(float)).to_numpy()  # a tuned run stopped before its budget: no L_T
    status = np.select(
        [m["_merge"] == "left_only", pdiv & adiv, pdiv, adiv, stopped, ps.isna() | ts.isna(), ts <= 0],
        ["no prediction", "both diverged", "predicted diverged", "actual diverged", "stopped early", "not reached",
         "T = 0"],
        default="compared")
    m["status"] = status
    ok = m.status == "compared"
    m["relative_error"] = np.where(ok, (ps - ts).abs() / ts.where(ts > 0), np.nan)
    cols = ["dataset", "config_id", "model", "loss", "regime", "lr", "lr_fraction", "momentum", "batch_size",
            "full_batch", "effective_lr", "criterion", "eps", "eps_mode", "budget_steps", "n", "seed",
            "predicted_steps", "actual_steps", "relative_error", "status", "predicted_fraction", "actual_fraction",
            "predicted_diverged", "actual_diverged", "predicted_final_loss", "actual_final_loss",
            "predicted_final_error", "actual_final_error", "predicted_step_time_s", "actual_step_time_s",
            "run_step_time_s", "predicted_cost_s", "actual_cost_s", "method"] + target_cols
    out = m[cols].sort_values(["dataset", "config_id", "criterion", "eps", "seed"], kind="stable")
    out["predicted_steps"] = out.predicted_steps.astype("Int64")
    out["actual_steps"] = out.actual_steps.astype("Int64")
    return out.reset_index(drop=True)


def _metrics(rows: pd.DataFrame) -> Dict[str, Any]:
    ok = rows[rows.status == "compared"]
    rel = ok.relative_error.to_numpy(dtype=float)
    p, t = ok.predicted_steps.to_numpy(dtype=float), ok.actual_steps.to_numpy(dtype=float)
    r = None
    if len(ok) >= 2 and np.std(p) > 0 and np.std(t) > 0:
        r = float(np.corrcoef(p, t)[0, 1])
    return {"rows": int(len(rows)), "compared": int(len(ok)), "configs": int(rows.config_id.nunique()),
            "mean_relative_error": float(rel.mean()) if rel.size else None,
            "median_relative_error": float(np.median(rel)) if rel.size else None,
            "pearson": r}


def validation_metrics(val: pd.DataFrame, groups: Sequence[str] = GROUP_KEYS) -> Dict[str, Any]:
    """Mean and median of ``|T̂ε − Tε| / Tε`` and Pearson r of (T̂ε, Tε) over the ``compared`` rows of
    :func:`validation_table`: ``overall``, per ``groups`` (``slices``) and per criterion (``by_criterion``);
    ``status`` counts every row. A metric over too few rows (Pearson: < 2 or no spread) is ``None``."""
    slices = []
    for key, rows in val.groupby(list(groups), sort=True):
        slices.append({**dict(zip(groups, key)), **_metrics(rows)})
    by_crit = [{"criterion": c, **_metrics(rows)} for c, rows in val.groupby("criterion", sort=True)]
    return {"overall": _metrics(val), "slices": slices, "by_criterion": by_crit,
            "status": {k: int(v) for k, v in val.status.value_counts().sort_index().items()}}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the average ranks (ties share their mean rank); NaN without spread."""
    rx, ry = pd.Series(x).rank(method="average").to_numpy(), pd.Series(y).rank(method="average").to_numpy()
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _side_cost(rows: pd.DataFrame, side: str, steps_col: str) -> Tuple[np.ndarray, np.ndarray]:
    """(cost, flagged) of one side (``predicted`` / ``actual``) of validation rows: steps × step time, or the
    budget × step time where the side diverges or never reaches (flagged)."""
    steps = rows[steps_col].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    flagged = rows[f"{side}_diverged"].eq(True).to_numpy() | np.isnan(steps)
    st = rows[f"{side}_step_time_s"].to_numpy(dtype=float)
    budget = rows.budget_steps.to_numpy(dtype=float)
    return np.where(flagged, budget, steps) * st, flagged


def _ranking_quality(rows: pd.DataFrame, steps: Tuple[str, str]) -> Dict[str, Any]:
    pc, pflag = _side_cost(rows, "predicted", steps[0])
    ac, aflag = _side_cost(rows, "actual", steps[1])
    ok = np.isfinite(pc) & np.isfinite(ac)
    per = (pd.DataFrame({"config_id": rows.config_id.to_numpy()[ok], "p": pc[ok], "a": ac[ok],
                         "p_reached": ~pflag[ok], "a_reached": ~aflag[ok]})
           .groupby("config_id", sort=True)
           .agg(p=("p", "first"), a=("a", "mean"), p_reached=("p_reached", "first"), a_reached=("a_reached", "any"))
           .reset_index())
    out: Dict[str, Any] = {"configs": int(len(per)), "rows": int(len(rows)),
                           "reached_predicted": int(per.p_reached.sum()), "reached_actual": int(per.a_reached.sum()),
                           "flagged_predicted": int((pflag & ok).sum()), "flagged_actual": int((aflag & ok).sum()),
                           "unranked_rows": int((~ok).sum()),
                           "spearman": math.nan, "top1_regret": math.nan, "top3_hit": None,
                           "predicted_best": None, "actual_best": None}
    if not len(per) or not per.p_reached.any() or not per.a_reached.any():
        return out  # nothing reached on one side: every cost there is the budget, no order to compare
    by_pred = per.sort_values(["p", "config_id"], kind="stable")
    best_real = float(per.a.min())
    truly_best = set(per.config_id[per.a == best_real])
    pick = by_pred.iloc[0]
    regret = (float(pick.a) / best_real if best_real > 0 else (1.0 if float(pick.a) == 0 else math.inf))
    out.update(top1_regret=regret, top3_hit=bool(truly_best & set(by_pred.config_id.iloc[:3])),
               predicted_best=str(pick.config_id),
               actual_best=str(per.sort_values(["a", "config_id"], kind="stable").config_id.iloc[0]))
    if len(per) >= 3:
        out["spearman"] = _spearman(per.p.to_numpy(), per.a.to_numpy())
    return out


def ranking_metrics(val: pd.DataFrame, groups: Sequence[str] = RANKING_GROUPS,
                    objectives: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """How well the predicted costs order the fine-tuned configs, per group of :func:`validation_table` rows
    (default (dataset, model, loss, criterion, ε)) and objective (:data:`RANKING_OBJECTIVES`):

    * ``cost``: T̂ε × predicted step time against Tε × the run's own step time;
    * ``cost_to_target``: steps to the common target × step time, both sides (needs the target columns:
      ``validation_table(..., curves=...)``). It does not depend on ε: ``eps`` is left out of its groups
      (null) and each (config, seed) counted once.

    A row whose prediction diverges or never reaches (ε, or the target) is *flagged* and costs the whole
    budget (``budget_steps`` × its side's step time); so is a real run that diverges or never reaches: such
    rows stay in the ranking, and ``flagged_predicted`` / ``flagged_actual`` count them. A config's real cost
    is the mean over its seeds. Per group: ``configs`` ranked, ``rows``, ``reached_predicted`` /
    ``reached_actual`` (configs not flagged on that side; real: in at least one seed), ``unranked_rows`` (no
    cost even at the budget: no prediction, or no step time), ``spearman`` (Spearman's ρ of predicted and
    real cost over the configs, ties at their mean rank; NaN with fewer than 3 configs or no spread),
    ``top1_regret`` (real cost of the predicted-cheapest config ÷ the cheapest real cost; ties in the
    prediction by ``config_id``), ``top3_hit`` (a truly cheapest config is among the 3 predicted cheapest),
    ``predicted_best`` and ``actual_best`` (config ids). When no config reaches on one side, every cost there
    is the budget and there is no order to compare: ρ and the regret are NaN, ``top3_hit`` None.
    Summaries over groups: :func:`ranking_summary`.
    """
    objectives = list(objectives) if objectives is not None else [
        o for o, (p, a) in RANKING_OBJECTIVES.items() if {p, a} <= set(val.columns)]
    rows = []
    for obj in objectives:
        if obj not in RANKING_OBJECTIVES:
            raise AnalysisError(f"objective: {obj!r} is not allowed; allowed: {', '.join(RANKING_OBJECTIVES)}")
        steps = RANKING_OBJECTIVES[obj]
        if not set(steps) <= set(val.columns):
            raise AnalysisError(f"objective: {obj} needs the columns {', '.join(steps)}; allowed: a validation "
                                f"table built with curves (validation_table(pred, gt, curves))")
        keys = [g for g in groups if not (obj == "cost_to_target" and g == "eps")]
        for key, g in val.groupby(keys, sort=True, dropna=False):
            if obj == "cost_to_target":
                g = g.drop_duplicates([c for c in ("config_id", "seed") if c in g.columns])
            key = key if isinstance(key, tuple) else (key,)
            rows.append({"objective": obj, **{k: None for k in groups}, **dict(zip(keys, key)),
                         **_ranking_quality(g, steps)})
    cols = ["objective", *groups, "configs", "rows", "reached_predicted", "reached_actual", "flagged_predicted",
            "flagged_actual", "unranked_rows", "spearman", "top1_regret", "top3_hit", "predicted_best",
            "actual_best"]
    return pd.DataFrame(rows, columns=cols)


def ranking_summary(metrics: pd.DataFrame, min_configs: int = 3) -> Dict[str, Dict[str, Any]]:
    """Per objective, over the groups of :func:`ranking_metrics` with at least ``min_configs`` configs (with
    fewer, ρ is undefined and a top-3 hit trivial) and something reached on both sides: ``groups``,
    ``median_spearman``, ``min_spearman`` (groups without spread left out), ``mean_top1_regret``,
    ``max_top1_regret``, ``top3_hit_rate`` (the fraction of groups whose truly cheapest config is in the
    predicted top 3); ``groups_nothing_reached`` (groups of enough configs where no config reaches on one
    side), and the flagged rows summed over all those groups."""
    out: Dict[str, Dict[str, Any]] = {}
    for obj, m in metrics.groupby("objective", sort=False):
        m = m[m.configs >= min_configs]
        empty = (m.reached_predicted == 0) | (m.reached_actual == 0)
        flagged = (int(m.flagged_predicted.sum()), int(m.flagged_actual.sum()))
        m = m[~empty]
        rho = m.spearman.to_numpy(dtype=float)
        rho = rho[np.isfinite(rho)]
        reg = m.top1_regret.to_numpy(dtype=float)
        out[str(obj)] = {
            "groups": int(len(m)),
            "median_spearman": float(np.median(rho)) if rho.size else None,
            "min_spearman": float(rho.min()) if rho.size else None,
            "mean_top1_regret": float(reg.mean()) if reg.size else None,
            "max_top1_regret": float(reg.max()) if reg.size else None,
            "top3_hit_rate": float(m.top3_hit.astype(bool).mean()) if len(m) else None,
            "groups_nothing_reached": int(empty.sum()),
            "flagged_predicted": flagged[0], "flagged_actual": flagged[1],
        }
    return out


def write_validation(val: pd.DataFrame, out: Union[str, Path]) -> Path:
    """``val`` as Parquet at ``OUT/validation.parquet`` (or at ``out`` if it names a file), atomically."""
    from ..atomic import atomic_write

    path = Path(out)
    if path.is_dir():
        path = path / VALIDATION_FILE
    return atomic_write(path, lambda tmp: val.to_parquet(tmp, index=False, engine="pyarrow"))


def validated_configs(val: pd.DataFrame) -> List[Tuple[str, str]]:
    """(dataset, config_id) of every config with ground truth, in table order."""
    seen = val[["dataset", "config_id"]].drop_duplicates()
    return [(str(d), str(c)) for d, c in seen.itertuples(index=False)]


# ------------------------------------------------------------------------------------------- spectrum

def fit_spectrum(spectrum: pd.DataFrame, k_range: Optional[Tuple[int, int]] = None):
    """Power law ``λ_k / N ≈ c k^(−s)`` over one spectrum (rows of one dataset and kind of the ``spectra``
    table), with :func:`ttp_ray.subset.fit_power_law` (weights 1/k, Huber-robust) over ``k_range``
    (default :func:`ttp_ray.subset.default_fit_range`: past the 2C class-structure modes, up to a third of
    the rank, the range METHOD.md §7's extrapolation fits). Returns a :class:`ttp_ray.subset.PowerLaw`."""
    from ..subset import default_fit_range, fit_power_law

    s = spectrum.sort_values("k")
    lam = (s.eigenvalue / s.n).to_numpy(dtype=float)
    if k_range is None:
        k_range = default_fit_range(len(lam), int(s.num_classes.iloc[0]), bool(s.class_trace.iloc[0]))
    return fit_power_law(lam, k_range)


def to_jsonable(obj: Any) -> Any:
    """NaN / NA -> None, numpy scalars -> Python, recursively (for ``--json``)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return json.loads(obj.to_json(orient="records"))
    if obj is None or obj is pd.NA:
        return None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj

