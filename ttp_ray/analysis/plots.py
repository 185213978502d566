"""Analysis of a sweep's output, the figures: curves, T̂ε scatter, spectrum, cost heat map, and ``write_plots``.

Functions over the pandas DataFrames of a sweep's tables and of :mod:`ttp_ray.analysis.metrics` that return
matplotlib :class:`~matplotlib.figure.Figure` objects. Figures use matplotlib's object API (no ``pyplot``): no
global state, no display needed, so they render headless (Agg) in the CLI and inline in a notebook alike.
matplotlib is imported here only, and only when a figure is drawn; nothing here imports Ray or click.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .metrics import (AnalysisError, SweepTables, dataset_as_str, default_selection, fit_spectrum, flag, fmt,
                      select, validated_configs, validation_metrics, validation_table)

__all__ = [
    "PLOT_KINDS",
    "curve_figure",
    "curves_overview_figure",
    "t_eps_scatter_figure",
    "spectrum_figure",
    "cost_heatmap_figure",
    "safe_name",
    "write_figure",
    "write_plots",
]

PLOT_KINDS = ("curves", "scatter", "spectrum", "heatmap")

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
    pred, gt, curves = dataset_as_str(pred), dataset_as_str(gt), dataset_as_str(curves)
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
    pred, gt, curves = dataset_as_str(pred), dataset_as_str(gt), dataset_as_str(curves)
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
    spectra = dataset_as_str(spectra)
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
