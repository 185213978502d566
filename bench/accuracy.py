"""Accuracy of T̂ε against real fine-tuning on the embedded default (issue: predictor, METHOD.md §5).

A fixed, seeded grid: datasets digits-5to9 and digits, backbones digits-cnn and digits-resnet,
full-batch GD and B = 64, momentum 0 and 0.9, learning rates as fractions of each state's
``max_stable_lr(m) = 2(1+m)N/lambda_max`` (three inside, one beyond to check the divergence flag),
losses MSE and CE, two relative eps, criteria loss and error. Every config is fine-tuned for real once
and predicted under each method option:

* GD: ``discrete`` with the ELR (paper), ``discrete`` with exact heavy ball, ``ode`` (ELR);
* SGD: ``sde`` with rescaled noise (paper), ``sde`` with constant noise (ablation), ``minibatch`` (exact
  SGD on the linearised model, heavy ball), and a noise-free GD prediction (``discrete``) for reference;
* the default (class-trace) kernel throughout, and the full NC x NC kernel sketch with the default methods.

The report also says how well T̂ε × step time *ranks* the configs of each (dataset, backbone, loss, criterion,
ε) slice against their real cost (``ttp_ray.analysis.ranking_metrics``: Spearman ρ, top-1 regret, top-3 hit).

Run: ``.venv/bin/python bench/accuracy.py`` (``--quick`` for a reduced grid). Writes the tables into
docs/BENCHMARKS.md (section ``accuracy``) and every row to ``runs/bench/accuracy.csv``.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, md_table, write_section  # noqa: E402

from ttp_ray.data import load_dataset  # noqa: E402
from ttp_ray.dynamics import SimConfig, SimOptions  # noqa: E402
from ttp_ray.finetune import FinetuneConfig, FinetuneResult, finetune  # noqa: E402
from ttp_ray.kernel import KernelOptions  # noqa: E402
from ttp_ray.models import build_finetune_model  # noqa: E402
from ttp_ray.predict import PredictSettings  # noqa: E402
from ttp_ray.predictors import DEFAULT_PREDICTOR, PredictionInputs, get_predictor  # noqa: E402
from ttp_ray.training_time import curve_training_times  # noqa: E402
from ttp_ray.drift import DRIFT_METHOD  # noqa: E402

EPS = (0.05, 0.01)  # relative to the curve's own drop L_0 - L_T
EPS_MODE = "relative"
LR_FRACTIONS = (0.05, 0.2, 0.6, 1.3)  # of max_stable_lr(m); 1.3 is beyond the limit
SGD_BATCH = 64
SGD_LOG_EVERY = 5  # SGD curves are logged (full-set loss and error) every 5 steps
SELECTION_DATASET = "digits-5to9"  # the default predictor's variant was chosen on this set; the others are held out
REFERENCE_FRACTION = 0.6  # ode-drift: the real plain-GD run at this fraction of max_stable_lr(0) calibrates s(L)
GRID_LRS = json.loads((ROOT / "bench" / "grid_lrs.json").read_text())["lr"]  # the pinned grid (see its note)


def grid_lr(ds_name: str, backbone: str, momentum: float, fraction: float, state) -> float:
    """The grid's lr for (dataset, backbone, m, fraction): the pinned value of bench/grid_lrs.json, so that a
    change to the kernel estimator does not move the experiment (and invalidate its ground truth); a pair not
    pinned there (another dataset or backbone) takes fraction x ``state.max_stable_lr(m)`` of today's kernel."""
    pinned = GRID_LRS.get(f"{ds_name}/{backbone}/m={momentum:g}/{fraction:g}x")
    return pinned if pinned is not None else fraction * state.max_stable_lr(momentum)


def gd_methods():
    return {
        "discrete-elr": SimOptions(method="discrete", momentum_mode="elr"),
        "discrete-heavy_ball": SimOptions(method="discrete", momentum_mode="heavy_ball"),
        "ode-elr": SimOptions(method="ode", momentum_mode="elr"),
    }


def sgd_methods(paths: int):
    return {
        "sde-rescaled": SimOptions(method="sde", noise="rescaled", paths=paths),
        "sde-constant": SimOptions(method="sde", noise="constant", paths=paths),
        "minibatch-heavy_ball": SimOptions(method="minibatch", momentum_mode="heavy_ball", paths=paths),
        "noise-free-discrete": SimOptions(method="discrete", momentum_mode="elr"),
    }


_GT_FIELDS = ("steps", "loss", "error", "grad_norm_sq", "outputs")


def _gt_path(cache_dir, job) -> Path:
    """The file of one ground-truth run in ``--gt-cache``: named by everything that determines the run."""
    ds_name, backbone, frac, cfg, budget = job
    return Path(cache_dir) / (f"{ds_name}_{backbone}_{cfg.loss}_m{cfg.momentum:g}_B{cfg.batch_size or 'full'}_"
                              f"f{frac:g}_lr{cfg.lr:.10g}_T{budget}.npz")


def _load_gt(path: Path, job) -> FinetuneResult:
    _, _, _, cfg, budget = job
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: (z[k] if k in z.files else None) for k in _GT_FIELDS}
        info = json.loads(str(z["info"]))
    config = FinetuneConfig(lr=cfg.lr, momentum=cfg.momentum, batch_size=cfg.batch_size, loss=cfg.loss, steps=budget,
                            seed=0, log_every=1 if cfg.batch_size is None else SGD_LOG_EVERY)
    return FinetuneResult(config=config, n=info["n"], diverged=info["diverged"], step_time_s=info["step_time_s"],
                          train_seconds=info["train_seconds"], total_seconds=info["total_seconds"], device=info["device"],
                          **arrays)


def _save_gt(path: Path, res: FinetuneResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {k: getattr(res, k) for k in ("n", "diverged", "step_time_s", "train_seconds", "total_seconds", "device")}
    arrays = {k: getattr(res, k) for k in _GT_FIELDS if getattr(res, k) is not None}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, info=json.dumps(info), **arrays)
    tmp.replace(path)


def _finetune_job(job, cache_dir=None):
    """One ground-truth run (in a worker process): the real trainer on the config's (lr, m, B, loss); the
    drift reference (plain GD at REFERENCE_FRACTION) also keeps its outputs. With ``cache_dir`` a run made
    before (same dataset, backbone, config and budget) is read back instead of trained again."""
    ds_name, backbone, frac, cfg, budget = job
    path = _gt_path(cache_dir, job) if cache_dir else None
    if path is not None and path.exists():
        return _load_gt(path, job)
    ds = load_dataset(ds_name)
    model = build_finetune_model(backbone, ds.num_classes, 0)
    res = finetune(model, ds, FinetuneConfig(
        lr=cfg.lr, momentum=cfg.momentum, batch_size=cfg.batch_size, loss=cfg.loss, steps=budget, seed=0,
        log_every=1 if cfg.batch_size is None else SGD_LOG_EVERY),
        record_outputs=cfg.batch_size is None and cfg.momentum == 0.0 and frac == REFERENCE_FRACTION)
    if path is not None:
        _save_gt(path, res)
    return res


def _prediction_rows(real, ds_name, backbone, regime, n, method, cfgs, preds):
    """One row per (config, criterion, eps): the prediction against the config's real T_eps."""
    rows = []
    for cfg, pred in zip(cfgs, preds):
        frac, res, times = real[ds_name, backbone, cfg]
        for p_row, r_row in zip(pred.rows, times):
            rows.append({
                "dataset": ds_name, "backbone": backbone, "loss": cfg.loss, "momentum": cfg.momentum,
                "regime": regime, "batch_size": cfg.batch_size or n, "lr_fraction": frac, "lr": cfg.lr,
                "method": method, "criterion": r_row["criterion"], "eps": r_row["eps"],
                "real_steps": r_row["steps"], "pred_steps": p_row["predicted_steps"],
                "real_diverged": res.diverged, "pred_diverged": pred.diverged,
                "rel_error": relative_error(p_row["predicted_steps"], r_row["steps"]),
                "pred_low": p_row.get("predicted_steps_low"), "pred_high": p_row.get("predicted_steps_high"),
                "pred_drift": p_row.get("predicted_drift"),
                "pred_beyond_probes": p_row.get("drift_beyond_probes"),
                "pred_halfwidth": pred.result.extras.get("interval_log_halfwidth"),
                "real_step_time_s": res.step_time_s,
            })
    return rows


def relative_error(pred, real):
    if pred is None or real is None or real == 0:
        return np.nan
    return abs(pred - real) / real


def summarise(df: pd.DataFrame) -> dict:
    ok = df.dropna(subset=["rel_error"])
    if not len(ok):
        return {"n": 0, "mean": np.nan, "median": np.nan, "pearson": np.nan}
    pear = np.corrcoef(ok.pred_steps, ok.real_steps)[0, 1] if len(ok) > 2 and ok.real_steps.std() > 0 else np.nan
    return {"n": len(ok), "mean": ok.rel_error.mean(), "median": ok.rel_error.median(), "pearson": pear}


def at_budget(df: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Every row, the 1.3x ones included: a T̂ε or Tε that is flagged (diverging, or ε not reached) counts as the
    whole budget, so a config flagged diverging that trains for real is an error, never left out."""
    p = df.pred_steps.where(~df.pred_diverged.astype(bool) & df.pred_steps.notna(), budget).astype(float)
    r = df.real_steps.where(~df.real_diverged.astype(bool) & df.real_steps.notna(), budget).astype(float)
    out = df.assign(pred_steps=p, real_steps=r)
    return out.assign(rel_error=[relative_error(a, b) for a, b in zip(p, r)])


def coverage(df: pd.DataFrame) -> tuple:
    """(share of rows whose real Tε lies in the predicted interval, rows with an interval and a real Tε)."""
    d = df[df.pred_low.notna() & df.real_steps.notna() & ~df.real_diverged.astype(bool)] if "pred_low" in df else df.iloc[:0]
    if not len(d):
        return np.nan, 0
    return float(((d.real_steps >= d.pred_low) & (d.real_steps <= d.pred_high)).mean()), len(d)


def fmt(s: dict) -> list:
    return [s["n"], f"{100 * s['mean']:.1f}%", f"{100 * s['median']:.1f}%",
            "n/a" if np.isnan(s["pearson"]) else f"{s['pearson']:.3f}"]


RANKING_GROUPS = ("dataset", "model", "loss", "criterion", "eps")  # model: the backbone


def default_method_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the default methods: discrete-elr for GD, sde-rescaled for SGD."""
    return df[((df.regime == "GD") & (df.method == "discrete-elr"))
              | ((df.regime == "SGD") & (df.method == "sde-rescaled"))]


def ranking_table(df: pd.DataFrame, budget: int, method: str = None) -> tuple:
    """The default methods' rows as ``ttp_ray.analysis.ranking_metrics`` reads them (one config = (regime,
    momentum, lr fraction) of a (dataset, backbone, loss); every lr, 1.3 x included) and the unit of cost:
    steps x the real step time of the config's (dataset, backbone, B) (median of ``real_step_time_s``), else steps x B (examples
    processed: rows written before the step time was recorded). The same step time prices both sides, so the
    ranking measures T̂ε's order alone. ``method``: that method's rows instead of the frozen defaults."""
    d = default_method_rows(df) if method is None else df[df.method == method]
    timed = "real_step_time_s" in d.columns and d.real_step_time_s.notna().all()
    # a step's time depends on (dataset, backbone, B) only: the median over those runs (analysis.pooled_step_time),
    # so that a run timed on a loaded machine does not reorder its slice
    step = (d.groupby(["dataset", "backbone", "batch_size"]).real_step_time_s.transform("median").astype(float)
            if timed else d.batch_size.astype(float))
    val = pd.DataFrame({
        "dataset": d.dataset, "model": d.backbone, "loss": d.loss, "criterion": d.criterion, "eps": d.eps,
        "config_id": [f"{r} m={m:g} {f:g}x" for r, m, f in zip(d.regime, d.momentum, d.lr_fraction)],
        "seed": 0, "budget_steps": budget, "predicted_steps": d.pred_steps, "actual_steps": d.real_steps,
        "predicted_diverged": d.pred_diverged.astype(bool), "actual_diverged": d.real_diverged.astype(bool),
        "predicted_step_time_s": step, "actual_step_time_s": step})
    return val, ("s (steps x the real step time)" if timed else "examples (steps x B; no step times in these rows)")


def ranking_section(df: pd.DataFrame, meta: dict, method: str = None) -> list:
    """Markdown lines: how well T̂ε x step time ranks the configs of each (dataset, backbone, loss, criterion,
    eps) slice against the real runs (``ttp_ray.analysis.ranking_metrics``), summary figures first."""
    from ttp_ray.analysis import ranking_metrics, ranking_summary

    val, unit = ranking_table(df, meta["budget"], method)
    rk = ranking_metrics(val, groups=RANKING_GROUPS, objectives=["cost"])
    s = ranking_summary(rk)["cost"]

    def f(x, spec=".2f"):
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)

    lines = [f"\n### Ranking quality ({'frozen kernel, default methods' if method is None else method + ' predictor'})\n",
             f"Per (dataset, backbone, loss, criterion, ε) slice, the configs (GD and SGD, m in {{0, 0.9}}, every lr "
             f"fraction) ordered by predicted cost T̂ε × step time against their real cost Tε × step time; cost in "
             f"{unit}. A config that diverges or never reaches ε, predicted or real, costs the whole budget "
             f"({meta['budget']} steps) and is counted as flagged. Spearman ρ over the configs; top-1 regret = real "
             f"cost of the predicted-cheapest config / the cheapest real cost (1 is perfect); top-3 hit = the truly "
             f"cheapest config is among the 3 predicted cheapest.\n",
             f"Over {s['groups']} slices: median ρ {f(s['median_spearman'])}, min ρ {f(s['min_spearman'])}; top-1 regret "
             f"mean {f(s['mean_top1_regret'])}, max {f(s['max_top1_regret'])}; top-3 hit rate "
             f"{f(s['top3_hit_rate'])}; flagged rows {s['flagged_predicted']} predicted, {s['flagged_actual']} real.\n"]
    lines.append(md_table(["slice", "configs", "flagged pred/real", "Spearman ρ", "top-1 regret", "top-3 hit",
                           "predicted cheapest", "real cheapest"], [
        [f"{r.dataset} / {r.model} / {r.loss} / {r.criterion} / {r.eps:g}", r.configs,
         f"{r.flagged_predicted}/{r.flagged_actual}", f(r.spearman), f(r.top1_regret),
         "-" if r.top3_hit is None else ("yes" if r.top3_hit else "no"), r.predicted_best, r.actual_best]
        for r in rk.itertuples(index=False)]))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one dataset, one backbone, budget 100")
    ap.add_argument("--datasets", nargs="+", default=["digits-5to9", "digits"])
    ap.add_argument("--backbones", nargs="+", default=["digits-cnn", "digits-resnet"])
    ap.add_argument("--budget", type=int, default=150)
    ap.add_argument("--paths", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: steadiest on a shared box)")
    ap.add_argument("--workers", type=int, default=2, help="processes fine-tuning the ground truth side by side")
    ap.add_argument("--default-options", default="{}",
                    help="options of the default predictor as JSON (variants for docs/CHOICES.md), e.g. "
                         "'{\"probe\": {\"work_epochs\": 3}}'")
    ap.add_argument("--gt-cache", default=None,
                    help="folder keeping every ground-truth run (npz); a run found there is read back, not trained")
    ap.add_argument("--from-csv", action="store_true",
                    help="regenerate the report from runs/bench/accuracy.csv and .json (no training)")
    args = ap.parse_args()
    if args.from_csv:
        out_dir = ROOT / "runs" / "bench"
        report(pd.read_csv(out_dir / "accuracy.csv"), json.loads((out_dir / "accuracy.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    datasets = ["digits-5to9"] if args.quick else args.datasets
    backbones = ["digits-cnn"] if args.quick else args.backbones
    budget = 100 if args.quick else args.budget
    kernels = {"": KernelOptions(), "full-kernel:": KernelOptions(class_trace=False)}  # default is class-trace
    rows = []
    t_all = time.perf_counter()
    predict_seconds = 0.0
    # 1) ground truth: every config fine-tuned for real once, in a pool of single-threaded processes
    states, jobs, size = {}, [], {}
    for ds_name in datasets:
        ds = load_dataset(ds_name)
        size[ds_name] = len(ds)
        for backbone in backbones:
            states[ds_name, backbone] = {tag: get_predictor("frozen").prepare(PredictionInputs(backbone, ds, k))
                                         for tag, k in kernels.items()}
            default = states[ds_name, backbone][""]
            for loss in ("mse", "ce"):
                for momentum in (0.0, 0.9):
                    for batch in (None, SGD_BATCH):
                        for frac in LR_FRACTIONS:
                            cfg = SimConfig(lr=grid_lr(ds_name, backbone, momentum, frac, default), momentum=momentum,
                                            batch_size=batch, loss=loss)
                            jobs.append((ds_name, backbone, frac, cfg, budget))
    # longest first (full batch on the bigger set), so the pool's tail is short
    jobs.sort(key=lambda j: (j[3].batch_size is not None, -size[j[0]], j[1] != "digits-resnet"))
    real = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
        for (ds_name, backbone, frac, cfg, _), res in zip(jobs, pool.map(functools.partial(_finetune_job, cache_dir=args.gt_cache), jobs)):
            times = curve_training_times(res.steps, res.curves(), EPS, budget=budget, eps_mode=EPS_MODE,
                                         diverged=res.diverged)
            real[ds_name, backbone, cfg] = (frac, res, times)
            print(f"{ds_name} {backbone} {cfg.loss} m={cfg.momentum} B={cfg.batch_size or res.n} lr={frac:.2f}x: "
                  f"real {[r['steps'] for r in times]} diverged={res.diverged}", flush=True)
    train_wall = time.perf_counter() - t0
    train_seconds = sum(r[1].total_seconds for r in real.values())
    for ds_name in datasets:
        for backbone in backbones:
            n = states[ds_name, backbone][""].n
            # 2) predictions: one vectorised grid per (regime, method option, kernel)
            for regime, methods, log_every in (("GD", gd_methods(), 1), ("SGD", sgd_methods(args.paths), SGD_LOG_EVERY)):
                cfgs = [c for (d, b, c) in real if (d, b) == (ds_name, backbone)
                        and (c.batch_size is None) == (regime == "GD")]
                for tag, prep in states[ds_name, backbone].items():
                    for name, opt in methods.items():
                        if tag and name not in ("discrete-elr", "sde-rescaled"):
                            continue  # the full kernel is compared on the default methods only
                        opt = SimOptions(**{**opt.__dict__, "log_every": log_every})
                        t0 = time.perf_counter()
                        preds = prep.predict(cfgs, budget_steps=budget, eps_list=EPS,
                                             settings=PredictSettings(sim=opt, eps_mode=EPS_MODE))
                        predict_seconds += time.perf_counter() - t0
                        rows += _prediction_rows(real, ds_name, backbone, regime, n, tag + name, cfgs, preds)
    # 2b) the default predictor (drift-aware, probed; METHOD.md §14) on every config, the 1.3x ones included, with
    #     the simulation settings a sweep uses by default; its extra work is counted per (dataset, backbone, loss)
    default_meta = {}
    for ds_name in datasets:
        for backbone in backbones:
            prep = get_predictor(DEFAULT_PREDICTOR, **json.loads(args.default_options)).rebind(states[ds_name, backbone][""])
            n = prep.n
            t0 = time.perf_counter()
            for regime, log_every in (("GD", 1), ("SGD", SGD_LOG_EVERY)):
                cfgs = [c for (d, b, c) in real if (d, b) == (ds_name, backbone)
                        and (c.batch_size is None) == (regime == "GD")]
                preds = prep.predict(cfgs, budget_steps=budget, eps_list=EPS, settings=PredictSettings(
                    sim=SimOptions(paths=args.paths, log_every=log_every), eps_mode=EPS_MODE))
                rows += _prediction_rows(real, ds_name, backbone, regime, n, DEFAULT_PREDICTOR, cfgs, preds)
            seconds = time.perf_counter() - t0
            predict_seconds += seconds
            for loss in ("mse", "ce"):
                drift = prep.shared[("probed", loss, budget)]
                edge = list(prep.shared.get(("edge", loss, budget), {}).values())  # the edge probes beyond the limit
                grads = drift.per_sample_gradients + sum(r.per_sample_gradients for r in edge)
                default_meta[f"{ds_name}/{backbone}/{loss}"] = {
                    "per_sample_gradients": grads, "n": n, "epochs": grads / n,
                    "drift_probe_gradients": drift.per_sample_gradients, "edge_probes": len(edge),
                    "edge_probe_gradients": sum(r.per_sample_gradients for r in edge),
                    "probe_seconds": sum(r.seconds for r in drift.runs) + sum(r.seconds for r in edge)}
            default_meta[f"{ds_name}/{backbone}"] = {"seconds": seconds}
    # 3) GD with the kernel drift calibrated by one real run per (dataset, backbone, loss): the grid's own
    #    plain-GD config at REFERENCE_FRACTION x max_stable_lr(0) (its rows are flagged, and left out of the summary)
    drift_meta = {}
    drift_predictor = get_predictor("drift", reference_fraction=REFERENCE_FRACTION)
    for ds_name in datasets:
        for backbone in backbones:
            prep = drift_predictor.rebind(states[ds_name, backbone][""])  # the same kernel state, drift-warped
            n = prep.n
            for loss in ("mse", "ce"):
                cfgs = [c for (d, b, c) in real if (d, b) == (ds_name, backbone) and c.batch_size is None and c.loss == loss]
                ref = next(c for c in cfgs if c.momentum == 0.0 and real[ds_name, backbone, c][0] == REFERENCE_FRACTION)
                ref_res = real[ds_name, backbone, ref][1]
                t0 = time.perf_counter()
                drift = drift_predictor.use_reference(prep, loss, budget, ref, ref_res)  # the grid's own run
                preds = prep.predict(cfgs, budget_steps=budget, eps_list=EPS, settings=PredictSettings(eps_mode=EPS_MODE))
                predict_seconds += time.perf_counter() - t0
                drift_meta[f"{ds_name}/{backbone}/{loss}"] = {"seconds": time.perf_counter() - t0,
                                                              "scale_min": float(drift.scale.min()),
                                                              "scale_max": drift.max_scale}
                rows += [{**r, "reference": r["momentum"] == 0.0 and r["lr_fraction"] == REFERENCE_FRACTION}
                         for r in _prediction_rows(real, ds_name, backbone, "GD", n, DRIFT_METHOD, cfgs, preds)]
    df = pd.DataFrame(rows)
    df["reference"] = df["reference"].fillna(False).astype(bool) if "reference" in df else False
    out_dir = ROOT / "runs" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "accuracy.csv", index=False)
    meta = {"datasets": datasets, "backbones": backbones, "budget": budget, "paths": args.paths,
            "train_seconds": train_seconds, "train_wall_seconds": train_wall, "workers": args.workers,
            "predict_seconds": predict_seconds, "drift": drift_meta, "default_predictor": default_meta,
            "selection_dataset": SELECTION_DATASET, "default_options": json.loads(args.default_options),
            "total_seconds": time.perf_counter() - t_all, "command": "python " + " ".join(["bench/accuracy.py"] + [  # the cache folder is this machine's: DIR
                "DIR" if i > 1 and sys.argv[i - 1] == "--gt-cache" else a for i, a in enumerate(sys.argv) if i > 0])}
    (out_dir / "accuracy.json").write_text(json.dumps(meta))
    report(df, meta)


BEYOND_BINS = (-np.inf, 0.0, 1.0, np.inf)  # e-folds of loss below every probe's lowest level: none, up to 1, more


def beyond_probes_table(rows: pd.DataFrame, sel: str) -> list:
    """Markdown lines: the default predictor's error and interval coverage by how far below every probe's lowest
    loss level each row's predicted curve goes (``drift_beyond_probes``, METHOD.md §14), selection set and held out."""
    if "pred_beyond_probes" not in rows or rows.pred_beyond_probes.isna().all():
        return []
    d = rows.dropna(subset=["pred_beyond_probes", "rel_error"])
    labels = ["0 (within)", "0-1", "over 1"]
    out = []
    for role, g in (("selection", d[d.dataset == sel]), ("held out", d[d.dataset != sel])):
        for label, h in g.groupby(pd.cut(g.pred_beyond_probes, BEYOND_BINS, labels=labels), observed=True):
            cov, ncov = coverage(h)
            out.append([role, label, len(h), f"{100 * h.rel_error.mean():.1f}%", f"{100 * h.rel_error.median():.1f}%",
                        "-" if not ncov else f"{100 * cov:.0f}% of {ncov}"])
    return ["\nBy how far below every probe's lowest loss level the predicted curve goes (`drift_beyond_probes`, "
            "e-folds of loss; there s is held, not measured), every config, flagged rows at the budget:\n",
            md_table(["set", "drift_beyond_probes", "pairs", "mean", "median", "interval coverage"], out)]


def default_predictor_section(df: pd.DataFrame, inside: pd.DataFrame, meta: dict) -> list:
    """Markdown lines: the default (probed) predictor against the frozen kernel's default methods, per dataset (the
    selection set and the held-out ones), every config counted; its interval's coverage, ranking and extra work."""
    from ttp_ray.analysis import ranking_metrics, ranking_summary

    budget = meta["budget"]
    sel = meta.get("selection_dataset", SELECTION_DATASET)
    probed_all = df[(df.method == DEFAULT_PREDICTOR) & ~df.reference.astype(bool)]
    frozen_all = default_method_rows(df[~df.reference.astype(bool)])
    lines = [f"### The default predictor ({DEFAULT_PREDICTOR}: frozen dynamics warped by the drift that short real "
             f"probes measure; docs/METHOD.md §14)\n",
             f"Chosen on {sel} only (its variant and constants, docs/CHOICES.md); every other dataset here is held "
             f"out. *All configs* counts the 1.3x ones too: a flagged T̂ε or Tε (diverging, or ε not reached) is the "
             f"whole budget ({budget} steps), so a config flagged diverging that trains for real is an error. "
             f"*Inside*: lr <= max_stable_lr. Coverage: the share of real Tε inside the row's interval "
             f"[predicted_steps_low, predicted_steps_high]. Spearman ρ and top-1 regret of predicted cost T̂ε x step "
             f"time per (dataset, backbone, loss, criterion, ε), every config.\n"]
    rows = []
    for ds_name in [d for d in meta["datasets"]] + ["all"]:
        def pick(d):
            return d if ds_name == "all" else d[d.dataset == ds_name]
        role = "all" if ds_name == "all" else ("selection" if ds_name == sel else "held out")
        for label, every, ins in (("frozen (default methods)", pick(frozen_all), pick(default_method_rows(inside))),
                                  (DEFAULT_PREDICTOR, pick(probed_all), pick(inside[inside.method == DEFAULT_PREDICTOR]))):
            val, _ = ranking_table(every, budget, None if label.startswith("frozen") else DEFAULT_PREDICTOR)
            rk = ranking_summary(ranking_metrics(val, groups=RANKING_GROUPS, objectives=["cost"]))["cost"]
            cov, ncov = coverage(every)
            a = summarise(at_budget(every, budget))
            rows.append([f"{ds_name} ({role})", label] + fmt(a) + fmt(summarise(ins))[1:] + [
                "-" if not ncov else f"{100 * cov:.0f}% of {ncov}",
                f"{rk['min_spearman']:.2f} / {rk['median_spearman']:.2f}",
                f"{rk['mean_top1_regret']:.2f} / {rk['max_top1_regret']:.2f}"])
    lines.append(md_table(["dataset", "predictor", "pairs (all configs)", "mean", "median", "Pearson", "mean (inside)",
                           "median (inside)", "Pearson (inside)", "interval coverage", "Spearman ρ min / median",
                           "top-1 regret mean / max"], rows))
    lines.append("\nBy slice, every config (the 1.3x ones included), mean relative error; frozen = the default methods:\n")
    keys = ["regime", "loss", "backbone", "momentum"]
    fz, pr = at_budget(frozen_all, budget), at_budget(probed_all, budget)
    slice_rows = []
    for key, g in pr.groupby(keys):
        f = fz.merge(g[keys[:0] + ["dataset", "backbone", "loss", "momentum", "regime", "lr_fraction", "criterion", "eps"]],
                     on=["dataset", "backbone", "loss", "momentum", "regime", "lr_fraction", "criterion", "eps"])
        slice_rows.append([" / ".join(str(k) for k in key), len(g), f"{100 * f.rel_error.mean():.1f}%",
                           f"{100 * g.rel_error.mean():.1f}%", f"{100 * g.rel_error.median():.1f}%",
                           f"{100 * g[g.dataset != sel].rel_error.mean():.1f}%"])
    lines.append(md_table(["slice (regime / loss / backbone / m)", "pairs", "frozen mean", f"{DEFAULT_PREDICTOR} mean",
                           f"{DEFAULT_PREDICTOR} median", f"{DEFAULT_PREDICTOR} mean, held out"], slice_rows))
    lines += beyond_probes_table(pr, sel)
    beyond = probed_all[probed_all.lr_fraction > 1.0].drop_duplicates(["dataset", "backbone", "loss", "momentum", "batch_size"])
    lines.append(f"\nBeyond the limit (1.3x): {DEFAULT_PREDICTOR} flags {int(beyond.pred_diverged.sum())}/{len(beyond)} "
                 f"as diverging, {int(beyond.real_diverged.sum())}/{len(beyond)} real runs diverged, "
                 f"{int((beyond.pred_diverged.astype(bool) == beyond.real_diverged.astype(bool)).sum())}/{len(beyond)} "
                 f"agree (the frozen kernel flags every one).\n")
    work = {k: v for k, v in meta.get("default_predictor", {}).items() if "per_sample_gradients" in v}
    if work:
        lines.append("Extra work beyond the Θ0 sketch, counted by the predictor (per-sample gradients of its probes):\n")
        lines.append(md_table(["dataset / backbone / loss", "N", "per-sample gradients", "epochs (x N)", "probe seconds"],
                              [[k, v["n"], v["per_sample_gradients"], f"{v['epochs']:.2f}", f"{v['probe_seconds']:.1f}"]
                               for k, v in work.items()]))
    lines += ranking_section(df, meta, DEFAULT_PREDICTOR)
    lines.append("")
    return lines


def report(df: pd.DataFrame, meta: dict) -> None:
    """Tables of docs/BENCHMARKS.md's accuracy section from the measured rows."""
    if "reference" not in df:
        df = df.assign(reference=False)
    # the drift reference's own rows are calibrated on themselves: left out of every summary
    inside = df[(df.lr_fraction < 1.0) & ~df.reference.astype(bool)].copy()
    # effective lr as a fraction of the plain-GD limit 2N/lambda_max: eta/(1-m) / (2N/lambda) = f (1+m)/(1-m)
    inside["elr_fraction"] = inside.lr_fraction * (1 + inside.momentum) / (1 - inside.momentum)
    beyond = df[df.lr_fraction > 1.0].drop_duplicates(["dataset", "backbone", "loss", "momentum", "batch_size", "method"])
    body = [f"Grid: datasets {meta['datasets']} x backbones {meta['backbones']} x losses mse, ce x m in {{0, 0.9}} x "
            f"B in {{full, {SGD_BATCH}}} x lr in {LR_FRACTIONS} of max_stable_lr(m) = 2(1+m)N/lambda_max, budget "
            f"{meta['budget']} steps, {meta['paths']} paths, eps {EPS} relative to the drop, criteria loss and error. "
            f"Kernel: default sketch ({KernelOptions().projection}, k={KernelOptions().k}, class-trace), and the full "
            f"NC x NC sketch for comparison (rows 'full-kernel:'). Relative error |T̂ε − Tε|/Tε over configs inside "
            f"the stability limit; Pearson between T̂ε and Tε; counts are (config, criterion, ε) pairs. *Linear regime*: effective lr eta/(1-m) at most the "
            f"plain-GD limit 2N/lambda_max (all m = 0 points, and m = 0.9 at 0.05 x).",
            ""]
    headers = ["method", "configs", "mean rel. error", "median", "Pearson"]
    if (df.method == DEFAULT_PREDICTOR).any():
        body += default_predictor_section(df, inside, meta)
    lin = inside[inside.elr_fraction <= 1.0]
    body.append("### By method option\n")
    body.append(md_table(["method", "configs (all)", "mean", "median", "Pearson", "configs (linear regime)",
                          "mean", "median", "Pearson"],
                         [[m] + fmt(summarise(g)) + fmt(summarise(lin[lin.method == m]))
                          for m, g in inside.groupby("method")]))
    body.append("\n### Default methods (discrete-elr for GD, sde-rescaled for SGD) by slice\n")
    default = default_method_rows(inside)
    dlin = default[default.elr_fraction <= 1.0]
    body.append(md_table(["slice", "configs (all)", "mean", "median", "Pearson", "configs (linear regime)", "mean",
                          "median", "Pearson"],
                         [["overall"] + fmt(summarise(default)) + fmt(summarise(dlin))] + [
        [f"{r} / {l} / {b}"] + fmt(summarise(g)) + fmt(summarise(dlin[(dlin.regime == r) & (dlin.loss == l) & (dlin.backbone == b)]))
        for (r, l, b), g in default.groupby(["regime", "loss", "backbone"])]))
    drift = inside[inside.method == DRIFT_METHOD]
    if len(drift):
        body.append(f"\n### GD with the kernel drift calibrated by one real run ({DRIFT_METHOD})\n")
        body.append(f"`ttp_ray.drift`: per (dataset, backbone, loss), the real plain-GD run at {REFERENCE_FRACTION} x "
                    "max_stable_lr(0) (a grid config, already fine-tuned above) gives the drift scale s(L) = real / frozen "
                    "loss-decrease rate at its own outputs; every GD config's frozen ODE curve is read at the warped time "
                    "dt'/dt = s(L). The reference config's rows are left out of every table (they are calibrated on "
                    "themselves). Same (config, criterion, eps) pairs in each column:\n")
        keys = ["dataset", "backbone", "loss", "momentum", "lr_fraction", "criterion", "eps"]
        gd = inside[inside.regime == "GD"]
        same = gd[gd.method.isin(["discrete-elr", "ode-elr"])].merge(drift[keys], on=keys)
        body.append(md_table(["slice", "pairs", "discrete-elr (default)", "ode-elr (frozen ODE)", f"{DRIFT_METHOD}",
                              f"{DRIFT_METHOD} median", f"{DRIFT_METHOD} Pearson"], [
            [name, len(dg), f"{100 * same[(same.method == 'discrete-elr') & sel(same)].rel_error.mean():.1f}%",
             f"{100 * same[(same.method == 'ode-elr') & sel(same)].rel_error.mean():.1f}%"] + fmt(summarise(dg))[1:]
            for name, sel, dg in [("all GD", lambda d: d.index == d.index, drift)] + [
                (f"{l} / {b} / m={m}", (lambda l, b, m: lambda d: (d.loss == l) & (d.backbone == b) & (d.momentum == m))(l, b, m), g)
                for (l, b, m), g in drift.groupby(["loss", "backbone", "momentum"])]]))
        combo = pd.concat([drift, inside[(inside.regime == "SGD") & (inside.method == "sde-rescaled")]])
        base = inside[((inside.regime == "GD") & (inside.method == "discrete-elr"))
                      | ((inside.regime == "SGD") & (inside.method == "sde-rescaled"))].merge(combo[keys + ["regime"]], on=keys + ["regime"])
        body.append("\nWhole grid, " + DRIFT_METHOD + " for GD + sde-rescaled for SGD: mean {1}, median {2}, Pearson {3} "
                    "({0} pairs); the defaults on the same pairs: mean {5}, median {6}, Pearson {7}.".format(
                        *fmt(summarise(combo)), *fmt(summarise(base))))
    body += ranking_section(df, meta)
    body.append("\n### Default methods by criterion, momentum and lr fraction\n")
    body.append(md_table(["slice"] + headers[1:], [
        [f"{c} / m={m} / {f}x"] + fmt(summarise(g)) for (c, m, f), g in default.groupby(["criterion", "momentum", "lr_fraction"])]))
    flag = beyond.groupby("method").apply(lambda g: f"{int(g.pred_diverged.sum())}/{len(g)} predicted diverging, "
                                                    f"{int(g.real_diverged.sum())}/{len(g)} real diverged",
                                          include_groups=False)
    body.append("\n### Beyond the limit (lr = 1.3 x max_stable_lr)\n")
    body.append(md_table(["method", "divergence flag"], [[m, s] for m, s in flag.items()]))
    body.append(f"\nWall time: fine-tuning {meta['train_seconds']:.0f} s, prediction {meta['predict_seconds']:.1f} s "
                f"(simulations only; kernels cached), whole bench {meta['total_seconds']:.0f} s. Rows: "
                f"runs/bench/accuracy.csv; `--from-csv` regenerates these tables from them.")
    write_section("accuracy", "## Predictor accuracy (bench/accuracy.py)\n\n" + "\n".join(body), meta["command"])
    print("\n".join(body))


if __name__ == "__main__":
    main()
