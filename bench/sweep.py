"""Sweep engine benchmarks -> docs/BENCHMARKS.md, section ``sweep``.

1. Marginal cost: wall time of a 500-config sweep on one dataset / wall time of a 1-config sweep, both
   through :func:`ttp_ray.sweep.driver.run_sweep` on the same local Ray (started once, its start-up
   excluded), with the kernel loaded from the disk cache, and with the kernel computed by each sweep
   (``kernel.cache: false``). Target: <= 1.5.
2. Throughput: simulated configs per second per actor (one actor; configs / actor-side shard seconds)
   for GD-MSE, GD-CE and SGD (minibatch on the linearised model, and the paper's SDE).

Dataset digits-5to9 (N = 896, C = 5), backbone digits-cnn, the quickstart's kernel (class-trace
countsketch, k = 512) and budget (300 steps, logged every 5).

    .venv/bin/python bench/sweep.py            # full run, writes the section
    .venv/bin/python bench/sweep.py --quick    # small grids, prints only
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _measure import write_json  # noqa: E402
from _report import md_table, median, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/sweep.py"

BASE = {
    "name": "bench",
    "model": "digits-cnn",
    "datasets": ["digits-5to9"],
    "eps": [0.01],
    "criteria": ["loss", "error"],
    "budget": {"steps": 300},
    "kernel": {"k": 512, "class_trace": True},
    "simulation": {"momentum_mode": "heavy_ball", "paths": 4, "log_every": 5},
    "resources": {"actors": 1},
}

# 2 losses x 10 lr fractions x 5 momenta x 5 batch sizes = 500 configs
GRID_500 = {
    "losses": ["mse", "ce"],
    "lr": {"fraction_of_max_stable": {"geomspace": [0.01, 1.0, 10]}},
    "momentum": [0.0, 0.25, 0.5, 0.75, 0.9],
    "batch_size": ["full", 16, 32, 64, 128],
}
GD_MSE_500 = {  # 100 absolute lrs, a factor 2^(1/20) apart, x 5 momenta with 1/(1-m) = 1, 2, 4, 8, 16:
    "losses": ["mse"],  # lr/(1-m) coincide across momenta, so the ELR collapse shares simulations
    "lr": {"geomspace": [1e-4, 0.00309099625256, 100]},
    "momentum": [0.0, 0.5, 0.75, 0.875, 0.9375],
    "batch_size": ["full"],
    "simulation": {"momentum_mode": "auto", "paths": 4, "log_every": 5},  # ELR: lr/(1-m) collapses
}
FIGURES = {"marginal": [], "throughput": []}  # raw numbers of the tables, saved to runs/bench/sweep.json
GRID_1 = {"losses": ["mse"], "lr": {"fraction_of_max_stable": [0.5]}, "momentum": [0.0], "batch_size": ["full"]}

THROUGHPUT = {
    "GD-MSE": {"losses": ["mse"], "batch_size": ["full"]},
    "GD-CE": {"losses": ["ce"], "batch_size": ["full"]},
    "SGD (minibatch, heavy ball)": {"losses": ["mse", "ce"], "batch_size": [16, 64]},
    "SGD (SDE, ELR: the paper's), m in {0, 0.5}": {
        "losses": ["mse", "ce"], "batch_size": [16, 64], "momentum": [0.0, 0.5],
        "simulation": {"method": "sde", "momentum_mode": "elr", "paths": 4, "log_every": 5}},
    "SGD (SDE, ELR), m = 0.9, fractions {0.1, 0.5}": {
        "losses": ["mse", "ce"], "batch_size": [16, 64], "momentum": [0.9],
        "lr": {"fraction_of_max_stable": [0.1, 0.5]},
        "simulation": {"method": "sde", "momentum_mode": "elr", "paths": 4, "log_every": 5}},
}


def make_spec(grid: dict, *, cache: bool = True, **extra):
    from ttp_ray.sweep.spec import parse_spec

    d = copy.deepcopy(BASE)
    d.update(copy.deepcopy(grid))
    d.update(extra)
    d["kernel"] = dict(d["kernel"], cache=cache)
    return parse_spec(d)


def timed_sweep(spec, root: Path, tag: str):
    from ttp_ray.sweep.driver import run_sweep

    out = root / tag
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_sweep(spec, str(out), progress=False)
    wall = time.perf_counter() - t0
    assert res.complete, res.failures
    return wall, res


def marginal_cost(root: Path, grids, repeats: int):
    rows = []
    ones = {}
    for name, grid, cache in grids:
        if cache not in ones:
            ones[cache] = [timed_sweep(make_spec(GRID_1, cache=cache), root, f"one-{cache}-{i}")[0]
                           for i in range(repeats)]
        big, res = timed_sweep(make_spec(grid, cache=cache), root, f"big-{len(rows)}")
        n = res.plan.n_configs
        t1 = median(ones[cache])
        orchestration = big - res.shard_seconds
        kernel = "cached (loaded from disk)" if cache else "computed by each sweep"
        rows.append((name, kernel, n, _distinct(res), f"{t1:.1f}", f"{big:.1f}", f"**{big / t1:.2f}**",
                     f"{res.shard_seconds:.1f}", f"{orchestration:.1f}"))
        FIGURES["marginal"].append({"grid": name, "kernel": kernel, "configs": n, "one_config_s": t1,
                                    "one_config_runs_s": ones[cache], "grid_s": big, "ratio": big / t1,
                                    "shard_s": res.shard_seconds})
        print(f"marginal cost {name}, cache={cache}: 1 config {t1:.1f} s (runs {[round(x, 1) for x in ones[cache]]}), "
              f"{n} configs {big:.1f} s, ratio {big / t1:.2f}; shards {res.shard_seconds:.1f} s", flush=True)
    return rows


def throughput(root: Path, quick: bool):
    rows = []
    for name, grid in THROUGHPUT.items():
        g = {"lr": {"fraction_of_max_stable": {"geomspace": [0.02, 1.0, 4 if quick else 10]}},
             "momentum": [0.0, 0.9], **copy.deepcopy(grid)}
        sim = g.pop("simulation", None)
        spec = make_spec(g, **({"simulation": sim} if sim else {}))
        wall, res = timed_sweep(spec, root, f"tp-{name.split()[0]}-{len(rows)}")
        n = res.plan.n_configs
        rate = n / res.shard_seconds
        pred = _distinct(res)
        sim = _simulate_seconds(res.out)
        rows.append((name, n, pred, f"{res.shard_seconds:.1f}", f"**{rate:.1f}**", f"{sim:.1f}", f"{n / sim:.1f}",
                     f"{wall:.1f}"))
        FIGURES["throughput"].append({"class": name, "configs": n, "simulations": pred, "actor_s": res.shard_seconds,
                                      "configs_per_s": rate, "simulate_s": sim, "wall_s": wall})
        print(f"throughput {name}: {n} configs ({pred} simulations) in {res.shard_seconds:.1f} s of actor time "
              f"-> {rate:.1f} configs/s/actor; simulation alone {sim:.1f} s -> {n / sim:.1f} configs/s "
              f"(sweep wall {wall:.1f} s)", flush=True)
    return rows


def _simulate_seconds(out) -> float:
    """Engine time of the dynamics alone: simulate_seconds is per config (shared among a group's configs)."""
    from ttp_ray.sweep.output import read_table

    t = read_table(out, "predictions", columns=["config_id", "simulate_seconds"]).to_pandas()
    return float(t.drop_duplicates("config_id").simulate_seconds.sum())


def _distinct(res) -> int:
    return sum(d.sharded_simulations for d in res.plan.datasets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grids; print only")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/BENCHMARKS.md")
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args()

    import ray

    from ttp_ray.sweep.driver import start_local_ray

    if args.quick:
        grids = [("mixed GD + SGD (small)", dict(GRID_500, momentum=[0.0, 0.9], batch_size=["full", 32]), True),
                 ("GD-MSE (small)", dict(GD_MSE_500, lr={"geomspace": [1e-4, 2e-2, 10]}), False)]
    else:
        grids = [("mixed GD + SGD", GRID_500, True), ("GD-MSE", GD_MSE_500, True), ("GD-MSE", GD_MSE_500, False)]
    root = Path(tempfile.mkdtemp(prefix="ttp-ray-bench-sweep-"))
    start_local_ray(num_cpus=args.num_cpus or os.cpu_count())
    try:
        timed_sweep(make_spec(GRID_1), root, "warm")  # backbone + kernel into the disk caches
        mc = marginal_cost(root, grids, 1 if args.quick else 3)
        tp = throughput(root, args.quick)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if args.quick or args.no_write:
        return
    body = "\n".join([
        "## Sweep engine (`ttp-ray sweep`)",
        "",
        "Marginal cost: wall time of `run_sweep` for a 500-config grid on one dataset divided by that of a "
        "1-config sweep, same local Ray (its start-up excluded), one actor, fresh output directories; "
        "digits-5to9 (N = 896), digits-cnn, kernel class-trace countsketch k = 512, 300 steps logged every 5, "
        "heavy-ball momentum (discrete map for GD, minibatch SGD on the linearised model), 4 paths. "
        "*Mixed*: loss {mse, ce} x 10 lr fractions of max_stable_lr (0.01..1, geometric) x momentum "
        "{0, .25, .5, .75, .9} x B {full, 16, 32, 64, 128}. *GD-MSE*: 100 absolute lrs 1e-4 * 2^(j/20) x "
        "momentum {0, .5, .75, .875, .9375}, full batch, effective-lr momentum (configs with equal lr/(1-m) "
        "share a simulation). Target <= 1.5. The 1-config time is the median of 3. *Shards* is the "
        "actor-side time spent predicting (simulation, T_eps rows, step-time measurement); *orchestration* = "
        "wall - shards (actor start, kernel load or computation, Ray, Parquet).",
        "",
        md_table(["grid", "kernel", "configs", "distinct simulations", "1-config sweep s", "500-config sweep s",
                  "ratio", "shards s", "orchestration s"], mc),
        "",
        "Throughput: configs simulated per second per actor (configs / actor-side shard seconds, which include "
        "one step-time measurement per batch size and loss), and of the dynamics alone (sum of "
        "simulate_seconds), one actor, "
        "grids of 10 lr fractions (0.02..1) x momentum {0, 0.9} x the losses and batch sizes named "
        "(unless the row says otherwise).",
        "",
        md_table(["class", "configs", "distinct simulations", "actor s", "configs/s/actor", "simulation s",
                  "configs/s (simulation alone)", "sweep wall s"], tp),
    ])
    write_json("sweep.json", {**FIGURES, "command": COMMAND})  # read by bench/report.py
    write_section("sweep", body, COMMAND)
    print("wrote docs/BENCHMARKS.md section 'sweep'")


if __name__ == "__main__":
    main()
