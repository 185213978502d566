"""Analysis of a sweep's output for people: rank configs, validate predictions against real fine-tunes, plot.

Pure functions over the pandas DataFrames of a sweep's tables (:mod:`ttp_ray.sweep.output`: ``predictions``,
``ground_truth``, ``curves``, ``spectra``) that return DataFrames, dicts and matplotlib
:class:`~matplotlib.figure.Figure` objects. Figures use matplotlib's object API (no ``pyplot``): no global
state, no display needed, so they render headless (Agg) in the CLI and inline in a notebook alike. Nothing
here imports Ray, torch (except :func:`fit_spectrum`, which reuses :func:`ttp_ray.subset.fit_power_law`) or
click; ``ttp-ray rank | validate | plot`` (:mod:`ttp_ray.analysis_cli`) are thin layers over it.

Formulas (METHOD.md §5, §7):

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

__all__ = [
    "AnalysisError",
    "RANK_KEYS",
    "GROUP_KEYS",
    "PLOT_KINDS",
    "SweepTables",
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
    "curve_figure",
    "curves_overview_figure",
    "t_eps_scatter_figure",
    "spectrum_figure",
    "cost_heatmap_figure",
    "write_figure",
    "write_plots",
    "safe_name",
    "fmt",
    "to_jsonable",
]

RANK_KEYS = ("predicted_cost_s", "predicted_steps", "predicted_final_error")
GROUP_KEYS = ("dataset", "loss", "regime")  # the slices of validation_metrics; regime = GD | SGD
PLOT_KINDS = ("curves", "scatter", "spectrum", "heatmap")
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


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """``dataset`` as str (``pd.read_parquet`` gives a categorical from the hive partition)."""
    if "dataset" in df.columns and not df.empty:
        df = df.copy()
        df["dataset"] = df["dataset"].astype(str)
    return df


def load_sweep(out: Union[str, Path], tables: Sequence[str] = ("predictions", "ground_truth", "curves", "spectra")
               ) -> SweepTables:
    """Read ``OUT`` (the ``--out`` of ``ttp-ray sweep``): its manifest and the named tables (others empty)."""
    from ..sweep.output import MANIFEST, OutputError, SweepOutput, read_table

    root = Path(out)
    if not root.is_dir():
        raise AnalysisError(f"OUT: {root} is not a directory; expected the --out directory of `ttp-ray sweep`")
    try:
        manifest = SweepOutput(root).read_manifest()
    except OutputError:
        manifest = None
    if manifest is None:
        raise AnalysisError(f"OUT: {root} is not a ttp-ray sweep directory (no valid {MANIFEST}); expected the "
                            f"--out directory of `ttp-ray sweep`")
    got = {t: _normalise(read_table(root, t).to_pandas()) if t in tables else pd.DataFrame()
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
    df = _normalise(df)
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
    pred, gt = _normalise(pred), _normalise(gt)
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


# ---------------------------------------------------------------------------------------------- plots

_REAL, _PRED = "C0", "C3"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _config_title(row: pd.Series) -> str:
    b = f"B=N={int(row.batch_size)}" if bool(row.full_batch) else f"B={int(row.batch_size)}"
    frac = "" if pd.isna(row.get("lr_fraction")) else f" ({row.lr_fraction:g}×max)"
    return f"{row.dataset}: {row.loss}, lr={row.lr:.3g}{frac}, m={row.momentum:g}, {b}"


def _draw_curves(ax, curves: pd.DataFrame, config_id: str, criterion: str, pred_rows: pd.DataFrame,
                 gt_rows: pd.DataFrame, eps: Optional[float], legend: bool, loss_name: str = "") -> None:
    c = curves[curves.config_id == config_id]
    real = c[c.source == "actual"].dropna(subset=[criterion])
    if len(real):
        wide = real.pivot_table(index="step", columns="seed", values=criterion, aggfunc="first").sort_index()
        mean = wide.mean(axis=1)
        nseeds = wide.shape[1]
        ax.plot(mean.index, mean.values, "-", color=_REAL, lw=1.8,
                label="real" + (f" (mean of {nseeds} seeds)" if nseeds > 1 else ""))
        if nseeds > 1:
            ax.fill_between(wide.index, wide.min(axis=1), wide.max(axis=1), color=_REAL, alpha=0.2,
                            lw=0, label="real: seed range")
    pc = c[c.source == "predicted"].dropna(subset=[criterion]).sort_values("step")
    if len(pc):
        ax.plot(pc.step, pc[criterion], "--", color=_PRED, lw=1.8, label="predicted (linearised)")
    if eps is not None:
        sel = np.isclose(pred_rows.eps, eps) & (pred_rows.criterion == criterion)
        for v in pred_rows[sel].predicted_steps.dropna():
            ax.axvline(float(v), color=_PRED, ls=":", lw=1.2, label=f"T̂ε (ε={eps:g})")
        sel = np.isclose(gt_rows.eps, eps) & (gt_rows.criterion == criterion)
        for v in gt_rows[sel].actual_steps.dropna().unique():
            ax.axvline(float(v), color=_REAL, ls=":", lw=1.2, label=f"Tε (ε={eps:g})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({loss_name})" if criterion == "loss" else "training error")
    ax.grid(alpha=0.3)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)


def curve_figure(curves: pd.DataFrame, pred: pd.DataFrame, gt: pd.DataFrame, dataset: str, config_id: str,
                 eps: Optional[float] = None):
    """Real (solid; seed range as a band when several seeds) and predicted (dashed) loss and error curves
    of one config over the steps of its budget (paper Figs. 8, 10), with Tε / T̂ε at ``eps`` (dotted)."""
    pred, gt, curves = _normalise(pred), _normalise(gt), _normalise(curves)
    c = curves[curves.dataset == dataset]
    prow = pred[(pred.dataset == dataset) & (pred.config_id == config_id)]
    grow = gt[(gt.dataset == dataset) & (gt.config_id == config_id)]
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2)
    head = prow.iloc[0] if len(prow) else grow.iloc[0]
    for ax, crit in zip(axes, ("loss", "error")):
        _draw_curves(ax, c, config_id, crit, prow, grow, eps, legend=True, loss_name=head.loss)
        ax.set_title("loss" if crit == "loss" else "error (fraction misclassified)")
    fig.suptitle(_config_title(head) + f"  [{config_id}]", fontsize=10)
    return fig


def curves_overview_figure(curves: pd.DataFrame, pred: pd.DataFrame, gt: pd.DataFrame,
                           configs: Sequence[Tuple[str, str]], eps: Optional[float] = None, max_configs: int = 8):
    """One row per validated config (at most ``max_configs``): loss | error, real solid, predicted dashed."""
    pred, gt, curves = _normalise(pred), _normalise(gt), _normalise(curves)
    configs = list(configs)[:max_configs]
    fig = _figure(11, 2.5 * len(configs) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(configs), 2, squeeze=False))
    for i, (ds, cid) in enumerate(configs):
        prow = pred[(pred.dataset == ds) & (pred.config_id == cid)]
        grow = gt[(gt.dataset == ds) & (gt.config_id == cid)]
        head = prow.iloc[0] if len(prow) else grow.iloc[0]
        for j, crit in enumerate(("loss", "error")):
            ax = axes[i, j]
            _draw_curves(ax, curves[curves.dataset == ds], cid, crit, prow, grow, eps, legend=(i == 0),
                         loss_name=head.loss)
            ax.set_title(_config_title(head), fontsize=9)
            if i < len(configs) - 1:
                ax.set_xlabel("")
    fig.suptitle("Real (solid) vs predicted (dashed) fine-tuning curves", fontsize=12)
    return fig


def _plain(v, _pos=None) -> str:
    return f"{v:g}"


def _sparse(v, _pos=None) -> str:
    """Minor log tick labels at 2, 3 and 5 times a power of ten only."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v)), 6)
    return f"{v:g}" if lead in (2.0, 3.0, 5.0) else ""


def _formatter(fn):
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(fn)


def t_eps_scatter_figure(val: pd.DataFrame, metrics: Optional[Dict[str, Any]] = None):
    """Predicted T̂ε against real Tε (steps) over the compared validation rows, with the identity line and a
    ±20% band (the paper's 13–20% error margin); colour: dataset, marker: criterion. Log axes when every
    value is positive."""
    ok = val[val.status == "compared"]
    metrics = metrics or validation_metrics(val)
    fig = _figure(6.4, 5.6)
    ax = fig.subplots()
    markers = {"loss": "o", "error": "s"}
    colours = {d: f"C{i % 10}" for i, d in enumerate(sorted(set(ok.dataset)))}
    for (ds, crit), rows in ok.groupby(["dataset", "criterion"], sort=True):
        ax.scatter(rows.actual_steps.astype(float), rows.predicted_steps.astype(float), s=36, alpha=0.8,
                   marker=markers.get(crit, "^"), color=colours[ds], edgecolor="k", linewidth=0.4,
                   label=f"{ds}, {crit}")
    vals = np.concatenate([ok.actual_steps.to_numpy(dtype=float), ok.predicted_steps.to_numpy(dtype=float)])
    if vals.size:
        positive = bool((vals > 0).all())
        lo, hi = (vals.min() / 1.5, vals.max() * 1.5) if positive else (0.0, vals.max() * 1.1 + 1)
        line = np.geomspace(lo, hi, 50) if positive else np.linspace(lo, hi, 50)
        ax.fill_between(line, line * 0.8, line * 1.2, color="0.5", alpha=0.15, lw=0, label="±20%")
        ax.plot(line, line, "k-", lw=1, label="identity T̂ε = Tε")
        if positive:
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(_formatter(_plain))
                axis.set_minor_formatter(_formatter(_sparse))
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
    o = metrics["overall"]
    mean, med, r = (fmt(o["mean_relative_error"], ".3f"), fmt(o["median_relative_error"], ".3f"), fmt(o["pearson"], ".3f"))
    ax.set_title(f"Predicted vs real Tε over {o['compared']} (config, criterion, ε) rows\n"
                 f"|T̂ε−Tε|/Tε: mean {mean}, median {med}; Pearson r {r}", fontsize=10)
    ax.set_xlabel("real Tε (steps)")
    ax.set_ylabel("predicted T̂ε (steps)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def spectrum_figure(spectra: pd.DataFrame):
    """Eigenvalues of Θ normalised by the set size, ``λ_k / N`` against ``k``, on log-log axes, one line per
    dataset (and kind), with its power-law fit ``c k^(−s)`` (dashed, over the fitted range)."""
    spectra = _normalise(spectra)
    fig = _figure(7.5, 5.2)
    ax = fig.subplots()
    for i, ((ds, kind), s) in enumerate(spectra.groupby(["dataset", "kind"], sort=True)):
        s = s.sort_values("k")
        lam = (s.eigenvalue / s.n).to_numpy(dtype=float)
        keep = lam > 0
        colour = f"C{i % 10}"
        name = ds if kind == "kernel" else f"{ds} ({kind})"
        ax.loglog(s.k.to_numpy()[keep], lam[keep], "-", color=colour, lw=1.5,
                  label=f"{name}: N={int(s.n.iloc[0])}, {keep.sum()} modes")
        try:
            fit = fit_spectrum(s)
        except ValueError:
            continue
        k = np.arange(fit.k_lo, fit.k_hi + 1)
        ax.loglog(k, fit(k), "--", color="k", lw=1.2, alpha=0.8)
        ax.loglog(k, fit(k), "--", color=colour, lw=2.2, alpha=0.6,
                  label=f"  fit {fit.c:.3g}·k^(−{fit.s:.2f}), k∈[{fit.k_lo}, {fit.k_hi}]")
    ax.set_xlabel("mode index k")
    ax.set_ylabel("λ_k / N  (eigenvalue of Θ per sample)")
    ax.set_title("Spectrum of the empirical NTK Θ with power-law fit")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def cost_heatmap_figure(pred: pd.DataFrame, dataset: str, *, criterion: str, eps: float):
    """Predicted cost ``T̂ε × step time`` (s) over (learning rate, batch size) for one dataset, one panel per
    (loss, momentum); log colour scale; diverging cells grey (``div``), cells not reaching ε hatched (``n/r``)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    cmap = colormaps["viridis_r"]
    df = select(pred, criterion=criterion, eps=eps, datasets=[dataset]).copy()
    df["flag"] = flag(df)
    frac = df.lr_fraction.notna().all()
    losses, moms = sorted(set(df.loss)), sorted(set(df.momentum))
    costs = df.predicted_cost_s[df.predicted_cost_s > 0]
    norm = LogNorm(vmin=float(costs.min()), vmax=float(costs.max())) if len(costs) else None
    if norm is not None and norm.vmin == norm.vmax:
        norm = LogNorm(vmin=norm.vmin / 1.1, vmax=norm.vmax * 1.1)
    xs = sorted(set(df.lr_fraction if frac else df.lr))
    bs = sorted(set(zip(df.full_batch.astype(bool), df.batch_size.astype(int))))  # minibatches first, then full
    fig = _figure(max(5.0, 1.0 + 0.85 * len(xs)) * len(moms), 0.9 + 0.75 * len(bs) * len(losses) + 1.2)
    axes = np.atleast_2d(fig.subplots(len(losses), len(moms), squeeze=False))
    image = None
    for i, loss in enumerate(losses):
        for j, m in enumerate(moms):
            ax = axes[i, j]
            cell = df[(df.loss == loss) & (df.momentum == m)]
            grid = np.full((len(bs), len(xs)), np.nan)
            labels = [[""] * len(xs) for _ in bs]
            lrs = {}
            for r in cell.itertuples(index=False):
                x = xs.index(r.lr_fraction if frac else r.lr)
                y = bs.index((bool(r.full_batch), int(r.batch_size)))
                lrs[x] = r.lr
                if r.flag == "diverges":
                    labels[y][x] = "div"
                elif r.flag or pd.isna(r.predicted_cost_s):
                    labels[y][x] = "n/r"
                else:
                    grid[y, x] = r.predicted_cost_s
                    labels[y][x] = fmt(r.predicted_cost_s, ".2g")
            ax.set_facecolor("0.85")
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", origin="lower")
            for y in range(len(bs)):
                for x in range(len(xs)):
                    if labels[y][x] in ("div", "n/r"):
                        ax.add_patch(_hatch_patch(x, y, labels[y][x]))
                    dark = not np.isnan(grid[y, x]) and _luminance(cmap(norm(grid[y, x]))) < 0.5
                    ax.text(x, y, labels[y][x], ha="center", va="center", fontsize=8, color="w" if dark else "k")
            ax.set_xticks(range(len(xs)))
            if frac:
                ax.set_xticklabels([f"{v:g}\n({fmt(lrs.get(k), '.2g')})" for k, v in enumerate(xs)], fontsize=8)
                ax.set_xlabel("lr as a fraction of max stable (absolute lr)")
            else:
                ax.set_xticklabels([f"{v:.2g}" for v in xs], fontsize=8)
                ax.set_xlabel("learning rate")
            ax.set_yticks(range(len(bs)))
            ax.set_yticklabels([f"full ({b})" if full else str(b) for full, b in bs], fontsize=8)
            ax.set_ylabel("batch size B")
            ax.set_title(f"loss {loss}, momentum {m:g}", fontsize=10)
    if image is not None and norm is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="predicted cost (s) = T̂ε (steps) × step time")
    fig.suptitle(f"{dataset}: predicted cost to reach ε={eps:g} ({criterion}); div = diverges, "
                 f"n/r = not reached", fontsize=11)
    return fig


def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _hatch_patch(x: int, y: int, kind: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor="0.75" if kind == "div" else "0.9",
                     hatch="//" if kind == "div" else "..", edgecolor="0.55", lw=0)


def safe_name(text: str) -> str:
    """A file-name-safe form of a dataset label or config id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "_"


def write_figure(fig, path: Union[str, Path], dpi: int = 100) -> Path:
    """Save ``fig`` as PNG at ``path`` (atomically: temp file + rename) with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ..atomic import atomic_write

    FigureCanvasAgg(fig)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def write_plots(tables: SweepTables, out_dir: Union[str, Path], *, criterion: Optional[str] = None,
                eps: Optional[float] = None, datasets: Optional[Sequence[str]] = None,
                kinds: Sequence[str] = PLOT_KINDS) -> Tuple[List[Path], List[str]]:
    """Every plot of ``kinds`` as PNG under ``out_dir``; returns (paths written, notes on plots skipped).

    ``curves.png`` (overview) and ``curves/<dataset>__<config>.png`` per validated config;
    ``t_eps_scatter.png``; ``spectrum.png``; ``cost_heatmap_<dataset>.png`` per dataset.
    """
    bad = [k for k in kinds if k not in PLOT_KINDS]
    if bad:
        raise AnalysisError(f"only: {', '.join(bad)} not allowed; allowed: {', '.join(PLOT_KINDS)}")
    out_dir = Path(out_dir)
    pred = select(tables.predictions, datasets=datasets)
    dflt = default_selection(pred, tables.manifest)
    criterion = criterion or dflt[0]
    eps = dflt[1] if eps is None else eps
    select(pred, criterion=criterion, eps=eps)  # validates both
    written: List[Path] = []
    notes: List[str] = []
    gt = select(tables.ground_truth, datasets=None)
    if datasets and not gt.empty:
        gt = gt[gt.dataset.isin(list(datasets))]
    val = validation_table(pred, gt) if not gt.empty else None
    if val is not None and val.empty:
        val = None
    if "curves" in kinds:
        if val is None:
            notes.append("curves: no ground truth in this sweep (enable `ground_truth:` in the spec)")
        else:
            configs = validated_configs(val)
            written.append(write_figure(curves_overview_figure(tables.curves, pred, gt, configs, eps),
                                        out_dir / "curves.png"))
            for ds, cid in configs:
                fig = curve_figure(tables.curves, pred, gt, ds, cid, eps)
                written.append(write_figure(fig, out_dir / "curves" / f"{safe_name(ds)}__{safe_name(cid)}.png"))
    if "scatter" in kinds:
        if val is None:
            notes.append("scatter: no ground truth in this sweep (enable `ground_truth:` in the spec)")
        elif not (val.status == "compared").any():
            notes.append("scatter: no ground-truth row with both T̂ε and Tε (all diverged or not reached)")
        else:
            written.append(write_figure(t_eps_scatter_figure(val), out_dir / "t_eps_scatter.png"))
    if "spectrum" in kinds:
        spectra = tables.spectra
        if datasets and not spectra.empty:
            spectra = spectra[spectra.dataset.isin(list(datasets))]
        if spectra.empty:
            notes.append(f"spectrum: {tables.root} has no spectra table (written before it existed); re-run "
                         f"the same `ttp-ray sweep SPEC --out {tables.root}` to add it")
        else:
            written.append(write_figure(spectrum_figure(spectra), out_dir / "spectrum.png"))
    if "heatmap" in kinds:
        for ds in sorted(set(pred.dataset)):
            fig = cost_heatmap_figure(pred, ds, criterion=criterion, eps=eps)
            written.append(write_figure(fig, out_dir / f"cost_heatmap_{safe_name(ds)}.png"))
    return written, notes


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

