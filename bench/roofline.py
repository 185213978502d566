"""How far each simulator is from this machine's arithmetic ceiling -> docs/BENCHMARKS.md, section ``roofline``.

For each class of ``bench/sweep.py``'s throughput grid (digits-5to9, N = 896, C = 5, digits-cnn, the
quickstart's kernel: class-trace countsketch k = 512; 300 steps logged every 5, 4 paths, heavy ball; 10 lr
fractions 0.02..1 of max_stable_lr x momentum {0, 0.9}), in this process, one torch thread:

* the floating-point work of the simulation, counted by ``torch.profiler`` (``with_flops``: the matrix
  products, which is where the simulators spend their arithmetic), per config;
* the time of the same prediction without the profiler (median of ``--repeats``), so the achieved GFLOP/s;
* the machine's GEMM rate at the same dtype and thread count (the best of the GEMM shapes the simulators
  use, measured in the same run): the *ceiling*, at most ``rate / flop per config`` configs per second.

The issue's target for simulation-alone throughput is 10x the rate it measured (GD-CE 11.7, minibatch SGD
15.9, SDE 5.2 configs/s); the table says how many GFLOP/s that would need next to what the machine does.
Predictors: ``frozen`` (Θ0 alone) and the default ``probed`` (its drift probes are computed once,
before the timing: they are training, not simulation; its warp runs each simulation ahead of the budget).

    .venv/bin/python bench/roofline.py            # writes the section
    .venv/bin/python bench/roofline.py --no-write # prints only (and saves runs/bench/roofline.json)
    .venv/bin/python bench/roofline.py --from-json  # the section again from runs/bench/roofline.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _measure import write_json  # noqa: E402
from _report import md_table, median, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/roofline.py"
DATASET, MODEL, K = "digits-5to9", "digits-cnn", 512
BUDGET, LOG_EVERY, PATHS = 300, 5, 4
FRACTIONS = [0.02 * (50 ** (i / 9)) for i in range(10)]  # geomspace(0.02, 1, 10), as bench/sweep.py
# the baseline (simulation alone, configs/s per actor) and the classes of bench/sweep.py's throughput table
CLASSES = {
    "GD-CE": dict(losses=("ce",), batches=(None,), sim={}, baseline=11.7),
    "SGD (minibatch, heavy ball)": dict(losses=("mse", "ce"), batches=(16, 64),
                                        sim=dict(method="minibatch", momentum_mode="heavy_ball"), baseline=15.9),
    "SGD (SDE, ELR), m in {0, 0.5}": dict(losses=("mse", "ce"), batches=(16, 64), momenta=(0.0, 0.5),
                                          sim=dict(method="sde", momentum_mode="elr"), baseline=5.2),
    # the same configs per loss: where each SGD simulator spends its arithmetic
    "SGD-CE (minibatch, heavy ball)": dict(losses=("ce",), batches=(16, 64),
                                           sim=dict(method="minibatch", momentum_mode="heavy_ball"), baseline=15.9),
    "SGD-CE (SDE, ELR)": dict(losses=("ce",), batches=(16, 64), sim=dict(method="sde", momentum_mode="elr"),
                              baseline=5.2),
    "SGD-MSE (minibatch, heavy ball)": dict(losses=("mse",), batches=(16, 64),
                                            sim=dict(method="minibatch", momentum_mode="heavy_ball"), baseline=15.9),
    "SGD-MSE (SDE, ELR)": dict(losses=("mse",), batches=(16, 64), sim=dict(method="sde", momentum_mode="elr"),
                               baseline=5.2),
}


def gemm_rate(dtype, shapes, repeats: int = 7) -> float:
    """Best GFLOP/s of ``a @ b`` over ``shapes`` ((m, k, n) each), median of ``repeats`` per shape."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm
        reps = max(1, int(2e8 // (2 * m * k * n)))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            ts.append((time.perf_counter() - t0) / reps)
        best = max(best, 2 * m * k * n / median(ts) / 1e9)
    return best


def class_configs(prep, spec):
    from ttp_ray.dynamics import SimConfig

    out = []
    for loss in spec["losses"]:
        for b in spec["batches"]:
            for m in spec.get("momenta", (0.0, 0.9)):
                for f in FRACTIONS:
                    out.append(SimConfig(lr=f * prep.max_stable_lr(m), momentum=m, batch_size=b, loss=loss))
    return out


def measure(prep, configs, settings, repeats: int):
    """(seconds: median of repeats, flop: profiler count of one run)."""
    from torch.profiler import ProfilerActivity, profile

    def run():
        return prep.predict(configs, budget_steps=BUDGET, eps_list=[0.01], settings=settings)

    run()  # warm: shared state (probes, bases) is built here, outside the timing
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as p:
        run()
    flop = float(sum(e.flops or 0 for e in p.key_averages()))
    return median(ts), flop


def section(figures: dict, repeats: int) -> str:
    """The section's text from the figures ``main`` measured (``--from-json``: from runs/bench/roofline.json)."""
    rate, cls = figures["gemm_gflops"], figures["classes"]
    rows = [(c["class"], c["predictor"], c["configs"], f"{c['gflop_per_config']:.2f}", f"{c['seconds']:.2f}",
             f"{c['configs_per_s']:.1f}", f"{c['achieved_gflops']:.1f}", f"{100 * c['achieved_gflops'] / rate:.0f}%",
             f"{c['ceiling_configs_per_s']:.1f}", f"{c['target_configs_per_s']:.0f}", f"**{c['target_needs_gflops']:.0f}**")
            for c in cls]
    head = ["class", "predictor", "configs", "GFLOP / config", "s", "configs/s", "GFLOP/s achieved",
            "of GEMM rate", "ceiling configs/s", "10x target configs/s", "GFLOP/s the target needs"]
    frac = [c["achieved_gflops"] / rate for c in cls]
    room = [c["ceiling_configs_per_s"] / c["configs_per_s"] for c in cls]
    need = [c["target_needs_gflops"] / rate for c in cls]
    beyond = sum(x > 1 for x in need)
    work = {(c["class"], c["predictor"]): c["gflop_per_config"] for c in cls}
    return (
        "## Roofline: the simulators against this machine's arithmetic (bench/roofline.py)\n\n"
        f"Simulation alone, in process, one torch thread, {figures['dtype']}: {DATASET} (N = {figures['n']}, "
        f"C = {figures['c']}), {MODEL}, class-trace countsketch k = {K} (rank {figures['rank']}), {BUDGET} steps logged "
        f"every {LOG_EVERY}, {PATHS} paths; 10 lr fractions 0.02..1 of max_stable_lr x momentum {{0, 0.9}} (the "
        "mixed SDE row: {0, 0.5}), the losses and batch sizes of `bench/sweep.py`'s throughput table; the last four "
        "classes split the SGD configs by loss. *GFLOP / config*: the matrix products' floating-point work counted by "
        "`torch.profiler` (`with_flops`), per config. *GEMM rate*: the best rate of a plain `a @ b` at the "
        f"simulators' shapes on this machine in the same run, **{rate:.1f} GFLOP/s**; *ceiling* = GEMM rate / GFLOP "
        "per config, the most configs/s that arithmetic allows here. *GFLOP/s the target needs*: 10x the issue's "
        f"baseline rate (GD-CE 11.7, minibatch SGD 15.9, SDE 5.2 configs/s) times the work per config. Median of "
        f"{repeats} runs (the probed predictor's probes computed once before the timing).\n\n"
        + md_table(head, rows)
        + f"\n\nReading it: the simulators run at {100 * min(frac):.0f}–{100 * max(frac):.0f} % of the machine's GEMM "
        f"rate, {min(room):.1f}–{max(room):.1f}x below their arithmetic ceiling. The issue's 10x would need "
        f"{min(need):.1f}–{max(need):.1f}x this core's whole GEMM rate; for {beyond} of the {len(cls)} rows that is "
        "more than the core can do at all, so on this CPU the 10x can only come from less arithmetic, not from "
        "better batching. For cross-entropy SGD the exact minibatch map does "
        f"{work[('SGD-CE (minibatch, heavy ball)', 'frozen')]:.2f} GFLOP per config where the SDE does "
        f"{work[('SGD-CE (SDE, ELR)', 'frozen')]:.2f}: why `method: auto` resolves SGD to it (docs/METHOD.md §4). The "
        "probed rows' extra work over the frozen ones is the default predictor's run-ahead (each config simulated "
        "up to max s budgets ahead, METHOD.md §14)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--from-json", action="store_true", help="rewrite the section from runs/bench/roofline.json")
    args = ap.parse_args()
    if args.from_json:
        import torch

        from _measure import read_json

        torch.set_num_threads(1)  # the machine line states the threads the figures were measured with
        figures = read_json("roofline.json")
        write_section("roofline", section(figures, figures.get("repeats", args.repeats)), COMMAND)
        return

    import torch

    from ttp_ray.data import load_dataset
    from ttp_ray.dynamics import SimOptions
    from ttp_ray.kernel import KernelOptions
    from ttp_ray.predict import PredictSettings
    from ttp_ray.predictors import PredictionInputs, get_predictor

    torch.set_num_threads(1)
    ds = load_dataset(DATASET)
    inputs = PredictionInputs(MODEL, ds, kernel=KernelOptions(k=K, class_trace=True))
    frozen = get_predictor("frozen").prepare(inputs)
    preps = {"frozen": frozen, "probed": get_predictor("probed").rebind(frozen)}
    st = frozen.state
    n, c, r = st.n, st.num_classes, int(st.eigvals.numel())
    dtype = st.f0.dtype if st.f0.is_floating_point() else torch.float32
    # the simulators' products: (N x r) lifts and projections of a few to a few hundred columns
    rate = gemm_rate(dtype, [(n, r, 64 * c), (n, r, 256 * c), (r, n, 256 * c)])
    print(f"GEMM rate ({dtype}, 1 thread): {rate:.1f} GFLOP/s; N={n} C={c} rank={r}", flush=True)
    figures = {"gemm_gflops": rate, "n": n, "c": c, "rank": r, "dtype": str(dtype), "repeats": args.repeats,
               "classes": []}
    for name, spec in CLASSES.items():
        for pname, prep in preps.items():
            configs = class_configs(prep, spec)
            settings = PredictSettings(sim=SimOptions(paths=PATHS, log_every=LOG_EVERY, **spec["sim"]))
            sec, flop = measure(prep, configs, settings, args.repeats)
            per = flop / len(configs)
            achieved = flop / sec / 1e9
            now, ceiling = len(configs) / sec, rate * 1e9 / per if per else float("inf")
            need = 10 * spec["baseline"] * per / 1e9
            figures["classes"].append({"class": name, "predictor": pname, "configs": len(configs),
                                       "gflop_per_config": per / 1e9, "seconds": sec, "configs_per_s": now,
                                       "achieved_gflops": achieved, "ceiling_configs_per_s": ceiling,
                                       "target_configs_per_s": 10 * spec["baseline"], "target_needs_gflops": need})
            print(f"{name} / {pname}: {len(configs)} configs, {per / 1e9:.2f} GFLOP each, {sec:.2f} s -> "
                  f"{now:.1f} configs/s, {achieved:.1f} GFLOP/s ({100 * achieved / rate:.0f}% of GEMM), "
                  f"ceiling {ceiling:.1f} configs/s; 10x target needs {need:.0f} GFLOP/s", flush=True)
    write_json("roofline.json", {**figures, "command": COMMAND})
    if not args.no_write:
        write_section("roofline", section(figures, args.repeats), COMMAND)


if __name__ == "__main__":
    main()
