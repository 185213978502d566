"""Cost bench (issue 7): predicting a whole grid vs fine-tuning it, measured back to back in one invocation.

    .venv/bin/python bench/cost.py                 # every config of sweeps/quickstart.yaml fine-tuned (~45 min here)
    .venv/bin/python bench/cost.py --sample 36     # 36 configs fine-tuned, the grid extrapolated by class
    .venv/bin/python bench/cost.py --tiny --no-write   # seconds: a 4-config grid of 20 steps (the test)

Prediction side: the product path, :func:`ttp_ray.sweep.driver.run_sweep` (what ``ttp-ray sweep`` runs) on the
spec with ground truth disabled, into a fresh output directory each time, starting and stopping its own
local Ray (``--num-cpus``, default 1: the actors run one after another on one core, like the fine-tunes):

* *kernel computed*: ``kernel.cache: false``, every dataset's kernel state computed by its actor;
* *kernel cached*: the state loaded from the disk cache (a warm-up run stores it first).

Medians over ``--repeats`` runs, the two variants interleaved. Also the cost of predicting one config with
its kernel: a 1-config sweep per dataset (Ray start-up included) and the in-process API without Ray
(:func:`ttp_ray.predict.load_state` with the cache off + :func:`~ttp_ray.predict.predict_grid` + the step-time
measurement the sweep does for ``predicted_cost_s``).

Fine-tuning side: the real trainer exactly as the sweep's ground-truth tasks run it,
:func:`ttp_ray.sweep.work.run_ground_truth` (``torch.optim.SGD``; lr resolved from the same
``max_stable_lr`` the prediction used; momentum, batch size, loss, budget, seed 0; full-set loss and error
logged every ``simulation.log_every`` steps, which T_eps needs), serially in this process, one thread. With
``--sample K`` a seeded sample of K configs stratified by (dataset, batch size) is fine-tuned and the grid's
time is extrapolated as sum over classes of (configs in class x mean time per sampled config).

Clocks: wall = ``time.perf_counter``. CPU seconds = user + system: for the prediction, of this process and
every process it starts (Ray's GCS, raylet, workers, actors), sampled every 0.1 s with psutil
(bench/_measure.py ``TreeCPU``); for the fine-tunes, of this process (``time.process_time``).
Writes section ``cost`` of docs/BENCHMARKS.md and runs/bench/cost.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _measure import TreeCPU, log, write_json  # noqa: E402
from _report import ROOT, md_table, write_section  # noqa: E402

SPEC = "sweeps/quickstart.yaml"
PAPER = "30-45x"  # the paper's cost claim (prediction vs training), METHOD.md


def fx(x: float) -> str:
    """A ratio: 3 significant figures at most, no needless decimals."""
    return f"{x:.0f}x" if x >= 100 else f"{x:.3g}x"


# ------------------------------------------------------------------------------------------- specs

def prediction_spec(spec, *, cache: bool):
    """The spec as the prediction side runs it: ground truth off, kernel cache on or off."""
    return dataclasses.replace(spec, kernel=dataclasses.replace(spec.kernel, cache=cache),
                               ground_truth=dataclasses.replace(spec.ground_truth, enabled=False))


def one_config_spec(spec, label: str):
    """One config of dataset ``label``: the first loss, lr 0.4 x max_stable_lr, the largest momentum, the smallest batch."""
    from ttp_ray.sweep.spec import LrGrid

    entry = next(d for d in spec.datasets if d.label == label)
    b = next((b for b in spec.batch_size if b is not None), spec.batch_size[0])
    value = 0.4 if spec.lr.relative else spec.lr.values[len(spec.lr.values) // 2]
    return dataclasses.replace(prediction_spec(spec, cache=False), datasets=(entry,), losses=(spec.losses[0],),
                               lr=LrGrid(spec.lr.mode, (value,)), momentum=(spec.momentum[-1],), batch_size=(b,))


def tiny_spec(spec):
    """--tiny: one dataset, 4 configs, 20 steps (the fast test)."""
    from ttp_ray.sweep.spec import Budget, LrGrid

    return dataclasses.replace(spec, datasets=spec.datasets[:1], losses=("mse",), lr=LrGrid(spec.lr.mode, (0.2, 0.4)),
                               momentum=(0.0,), batch_size=(None, 16), budget=Budget(steps=20))


# -------------------------------------------------------------------------------------- prediction

def timed_sweep(spec, root: Path, tag: str, num_cpus: int) -> dict:
    from ttp_ray.sweep.driver import run_sweep

    out = root / tag
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with TreeCPU() as cpu:
        res = run_sweep(spec, str(out), fresh=True, num_cpus=num_cpus, progress=False)
    wall = time.perf_counter() - t0
    if not res.complete:
        raise RuntimeError(f"sweep {tag} incomplete: {res.failures}")
    shutil.rmtree(out, ignore_errors=True)
    kernel = {k: float(v.get("kernel_load_seconds", 0.0)) for k, v in res.datasets.items()}
    return {"wall_s": wall, "cpu_s": cpu.seconds, "driver_cpu_s": cpu.own_seconds, "processes": cpu.processes,
            "shard_s": float(res.shard_seconds), "configs": res.plan.n_configs, "kernel_s": kernel,
            "cache_hit": {k: bool(v.get("kernel_cache_hit")) for k, v in res.datasets.items()},
            "datasets": res.datasets}


def api_one_config(spec, label: str) -> dict:
    """One config predicted in-process, no Ray: kernel computed (cache off), simulation, T_eps rows, step time."""
    from ttp_ray.finetune import measure_step_time
    from ttp_ray.predict import load_state, predict_grid
    from ttp_ray.sweep.plan import DatasetSize, build_plan, resolve_lr, sim_config

    s = one_config_spec(spec, label)
    entry = s.datasets[0]
    k = s.kernel
    t0, c0 = time.perf_counter(), time.process_time()
    prep = load_state(s.model, entry.ref, k.options(), head_seed=k.head_seed, trainable=k.trainable, cache=False)
    plan = build_plan(s, {label: DatasetSize(prep.n, int(prep.state.num_classes), "loaded")})
    c = plan.datasets[0].configs[0]
    lr = resolve_lr(c, prep.max_stable_lr)
    predict_grid(prep, [sim_config(c, lr)], budget_steps=c.budget_steps, eps_list=list(s.eps),
                 settings=s.simulation.settings(s.criteria))
    measure_step_time(prep.model, prep.dataset, c.batch_size, c.loss, steps=s.cost.step_time_steps,
                      trainable=k.trainable)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "kernel_s": float(prep.state.meta.get("total_seconds", prep.kernel_seconds))}


def median_of(runs: List[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


# ------------------------------------------------------------------------------------- fine-tuning

def stratified_sample(configs, k: Optional[int], seed: int) -> List:
    """All configs (k None or >= len), else k of them spread evenly over the (dataset, batch size) classes
    (a seeded draw inside each class; the remainder goes to the first classes in grid order)."""
    if k is None or k >= len(configs):
        return list(configs)
    classes: Dict[tuple, list] = defaultdict(list)
    for c in configs:
        classes[(c.dataset, c.batch_size)].append(c)
    keys = list(classes)
    if k < len(keys):
        raise SystemExit(f"--sample: must be at least the number of (dataset, batch size) classes, {len(keys)}")
    rng = random.Random(seed)
    chosen = set()
    for i, key in enumerate(keys):
        want = min(len(classes[key]), k // len(keys) + (1 if i < k % len(keys) else 0))
        chosen.update(c.config_id for c in rng.sample(classes[key], want))
    return [c for c in configs if c.config_id in chosen]


def finetune_configs(spec, plan, max_stable: Dict[str, Dict[str, float]], sample) -> List[dict]:
    from ttp_ray.stability import max_stable_lr
    from ttp_ray.sweep.plan import GroundTruthRun, resolve_lr
    from ttp_ray.sweep.work import GroundTruthJob, run_ground_truth

    rows = []
    for i, c in enumerate(sample):
        msl = max_stable[c.dataset]
        lr = resolve_lr(c, lambda m: max_stable_lr(*msl, m))
        job = GroundTruthJob(spec, GroundTruthRun(c, 0), lr, max_stable_lr(*msl, c.momentum))
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_ground_truth(job)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        t = out.rows.to_pydict()
        rows.append({"config_id": c.config_id, "dataset": c.dataset, "batch_size": c.batch_size, "loss": c.loss,
                     "lr_fraction": c.lr_fraction, "momentum": c.momentum, "wall_s": wall, "cpu_s": cpu,
                     "train_s": float(t["train_seconds"][0]), "diverged": bool(t["diverged"][0])})
        log(f"  fine-tune {i + 1}/{len(sample)} {c.dataset} B={c.batch_size or 'full'} {c.loss} "
            f"f={c.lr_fraction} m={c.momentum}: {wall:.1f}s wall, {cpu:.1f}s CPU"
            + (" (diverged)" if rows[-1]["diverged"] else ""))
    return rows


def extrapolate(plan, rows: List[dict]) -> dict:
    """Grid totals from per-class means (exact sums when every config was run), with the sampling s.e."""
    counts: Dict[tuple, int] = defaultdict(int)
    for d in plan.datasets:
        for c in d.configs:
            counts[(c.dataset, c.batch_size)] += 1
    by: Dict[tuple, list] = defaultdict(list)
    for r in rows:
        by[(r["dataset"], r["batch_size"])].append(r)
    classes, tot = [], {"wall_s": 0.0, "cpu_s": 0.0, "train_s": 0.0}
    var = 0.0
    for key, n in counts.items():
        got = by[key]
        m = {f: statistics.fmean(r[f] for r in got) for f in tot}
        for f in tot:
            tot[f] += n * m[f]
        k = len(got)
        if 1 < k < n:
            var += n * n * statistics.variance([r["wall_s"] for r in got]) / k * (1 - k / n)
        classes.append({"dataset": key[0], "batch_size": key[1], "configs": n, "sampled": k, **{f"mean_{f}": v for f, v in m.items()},
                        "diverged": sum(r["diverged"] for r in got)})
    measured_all = all(c["sampled"] == c["configs"] for c in classes)
    return {**tot, "wall_se_s": math.sqrt(var), "classes": classes, "measured_all": measured_all,
            "configs": sum(counts.values()), "sampled": len(rows)}


def _weighted(classes: List[dict], label: str, key: str) -> float:
    """Mean per config over dataset ``label``'s grid (classes weighted by their config counts)."""
    cs = [c for c in classes if c["dataset"] == label]
    return sum(c[key] * c["configs"] for c in cs) / sum(c["configs"] for c in cs)


# -------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--sample", type=int, default=None, help="fine-tune K configs (stratified) instead of all")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument("--repeats", type=int, default=3, help="prediction runs per variant (median)")
    ap.add_argument("--num-cpus", type=int, default=1, help="CPUs of the local Ray of each prediction sweep")
    ap.add_argument("--tiny", action="store_true", help="a 4-config, 20-step grid on one dataset (test)")
    ap.add_argument("--no-write", action="store_true", help="print only: no docs/BENCHMARKS.md, no runs/bench/cost.json")
    args = ap.parse_args(argv)

    import torch

    from ttp_ray.sweep.driver import plan_sweep, preflight
    from ttp_ray.sweep.spec import load_spec

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    spec = load_spec(ROOT / args.spec)
    if args.tiny:
        spec = tiny_spec(spec)
    repeats = 1 if args.tiny else args.repeats
    plan = plan_sweep(spec, preflight(spec))
    n_cfg = plan.n_configs
    labels = [d.label for d in plan.datasets]
    root = Path(tempfile.mkdtemp(prefix="ttp-ray-bench-cost-"))
    try:
        # ---------------------------------------------------------------- prediction
        log(f"prediction: {n_cfg} configs over {labels}, local Ray with {args.num_cpus} CPU(s)")
        warm = timed_sweep(prediction_spec(spec, cache=True), root, "warm", args.num_cpus)  # stores the kernel
        max_stable = {k: v["limit"] for k, v in warm["datasets"].items()}
        grid = {"computed": [], "cached": []}
        for i in range(repeats):
            for variant in ("computed", "cached"):
                r = timed_sweep(prediction_spec(spec, cache=variant == "cached"), root, f"{variant}-{i}", args.num_cpus)
                grid[variant].append(r)
                log(f"  grid, kernel {variant}: {r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s CPU "
                    f"({r['processes']} processes), shards {r['shard_s']:.1f}s, kernel {r['kernel_s']}")
        for r in grid["cached"]:
            assert all(r["cache_hit"].values()), r["cache_hit"]
        one: Dict[str, Dict[str, list]] = {lab: {"sweep": [], "api": []} for lab in labels}
        for i in range(repeats):
            for lab in labels:
                r = timed_sweep(one_config_spec(spec, lab), root, f"one-{lab}-{i}", args.num_cpus)
                one[lab]["sweep"].append(r)
                a = api_one_config(spec, lab)
                one[lab]["api"].append(a)
                log(f"  1 config on {lab}, kernel computed: sweep {r['wall_s']:.1f}s wall / {r['cpu_s']:.1f}s CPU; "
                    f"API (no Ray) {a['wall_s']:.1f}s wall / {a['cpu_s']:.1f}s CPU")
        # ---------------------------------------------------------------- fine-tuning
        configs = [c for d in plan.datasets for c in d.configs]
        sample = stratified_sample(configs, args.sample, args.seed)
        log(f"fine-tuning {len(sample)} of {n_cfg} configs, serially, one thread")
        t_ft = time.perf_counter()
        ft_rows = finetune_configs(spec, plan, max_stable, sample)
        ft_wall = time.perf_counter() - t_ft
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ft = extrapolate(plan, ft_rows)

    pred = {v: {"wall_s": median_of(rs, "wall_s"), "cpu_s": median_of(rs, "cpu_s"), "shard_s": median_of(rs, "shard_s"),
                "runs": [{k: r[k] for k in ("wall_s", "cpu_s", "driver_cpu_s", "shard_s", "kernel_s", "processes")}
                         for r in rs]} for v, rs in grid.items()}
    one_cfg = {lab: {kind: {"wall_s": median_of(v[kind], "wall_s"), "cpu_s": median_of(v[kind], "cpu_s")}
                     for kind in ("sweep", "api")} for lab, v in one.items()}
    ft_mean = {lab: _weighted(ft["classes"], lab, "mean_wall_s") for lab in labels}
    ft_mean_cpu = {lab: _weighted(ft["classes"], lab, "mean_cpu_s") for lab in labels}
    result = {
        "spec": args.spec, "tiny": args.tiny, "configs": n_cfg, "datasets": labels, "num_cpus": args.num_cpus,
        "repeats": repeats, "sample": args.sample, "seed": args.seed, "prediction": pred, "one_config": one_cfg,
        "finetune": {**ft, "rows": ft_rows, "run_wall_s": ft_wall, "mean_wall_s_by_dataset": ft_mean,
                     "mean_cpu_s_by_dataset": ft_mean_cpu},
        "ratios": {
            "grid_wall_computed": ft["wall_s"] / pred["computed"]["wall_s"],
            "grid_cpu_computed": ft["cpu_s"] / pred["computed"]["cpu_s"],
            "grid_wall_cached": ft["wall_s"] / pred["cached"]["wall_s"],
            "grid_cpu_cached": ft["cpu_s"] / pred["cached"]["cpu_s"],
            "grid_steps_only_computed": ft["train_s"] / pred["computed"]["wall_s"],
            "per_config_amortised": (ft["wall_s"] / n_cfg) / (pred["computed"]["wall_s"] / n_cfg),
            "per_config_marginal": (ft["wall_s"] / n_cfg) / (pred["computed"]["shard_s"] / n_cfg),
            "per_config_one_sweep": {lab: ft_mean[lab] / one_cfg[lab]["sweep"]["wall_s"] for lab in labels},
            "per_config_one_api": {lab: ft_mean[lab] / one_cfg[lab]["api"]["wall_s"] for lab in labels},
            "per_config_one_api_cpu": {lab: ft_mean_cpu[lab] / one_cfg[lab]["api"]["cpu_s"] for lab in labels},
        },
        "total_s": time.perf_counter() - t_all,
    }
    body = report(result, spec)
    print(body)
    if args.tiny or args.no_write:
        return
    write_json("cost.json", result)
    cmd = ".venv/bin/python bench/cost.py" + (f" --sample {args.sample}" if args.sample else "") + \
        (f" --spec {args.spec}" if args.spec != SPEC else "")
    write_section("cost", body, cmd)
    log("wrote docs/BENCHMARKS.md section 'cost' and runs/bench/cost.json")


def report(r: dict, spec) -> str:
    pred, ft, ra, n = r["prediction"], r["finetune"], r["ratios"], r["configs"]
    how = ("measured: every config fine-tuned" if ft["measured_all"] else
           f"extrapolated from a seeded sample of K = {ft['sampled']} configs (seed {r['seed']}) stratified by "
           f"(dataset, batch size): sum over the {len(ft['classes'])} classes of configs x mean per sampled config; "
           f"+- one standard error of the sampling {ft['wall_se_s']:.0f} s")
    b = [b for b in spec.batch_size if b is not None]
    grid_rows = [
        ["prediction, kernel computed (`kernel.cache: false`)", f"{pred['computed']['wall_s']:.1f}",
         f"{pred['computed']['cpu_s']:.1f}", "-", "-"],
        ["prediction, kernel cached (loaded from disk)", f"{pred['cached']['wall_s']:.1f}", f"{pred['cached']['cpu_s']:.1f}",
         "-", "-"],
        ["fine-tuning (real trainer, curves logged)", f"{ft['wall_s']:.0f}", f"{ft['cpu_s']:.0f}",
         f"**{fx(ra['grid_wall_computed'])}** / {fx(ra['grid_wall_cached'])}",
         f"**{fx(ra['grid_cpu_computed'])}** / {fx(ra['grid_cpu_cached'])}"],
        ["fine-tuning, optimiser steps alone (evaluations excluded)", f"{ft['train_s']:.0f}", "-",
         f"{fx(ra['grid_steps_only_computed'])} / -", "-"],
    ]
    per = []
    mean_all = ft["wall_s"] / n
    per.append(["fine-tuning, mean over the grid", f"{mean_all:.2f}", "1"])
    per.append(["prediction, amortised: grid sweep (kernel computed) / configs", f"{pred['computed']['wall_s'] / n:.3f}",
                f"**{fx(ra['per_config_amortised'])}**"])
    per.append(["prediction, marginal: actor-side shard seconds / configs (kernel and Ray excluded)",
                f"{pred['computed']['shard_s'] / n:.3f}", fx(ra['per_config_marginal'])])
    for lab in r["datasets"]:
        o = r["one_config"][lab]
        fm = ft["mean_wall_s_by_dataset"][lab]
        per.append([f"fine-tuning, mean on {lab}", f"{fm:.2f}", "1"])
        per.append([f"1-config sweep on {lab}, kernel computed, Ray start-up included", f"{o['sweep']['wall_s']:.2f}",
                    f"**{fx(ra['per_config_one_sweep'][lab])}**"])
        per.append([f"1 config on {lab} through the API (no Ray): kernel computed + simulation + step time",
                    f"{o['api']['wall_s']:.2f}", f"**{fx(ra['per_config_one_api'][lab])}** "
                                                 f"(CPU {fx(ra['per_config_one_api_cpu'][lab])})"])
    classes = [[c["dataset"], c["batch_size"] or "full", c["configs"], c["sampled"], f"{c['mean_wall_s']:.2f}",
                f"{c['mean_cpu_s']:.2f}", f"{c['mean_train_s']:.2f}", c["diverged"]] for c in ft["classes"]]
    lines = [
        "## Cost: predicting a grid vs fine-tuning it (issue 7)",
        "",
        f"Grid: `{r['spec']}`{' (--tiny)' if r['tiny'] else ''}, {n} configs over {', '.join(r['datasets'])} "
        f"({spec.model}, {len(spec.losses)} losses x {len(spec.lr.values)} lr x {len(spec.momentum)} momenta x "
        f"batch sizes full, {', '.join(map(str, b))}; budget {spec.budget.steps} steps, curves every "
        f"{spec.simulation.log_every}). Prediction: `run_sweep` (the `ttp-ray sweep` path) with ground truth "
        f"disabled, a fresh output directory each run, its own local Ray with {r['num_cpus']} CPU (start-up and "
        f"shut-down included), median of {r['repeats']}. Fine-tuning: `run_ground_truth` (the sweep's ground-truth "
        f"task: `torch.optim.SGD`, same lr from the same max_stable_lr, momentum, batch, loss, budget, seed 0, "
        f"full-set loss and error every {spec.simulation.log_every} steps), serially, one thread. Wall = "
        "perf_counter. CPU = user + system: prediction, this process and every process it starts (Ray's GCS, "
        "raylet, workers, actors; psutil, sampled every 0.1 s); fine-tuning, this process.",
        "",
        f"Fine-tuning time of the grid: {how}.",
        "",
        "### Whole grid",
        "",
        md_table(["side", "wall s", "CPU s", "ratio fine-tuning / prediction, wall (kernel computed / cached)",
                  "ratio, CPU (computed / cached)"], grid_rows),
        "",
        f"### Per config (the paper: {PAPER} cheaper to predict one config, kernel included, than to train it)",
        "",
        md_table(["quantity", "wall s", "fine-tuning / this"], per),
        "",
        f"The 1-config prediction is one SGD config ({spec.losses[0]}, lr "
        f"{'0.4 x max_stable_lr' if spec.lr.relative else 'the middle value'}, m = {spec.momentum[-1]}, "
        f"B = {b[0] if b else 'full'}; two thirds of the grid are SGD), compared with the mean fine-tune of its "
        "dataset over the grid.",
        "",
        "### Fine-tuning by class",
        "",
        md_table(["dataset", "batch", "configs", "fine-tuned", "mean wall s", "mean CPU s",
                  "mean optimiser-step s", "diverged (stopped early)"], classes),
        "",
        f"Bench runtime {r['total_s']:.0f} s (fine-tuning {ft['run_wall_s']:.0f} s).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
