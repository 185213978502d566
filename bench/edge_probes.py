"""Beyond the stability limit: does the default predictor's "diverges" agree with real fine-tuning? (issue 15, §14)

    .venv/bin/python bench/edge_probes.py --gt-cache DIR     # ~10 min on 2 shared cores with an empty cache

On the selection set only (digits-5to9, both embedded backbones; digits is held out for bench/accuracy.py), every
config of the accuracy grid beyond the limit, at lr in {1.3, 1.6, 2.0} x max_stable_lr(m), m in {0, 0.9}, full
batch and B = 64, MSE and cross-entropy (48 configs), is fine-tuned for real for the accuracy grid's budget (150
steps; cached under ``--gt-cache``, shared with bench/accuracy.py) and predicted by variants of the default
predictor (``probed``). Per variant: how many flags ("diverged") agree with the real run, false flags (the real run
trains: one missed option) and missed divergences (a wasted run), and the extra work the edge probes cost.
The variants are the ones docs/CHOICES.md chose between. Writes section "edge_probes" of docs/BENCHMARKS.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy as A  # noqa: E402
from _report import md_table, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/edge_probes.py --gt-cache DIR"
FRACTIONS = (1.3, 1.6, 2.0)
VARIANTS = {
    "no edge probes (momentum beyond the limit diverges; plain GD/SGD up to 2x: the catapult rule)":
        {"edge_probe_steps": 0, "probe_all_edges": False},
    "edge probes for momentum only, lowest lr first, 64 steps": {"probe_all_edges": False, "_order": "ascending"},
    "edge probes for every momentum, 32 steps": {"edge_probe_steps": 32},
    "edge probes for every momentum, 64 steps (the default)": {},
}


def main() -> None:
    import torch

    from ttp_ray.data import load_dataset
    from ttp_ray.dynamics import SimConfig, SimOptions
    from ttp_ray.predict import PredictSettings
    from ttp_ray.predictors import PredictionInputs, get_predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt-cache", default=None, help="folder of ground-truth runs (npz), shared with bench/accuracy.py")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds_name, budget = A.SELECTION_DATASET, 150
    ds = load_dataset(ds_name)
    states, jobs = {}, []
    for backbone in ("digits-cnn", "digits-resnet"):
        states[backbone] = get_predictor("frozen").prepare(PredictionInputs(backbone, ds))
        for loss in ("mse", "ce"):
            for m in (0.0, 0.9):
                for batch in (None, A.SGD_BATCH):
                    for f in FRACTIONS:
                        cfg = SimConfig(lr=A.grid_lr(ds_name, backbone, m, f, states[backbone]), momentum=m,
                                        batch_size=batch, loss=loss)
                        jobs.append((ds_name, backbone, f, cfg, budget))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        real = {(j[1], j[3]): res.diverged
                for j, res in zip(jobs, pool.map(functools.partial(A._finetune_job, cache_dir=args.gt_cache), jobs))}
    train_seconds = time.perf_counter() - t0
    rows, listing = [], {}
    for label, options in VARIANTS.items():
        options = dict(options)
        ascending = options.pop("_order", None) == "ascending"
        agree = false_flags = missed = 0
        work = []
        for backbone, base in states.items():
            pred = get_predictor("probed", **options).rebind(base)
            cfgs = [c for (b, c) in real if b == backbone]
            if ascending:  # the first version: each config alone, lowest lr first (one edge probe decides the higher)
                cfgs = sorted(cfgs, key=lambda c: (c.momentum, c.lr))
            for regime, log_every in (("GD", 1), ("SGD", A.SGD_LOG_EVERY)):
                group = [c for c in cfgs if (c.batch_size is None) == (regime == "GD")]
                calls = [[c] for c in group] if ascending else [group]
                for call in calls:
                    for c, pc in zip(call, pred.predict(call, budget_steps=budget, eps_list=A.EPS, settings=PredictSettings(
                            sim=SimOptions(paths=4, log_every=log_every), eps_mode=A.EPS_MODE))):
                        truth = real[backbone, c]
                        agree += pc.diverged == truth
                        false_flags += pc.diverged and not truth
                        missed += truth and not pc.diverged
                        listing.setdefault((backbone, c.loss, c.momentum, c.batch_size or "full",
                                            round(c.lr / base.max_stable_lr(c.momentum), 2)), [truth])
                        listing[backbone, c.loss, c.momentum, c.batch_size or "full",
                                round(c.lr / base.max_stable_lr(c.momentum), 2)].append(pc.diverged)
            for loss in ("mse", "ce"):
                edge = pred.predictor.edge_work(pred, loss, budget)
                work.append(edge / base.n)
        rows.append([label, f"{agree} / {len(real)}", false_flags, missed, f"{min(work):.1f}-{max(work):.1f}"])
        print(label, rows[-1][1:], flush=True)
    body = [f"Selection set only ({ds_name}, N = {len(ds)}); 48 configs beyond the limit, each fine-tuned for real "
            f"({budget} steps, seed 0; {train_seconds:.0f} s with the cache as found). A flag is `diverged`; a real run "
            f"diverges when its loss passes 1e3 x L_0 or is not finite (the trainer's rule). Edge probes draw their "
            f"batches from another seed than the real runs.\n",
            md_table(["variant", "flag agrees with real training", "false flags (trains for real)",
                      "missed divergences", "edge-probe work per (backbone, loss), epochs"], rows),
            "\nPer config: real diverged, then each variant's flag, in the order above (T: diverged):\n",
            md_table(["backbone / loss / m / B / lr x limit", "real"] + [f"v{i + 1}" for i in range(len(VARIANTS))],
                     [[" / ".join(str(k) for k in key), "T" if v[0] else "-"] + ["T" if x else "-" for x in v[1:]]
                      for key, v in sorted(listing.items(), key=lambda kv: str(kv[0]))])]
    write_section("edge_probes", "\n".join(body), COMMAND)
    print(json.dumps({"rows": rows}), flush=True)


if __name__ == "__main__":
    main()
