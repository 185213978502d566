"""ttp-ray-guided tuning against Ray Tune's ASHA and a plain grid, on one grid, with one trainable (issue 17).

    .venv/bin/python bench/tune.py            # ~10-15 min on 2 shared cores; writes section "tune" of docs/BENCHMARKS.md
    .venv/bin/python bench/tune.py --quick    # a 300-image, 60-step smoke run (minutes; writes nothing to the docs)

The grid is the quickstart's on one dataset and one loss: digits-5to9 (N = 896), digits-cnn, cross-entropy,
lr = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.3) x max_stable_lr(m), m in {0.9, 0}, B in {16, 64, full}: 42 configs,
300 steps, curves logged every 5 steps, one minibatch seed. Every arm trains through the same Ray Tune trainable
(:func:`ttp_ray.tune.train_trial`: real ``torch.optim.SGD`` fine-tuning, a report per logged step) on one local
Ray (2 CPUs, one per trial):

* **ttp-ray**: ``run_tune``: predict the grid (the kernel computed here, not read from a cache), rank by predicted
  cost to the common error target (METHOD.md §12), train the top K with :class:`ttp_ray.tune.PredictedBudgetStopper`
  (stop at margin x the predicted steps to the target, or when the real curve reaches it);
* **ASHA**: Ray Tune's ``ASHAScheduler`` over all 42 configs (``time_attr="step"``, metric error, mode min,
  ``max_t`` = 300, grace period and reduction factor as given);
* **grid**: all 42 configs for the whole budget, no scheduler: the ground truth.

The target is one error rate per (dataset, loss): min + 0.25 x (median - min) of the predicted final errors (the
rank's default, derived from the predictions; ASHA and the grid are scored against the same value). The lrs of
the grid are fractions of the stability limit, resolved on the kernel: ASHA and the grid get them for free, only
the ttp-ray arm pays for the kernel.

Per arm: **compute** = prediction seconds (kernel + prediction shards; ttp-ray only) + every trial's optimiser-step
seconds (``train_seconds``: forward, backward, update; minibatch runs' full-set evaluations excluded, as
``finetune`` measures them); wall time; trained steps and samples (steps x B, load-independent). **Pick**: the
config with the lowest real cost to the target among the arm's own trials (what the arm measured), also ASHA's
conventional pick (the lowest error at its last report). A pick is scored by the grid's run of that config:
its real cost to the target (steps to the target x that run's step time) against the cheapest of the grid, and
its final error at 300 steps. The figure to beat (issue 17): ttp-ray within 10 % of the best real cost with at
least 5x less compute than ASHA (goal 10x).

Writes runs/bench/tune.json, runs/bench/tune_grid.csv (every config: predicted and real) and the section.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import ROOT, log  # noqa: E402
from _report import machine_facts, md_table, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/tune.py"
FRACTIONS = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.3)


def bench_spec(quick: bool):
    from ttp_ray.sweep.spec import parse_spec

    return parse_spec({
        "name": "bench-tune" + ("-quick" if quick else ""),
        "model": "digits-cnn",
        "datasets": ["digits-5to9:subset=300" if quick else "digits-5to9"],
        "losses": ["ce"],
        "lr": {"fraction_of_max_stable": [0.1, 0.4, 1.3] if quick else list(FRACTIONS)},
        "momentum": [0.9, 0.0],
        "batch_size": [16, 64, "full"],
        "eps": [0.01],
        "criteria": ["error"],
        "budget": {"steps": 60 if quick else 300},
        "kernel": {"method": "sketch", "projection": "countsketch", "k": 128 if quick else 512, "class_trace": True,
                   "seed": 0, "cache": False},
        "simulation": {"method": "auto", "momentum_mode": "heavy_ball", "paths": 4, "seed": 0, "log_every": 5},
    })


def run_arm(name: str, spec, rows, storage: Path, scheduler=None) -> Dict[str, Any]:
    """Every config of ``rows`` as a Tune trial of the project's trainable (optionally under ``scheduler``);
    returns the wall time and config_id -> the run rebuilt from its reports."""
    from ray import tune as ray_tune

    from ttp_ray.tune import TrialSetup, param_space, trainable, trial_finished, trial_run

    shutil.rmtree(storage, ignore_errors=True)
    setup = TrialSetup(spec)
    t0 = time.perf_counter()
    tuner = ray_tune.Tuner(trainable(setup), param_space=param_space(rows),
                           tune_config=ray_tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
                           run_config=ray_tune.RunConfig(name=name, storage_path=str(storage.resolve()), verbose=0))
    results = tuner.fit()
    wall = time.perf_counter() - t0
    n = {str(r["config_id"]): int(r["n"]) for r in rows.to_dict("records")}
    runs = {}
    for result in results:
        cid = str(result.config["config_id"])
        if not trial_finished(result):
            raise RuntimeError(f"{name}: trial {cid} did not finish: {result.error!r}")
        runs[cid] = trial_run(result, setup, n[cid])
    log(f"{name}: {len(runs)} trials in {wall:.0f} s")
    return {"wall_s": wall, "runs": runs}


def real_costs(spec, rows, runs: Dict[str, Any], targets):
    """config_id -> {cost_s, steps, final_error, last_step, train_s, diverged} of ``runs``: steps to the target
    (``targets``: the predictions' per (dataset, loss)) x the run's own step time, as ``ttp-ray validate`` reads them."""
    import pandas as pd

    from ttp_ray.analysis.targets import actual_cost_to_target
    from ttp_ray.tune import trial_tables

    by_id = {str(r["config_id"]): r for r in rows.to_dict("records")}
    gts, curves = [], []
    for cid, run in runs.items():
        gt, curve = trial_tables(spec, by_id[cid], run)
        ds = str(by_id[cid]["dataset"])
        gts.append(gt.to_pandas().assign(dataset=ds))
        curves.append(curve.to_pandas().assign(dataset=ds))
    gt = actual_cost_to_target(pd.concat(gts, ignore_index=True), pd.concat(curves, ignore_index=True), targets)
    out = {}
    for r in gt.drop_duplicates("config_id").itertuples(index=False):
        run = runs[r.config_id]
        cost = float(r.actual_cost_to_target_s) if pd.notna(r.actual_cost_to_target_s) else math.nan
        out[r.config_id] = {"cost_s": cost, "steps": None if pd.isna(r.actual_steps_to_target) else
                            int(r.actual_steps_to_target), "final_error": None if run.diverged else float(run.error[-1]),
                            "last_step": int(run.steps[-1]) if len(run.steps) else 0, "train_s": run.train_seconds,
                            "diverged": bool(run.diverged), "batch_size": int(by_id[r.config_id]["batch_size"])}
    return out


def cheapest(costs: Dict[str, Dict[str, Any]]) -> Optional[str]:
    ok = {c: v["cost_s"] for c, v in costs.items() if math.isfinite(v["cost_s"])}
    return min(ok, key=lambda c: (ok[c], c)) if ok else None


def totals(costs: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    return {"trial_train_s": sum(v["train_s"] for v in costs.values()),
            "steps": sum(v["last_step"] for v in costs.values()),
            "samples": sum(v["last_step"] * v["batch_size"] for v in costs.values()), "trials": len(costs)}


def describe(grid: Dict[str, Dict[str, Any]], cid: Optional[str]) -> str:
    """A config of the grid (config_id -> its row in tune.json) in words."""
    if cid is None:
        return "none"
    r = grid[cid]
    b = "full" if r["full_batch"] else str(int(r["batch_size"]))
    return f"{r['lr_fraction']:g}x, m {r['momentum']:g}, B {b}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=3, help="configs ttp-ray trains (best-ranked first)")
    ap.add_argument("--margin", type=float, default=1.2, help="ttp-ray's budget: margin x predicted steps to target")
    ap.add_argument("--grace", type=int, default=30, help="ASHA grace period (steps)")
    ap.add_argument("--reduction", type=float, default=3, help="ASHA reduction factor")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (one per trial)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "tune"), help="working directory (cleared)")
    ap.add_argument("--quick", action="store_true", help="a tiny grid, to check the script; writes nothing to docs")
    ap.add_argument("--from-json", action="store_true",
                    help="regenerate the section from runs/bench/tune.json (no training)")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads((ROOT / "runs" / "bench" / "tune.json").read_text())
        body = report(result)
        print(body)
        write_section("tune", body, COMMAND, machine=result["facts"]["machine"])
        return

    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.tune.schedulers import ASHAScheduler

    from ttp_ray.analysis import load_sweep
    from ttp_ray.analysis.targets import derive_targets
    from ttp_ray.sweep.driver import start_local_ray
    from ttp_ray.tune import TuneOptions, run_tune, tune_text

    spec = bench_spec(args.quick)
    budget = spec.budget.steps
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start_local_ray(args.num_cpus)
    try:
        # ---- ttp-ray: predict, rank, train the top K with the predicted-budget stopper
        t0 = time.perf_counter()
        outcome = run_tune(spec, str(work / "guided"), options=TuneOptions(top=args.top, margin=args.margin,
                                                                            verbose=0),
                           progress=False, echo=log)
        guided_wall = time.perf_counter() - t0
        log(f"ttp-ray: {guided_wall:.0f} s")
        print(tune_text(outcome))
        tables = load_sweep(work / "guided", tables=("predictions", "ground_truth", "curves"))
        rows = tables.predictions.sort_values("config_id").reset_index(drop=True)
        targets = derive_targets(rows)
        cands = outcome.comparison
        # ---- the grid (the ground truth) and ASHA, same trainable, same Ray
        grid = run_arm("grid", spec, rows, work / "grid")
        asha_scheduler = ASHAScheduler(time_attr="step", metric="error", mode="min", max_t=budget,
                                       grace_period=args.grace, reduction_factor=args.reduction)
        asha = run_arm("asha", spec, rows, work / "asha", scheduler=asha_scheduler)
    finally:
        ray.shutdown()

    truth = real_costs(spec, rows, grid["runs"], targets)
    asha_costs = real_costs(spec, rows, asha["runs"], targets)
    gt = tables.ground_truth.drop_duplicates("config_id").set_index("config_id")
    guided_runs = {r.config_id: {"cost_s": float(r.actual_cost_to_target_s) if r.actual_cost_to_target_s ==
                                 r.actual_cost_to_target_s else math.nan,  # NaN: never reached the target
                                 "train_s": float(gt.train_seconds[r.config_id]), "last_step": int(r.last_step),
                                 "batch_size": int(r.batch_size), "diverged": bool(gt.diverged[r.config_id])}
                   for r in cands.itertuples(index=False)}
    # load-robust variant: steps to the target x the median step time of the grid's runs at that batch size
    per_b: Dict[int, List[float]] = {}
    for v in truth.values():
        if not v["diverged"] and v["last_step"] > 0:
            per_b.setdefault(v["batch_size"], []).append(v["train_s"] / v["last_step"])
    step_b = {b: sorted(x)[len(x) // 2] for b, x in per_b.items()}
    for v in truth.values():
        v["cost_median_s"] = v["steps"] * step_b[v["batch_size"]] if v["steps"] is not None else math.nan
    best = cheapest(truth)
    best_cost = truth[best]["cost_s"] if best else math.nan
    best_median = min((v["cost_median_s"] for v in truth.values() if math.isfinite(v["cost_median_s"])),
                      default=math.nan)
    prediction_s = outcome.kernel_seconds + outcome.shard_seconds
    finals = {c: v for c, v in asha["runs"].items() if not v.diverged}
    asha_conventional = min(finals, key=lambda c: (float(finals[c].error[-1]), float(finals[c].loss[-1]), c)) \
        if finals else None
    arms = {
        "ttp-ray": {"prediction_s": prediction_s, **totals(guided_runs), "wall_s": guided_wall,
                    "pick": cheapest(guided_runs)},
        "ASHA": {"prediction_s": 0.0, **totals(asha_costs), "wall_s": asha["wall_s"], "pick": cheapest(asha_costs),
                 "conventional_pick": asha_conventional},
        "grid": {"prediction_s": 0.0, **totals(truth), "wall_s": grid["wall_s"], "pick": best},
    }
    for a in arms.values():
        a["compute_s"] = a["prediction_s"] + a["trial_train_s"]
        for key in ("pick", "conventional_pick"):
            if key in a:
                cid = a[key]
                cost = truth[cid]["cost_s"] if cid else math.nan
                a[f"{key}_cost_s"] = cost
                a[f"{key}_regret"] = cost / best_cost if cid and math.isfinite(cost) and best_cost > 0 else math.nan
                a[f"{key}_final_error"] = truth[cid]["final_error"] if cid else None
                a[f"{key}_regret_median_step"] = (truth[cid]["cost_median_s"] / best_median if cid and
                                                  math.isfinite(truth[cid]["cost_median_s"]) else math.nan)
    ratio = arms["ASHA"]["compute_s"] / arms["ttp-ray"]["compute_s"]
    within = arms["ttp-ray"]["pick_regret"] <= 1.10
    result = {"facts": {"quick": args.quick, "configs": int(len(rows)), "top": args.top, "margin": args.margin,
                        "grace": args.grace, "reduction": args.reduction, "budget": budget,
                        "target": float(targets.target.iloc[0]), "best": best, "best_cost_s": best_cost,
                        "best_cost_median_step_s": best_median,
                        "median_step_time_s": {str(b): t for b, t in sorted(step_b.items())},
                        "machine": machine_facts(), "kernel_s": outcome.kernel_seconds,
                        "shard_s": outcome.shard_seconds, "predictor": spec.chosen_predictor().name},
              "arms": arms, "asha_over_ttp_compute": ratio, "ttp_within_10pct": bool(within)}
    from ttp_ray.analysis import rank

    ranked = rank(rows, curves=tables.curves).set_index("config_id")
    grid_rows = []
    for r in rows.itertuples(index=False):
        t = truth[r.config_id]
        grid_rows.append({"config_id": r.config_id, "lr_fraction": r.lr_fraction, "momentum": r.momentum,
                          "batch_size": int(r.batch_size), "full_batch": bool(r.full_batch),
                          "predicted_diverged": bool(r.diverged), "predicted_final_error": r.predicted_final_error,
                          "predicted_cost_to_target_s": ranked.predicted_cost_to_target_s[r.config_id],
                          "real_cost_to_target_s": t["cost_s"],
                          "real_cost_median_step_s": t["cost_median_s"], "real_steps_to_target": t["steps"],
                          "real_final_error": t["final_error"], "real_diverged": t["diverged"],
                          "asha_steps": asha_costs[r.config_id]["last_step"],
                          "ttp_rank": None if r.config_id not in set(cands.config_id) else
                          int(cands.loc[cands.config_id == r.config_id, "rank"].iloc[0])})
    result["grid"] = grid_rows
    result["guided"] = [{"config_id": r.config_id, "rank": int(r.rank),
                         "predicted_cost_to_target_s": float(r.predicted_cost_to_target_s),
                         "trial_budget_steps": int(r.trial_budget_steps), "last_step": int(r.last_step),
                         "stopped": str(r.stopped), "real_cost_to_target_s": float(r.actual_cost_to_target_s)}
                        for r in cands.itertuples(index=False)]
    if args.quick:
        print(json.dumps(result, indent=1, default=str))
        return
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    import pandas as pd

    pd.DataFrame(grid_rows).to_csv(out / "tune_grid.csv", index=False)
    body = report(result)
    print(body)
    write_section("tune", body, COMMAND)


def _f(x, spec=".1f", none="-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report(result: Dict[str, Any]) -> str:
    """The section, from the bench's JSON (what main() measured)."""
    f, arms = result["facts"], result["arms"]
    grid = {g["config_id"]: g for g in result["grid"]}
    table = []
    for name, a in arms.items():
        pick = a["pick"]
        table.append([name, _f(a["compute_s"]), _f(a["prediction_s"]), _f(a["trial_train_s"]), a["trials"],
                      a["steps"], f"{a['samples'] / 1e3:.0f}k", _f(a["wall_s"], ".0f"), describe(grid, pick),
                      _f(a["pick_cost_s"], ".2f"), _f(a["pick_regret"], ".2f"), _f(a["pick_regret_median_step"], ".2f"),
                      _f(a["pick_final_error"], ".3f")])
    a = arms["ASHA"]
    table.append(["ASHA, conventional pick (lowest error at its last report)", "", "", "", "", "", "", "",
                  describe(grid, a["conventional_pick"]), _f(a["conventional_pick_cost_s"], ".2f"),
                  _f(a["conventional_pick_regret"], ".2f"), _f(a["conventional_pick_regret_median_step"], ".2f"),
                  _f(a["conventional_pick_final_error"], ".3f")])
    guided = []
    for r in result["guided"]:
        t = grid[r["config_id"]]
        guided.append([r["rank"], describe(grid, r["config_id"]), _f(r["predicted_cost_to_target_s"], ".2f"),
                       r["trial_budget_steps"], r["last_step"], r["stopped"], _f(r["real_cost_to_target_s"], ".2f"),
                       _f(t["real_cost_to_target_s"], ".2f"), _f(t["real_final_error"], ".3f")])
    # the configs ttp-ray never tries because they are predicted to diverge: what they really did
    flagged = [g for g in result["grid"] if g["predicted_diverged"]]
    survived = [g for g in flagged if not g["real_diverged"]]
    reach = [g for g in survived if g["real_cost_to_target_s"] is not None and math.isfinite(
        float(g["real_cost_to_target_s"]))]
    cheapest_flagged = min(reach, key=lambda g: float(g["real_cost_to_target_s"])) if reach else None
    diverge_note = (
        f"Of the {len(flagged)} configs predicted to diverge (which ttp-ray never tries), {len(survived)} did not "
        f"diverge for real"
        + (f"; the cheapest of them to the target, {describe(grid, cheapest_flagged['config_id'])}, costs "
           f"{float(cheapest_flagged['real_cost_to_target_s']):.2f} s (regret "
           f"{float(cheapest_flagged['real_cost_to_target_s']) / f['best_cost_s']:.2f}"
           + ("; the grid's best, which ttp-ray cannot pick" if cheapest_flagged["config_id"] == f["best"] else "")
           + ")." if cheapest_flagged else ".") if flagged else "No config is predicted to diverge.")
    first = grid[result["guided"][0]["config_id"]] if result["guided"] else None
    k1 = "" if first is None else (
        f" Trained alone (K = 1), ttp-ray's predicted best ({describe(grid, first['config_id'])}) would have regret "
        f"{_f(float(first['real_cost_to_target_s']) / f['best_cost_s'], '.2f')} "
        f"({_f(float(first['real_cost_median_step_s']) / f['best_cost_median_step_s'], '.2f')} with median step "
        f"times): the top {f['top']} trials are what finds the best.")
    ratio, within = result["asha_over_ttp_compute"], result["ttp_within_10pct"]
    verdict = (f"ttp-ray used **{ratio:.1f}x** less compute than ASHA and its pick is "
               f"{'within' if within else '**not** within'} 10 % of the best real cost "
               f"(regret {arms['ttp-ray']['pick_regret']:.2f}; {arms['ttp-ray']['pick_regret_median_step']:.2f} with "
               f"median step times); the figure to beat is >= 5x with a pick within 10 % (goal 10x): "
               f"{'met' if within and ratio >= 5 else '**not met**'}.")
    return "\n".join([
        "## Tuning: ttp-ray-guided vs ASHA vs the grid (issue 17)",
        "",
        f"Grid: digits-5to9 (N = 896), digits-cnn, cross-entropy, lr = {', '.join(f'{x:g}' for x in FRACTIONS)} x "
        f"max_stable_lr(m), m in {{0.9, 0}}, B in {{16, 64, full}}: {f['configs']} configs, {f['budget']} steps "
        f"logged every 5, seed 0; one local Ray (2 CPUs, one per trial); every arm trains through the same Tune "
        f"trainable (`ttp_ray.tune.train_trial`). Target: error {f['target']:.4f} (min + 0.25 (median - min) of the "
        f"predicted final errors). *ttp-ray*: `run_tune`, kernel computed (k = 512 class-trace countsketch, "
        f"{f['kernel_s']:.1f} s) and the grid predicted by the `{f['predictor']}` predictor ({f['shard_s']:.1f} s of "
        f"shards, its own extra work included), top {f['top']} by "
        f"predicted cost to the target, each stopped at {f['margin']:g} x its predicted steps to the target or on "
        f"reaching it. *ASHA*: `ASHAScheduler(time_attr='step', metric='error', mode='min', max_t={f['budget']}, "
        f"grace_period={f['grace']}, reduction_factor={f['reduction']:g})` over all configs. *grid*: every config, "
        f"whole budget. The grid's lrs are fractions of the stability limit resolved on the kernel: ASHA and the "
        f"grid get them for free.",
        "",
        "*Compute* = prediction (kernel + shards) + the optimiser-step seconds of every trial (forward, backward, "
        "update; the full-set evaluations of minibatch runs excluded); *samples* = trained steps x B (independent "
        "of the machine's load). *Pick* = the config with the lowest real cost to the target among the arm's own "
        "trials. A pick is scored by the grid's run of it: *real cost* = its steps to the target x its step time, "
        f"*regret* = that / the cheapest of the grid ({describe(grid, f['best'])}, "
        f"{_f(f['best_cost_s'], '.2f')} s), *final error* at {f['budget']} steps. Step times move with the load of "
        f"this shared machine, so the regret is also given with every run's steps to the target x the median step "
        f"time of the grid's runs at its batch size (" + ", ".join(f"B {b}: {t * 1e3:.1f} ms" for b, t in
                                                              f["median_step_time_s"].items()) + ").",
        "",
        md_table(["arm", "compute (s)", "prediction (s)", "trials (s)", "trials", "steps", "samples", "wall (s)",
                  "pick", "real cost (s)", "regret", "regret, median step time", "final error"], table),
        "",
        verdict + " One run on a shared, loaded machine (step times, and so the real costs, move with the load)."
        + k1,
        "",
        diverge_note,
        "",
        "ttp-ray's trials, predicted against real (the trial's own run, and the grid's run of the same config):",
        "",
        md_table(["rank", "config", "predicted cost (s)", "budget (steps)", "stopped at", "why", "real cost, trial (s)",
                  "real cost, grid (s)", "final error, grid"], guided),
        "",
        "Every config's predicted and real figures: runs/bench/tune_grid.csv; all numbers: runs/bench/tune.json.",
    ])


if __name__ == "__main__":
    main()
