"""Piecewise re-linearisation (ttp_ray.relinearise) on the accuracy grid's full-batch GD configs.

The ground truth is the accuracy bench's: every GD config of ``bench/accuracy.py``'s seeded grid (both
datasets, both backbones, mse and ce, m in {0, 0.9}, lr in {0.05, 0.2, 0.6} x max_stable_lr(m), and 1.3x
beyond the limit for the divergence flag; budget 150, eps 0.05 and 0.01 relative to the drop, criteria loss
and error) was fine-tuned for real there, and its T_eps rows are read back from ``runs/bench/accuracy.csv`` (run that bench first).
Here each config is predicted by re-linearisation and compared with the same real T_eps. Cost: per
(dataset, backbone), one real fine-tune of the grid's most expensive kind (full batch, 150 steps) is timed in
the same worker processes, and the ratio of the median prediction time to it is reported.

Run: ``.venv/bin/python bench/relinearise.py`` (about 25 minutes here with 2 workers); writes the
``relinearise`` section of docs/BENCHMARKS.md and runs/bench/relinearise.csv.
"""
from __future__ import annotations

import argparse
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
from accuracy import EPS, EPS_MODE, fmt, relative_error, summarise  # noqa: E402

from ttp_ray.data import load_dataset  # noqa: E402
from ttp_ray.dynamics import SimConfig  # noqa: E402
from ttp_ray.finetune import FinetuneConfig, finetune  # noqa: E402
from ttp_ray.kernel import KernelOptions  # noqa: E402
from ttp_ray.models import build_finetune_model  # noqa: E402
from ttp_ray.predict import load_state  # noqa: E402
from ttp_ray.relinearise import (FLOW_METHOD, RelinearisationOptions, flow_path,  # noqa: E402
                                 relinearised_curves, simulate_on_flow_path)
from ttp_ray.training_time import curve_training_times  # noqa: E402

METHOD = "relinearised"
FLOW_MAX_KERNELS = 40  # one path serves every config of a loss: a larger kernel budget than per config
FLOW_REFERENCE = 0.5  # the path's plain-GD lr, as a fraction of max_stable_lr(0) (close to the flow)


def _times(r, budget):
    return curve_training_times(r.steps, {"loss": r.loss, "error": r.error}, EPS, budget=budget, eps_mode=EPS_MODE,
                                diverged=r.diverged)


def _job(job):
    kind, ds_name, backbone, cfg, budget, tol = job
    ds = load_dataset(ds_name)
    model = build_finetune_model(backbone, ds.num_classes, 0)
    if kind == "finetune":
        res = finetune(model, ds, FinetuneConfig(lr=cfg.lr, momentum=cfg.momentum, loss=cfg.loss, steps=budget))
        return {"seconds": res.total_seconds}
    if kind == "flow":  # cfg: the (loss, reference lr, configs) of one shared path
        loss, ref_lr, cfgs = cfg
        path = flow_path(model, ds, loss, max(c.effective_lr for c in cfgs) * budget, ref_lr,
                         RelinearisationOptions(tolerance=tol, max_kernels=FLOW_MAX_KERNELS))
        sims = simulate_on_flow_path(path, cfgs, budget)
        return {"path_seconds": path.seconds, "path_kernels": len(path.sketches), "note": path.note,
                "configs": [{"seconds": r.seconds, "kernels": r.kernels, "diverged": r.diverged, "note": r.note,
                             "times": _times(r, budget)} for r in sims]}
    r = relinearised_curves(model, ds, cfg, budget, RelinearisationOptions(tolerance=tol))
    times = _times(r, budget)
    return {"seconds": r.seconds, "kernel_seconds": r.kernel_seconds, "kernels": r.kernels, "rejected": r.rejected,
            "diverged": r.diverged, "note": r.note, "times": times}


def _rows(gd, ds_name, backbone, cfg, res, method):
    """One row per (criterion, eps): the prediction ``res`` of ``cfg`` against the accuracy grid's real T_eps."""
    real = gd[(gd.dataset == ds_name) & (gd.backbone == backbone) & (gd.loss == cfg.loss)
              & (gd.momentum == cfg.momentum) & np.isclose(gd.lr, cfg.lr, rtol=1e-9)]
    out = []
    for t in res["times"]:
        r = real[(real.criterion == t["criterion"]) & (real.eps == t["eps"])].iloc[0]
        out.append({"dataset": ds_name, "backbone": backbone, "loss": cfg.loss, "momentum": cfg.momentum,
                    "regime": "GD", "batch_size": int(r.batch_size), "lr_fraction": r.lr_fraction, "lr": cfg.lr,
                    "method": method, "criterion": t["criterion"], "eps": t["eps"], "real_steps": r.real_steps,
                    "pred_steps": t["steps"], "real_diverged": r.real_diverged, "pred_diverged": res["diverged"],
                    "rel_error": relative_error(t["steps"], r.real_steps), "kernels": res["kernels"],
                    "rejected": res.get("rejected", 0), "seconds": res["seconds"],
                    "kernel_seconds": res.get("kernel_seconds", 0.0), "note": res["note"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tolerance", type=float, default=RelinearisationOptions().tolerance)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=["config", "flow"], default=None,
                    help="run one predictor only (config: per-config re-linearisation; flow: one shared path per loss); "
                         "the other's rows are kept from the previous run")
    ap.add_argument("--from-csv", action="store_true", help="regenerate the report from runs/bench/relinearise.csv")
    args = ap.parse_args()
    out_dir = ROOT / "runs" / "bench"
    acc = pd.read_csv(out_dir / "accuracy.csv")
    meta_acc = json.loads((out_dir / "accuracy.json").read_text())
    if args.from_csv:
        report(acc, pd.read_csv(out_dir / "relinearise.csv"), json.loads((out_dir / "relinearise.json").read_text()))
        return
    previous = pd.read_csv(out_dir / "relinearise.csv") if args.only and (out_dir / "relinearise.csv").exists() else None
    prev_meta = json.loads((out_dir / "relinearise.json").read_text()) if previous is not None else {}
    budget = int(meta_acc["budget"])
    gd = acc[(acc.regime == "GD") & (acc.method == "discrete-elr")]  # the 1.3x configs too: divergence
    keys = gd.drop_duplicates(["dataset", "backbone", "loss", "momentum", "lr_fraction"])
    jobs = []
    for ds_name, backbone in keys[["dataset", "backbone"]].drop_duplicates().itertuples(index=False):
        ds = load_dataset(ds_name)
        state = load_state(backbone, ds, KernelOptions())  # the accuracy grid's lrs: fractions of its limit
        sub = keys[(keys.dataset == ds_name) & (keys.backbone == backbone)]
        by_loss = {}
        for r in sub.itertuples(index=False):
            cfg = SimConfig(lr=r.lr_fraction * state.max_stable_lr(r.momentum), momentum=r.momentum,
                            batch_size=None, loss=r.loss)
            if not np.isclose(cfg.lr, r.lr, rtol=1e-9):
                raise SystemExit(f"{ds_name}/{backbone}: lr {cfg.lr} differs from accuracy.csv's {r.lr}; rerun bench/accuracy.py")
            by_loss.setdefault(cfg.loss, []).append(cfg)
            if args.only != "flow":
                jobs.append(("predict", ds_name, backbone, cfg, budget, args.tolerance))
        if args.only != "config":
            for loss, cfgs in by_loss.items():
                jobs.append(("flow", ds_name, backbone, (loss, FLOW_REFERENCE * state.max_stable_lr(0.0), cfgs),
                             budget, args.tolerance))
        ref = SimConfig(lr=0.2 * state.max_stable_lr(0.9), momentum=0.9, batch_size=None, loss="ce")
        jobs.append(("finetune", ds_name, backbone, ref, budget, args.tolerance))
    jobs.sort(key=lambda j: (j[1] != "digits", j[2] != "digits-resnet"))  # longest first
    rows, fine, paths = [], {}, {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for job, res in zip(jobs, pool.map(_job, jobs)):
            kind, ds_name, backbone, cfg, _, _ = job
            if kind == "finetune":
                fine[ds_name, backbone] = res["seconds"]
                continue
            if kind == "flow":
                loss, _, cfgs = cfg
                paths[f"{ds_name}/{backbone}/{loss}"] = {"seconds": res["path_seconds"], "kernels": res["path_kernels"],
                                                        "configs": len(cfgs), "note": res["note"]}
                for c, one in zip(cfgs, res["configs"]):
                    rows.extend(_rows(gd, ds_name, backbone, c, one, FLOW_METHOD))
                print(f"{ds_name} {backbone} {loss} flow path: {res['path_kernels']} kernels, {res['path_seconds']:.1f} s, "
                      f"{len(cfgs)} configs", flush=True)
                continue
            rows.extend(_rows(gd, ds_name, backbone, cfg, res, METHOD))
            print(f"{ds_name} {backbone} {cfg.loss} m={cfg.momentum} lr={rows[-1]['lr_fraction']}x: "
                  f"{res['kernels']} kernels, {res['seconds']:.1f} s, real/pred "
                  f"{[(r['real_steps'], r['pred_steps']) for r in rows[-len(res['times']):]]}", flush=True)
    df = pd.DataFrame(rows)
    if previous is not None:  # keep the other predictor's rows from the previous run
        keep = METHOD if args.only == "flow" else FLOW_METHOD
        df = pd.concat([previous[previous.method == keep], df], ignore_index=True)
        paths = paths or prev_meta.get("flow_paths", {})
        prev_meta.pop("previous", None)
    df.to_csv(out_dir / "relinearise.csv", index=False)
    meta = {"tolerance": args.tolerance, "workers": args.workers, "budget": budget, "only": args.only,
            "flow_paths": paths, "flow_reference": FLOW_REFERENCE, "flow_max_kernels": FLOW_MAX_KERNELS,
            "finetune_seconds": {f"{d}/{b}": s for (d, b), s in fine.items()}, "previous": prev_meta or None,
            "total_seconds": time.perf_counter() - t0,
            "command": "python " + " ".join(["bench/relinearise.py"] + sys.argv[1:])}
    (out_dir / "relinearise.json").write_text(json.dumps(meta))
    report(acc, df, meta)


def report(acc: pd.DataFrame, df_all: pd.DataFrame, meta: dict) -> None:
    inside = acc[acc.lr_fraction < 1.0]
    base = inside[(inside.regime == "GD") & (inside.method == "discrete-elr")]
    sgd = inside[(inside.regime == "SGD") & (inside.method == "sde-rescaled")]
    lin = lambda d: d[d.lr_fraction * (1 + d.momentum) / (1 - d.momentum) <= 1.0]  # noqa: E731
    names = {METHOD: "re-linearised per config", FLOW_METHOD: "re-linearised flow path (shared per loss)"}
    methods = [m for m in (METHOD, FLOW_METHOD) if (df_all.method == m).any()]
    by = {m: df_all[df_all.method == m] for m in methods}
    inn = {m: d[d.lr_fraction < 1.0] for m, d in by.items()}
    body = [f"Two re-linearised predictors (`ttp_ray.relinearise`, tolerance {meta['tolerance']}, full-kernel sketches) "
            "on the full-batch GD configs of the accuracy grid, against the same real T_eps (rows of "
            "runs/bench/accuracy.csv): *per config* (`predict --relinearise`: kernels along each config's own "
            "trajectory) and *flow path* (one re-linearised gradient-flow path per (dataset, backbone, loss), traced "
            f"by plain GD at {meta.get('flow_reference', FLOW_REFERENCE)} x max_stable_lr(0) with up to "
            f"{meta.get('flow_max_kernels', FLOW_MAX_KERNELS)} kernels, shared by every config, each reading "
            "the kernel at its own flow time tau = lr/(1-m) t). Relative error |T̂ε − Tε|/Tε; counts are "
            "(config, criterion, ε) pairs; configs inside the limit unless said.\n"]
    table = [["GD, frozen kernel (discrete-elr, default)"] + fmt(summarise(base))]
    table += [[f"GD, {names[m]}"] + fmt(summarise(inn[m])) for m in methods]
    table += [["GD, frozen kernel, linear regime"] + fmt(summarise(lin(base)))]
    table += [[f"GD, {names[m]}, linear regime"] + fmt(summarise(lin(inn[m]))) for m in methods]
    table += [["whole grid: GD frozen + SGD sde-rescaled (the defaults)"] + fmt(summarise(pd.concat([base, sgd])))]
    table += [[f"whole grid: GD {names[m]} + SGD sde-rescaled"] + fmt(summarise(pd.concat([inn[m], sgd])))
              for m in methods]
    body.append(md_table(["slice", "configs", "mean", "median", "Pearson"], table))
    body.append("\n### By slice (GD): mean relative error\n")
    srows = []
    keys = ["backbone", "loss", "momentum", "lr_fraction"]
    for k, bg in base.groupby(keys):
        row = [f"{k[0]} / {k[1]} / m={k[2]} / {k[3]}x", len(bg), f"{100 * bg.rel_error.mean():.1f}%"]
        for m in methods:
            g = inn[m][(inn[m][keys] == pd.Series(k, index=keys)).all(axis=1)]
            row += [f"{100 * g.rel_error.mean():.1f}%" if len(g) else "n/a",
                    f"{g.drop_duplicates(['dataset', 'lr']).kernels.median():.0f}" if len(g) else "n/a"]
        srows.append(row)
    hdr = ["slice", "pairs", "frozen"]
    for m in methods:
        hdr += [names[m], "kernels used (median)"]
    body.append(md_table(hdr, srows))
    fb = acc[(acc.lr_fraction > 1.0) & (acc.regime == "GD") & (acc.method == "discrete-elr")].drop_duplicates(
        ["dataset", "backbone", "loss", "momentum"])
    brows = [["frozen kernel (discrete-elr)", f"{int(fb.pred_diverged.sum())}/{len(fb)}",
              f"{int(fb.real_diverged.sum())}/{len(fb)}", "n/a (no number beyond the limit)"]]
    for m in methods:
        d = by[m]
        beyond = d[d.lr_fraction > 1.0].drop_duplicates(["dataset", "backbone", "loss", "momentum"])
        both = d[(d.lr_fraction > 1.0) & ~d.pred_diverged.astype(bool) & ~d.real_diverged.astype(bool)]
        if len(beyond):
            brows.append([names[m], f"{int(beyond.pred_diverged.sum())}/{len(beyond)}",
                          f"{int(beyond.real_diverged.sum())}/{len(beyond)}",
                          fmt(summarise(both))[1] + f" over {len(both)} pairs"])
    if len(brows) > 1:
        body.append("\n### Beyond the limit (lr = 1.3 x max_stable_lr, GD)\n")
        body.append(md_table(["predictor", "configs predicted diverging", "real runs diverged",
                              "T_eps error where neither diverged"], brows))
    body.append("\n### Cost (same run, same worker processes)\n")
    cost = []
    fine_cfg = (meta.get("previous") or {}).get("finetune_seconds") if meta.get("only") == "flow" else None
    for m in methods:
        per = by[m].drop_duplicates(["dataset", "backbone", "loss", "momentum", "lr_fraction"])
        for (d, b), g in per.groupby(["dataset", "backbone"]):
            fine = (fine_cfg if m == METHOD and fine_cfg else meta["finetune_seconds"]).get(f"{d}/{b}")
            if m == METHOD:
                pred = g.seconds.median()
                what = f"{g.kernels.median():.0f} ({g.kernels.min()}-{g.kernels.max()}) kernels per config"
            else:  # the paths (one per loss) amortised over the configs sharing them, plus each simulation
                ps = [meta["flow_paths"][f"{d}/{b}/{loss}"] for loss in g.loss.unique()]
                pred = (sum(p["seconds"] for p in ps) + g.seconds.sum()) / len(g)
                what = " + ".join(f"{p['kernels']}" for p in ps) + f" kernels for {len(g)} configs"
            cost.append([names[m], f"{d} / {b}", what, f"{pred:.1f}", f"{fine:.1f}" if fine else "n/a",
                         f"{pred / fine:.2f}" if fine else "n/a"])
    body.append(md_table(["predictor", "dataset / backbone", "kernels", "prediction s per config",
                          "one real fine-tune s (full batch, 150 steps)", "prediction / fine-tune"], cost))
    body.append(f"\nWhole bench {meta['total_seconds']:.0f} s with {meta['workers']} worker processes"
                + (f" (this run: the {names[FLOW_METHOD if meta['only'] == 'flow' else METHOD]} only; the other's "
                   "rows and fine-tune times are the previous run's)" if meta.get("only") else "")
                + ". `--from-csv` regenerates these tables.")
    write_section("relinearise", "## Re-linearised predictors (bench/relinearise.py)\n\n" + "\n".join(body),
                  meta["command"])
    print("\n".join(body))


if __name__ == "__main__":
    main()
