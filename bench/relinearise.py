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
from ttp_ray.relinearise import RelinearisationOptions, relinearised_curves  # noqa: E402
from ttp_ray.training_time import curve_training_times  # noqa: E402

METHOD = "relinearised"


def _job(job):
    kind, ds_name, backbone, cfg, budget, tol = job
    ds = load_dataset(ds_name)
    model = build_finetune_model(backbone, ds.num_classes, 0)
    if kind == "finetune":
        res = finetune(model, ds, FinetuneConfig(lr=cfg.lr, momentum=cfg.momentum, loss=cfg.loss, steps=budget))
        return {"seconds": res.total_seconds}
    r = relinearised_curves(model, ds, cfg, budget, RelinearisationOptions(tolerance=tol))
    times = curve_training_times(r.steps, {"loss": r.loss, "error": r.error}, EPS, budget=budget,
                                 eps_mode=EPS_MODE, diverged=r.diverged)
    return {"seconds": r.seconds, "kernel_seconds": r.kernel_seconds, "kernels": r.kernels, "rejected": r.rejected,
            "diverged": r.diverged, "note": r.note, "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tolerance", type=float, default=RelinearisationOptions().tolerance)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--from-csv", action="store_true", help="regenerate the report from runs/bench/relinearise.csv")
    args = ap.parse_args()
    out_dir = ROOT / "runs" / "bench"
    acc = pd.read_csv(out_dir / "accuracy.csv")
    meta_acc = json.loads((out_dir / "accuracy.json").read_text())
    if args.from_csv:
        report(acc, pd.read_csv(out_dir / "relinearise.csv"), json.loads((out_dir / "relinearise.json").read_text()))
        return
    budget = int(meta_acc["budget"])
    gd = acc[(acc.regime == "GD") & (acc.method == "discrete-elr")]  # the 1.3x configs too: divergence
    keys = gd.drop_duplicates(["dataset", "backbone", "loss", "momentum", "lr_fraction"])
    jobs = []
    for ds_name, backbone in keys[["dataset", "backbone"]].drop_duplicates().itertuples(index=False):
        ds = load_dataset(ds_name)
        state = load_state(backbone, ds, KernelOptions())  # the accuracy grid's lrs: fractions of its limit
        sub = keys[(keys.dataset == ds_name) & (keys.backbone == backbone)]
        for r in sub.itertuples(index=False):
            cfg = SimConfig(lr=r.lr_fraction * state.max_stable_lr(r.momentum), momentum=r.momentum,
                            batch_size=None, loss=r.loss)
            if not np.isclose(cfg.lr, r.lr, rtol=1e-9):
                raise SystemExit(f"{ds_name}/{backbone}: lr {cfg.lr} differs from accuracy.csv's {r.lr}; rerun bench/accuracy.py")
            jobs.append(("predict", ds_name, backbone, cfg, budget, args.tolerance))
        ref = SimConfig(lr=0.2 * state.max_stable_lr(0.9), momentum=0.9, batch_size=None, loss="ce")
        jobs.append(("finetune", ds_name, backbone, ref, budget, args.tolerance))
    jobs.sort(key=lambda j: (j[1] != "digits", j[2] != "digits-resnet"))  # longest first
    rows, fine = [], {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for job, res in zip(jobs, pool.map(_job, jobs)):
            kind, ds_name, backbone, cfg, _, _ = job
            if kind == "finetune":
                fine[ds_name, backbone] = res["seconds"]
                continue
            real = gd[(gd.dataset == ds_name) & (gd.backbone == backbone) & (gd.loss == cfg.loss)
                      & (gd.momentum == cfg.momentum) & np.isclose(gd.lr, cfg.lr, rtol=1e-9)]
            for t in res["times"]:
                r = real[(real.criterion == t["criterion"]) & (real.eps == t["eps"])].iloc[0]
                rows.append({"dataset": ds_name, "backbone": backbone, "loss": cfg.loss, "momentum": cfg.momentum,
                             "regime": "GD", "batch_size": int(r.batch_size), "lr_fraction": r.lr_fraction,
                             "lr": cfg.lr, "method": METHOD, "criterion": t["criterion"], "eps": t["eps"],
                             "real_steps": r.real_steps, "pred_steps": t["steps"], "real_diverged": r.real_diverged,
                             "pred_diverged": res["diverged"],
                             "rel_error": relative_error(t["steps"], r.real_steps),
                             "kernels": res["kernels"], "rejected": res["rejected"], "seconds": res["seconds"],
                             "kernel_seconds": res["kernel_seconds"], "note": res["note"]})
            print(f"{ds_name} {backbone} {cfg.loss} m={cfg.momentum} lr={rows[-1]['lr_fraction']}x: "
                  f"{res['kernels']} kernels, {res['seconds']:.1f} s, real/pred "
                  f"{[(r['real_steps'], r['pred_steps']) for r in rows[-len(res['times']):]]}", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out_dir / "relinearise.csv", index=False)
    meta = {"tolerance": args.tolerance, "workers": args.workers, "budget": budget,
            "finetune_seconds": {f"{d}/{b}": s for (d, b), s in fine.items()},
            "total_seconds": time.perf_counter() - t0,
            "command": "python " + " ".join(["bench/relinearise.py"] + sys.argv[1:])}
    (out_dir / "relinearise.json").write_text(json.dumps(meta))
    report(acc, df, meta)


def report(acc: pd.DataFrame, df_all: pd.DataFrame, meta: dict) -> None:
    inside = acc[acc.lr_fraction < 1.0]
    df = df_all[df_all.lr_fraction < 1.0]
    base = inside[(inside.regime == "GD") & (inside.method == "discrete-elr")]
    sgd = inside[(inside.regime == "SGD") & (inside.method == "sde-rescaled")]
    lin = lambda d: d[d.lr_fraction * (1 + d.momentum) / (1 - d.momentum) <= 1.0]  # noqa: E731
    body = [f"Re-linearisation (`ttp_ray.relinearise`, tolerance {meta['tolerance']}, full-kernel sketch per segment) "
            f"on the {len(df.drop_duplicates(['dataset', 'backbone', 'loss', 'momentum', 'lr_fraction']))} "
            "full-batch GD configs of the accuracy grid inside the limit (and the 16 beyond it, for the divergence flag), against the same real T_eps (rows of "
            "runs/bench/accuracy.csv). Relative error |T̂ε − Tε|/Tε; counts are (config, criterion, ε) pairs.\n"]
    hdr = ["slice", "configs", "mean", "median", "Pearson"]
    table = [["GD, frozen kernel (discrete-elr, default)"] + fmt(summarise(base)),
             ["GD, re-linearised"] + fmt(summarise(df)),
             ["GD, frozen kernel, linear regime"] + fmt(summarise(lin(base))),
             ["GD, re-linearised, linear regime"] + fmt(summarise(lin(df))),
             ["whole grid: GD frozen + SGD sde-rescaled (the defaults)"] + fmt(summarise(pd.concat([base, sgd]))),
             ["whole grid: GD re-linearised + SGD sde-rescaled"] + fmt(summarise(pd.concat([df, sgd])))]
    body.append(md_table(hdr, table))
    body.append("\n### By slice (GD): frozen kernel vs re-linearised\n")
    srows = []
    for (b, l, m, f), g in df.groupby(["backbone", "loss", "momentum", "lr_fraction"]):
        bg = base[(base.backbone == b) & (base.loss == l) & (base.momentum == m) & (base.lr_fraction == f)]
        srows.append([f"{b} / {l} / m={m} / {f}x", len(g), f"{100 * bg.rel_error.mean():.1f}%",
                      f"{100 * g.rel_error.mean():.1f}%", f"{g.drop_duplicates(['dataset', 'lr']).kernels.median():.0f}"])
    body.append(md_table(["slice", "pairs", "frozen mean", "re-linearised mean", "kernels (median)"], srows))
    beyond = df_all[df_all.lr_fraction > 1.0].drop_duplicates(["dataset", "backbone", "loss", "momentum"])
    if len(beyond):
        both = df_all[(df_all.lr_fraction > 1.0) & ~df_all.pred_diverged & ~df_all.real_diverged]
        fb = acc[(acc.lr_fraction > 1.0) & (acc.regime == "GD") & (acc.method == "discrete-elr")].drop_duplicates(
            ["dataset", "backbone", "loss", "momentum"])
        body.append("\n### Beyond the limit (lr = 1.3 x max_stable_lr, GD)\n")
        body.append(md_table(["predictor", "configs predicted diverging", "real runs diverged",
                              "T_eps error where neither diverged"],
                             [["frozen kernel (discrete-elr)", f"{int(fb.pred_diverged.sum())}/{len(fb)}",
                               f"{int(fb.real_diverged.sum())}/{len(fb)}", "n/a (no number beyond the limit)"],
                              ["re-linearised", f"{int(beyond.pred_diverged.sum())}/{len(beyond)}",
                               f"{int(beyond.real_diverged.sum())}/{len(beyond)}",
                               " ".join(fmt(summarise(both))[1:2]) + f" over {len(both)} pairs"]]))
    cost = []
    per = df_all.drop_duplicates(["dataset", "backbone", "loss", "momentum", "lr_fraction"])
    for (d, b), g in per.groupby(["dataset", "backbone"]):
        ft = meta["finetune_seconds"].get(f"{d}/{b}")
        cost.append([f"{d} / {b}", f"{g.kernels.median():.0f} ({g.kernels.min()}-{g.kernels.max()})",
                     f"{g.seconds.median():.1f}", f"{ft:.1f}" if ft else "n/a",
                     f"{g.seconds.median() / ft:.2f}" if ft else "n/a"])
    body.append("\n### Cost per config (same run, same worker processes)\n")
    body.append(md_table(["dataset / backbone", "kernels per config (median, range; all lrs)", "prediction s (median)",
                          "one real fine-tune s (full batch, 150 steps)", "prediction / fine-tune"], cost))
    body.append(f"\nWhole bench {meta['total_seconds']:.0f} s with {meta['workers']} worker processes. "
                "`--from-csv` regenerates these tables.")
    write_section("relinearise", "## Re-linearised predictor (bench/relinearise.py)\n\n" + "\n".join(body),
                  meta["command"])
    print("\n".join(body))


if __name__ == "__main__":
    main()
