"""T̂ε and Tε for a new ε, ε mode or criterion, read off a sweep's stored curves: no re-run, no ``--fresh``.

A sweep reads T̂ε off each predicted curve as logged (every ``log_every`` steps; the ``curves`` table keeps
exactly those points) and Tε off each real one, both with :func:`ttp_ray.training_time.curve_training_times`
(METHOD.md §5). Calling it again on the stored curves with another ε, ε mode (``absolute`` | ``relative``) or
criterion (``loss`` | ``error``) gives the rows a fresh sweep with those settings would have written:

* :func:`retime_predictions` -- prediction rows (one template per (dataset, config_id)) with ``criterion``,
  ``eps``, ``eps_mode``, ``predicted_steps``, ``predicted_fraction`` and ``predicted_cost_s`` (= steps ×
  the stored ``step_time_s``) recomputed; every other column (final values, divergence, lr, ...) is the
  config's own and does not depend on ε;
* :func:`retime_ground_truth` -- ground-truth rows (one template per (dataset, config_id, seed)) with
  ``actual_steps``, ``actual_fraction`` and ``actual_cost_s`` recomputed from each seed's real curve;
* :func:`timing_settings` -- the ε mode, T_ε definition and window the sweep used (its manifest);
* :func:`with_timing` -- the rows of the requested (criteria, ε, ε mode): the stored ones when the sweep
  has them all, else re-timed (the ``ttp-ray rank`` / ``validate`` options ``--eps``, ``--eps-mode``,
  ``--criterion``).

pandas and numpy, plus :mod:`ttp_ray.training_time`. Bad input raises
:class:`~ttp_ray.analysis.errors.AnalysisError`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..training_time import CRITERIA, EPS_MODES, TIME_DEFINITIONS, curve_training_times
from .errors import AnalysisError

__all__ = ["TimingSettings", "timing_settings", "retime_predictions", "retime_ground_truth", "with_timing",
           "has_timing"]

TimingSettings = Tuple[str, str, int]  # (eps_mode, definition, window)
_DEFAULT_TIMING: TimingSettings = ("absolute", "threshold", 0)  # ttp_ray.predict.PredictSettings' defaults


def timing_settings(manifest: Optional[Dict[str, Any]]) -> TimingSettings:
    """``(eps_mode, definition, window)`` of the sweep whose manifest this is (its spec's ``simulation``)."""
    sim = ((manifest or {}).get("spec") or {}).get("simulation") or {}
    return (str(sim.get("eps_mode", _DEFAULT_TIMING[0])), str(sim.get("definition", _DEFAULT_TIMING[1])),
            int(sim.get("window", _DEFAULT_TIMING[2]) or 0))


def _check(criteria: Sequence[str], eps: Sequence[float], eps_mode: str, definition: str) -> None:
    bad = [c for c in criteria if c not in CRITERIA]
    if bad or not criteria:
        raise AnalysisError(f"criterion: {', '.join(map(repr, bad)) or 'none'} not allowed; allowed: "
                            f"{', '.join(CRITERIA)}")
    if not eps or any(not (float(e) > 0 and np.isfinite(float(e))) for e in eps):
        raise AnalysisError(f"eps: {', '.join(f'{float(e):g}' for e in eps) or 'none'} not allowed; allowed: "
                            f"values > 0")
    if eps_mode not in EPS_MODES:
        raise AnalysisError(f"eps_mode: {eps_mode!r} is not allowed; allowed: {', '.join(EPS_MODES)}")
    if definition not in TIME_DEFINITIONS:
        raise AnalysisError(f"definition: {definition!r} is not allowed; allowed: {', '.join(TIME_DEFINITIONS)}")


def _curves_of(curves: pd.DataFrame, source: str, keys: List[str]) -> Dict[tuple, pd.DataFrame]:
    """The stored curves of ``source`` ('predicted' | 'actual') by ``keys``, each sorted by step."""
    if curves is None or curves.empty:
        raise AnalysisError("curves: this sweep has no stored curves (OUT/curves); allowed: the --out of a sweep "
                            "that wrote them, or the sweep's own eps and criteria")
    c = curves[curves.source == source].copy()
    c["dataset"] = c["dataset"].astype(str)
    if "seed" in keys:
        c["seed"] = c["seed"].astype("int64")
    return {k if isinstance(k, tuple) else (k,): g.sort_values("step") for k, g in c.groupby(keys, sort=False)}


def _times(curve: Optional[pd.DataFrame], criterion: str, eps: Sequence[float], budget: int, diverged: bool,
           settings: TimingSettings, what: str) -> List[Dict[str, Any]]:
    """curve_training_times of one stored curve for one criterion (no curve or a diverged run: none)."""
    eps_mode, definition, window = settings
    if diverged or curve is None or curve.empty:
        return [{"criterion": criterion, "eps": float(e), "steps": None, "fraction": None} for e in eps]
    values = curve[criterion].to_numpy(dtype=float)
    if np.isnan(values).all():
        raise AnalysisError(f"criterion: {what} has no stored {criterion} curve; allowed: "
                            f"{', '.join(c for c in CRITERIA if not curve[c].isna().all())}")
    return curve_training_times(curve.step.to_numpy(), {criterion: values}, [float(e) for e in eps], budget=budget,
                                eps_mode=eps_mode, definition=definition, window=window, diverged=False)


def retime_predictions(pred: pd.DataFrame, curves: pd.DataFrame, eps: Sequence[float], *,
                       criteria: Sequence[str] = CRITERIA, settings: TimingSettings = _DEFAULT_TIMING) -> pd.DataFrame:
    """One row per (config, criterion, ε) of ``pred``'s configs, T̂ε read off the stored predicted curve with
    ``settings`` = (eps_mode, definition, window) (:func:`timing_settings` gives the sweep's own)."""
    return _retime(pred, curves, eps, criteria, settings, source="predicted", keys=["dataset", "config_id"],
                   side="predicted", what=lambda r: f"config {r['config_id']}")


def retime_ground_truth(gt: pd.DataFrame, curves: pd.DataFrame, eps: Sequence[float], *,
                        criteria: Sequence[str] = CRITERIA, settings: TimingSettings = _DEFAULT_TIMING) -> pd.DataFrame:
    """One row per (config, criterion, ε, seed) of ``gt``'s runs, Tε read off each seed's stored real curve."""
    return _retime(gt, curves, eps, criteria, settings, source="actual", keys=["dataset", "config_id", "seed"],
                   side="actual", what=lambda r: f"run {r['config_id']} seed {r['seed']}")


def _retime(rows: pd.DataFrame, curves: pd.DataFrame, eps: Sequence[float], criteria: Sequence[str],
            settings: TimingSettings, *, source: str, keys: List[str], side: str, what) -> pd.DataFrame:
    """``rows`` (predictions or ground truth) re-timed from their stored ``source`` curves: one row per run
    (``keys``), criterion and ε, the ``{side}_steps`` / ``_fraction`` / ``_cost_s`` columns recomputed."""
    _check(criteria, eps, settings[0], settings[1])
    if rows.empty:
        return rows.copy()
    rows = rows.copy()
    rows["dataset"] = rows["dataset"].astype(str)
    by_run = _curves_of(curves, source, keys)
    out_rows = []
    for r in rows.drop_duplicates(keys).to_dict("records"):
        curve = by_run.get(tuple(int(r[k]) if k == "seed" else r[k] for k in keys))
        for crit in criteria:
            for t in _times(curve, crit, eps, int(r["budget_steps"]), bool(r["diverged"]), settings, what(r)):
                steps = t["steps"]
                out_rows.append({**r, "criterion": crit, "eps": t["eps"], "eps_mode": settings[0],
                                 f"{side}_steps": steps, f"{side}_fraction": t["fraction"],
                                 f"{side}_cost_s": None if steps is None else steps * float(r["step_time_s"])})
    out = pd.DataFrame(out_rows, columns=list(rows.columns))
    out[f"{side}_steps"] = out[f"{side}_steps"].astype("Int64")
    for col in (f"{side}_fraction", f"{side}_cost_s", "eps"):
        out[col] = out[col].astype(float)
    return out


def has_timing(rows: pd.DataFrame, criteria: Sequence[str], eps: Sequence[float], eps_mode: str) -> bool:
    """Whether ``rows`` hold every (criterion, ε) asked for, timed with ``eps_mode`` (ε compared with a relative
    tolerance of 1e-9)."""
    if rows.empty:
        return False
    modes = set(rows.eps_mode.dropna()) if "eps_mode" in rows.columns else {_DEFAULT_TIMING[0]}
    if modes and modes != {eps_mode}:
        return False
    have = rows[["criterion", "eps"]].drop_duplicates()
    for crit in criteria:
        e = have.eps[have.criterion == crit].to_numpy(dtype=float)
        if not all(np.isclose(e, float(x), rtol=1e-9, atol=0.0).any() for x in eps):
            return False
    return True


def _only(rows: pd.DataFrame, criteria: Sequence[str], eps: Sequence[float]) -> pd.DataFrame:
    if rows.empty:
        return rows
    e = rows.eps.to_numpy(dtype=float)
    hit = np.zeros(len(rows), dtype=bool)
    for x in eps:
        hit |= np.isclose(e, float(x), rtol=1e-9, atol=0.0)
    return rows[hit & rows.criterion.isin(list(criteria)).to_numpy()]


def with_timing(pred: pd.DataFrame, gt: Optional[pd.DataFrame], curves: Optional[pd.DataFrame],
                manifest: Optional[Dict[str, Any]], *, criteria: Optional[Sequence[str]] = None,
                eps: Optional[Sequence[float]] = None, eps_mode: Optional[str] = None
                ) -> Tuple[pd.DataFrame, Optional[pd.DataFrame], bool]:
    """The prediction (and ground-truth) rows of the requested ``criteria``, ``eps`` and ``eps_mode`` (None: the
    sweep's own): the stored rows when the sweep has them all, else re-timed from ``curves`` with the sweep's
    T_ε definition. Returns ``(pred, gt, retimed)``, only the requested rows in either case."""
    own_mode, definition, window = timing_settings(manifest)
    mode = eps_mode or own_mode
    crits = list(criteria) if criteria else sorted(set(pred.criterion), key=list(CRITERIA).index)
    values = [float(e) for e in eps] if eps else sorted({float(e) for e in pred.eps})
    _check(crits, values, mode, definition)
    stored = has_timing(pred, crits, values, mode) and (gt is None or gt.empty or has_timing(gt, crits, values, mode))
    if stored:
        return _only(pred, crits, values), None if gt is None else _only(gt, crits, values), False
    settings = (mode, definition, window)
    new_pred = retime_predictions(pred, curves, values, criteria=crits, settings=settings)
    new_gt = None if gt is None else retime_ground_truth(gt, curves, values, criteria=crits, settings=settings)
    return new_pred, new_gt, True
