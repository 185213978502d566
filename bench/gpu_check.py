"""GPU check (issue 7): the kernel and a sweep on CUDA at a size this project's CPU machines cannot run, and
CPU/GPU agreement of predictions from the same kernel state. Run it through ``bench/gpu_check.sh`` (it
installs what is missing); ``--smoke`` runs the same code path at a tiny size on the CPU.

1. **big**: :func:`bench.scaling.measure_point` on CUDA: ``synthetic:n=50000,classes=10,size=32,channels=3``
   (CIFAR-sized), torchvision ResNet-18 with seeded random weights (``resnet18:PATH``, a checkpoint this
   script saves: no ImageNet download), default kernel (one-probe class-trace count sketch, k = 2048), eigen
   step, and every simulation engine sweeps/all_datasets.yaml uses (2 configs each, 100 steps, 8 paths);
   time and peak GPU memory (``torch.cuda.max_memory_allocated``) of each step, one epoch of forward+backward;
2. **arch224**: the same backbone at 224 x 224 (the paper datasets' resolution), N = 2048: kernel and
   forward+backward per sample: what bench/project.py needs for the all_datasets projection;
3. **sweep**: :func:`ttp_ray.sweep.driver.run_sweep` with ``resources.device: cuda`` on the N = 50000 set:
   24 configs (mse/ce x 3 lr fractions x m {0, 0.9} x B {full, 128}), 500 steps, kernel computed;
4. **agreement**: one kernel state (digits-cnn on ``synthetic:n=1000,classes=10,size=8``, computed on the
   CPU) predicted on the CPU and on CUDA (``state.to("cuda")``): T_hat_eps per (config, criterion, eps) must
   be equal or within one logged step (``log_every``; float32 vs float64 rounding can move a threshold
   crossing by one logged point). Also the kernel computed on CUDA vs on the CPU: top-10 eigenvalues
   (relative, tolerance 1e-2: cuDNN convolutions run in TF32 by default).

Figures go to ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.md`` when ``OUT`` is set, else runs/bench/; a full
(non-smoke) run also writes runs/bench/gpu_check.json and section ``gpu`` of docs/BENCHMARKS.md.
``--from-json PATH`` rewrites that section (and runs/bench/gpu_check.json) from a fetched gpu_check.json.
Exit status 1 when the agreement check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _measure import log, write_json  # noqa: E402

COMMAND = "bench/gpu_check.sh"
SIZES = {  # full run on CUDA / --smoke on the CPU
    "full": {"n": 50000, "size": 32, "arch_n": 2048, "sweep_steps": 500, "budget": 100, "agree_n": 1000},
    "smoke": {"n": 256, "size": 32, "arch_n": 10, "sweep_steps": 20, "budget": 10, "agree_n": 300},
}


def agreement(device: str, n: int) -> dict:
    """Predictions of one CPU-computed kernel state on the CPU and on ``device``; kernel on both."""
    from ttp_ray.data import load_dataset
    from ttp_ray.dynamics import SimConfig, SimOptions
    from ttp_ray.kernel import KernelOptions, compute_kernel_state
    from ttp_ray.models import build_finetune_model
    from ttp_ray.predict import PredictSettings, predict_grid

    ds = load_dataset(f"synthetic:n={n},classes=10,size=8,seed=0")
    model = build_finetune_model("digits-cnn", 10)
    opts = KernelOptions(k=512)
    st = compute_kernel_state(model, ds, opts, device="cpu")
    st_dev = compute_kernel_state(model, ds, opts, device=device)
    top = min(10, st.eigvals.numel(), st_dev.eigvals.numel())
    eig_rel = float(((st_dev.eigvals[:top] - st.eigvals[:top]).abs() / st.eigvals[:top]).max())
    log_every, budget, eps = 5, 200, [0.05, 0.01]
    rows = {}
    cases = {
        "GD-MSE": (SimOptions(method="discrete", log_every=log_every), "mse", None, 0.0),
        "GD-CE": (SimOptions(method="discrete", log_every=log_every), "ce", None, 0.0),
        "SDE-CE": (SimOptions(method="sde", paths=4, log_every=log_every), "ce", 64, 0.0),
        "minibatch-MSE": (SimOptions(method="minibatch", momentum_mode="heavy_ball", paths=4, log_every=log_every),
                          "mse", 64, 0.9),
    }
    worst_steps, worst_loss, mismatches, compared = 0, 0.0, [], 0
    for name, (so, loss, b, m) in cases.items():
        cfgs = [SimConfig(lr=f * st.max_stable_lr(m), momentum=m, batch_size=b, loss=loss) for f in (0.2, 0.5, 0.9)]
        settings = PredictSettings(sim=so, eps_mode="relative")
        a = predict_grid(st, cfgs, budget_steps=budget, eps_list=eps, settings=settings)
        g = predict_grid(st.to(device), cfgs, budget_steps=budget, eps_list=eps, settings=settings)
        for pa, pg in zip(a, g):
            fl = abs(pa.result.loss[-1] - pg.result.loss[-1]) / max(abs(pa.result.loss[-1]), 1e-12)
            worst_loss = max(worst_loss, float(fl))
            for ra, rg in zip(pa.rows, pg.rows):
                compared += 1
                ta, tg = ra["predicted_steps"], rg["predicted_steps"]
                if ta is None or tg is None:
                    if ta != tg:
                        mismatches.append(f"{name} lr={pa.config.lr:.3g} {ra['criterion']} eps={ra['eps']}: {ta} vs {tg}")
                    continue
                d = abs(int(ta) - int(tg))
                worst_steps = max(worst_steps, d)
                if d > log_every:
                    mismatches.append(f"{name} lr={pa.config.lr:.3g} {ra['criterion']} eps={ra['eps']}: {ta} vs {tg}")
        rows[name] = len(cfgs)
    return {"n": n, "device": device, "configs": rows, "compared_rows": compared, "max_abs_step_diff": worst_steps,
            "tolerance_steps": log_every, "max_rel_final_loss_diff": worst_loss, "mismatches": mismatches,
            "kernel_top10_eig_max_rel_diff": eig_rel, "kernel_tolerance": 1e-2,
            "ok": not mismatches and eig_rel <= 1e-2, "budget": budget}


def sweep_on_device(device: str, n: int, size: int, model: str, steps: int) -> dict:
    from ttp_ray.sweep.driver import run_sweep
    from ttp_ray.sweep.spec import parse_spec

    spec = parse_spec({
        "name": "gpu-check", "model": model, "datasets": [f"synthetic:n={n},classes=10,size={size},channels=3,seed=0"],
        "losses": ["mse", "ce"], "lr": {"fraction_of_max_stable": [0.05, 0.3, 0.9]}, "momentum": [0.0, 0.9],
        "batch_size": ["full", 128], "eps": [0.01, 0.05], "criteria": ["loss", "error"], "budget": {"steps": steps},
        "kernel": {"k": 2048, "class_trace": True, "memory_cap_mb": 4096, "cache": False},
        "simulation": {"paths": 8, "log_every": 20}, "cost": {"step_time_max_batch": 512},
        "resources": {"actors": 1, "cpus_per_actor": 1, "device": device,
                      "gpus_per_actor": 1 if device.startswith("cuda") else 0},
    })
    out = Path(tempfile.mkdtemp(prefix="ttp-ray-gpu-check-"))
    try:
        t0 = time.perf_counter()
        res = run_sweep(spec, str(out), fresh=True, progress=False)
        wall = time.perf_counter() - t0
        info = next(iter(res.datasets.values()), {})
        return {"wall_s": wall, "configs": res.plan.n_configs, "complete": bool(res.complete), "failures": res.failures,
                "shard_s": float(res.shard_seconds), "kernel_s": float(info.get("kernel_seconds", float("nan"))),
                "device": info.get("device"), "steps": steps, "n": n, "size": size}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def fit_n(n: int, ms_per_sample: float, seconds: float) -> int:
    """``n``, or the largest round number of samples whose kernel (``ms_per_sample``) fits in ``seconds``."""
    if n * ms_per_sample / 1e3 <= seconds:
        return n
    return max(min(n, 1000), int(max(seconds, 0.0) / (ms_per_sample / 1e3)) // 1000 * 1000)


def run(smoke: bool, time_limit: float) -> dict:
    import torch

    from scaling import measure_point, resnet18_checkpoint

    size = SIZES["smoke" if smoke else "full"]
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "run with --smoke for the CPU path")
    if smoke:
        torch.set_num_threads(1)
    t_all = time.perf_counter()
    model = resnet18_checkpoint()
    from _report import machine_facts

    facts = {"machine": machine_facts(), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
             "torch": torch.__version__,
             "cuda": torch.version.cuda, "smoke": smoke, "model": "torchvision resnet18, random weights (seed 0)"}
    res: dict = {"facts": facts, "sizes": size}
    log(f"agreement (CPU vs {device})")
    res["agreement"] = agreement(device, size["agree_n"])
    log(f"  {res['agreement']['compared_rows']} rows, max |dT| {res['agreement']['max_abs_step_diff']}, "
        f"kernel eig diff {res['agreement']['kernel_top10_eig_max_rel_diff']:.2e}, ok {res['agreement']['ok']}")
    log(f"arch224: N={size['arch_n']} 224x224x3 on {device}")
    res["arch224"] = measure_point({"n": size["arch_n"], "k": 2048, "classes": 10, "size": 224, "channels": 3,
                                    "model": model, "device": device, "sims": False, "epoch": True,
                                    "epoch_batch": 128 if not smoke else 5, "memory_cap_mb": 4096})
    ms = res["arch224"]["kernel"]["ms_per_sample"]
    log(f"  kernel {ms:.2f} ms/sample, epoch {res['arch224']['epoch']['ms_per_sample']:.2f} ms/sample")
    # the 32 x 32 kernel costs at most the 224 x 224 one per sample: size N to what the time left allows
    n_big = fit_n(size["n"], ms, 0.45 * (time_limit - (time.perf_counter() - t_all)))
    res["big_n_reduced_from"] = None if n_big == size["n"] else size["n"]
    log(f"big: N={n_big} {size['size']}x{size['size']}x3 on {device}")
    res["big"] = measure_point({"n": n_big, "k": 2048, "classes": 10, "size": size["size"], "channels": 3,
                                "model": model, "device": device, "budget": size["budget"], "configs": 2,
                                "sims": True, "epoch": True, "epoch_batch": 128, "memory_cap_mb": 4096})
    log("  " + ", ".join(f"{k} {res['big'][k]['seconds']:.1f}s" for k in res["big"] if isinstance(res["big"][k], dict)
                         and "seconds" in res["big"][k]))
    per_sample_s = res["big"]["kernel"]["seconds"] / n_big
    left = time_limit - (time.perf_counter() - t_all)
    n_sweep = fit_n(n_big, 1e3 * per_sample_s, left - 90.0)  # the sweep computes its kernel again, plus Ray
    if left > 120.0:
        log(f"sweep on {device}: N={n_sweep}")
        res["sweep"] = sweep_on_device(device, n_sweep, size["size"], model, size["sweep_steps"])
        log(f"  {res['sweep']['configs']} configs in {res['sweep']['wall_s']:.1f}s (kernel {res['sweep']['kernel_s']:.1f}s)")
    else:
        res["sweep"] = None
        log(f"sweep skipped: {left:.0f}s of the {time_limit:.0f}s limit left")
    res["total_s"] = time.perf_counter() - t_all
    return res


def fmt_mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def report(res: dict) -> str:
    from _report import md_table

    f, b, a, s, ag = res["facts"], res["big"], res["arch224"], res.get("sweep"), res["agreement"]
    steps = ["kernel", "eigen", "GD-MSE", "GD-CE", "SDE-MSE", "SDE-CE", "minibatch-CE"]
    rows = [[st, f"{b[st]['seconds']:.2f}", fmt_mb(b[st].get("gpu_mb")), fmt_mb(b[st].get("rss_mb"))] for st in steps
            if st in b]
    lines = [
        "## GPU check (`bench/gpu_check.sh`)",
        "",
        f"Device {f['device']}, torch {f['torch']} (CUDA {f['cuda']}), {f['model']}. "
        + ("**Smoke run (CPU, tiny sizes): proves the script, not the GPU.** " if f["smoke"] else ""),
        "",
        f"### N = {b['n']}, {res['sizes']['size']} x {res['sizes']['size']} x 3, C = 10, k = 2048 "
        f"(D = {b['num_params']:,})",
        "",
        (f"N reduced from {res['big_n_reduced_from']} to fit the time limit (the kernel's measured cost per sample "
         "at 224 x 224 said the full size would not).\n" if res.get("big_n_reduced_from") else ""),
        f"Epoch of forward + backward (batch {b['epoch']['batch']}): {b['epoch']['seconds']:.2f} s. Simulations: 2 configs "
        f"per engine, {res['sizes']['budget']} steps, logged every 20, 8 paths for the stochastic ones.",
        "",
        md_table(["step", "seconds", "peak GPU MB (above start)", "peak host RSS MB"], rows),
        "",
        f"### 224 x 224 (N = {a['n']})",
        "",
        f"Kernel {a['kernel']['ms_per_sample']:.3f} ms / sample (batch {a['kernel']['batch_size']}, peak GPU "
        f"+{fmt_mb(a['kernel'].get('gpu_mb'))} MB); forward + backward {a['epoch']['ms_per_sample']:.3f} ms / sample "
        f"(batch {a['epoch']['batch']}); kernel / epoch = {a['kernel']['seconds'] / a['epoch']['seconds']:.2f}.",
        "",
    ]
    if s:
        lines += [f"### Sweep on {s['device']}: `run_sweep`, N = {s['n']}, {s['configs']} configs, {s['steps']} steps",
                  "", f"Wall {s['wall_s']:.1f} s (local Ray start-up included), kernel state {s['kernel_s']:.1f} s, "
                      f"shards {s['shard_s']:.1f} s; complete: {s['complete']}.", ""]
    lines += [
        "### CPU vs GPU agreement (same kernel state)",
        "",
        f"digits-cnn on synthetic N = {ag['n']}, k = 512, {sum(ag['configs'].values())} configs "
        f"({', '.join(f'{k} {v}' for k, v in ag['configs'].items())}), {ag['budget']} steps, relative eps 0.05 and "
        f"0.01, criteria loss and error: {ag['compared_rows']} T_hat rows compared, largest |T_hat(cpu) - "
        f"T_hat({ag['device']})| = {ag['max_abs_step_diff']} steps (tolerance {ag['tolerance_steps']}: one logged "
        f"step), largest relative difference of the final loss {ag['max_rel_final_loss_diff']:.1e}; kernel "
        f"computed on each device: top-10 eigenvalues within {ag['kernel_top10_eig_max_rel_diff']:.1e} (tolerance "
        f"{ag['kernel_tolerance']:g}). **{'agree' if ag['ok'] else 'DISAGREE: ' + '; '.join(ag['mismatches'][:5])}**",
        "",
        f"Check runtime {res['total_s']:.0f} s.",
    ]
    return "\n".join(lines)


def write_outputs(res: dict, body: str) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(res, indent=1, default=float))
        (Path(out) / "gpu_check.md").write_text(body + "\n")
        log(f"wrote {out}/gpu_check.json and gpu_check.md")
    if res["facts"]["smoke"]:
        write_json("gpu_check_smoke.json", res)
        return
    write_json("gpu_check.json", res)
    from _report import write_section

    write_section("gpu", body, COMMAND)
    log("wrote docs/BENCHMARKS.md section 'gpu' and runs/bench/gpu_check.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the same code path")
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="seconds for the whole check (install excluded): the big N and the sweep are sized to it")
    ap.add_argument("--from-json", default=None, help="write the docs section from a fetched gpu_check.json")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        body = report(res)
        print(body)
        if not res["facts"]["smoke"]:
            from _report import write_section

            write_json("gpu_check.json", res)
            write_section("gpu", body, COMMAND, machine=res["facts"]["machine"])
        return
    res = run(args.smoke or os.environ.get("GPU_CHECK_SMOKE") == "1", args.time_limit)
    body = report(res)
    print(body)
    write_outputs(res, body)
    if not res["agreement"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
