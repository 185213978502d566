"""Analysis of a sweep's output, the numbers: load its tables, rank configs, validate predictions against real
fine-tunes, fit the spectrum.

Pure functions over the pandas DataFrames of a sweep's tables (:mod:`ttp_ray.tables`: ``predictions``,
``ground_truth``, ``curves``, ``spectra``) that return DataFrames and dicts. pandas and numpy only: nothing
here imports matplotlib (the figures are in :mod:`ttp_ray.analysis.plots`), Ray, click, or torch (except
:func:`fit_spectrum`, which reuses :func:`ttp_ray.subset.fit_power_law`).

Formulas (METHOD.md §5, §7, §12):

* predicted cost ``Ĉ = T̂ε × step_time_s`` (column ``predicted_cost_s`` of the sweep; the step time is
  measured for (model, dataset, B, loss) on the actor's device);
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

__all__ = [
    "AnalysisError",
    "RANK_KEYS",
    "GROUP_KEYS",
    "VALIDATION_FILE",
    "SweepTables",
    "dataset_as_str",
    "load_sweep",
    "default_selection",
    "select",
    "flag",
    "elr_over_gd_limit",
    "rank",
    "rank_display",
    "validation_table",
    "validation_metrics",
    "write_validation",
    "validated_configs",
    "fit_spectrum",
    "fmt",
    "to_jsonable",
]

RANK_KEYS = ("predicted_cost_s", "predicted_steps", "predicted_final_error")
GROUP_KEYS = ("dataset", "loss", "regime")  # the slices of validation_metrics; regime = GD | SGD
VALIDATION_FILE = "validation.parquet"  # in ttp_ray.sweep.output.DERIVED: --fresh removes it
_JOIN = ["dataset", "config_id", "criterion", "eps"]


class AnalysisError(ValueError):
    """Bad input to the analysis: one line naming the field and what is allowed (CLI: exit code 2)."""


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


def rank(pred: pd.DataFrame, by: str = "predicted_cost_s", *, criterion: Optional[str] = None,
         eps: Optional[float] = None, datasets: Optional[Sequence[str]] = None,
         max_final_error: Optional[float] = None) -> pd.DataFrame:
    """The prediction rows of one (criterion, ε) ordered for a decision, with columns ``rank`` and ``flag``.

    Ranked first: the configs that converge (T̂ε reached, not diverging) with a value of ``by``, ascending
    (ties by ``config_id``), numbered ``rank`` = 1, 2, ...; then, unranked (``rank`` null) and flagged, the
    ones without a value of ``by`` (``flag`` = ``'no <by>'``), those not reaching ε (``'not reached'``) and
    the diverging ones (``'diverges'``). ``criterion`` / ``eps`` ``None``: the rows must hold one only.
    Also adds ``elr_over_gd_limit`` (:func:`elr_over_gd_limit`: how far to trust each row).
    ``max_final_error``: configs whose predicted final error exceeds it are not ranked either (flag
    ``'final error > x'``): the cheapest plateau is no use if it is a bad model.
    """
    if max_final_error is not None and not (0.0 <= max_final_error <= 1.0):
        raise AnalysisError(f"max_final_error: {max_final_error:g} is not allowed; allowed: a fraction in [0, 1]")
    if by not in RANK_KEYS:
        raise AnalysisError(f"by: {by!r} is not allowed; allowed: {', '.join(RANK_KEYS)}")
    df = select(pred, criterion=criterion, eps=eps, datasets=datasets).copy()
    for col, val in (("criterion", criterion), ("eps", eps)):
        if val is None and df[col].nunique() > 1:
            raise AnalysisError(f"{col}: the sweep has several ({_fmt_values(sorted(set(df[col])))}); pick one")
    df["flag"] = flag(df)
    df["elr_over_gd_limit"] = elr_over_gd_limit(df)
    missing = (df["flag"] == "") & df[by].isna()
    df.loc[missing, "flag"] = f"no {by}"
    order = {"": 0, f"no {by}": 2, "not reached": 3, "diverges": 4}
    if max_final_error is not None:
        too_bad = f"final error > {max_final_error:g}"
        df.loc[(df["flag"] == "") & (df.predicted_final_error > max_final_error), "flag"] = too_bad
        order[too_bad] = 1
    df["_group"] = df["flag"].map(order)
    df = df.sort_values(["_group", by, "config_id"], kind="stable", na_position="last")
    ranked = (df["_group"] == 0).to_numpy()
    df["rank"] = pd.array(np.where(ranked, np.cumsum(ranked), 0), dtype="Int64")
    df.loc[~ranked, "rank"] = pd.NA
    return df.drop(columns="_group").reset_index(drop=True)


def fmt(x, spec: str = ".4g", none: str = "-") -> str:
    """``format(x, spec)``, or ``none`` for None / NaN / NA."""
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) or pd.isna(x) else format(x, spec)


def rank_display(ranked: pd.DataFrame) -> pd.DataFrame:
    """Rows of :func:`rank` as strings for a terminal table (units in the headers)."""
    rows = []
    for r in ranked.itertuples(index=False):
        b = f"full ({int(r.batch_size)})" if bool(r.full_batch) else str(int(r.batch_size))
        rows.append({
            "#": fmt(r.rank, "d", ""), "dataset": str(r.dataset), "loss": r.loss, "lr": fmt(r.lr),
            "lr/max": fmt(r.lr_fraction, "g", ""), "mom": fmt(r.momentum, "g"), "B": b,
            "T̂ε (steps)": fmt(r.predicted_steps, ".0f"), "T̂ε/T": fmt(r.predicted_fraction, ".2f"),
            "step (ms)": fmt(r.step_time_s * 1e3, ".3g"), "cost (s)": fmt(r.predicted_cost_s, ".3g"),
            "final loss": fmt(r.predicted_final_loss, ".3g"), "final err": fmt(r.predicted_final_error, ".3f"),
            "η̃/GD lim": fmt(r.elr_over_gd_limit, ".2g"),
            "flag": r.flag, "config_id": r.config_id,
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ validation

def validation_table(pred: pd.DataFrame, gt: pd.DataFrame) -> pd.DataFrame:
    """Ground-truth rows joined with their predictions on (dataset, config_id, criterion, ε): one row per
    (config, criterion, ε, seed), with ``relative_error = |T̂ε − Tε| / Tε`` where both are finite and Tε > 0.

    ``status``: ``compared`` (relative error defined), ``both diverged`` (the prediction was right to refuse
    a number), ``predicted diverged`` / ``actual diverged`` (one side only), ``not reached``, ``T = 0``
    (real Tε is 0: no relative error), ``no prediction``. ``regime`` is ``GD`` (full batch) or ``SGD``.
    """
    pred, gt = dataset_as_str(pred), dataset_as_str(gt)
    if gt.empty:
        raise AnalysisError("ground_truth: this sweep has no ground-truth rows; enable `ground_truth:` in the "
                            "sweep spec and re-run `ttp-ray sweep` (resuming adds the fine-tunes)")
    pcols = _JOIN + ["predicted_steps", "predicted_fraction", "diverged", "predicted_final_loss",
                     "predicted_final_error", "step_time_s", "predicted_cost_s", "method"]
    p = pred[pcols].rename(columns={"diverged": "predicted_diverged", "step_time_s": "predicted_step_time_s"})
    g = gt.rename(columns={"diverged": "actual_diverged", "step_time_s": "actual_step_time_s"})
    m = g.merge(p, on=_JOIN, how="left", validate="many_to_one", indicator=True)
    m["regime"] = np.where(m.full_batch.astype(bool), "GD", "SGD")
    ps, ts = m.predicted_steps.astype(float), m.actual_steps.astype(float)
    pdiv = m.predicted_diverged.eq(True).to_numpy()
    adiv = m.actual_diverged.eq(True).to_numpy()
    status = np.select(
        [m["_merge"] == "left_only", pdiv & adiv, pdiv, adiv, ps.isna() | ts.isna(), ts <= 0],
        ["no prediction", "both diverged", "predicted diverged", "actual diverged", "not reached", "T = 0"],
        default="compared")
    m["status"] = status
    ok = m.status == "compared"
    m["relative_error"] = np.where(ok, (ps - ts).abs() / ts.where(ts > 0), np.nan)
    cols = ["dataset", "config_id", "model", "loss", "regime", "lr", "lr_fraction", "momentum", "batch_size",
            "full_batch", "effective_lr", "criterion", "eps", "eps_mode", "budget_steps", "n", "seed",
            "predicted_steps", "actual_steps", "relative_error", "status", "predicted_fraction", "actual_fraction",
            "predicted_diverged", "actual_diverged", "predicted_final_loss", "actual_final_loss",
            "predicted_final_error", "actual_final_error", "predicted_step_time_s", "actual_step_time_s",
            "predicted_cost_s", "actual_cost_s", "method"]
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

