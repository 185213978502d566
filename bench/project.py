"""Projection (issue 7): time, memory and GPU count of ``sweeps/all_datasets.yaml`` on a GPU cluster, computed
from the measured per-sample costs, nothing by hand. Writes the ``projection`` section of docs/SCALING.md and
runs/bench/projection.json.

    .venv/bin/python bench/project.py            # after bench/scaling.py (and bench/gpu_check.sh, when it has run)

Inputs: runs/bench/scaling.json (bench/scaling.py: CPU times per step vs N, k, C, fitted exponents, dense
rates, ResNet-18 224 x 224 kernel/epoch, image decoding), runs/bench/gpu_check.json when present
(bench/gpu_check.sh: the same steps measured on a GPU, which then replace the CPU-to-GPU conversion), the
spec's plan (``--dry-run`` sizes: the paper table) and the stated assumptions in :data:`ASSUMPTIONS`.

Model (every term printed in the section):

* **kernel** (per actor): N x (decode ms per image, one thread: the actor reads images in its own thread) +
  N x (kernel / epoch ratio of ResNet-18 at 224, measured) x (ResNet-18 forward+backward ms per image on the GPU);
* **eigen**: CPU seconds at the largest measured N, scaled by (N / N_ref)^a_N, divided by the GPU/CPU
  speed-up of a float64 Gram; **step times**: the sweep's ``predicted_cost_s`` measurement (5 + 1 steps
  per (batch, loss), batches above 512 timed at 512) at the forward+backward rate plus decoding;
* **simulations**: each config assigned the engine the sweep runs (``ttp_ray.dynamics._resolve`` on the
  plan, exact for lr-fraction grids), CPU seconds per config of that engine at (N_ref, C = 10, k = 2048,
  T_ref), scaled by (N / N_ref)^a_N (C / 10)^a_C (T / T_ref) x Euler-Maruyama substeps, divided by the
  GPU/CPU speed-up of the dense product that dominates it (float32 lift; float64 for the closed-form GD-MSE);
* **makespan** of a dataset on ``a`` actors (one GPU each; ``resources.actors = a``): the first actor
  prepares (overhead + kernel + eigen + step times = P) and simulates; the others are started when the
  first is prepared (driver.py) and prepare again (worst case: on another node, no shared kernel cache), so
  T(a) = (S + P + 2 (a - 1) P) / a with S the dataset's simulation GPU-seconds (a = 1: P + S);
* **ground truth** (28 fine-tunes as the spec selects them): 2000 steps of B = 128 forward+backward plus 101
  full-set evaluations (forward = 1/3 of forward+backward), every image decoded in the task's thread.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import ROOT, read_json, write_json  # noqa: E402

COMMAND = ".venv/bin/python bench/project.py"
SPEC = "sweeps/all_datasets.yaml"
SCALING_MD = ROOT / "docs" / "SCALING.md"
HOUR = 3600.0

ASSUMPTIONS = {
    "gpu": "NVIDIA H200 SXM (141 GB HBM3e)",
    "fp32_peak_tflops": 67.0,  # NVIDIA H100/H200 SXM datasheet: FP32 67 TFLOPS (same GH100 compute)
    "fp64_tensor_peak_tflops": 67.0,  # datasheet: FP64 34 TFLOPS, FP64 Tensor Core 67 TFLOPS
    "sustained_fraction": 0.5,  # assumed share of peak for the large dense products (eigen step, lifts)
    "resnet50_tf32_a100_img_s": 938.0,  # NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, 1x A100 80GB, TF32 training
    "resnet50_gflops": 4.089,  # torchvision ResNet50_Weights.IMAGENET1K_V1.meta["_ops"] (forward, 224 x 224)
    "resnet18_gflops": 1.814,  # torchvision ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]
    "forward_share": 1.0 / 3.0,  # forward = 1/3 of forward + backward (the usual 1:2 rule)
    "actor_overhead_s": 60.0,  # assumed: Ray actor start, imports, backbone load, dataset index (10-15 s measured here)
    "cifar_like": ["cifar10", "cifar100"],  # 32 x 32 sources upsampled; the others are JPEG trees
}


def speedups(sc: dict) -> Dict[str, float]:
    """GPU / one CPU thread, for the dense products (assumed sustained GPU rate / measured CPU rate)."""
    a = ASSUMPTIONS
    return {"fp32": a["sustained_fraction"] * a["fp32_peak_tflops"] * 1e3 / sc["rates"]["fp32_lift"]["gflops"],
            "fp64": a["sustained_fraction"] * a["fp64_tensor_peak_tflops"] * 1e3 / sc["rates"]["fp64_gram"]["gflops"]}


def gpu_fwd_bwd_ms() -> float:
    """ResNet-18 forward+backward ms per image on the GPU: ResNet-50's public TF32 A100 throughput at the same
    effective FLOP rate, scaled by the FLOP ratio (conservative for an H200)."""
    a = ASSUMPTIONS
    img_s = a["resnet50_tf32_a100_img_s"] * a["resnet50_gflops"] / a["resnet18_gflops"]
    return 1e3 / img_s


ENGINE_CLASS = {("discrete", "mse"): "GD-MSE", ("discrete", "ce"): "GD-CE", ("sde", "mse"): "SDE-MSE",
                ("sde", "ce"): "SDE-CE", ("minibatch", "mse"): "minibatch-CE", ("minibatch", "ce"): "minibatch-CE",
                ("ode", "mse"): "GD-MSE", ("ode", "ce"): "GD-CE"}


def engine_counts(spec, dplan) -> Dict[str, Dict[str, float]]:
    """Configs per engine class and their Euler-Maruyama substeps, as ``simulate`` will resolve them."""
    from ttp_ray.dynamics import resolve_plan
    from ttp_ray.stability import elr_stability_ratio, max_stable_lr
    from ttp_ray.sweep.plan import resolve_lr, sim_config

    n = dplan.size.n
    opt = spec.simulation.sim_options()
    out: Dict[str, Dict[str, float]] = {}
    for c in dplan.configs:
        cfg = sim_config(c, resolve_lr(c, lambda m: max_stable_lr(1.0, n, m)))  # lambda_max = 1: exact for fractions
        pl = resolve_plan(cfg, opt, n, 1.0)
        cls = ENGINE_CLASS[(pl.method, pl.loss)]
        sub = 1
        if pl.method == "sde":
            x = elr_stability_ratio(pl.eta_eff, 1.0, n, pl.loss)
            sub = 1 if x < 2.0 else int(math.ceil(x))
        d = out.setdefault(cls, {"configs": 0, "step_units": 0.0})
        d["configs"] += 1
        d["step_units"] += sub  # configs x substeps
    return out


def reference(sc: dict, gpu: Optional[dict]) -> dict:
    """Per-config seconds of each engine at the reference point, and where they come from."""
    classes = list(sc["sim_classes"])
    if gpu:
        b = gpu["big"]
        return {"source": "GPU (bench/gpu_check.sh)", "n": b["n"], "budget": b[classes[0]]["budget"],
                "per_config": {c: b[c]["per_config_s"] for c in classes}, "eigen_s": b["eigen"]["seconds"],
                "on_gpu": True}
    ref = max(sc["by_n"], key=lambda r: r["n"] if all(c in r for c in classes) else -1)
    return {"source": "CPU (bench/scaling.py), one thread", "n": ref["n"], "budget": ref[classes[0]]["budget"],
            "per_config": {c: ref[c]["per_config_s"] for c in classes}, "eigen_s": ref["eigen"]["seconds"],
            "on_gpu": False}


def project(sc: dict, gpu: Optional[dict]) -> dict:
    from ttp_ray.sweep.driver import plan_sweep, preflight
    from ttp_ray.sweep.spec import load_spec

    spec = load_spec(ROOT / SPEC)
    plan = plan_sweep(spec, preflight(spec, allow_missing=True))
    sp = speedups(sc)
    ref = reference(sc, gpu)
    fits_n, fits_c = sc["fits"]["n"], sc["fits"]["c"]
    fb_ms = gpu_fwd_bwd_ms()
    arch = sc["arch"]
    ratio = arch["kernel"]["seconds"] / arch["epoch"]["seconds"]
    kernel_ms = ratio * fb_ms
    kernel_src = (f"kernel/epoch {ratio:.2f} (ResNet-18 at 224, CPU, bench/scaling.py) x {fb_ms:.3f} ms forward+backward "
                  "(public ResNet-50 TF32 A100 throughput scaled by FLOPs)")
    if gpu and gpu.get("arch224"):
        kernel_ms = gpu["arch224"]["kernel"]["ms_per_sample"]
        fb_ms = gpu["arch224"]["epoch"]["ms_per_sample"]
        kernel_src = "measured on the GPU (bench/gpu_check.sh, 224 x 224)"
    dec = sc["decode"]
    randn_rate = sc["rates"].get("randn_fp64", {}).get("draws_per_s")
    from ttp_ray.dynamics import SimOptions

    opt_mem = SimOptions().memory_mb
    T = spec.budget.steps
    k = spec.kernel.k
    steps_logged = T // spec.simulation.log_every + 1
    st = spec.cost
    datasets = []
    for d in plan.datasets:
        n, c = d.size.n, d.size.num_classes
        r = min(n, k)
        dec_ms = dec["cifar_32px" if d.entry.name in ASSUMPTIONS["cifar_like"] else "jpeg_500x375"]["ms_per_image"]
        data_s = n * dec_ms / 1e3
        kern_s = n * kernel_ms / 1e3
        eig = ref["eigen_s"] * (n / ref["n"]) ** fits_n["eigen"]
        eig_s = eig if ref["on_gpu"] else eig / sp["fp64"]
        # step times: (steps + warm-up) x batch for each (batch, loss); above step_time_max_batch timed at it
        imgs = sum((st.step_time_steps + 1) * min(b or n, st.step_time_max_batch, n) for b in spec.batch_size) \
            * len(spec.losses)
        steptime_s = imgs * (fb_ms + dec_ms) / 1e3
        eng = engine_counts(spec, d)
        sims = {}
        for cls, v in eng.items():
            per = ref["per_config"][cls] * (n / ref["n"]) ** fits_n[cls] * (c / 10.0) ** fits_c[cls] * (T / ref["budget"])
            cpu_or_gpu = per * v["step_units"]
            gpu_s = cpu_or_gpu if ref["on_gpu"] else cpu_or_gpu / (sp["fp64"] if cls == "GD-MSE" else sp["fp32"])
            rng_s = 0.0
            if cls.startswith("SDE") and randn_rate and not ref["on_gpu"]:
                # the SDE draws its noise on the CPU (torch.randn(N, float64) per path and step, shared by the
                # groups of a chunk of at most G configs): that part does not move to the GPU
                g_max = max(1, int(opt_mem * 2**20 // ((n * c * 6 + r * c * 4) * 4 * spec.simulation.paths)))
                chunks = math.ceil(v["configs"] / g_max)
                rng_s = chunks * T * (v["step_units"] / v["configs"]) * spec.simulation.paths * n / randn_rate
            sims[cls] = {"configs": v["configs"], "step_units": v["step_units"], "ref_per_config_s": ref["per_config"][cls],
                         "scale": (n / ref["n"]) ** fits_n[cls] * (c / 10.0) ** fits_c[cls] * (T / ref["budget"]),
                         "compute_s": gpu_s, "cpu_noise_s": rng_s, "gpu_s": gpu_s + rng_s}
        sim_s = sum(v["gpu_s"] for v in sims.values())
        prep_s = ASSUMPTIONS["actor_overhead_s"] + data_s + kern_s + eig_s + steptime_s
        # memory (MiB): GPU while computing the kernel / in the eigen step / simulating; host state after
        mib = 2 ** 20
        mem = {
            "z_mib": n * k * 4 / mib, "v64_mib": n * r * 8 / mib,
            "gpu_kernel_mib": spec.kernel.memory_cap_mb + n * k * 4 / mib,
            "gpu_eigen_mib": (n * k * 4 + n * k * 8 + k * k * 8 + n * r * 8) / mib,
            "gpu_sim_mib": (n * k * 4 + n * r * 8 + n * r * 4) / mib + 1024.0,
            "host_state_mib": (n * k * 4 + n * r * 8 + n * c * 4) / mib,
        }
        # ground truth: B=128 steps + logged full-set evaluations, decoding in the task's thread
        gt = [g for g in d.ground_truth]
        gt_imgs_fb = T * 128
        gt_imgs_fwd = steps_logged * n
        gt_task_s = (gt_imgs_fb * fb_ms + gt_imgs_fwd * fb_ms * ASSUMPTIONS["forward_share"]) / 1e3 \
            + (gt_imgs_fb + gt_imgs_fwd) * dec_ms / 1e3
        # every config of the grid fine-tuned for its whole budget (GPU compute only, decoding excluded):
        # full batch = T steps over all N (each step's forward is the evaluation); else T steps of B plus the
        # logged full-set evaluations
        ft_grid_s = 0.0
        for cfg in d.configs:
            b = n if cfg.batch_size is None else min(int(cfg.batch_size), n)
            ft_grid_s += T * b * fb_ms / 1e3 + (0.0 if b == n else steps_logged * n * fb_ms * ASSUMPTIONS["forward_share"] / 1e3)
        datasets.append({"label": d.label, "n": n, "c": c, "rank": r, "configs": len(d.configs),
                         "shards": len(d.shards), "data_s": data_s, "kernel_s": kern_s, "eigen_s": eig_s,
                         "steptime_s": steptime_s, "prep_s": prep_s, "sims": sims, "sim_s": sim_s, "memory": mem,
                         "gt_runs": len(gt), "gt_task_s": gt_task_s, "finetune_grid_gpu_s": ft_grid_s,
                         "gt_task_gpu_s": (gt_imgs_fb * fb_ms + gt_imgs_fwd * fb_ms * ASSUMPTIONS["forward_share"]) / 1e3})

    def makespan(ds: dict, a: int) -> float:
        return (ds["sim_s"] + ds["prep_s"] + 2 * (a - 1) * ds["prep_s"]) / a

    max_a = min(ds["shards"] for ds in datasets)
    table = []
    for a in sorted({1, 2, 3, 4, 6, 8, 12, 16, max_a}):
        if a > max_a:
            continue
        spans = {ds["label"]: makespan(ds, a) for ds in datasets}
        table.append({"actors": a, "gpus": a * len(datasets), "hours": max(spans.values()) / HOUR,
                      "slowest": max(spans, key=spans.get)})
    uniform = next((a for a in range(1, max_a + 1) if max(makespan(ds, a) for ds in datasets) <= HOUR), None)
    per_ds = {}
    for ds in datasets:
        per_ds[ds["label"]] = next((a for a in range(1, ds["shards"] + 1) if makespan(ds, a) <= HOUR), None)
    gt_total = sum(ds["gt_runs"] * ds["gt_task_s"] for ds in datasets)
    pred_total = sum(ds["prep_s"] + ds["sim_s"] for ds in datasets)
    ft_total = sum(ds["finetune_grid_gpu_s"] for ds in datasets)
    gt_longest = max(ds["gt_task_s"] for ds in datasets)
    return {"spec": SPEC, "configs": plan.n_configs, "budget": T, "k": k, "paths": spec.simulation.paths,
            "log_every": spec.simulation.log_every, "assumptions": ASSUMPTIONS, "speedups": sp, "reference": ref,
            "fits": {"n": fits_n, "c": fits_c}, "fb_ms": fb_ms, "kernel_ms": kernel_ms, "kernel_src": kernel_src,
            "decode": dec, "randn_rate": randn_rate, "datasets": datasets, "cluster": table, "uniform_actors_1h": uniform,
            "per_dataset_actors_1h": per_ds, "gt_total_gpu_s": gt_total, "gt_longest_s": gt_longest,
            "prediction_gpu_s": pred_total, "finetune_grid_gpu_s": ft_total,
            "gpu_check": bool(gpu), "scaling_date": sc.get("date"), "makespan_formula": "T(a) = (S + P + 2(a-1)P) / a"}


def f(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def bottom_line(p: dict) -> str:
    ds = p["datasets"]
    one = next(t for t in p["cluster"] if t["actors"] == 1)
    sim = sum(d["sim_s"] for d in ds)
    noise = sum(d["sims"][c].get("cpu_noise_s", 0.0) for d in ds for c in d["sims"])
    kern = sum(d["kernel_s"] + d["data_s"] for d in ds)
    eig = sum(d["eigen_s"] for d in ds)
    other = sum(d["prep_s"] - d["kernel_s"] - d["data_s"] - d["eigen_s"] for d in ds)
    u = p["uniform_actors_1h"]
    top = max(ds, key=lambda d: d["sim_s"])
    return (f"**Bottom line.** One actor per dataset ({one['gpus']} GPUs, the spec's `resources.actors: auto`) finishes "
            f"in **{one['hours']:.2f} h**, bound by {one['slowest']}; "
            + (f"within an hour: **`resources.actors: {u}`, {u * len(ds)} GPUs**. " if u else
               "no uniform actor count finishes within an hour. ")
            + f"Of the {f(sim + kern + eig + other)} actor-seconds, the simulations take {f(sim)} "
            f"({100 * sim / (sim + kern + eig + other):.0f} %; {top['label']} alone {f(top['sim_s'])})"
            + (f", of which {f(noise)} are the SDE's noise drawn on the CPU" if noise else "")
            + f"; images and kernels {f(kern)}, the eigen steps {f(eig)}, "
            f"step times and actor overhead {f(other)}. The ground-truth fine-tunes of the spec hold GPUs for "
            f"{p['gt_total_gpu_s'] / HOUR:.0f} GPU-hours, their longest run {p['gt_longest_s'] / HOUR:.1f} h, mostly "
            "decoding images; predicting the whole grid costs "
            f"{p['finetune_grid_gpu_s'] / p['prediction_gpu_s']:,.0f}x less GPU time than fine-tuning it.")


def report(p: dict) -> str:
    from _report import md_table

    a, sp, ref = p["assumptions"], p["speedups"], p["reference"]
    ds = p["datasets"]
    lines = [
        "## Projection: `sweeps/all_datasets.yaml` on GPUs (computed by bench/project.py)",
        "",
        f"Spec: {p['configs']} configs (7 datasets x 240), ResNet-18 at 224 x 224, budget {p['budget']} steps, "
        f"curves every {p['log_every']}, k = {p['k']} (rank min(N, k)), {p['paths']} paths. GPU: {a['gpu']}"
        + (", **times from bench/gpu_check.sh**." if p["gpu_check"] else
           ", **not measured: the GPU check has not run yet**; CPU measurements converted as below."),
        "",
        bottom_line(p),
        "",
        "### Inputs",
        "",
        md_table(["input", "value", "source"], [
            ["simulation reference", f"per config at N = {ref['n']}, C = 10, k = 2048, {ref['budget']} steps: "
             + ", ".join(f"{c} {v:.3g} s" for c, v in ref["per_config"].items()), ref["source"]],
            ["eigen step at the reference N", f"{ref['eigen_s']:.3g} s", ref["source"]],
            ["exponent in N (N >= k)", ", ".join(f"{c} {v:.2f}" for c, v in p["fits"]["n"].items()),
             "bench/scaling.py (log-log fit)"],
            ["exponent in C", ", ".join(f"{c} {v:.2f}" for c, v in p["fits"]["c"].items()), "bench/scaling.py"],
            ["GPU / CPU-thread speed-up, float32 lift", f"{sp['fp32']:.0f}" + (" (unused)" if p["gpu_check"] else ""),
             f"{a['sustained_fraction']:.0%} of {a['fp32_peak_tflops']:g} TFLOPS FP32 (datasheet) / measured CPU rate"],
            ["GPU / CPU-thread speed-up, float64 Gram", f"{sp['fp64']:.0f}" + (" (unused)" if p["gpu_check"] else ""),
             f"{a['sustained_fraction']:.0%} of {a['fp64_tensor_peak_tflops']:g} TFLOPS FP64 tensor (datasheet) / measured CPU rate"],
            ["ResNet-18 forward+backward per image", f"{p['fb_ms']:.3f} ms",
             f"{a['resnet50_tf32_a100_img_s']:g} img/s ResNet-50 TF32 on one A100 (NVIDIA DeepLearningExamples) x "
             f"{a['resnet50_gflops']}/{a['resnet18_gflops']} GFLOPs (torchvision)" if not p["gpu_check"] else "bench/gpu_check.sh"],
            ["kernel per image", f"{p['kernel_ms']:.3f} ms", p["kernel_src"]],
            ["decode + resize per image (one thread)", f"CIFAR {p['decode']['cifar_32px']['ms_per_image']:.2f} ms, "
             f"JPEG {p['decode']['jpeg_500x375']['ms_per_image']:.2f} ms", "bench/scaling.py"],
            ["SDE noise: float64 normal draws on the CPU", f"{p['randn_rate'] / 1e6:.0f} M/s" if p["randn_rate"] else "-",
             "bench/scaling.py (one thread); `ttp_ray.dynamics` draws them on the CPU whatever the device"],
            ["actor overhead", f"{a['actor_overhead_s']:.0f} s", "assumed"],
        ]),
        "",
        "### Per dataset, one actor (GPU-seconds)",
        "",
        md_table(["dataset", "N", "C", "data s", "kernel s", "eigen s", "step times s", "prepare P s",
                  "GD-MSE", "GD-CE", "SDE-MSE", "SDE-CE", "minibatch-CE", "simulations S s", "P + S h"],
                 [[d["label"], d["n"], d["c"], f(d["data_s"]), f(d["kernel_s"]), f(d["eigen_s"]), f(d["steptime_s"]),
                   f(d["prep_s"])] + [f"{d['sims'][c]['configs']}: {f(d['sims'][c]['gpu_s'])}" if c in d["sims"] else "-"
                                      for c in ("GD-MSE", "GD-CE", "SDE-MSE", "SDE-CE", "minibatch-CE")]
                  + [f(d["sim_s"]), f"{(d['prep_s'] + d['sim_s']) / HOUR:.2f}"] for d in ds]),
        "",
        "Engine columns: configs resolved to that engine: seconds on the actor (GPU compute, plus for the SDE "
        "the noise drawn on the CPU), as `ttp_ray.dynamics.resolve_plan` resolves the spec's configs: with "
        "`method: auto` every SGD config runs exact minibatch heavy ball (`minibatch-CE`, MSE too; METHOD.md §4); "
        "the SDE columns count configs only in a spec that asks for it (`method: sde` or `momentum_mode: elr`). "
        + (f"Of the simulation seconds, {f(sum(d['sims'][c].get('cpu_noise_s', 0.0) for d in ds for c in d['sims']))} "
           f"of {f(sum(d['sim_s'] for d in ds))} are the SDE's noise drawn on the CPU." if p["randn_rate"] else ""),
        "",
    ]
    big = max(ds, key=lambda d: d["sim_s"])
    cls = max(big["sims"], key=lambda c: big["sims"][c]["gpu_s"])
    s = big["sims"][cls]
    conv = "" if ref["on_gpu"] else f" / {sp['fp64'] if cls == 'GD-MSE' else sp['fp32']:.0f} (speed-up)"
    lines += [
        f"Arithmetic of the largest term, {big['label']} / {cls}: {ref['per_config'][cls]:.3g} s per config at the "
        f"reference x ({big['n']}/{ref['n']})^{p['fits']['n'][cls]:.2f} x ({big['c']}/10)^{p['fits']['c'][cls]:.2f} x "
        f"({p['budget']}/{ref['budget']}) = {ref['per_config'][cls] * s['scale']:.4g} s per config{conv}, x "
        f"{s['step_units']:g} (configs x substeps) = {f(s['compute_s'])} GPU-s"
        + (f", plus {f(s['cpu_noise_s'])} s of noise drawn on the CPU (chunks of configs sharing draws x "
           f"{p['budget']} steps x {p['paths']} paths x N draws / the rate above) = {f(s['gpu_s'])} s."
           if s.get("cpu_noise_s") else "."),
        "",
        "### Cluster size (uniform `resources.actors` = a per dataset, one GPU per actor)",
        "",
        f"Makespan of a dataset {p['makespan_formula']} (P: prepare, S: simulation GPU-seconds; the extra actors "
        "start once the first is prepared and prepare again). Shards per dataset cap a at "
        f"{min(d['shards'] for d in ds)}.",
        "",
        md_table(["actors per dataset", "GPUs", "hours", "slowest dataset"],
                 [[t["actors"], t["gpus"], f"{t['hours']:.2f}", t["slowest"]] for t in p["cluster"]]),
        "",
    ]
    u = p["uniform_actors_1h"]
    per = p["per_dataset_actors_1h"]
    lines.append(
        (f"**Within an hour: `resources.actors: {u}` on {u * len(ds)} GPUs.** " if u else
         "**No uniform actor count finishes within an hour** (the shards cap it). ")
        + ("Per-dataset actor counts (not expressible in the spec today) would need "
           + ("only " + str(sum(per.values())) + " GPUs: " if all(per.values()) else "more than the shards allow: ")
           + ", ".join(f"{k} {v}" for k, v in per.items()) + "."))
    lines += [
        "",
        "### Memory per actor (MiB, from the array sizes)",
        "",
        md_table(["dataset", "Z (N x k float32)", "V (N x r float64)", "GPU, kernel pass (cap + Z)",
                  "GPU, eigen step (Z, Z float64, Gram, U)", "GPU, simulation (Z, V, V float32, 1 GiB chunks)",
                  "host, state"],
                 [[d["label"], f(d["memory"]["z_mib"]), f(d["memory"]["v64_mib"]), f(d["memory"]["gpu_kernel_mib"]),
                   f(d["memory"]["gpu_eigen_mib"]), f(d["memory"]["gpu_sim_mib"]), f(d["memory"]["host_state_mib"])]
                  for d in ds]),
        "",
        "### Ground truth (the spec's 28 fine-tunes, one GPU each)",
        "",
        md_table(["dataset", "runs", "per run h (GPU compute + decoding)", "of which GPU h"],
                 [[d["label"], d["gt_runs"], f"{d['gt_task_s'] / HOUR:.2f}", f"{d['gt_task_gpu_s'] / HOUR:.2f}"]
                  for d in ds]),
        "",
        f"All {sum(d['gt_runs'] for d in ds)} fine-tunes: {p['gt_total_gpu_s'] / HOUR:.1f} GPU-hours; the longest "
        f"run {p['gt_longest_s'] / HOUR:.2f} h bounds their makespan whatever the GPU count.",
        "",
        "### Predicting the grid vs fine-tuning it",
        "",
        md_table(["dataset", "prediction GPU-h (one actor: P + S)", "fine-tuning every config GPU-h", "ratio"],
                 [[d["label"], f"{(d['prep_s'] + d['sim_s']) / HOUR:.2f}", f"{d['finetune_grid_gpu_s'] / HOUR:,.0f}",
                   f"{d['finetune_grid_gpu_s'] / (d['prep_s'] + d['sim_s']):,.0f}x"] for d in ds]
                 + [["**all**", f"**{p['prediction_gpu_s'] / HOUR:.2f}**", f"**{p['finetune_grid_gpu_s'] / HOUR:,.0f}**",
                     f"**{p['finetune_grid_gpu_s'] / p['prediction_gpu_s']:,.0f}x**"]]),
        "",
        f"Fine-tuning: each config for its whole budget ({p['budget']} steps; diverging ones would stop earlier) at "
        "its batch size, full batch meaning N images a step, plus the full-set evaluations every "
        f"{p['log_every']} steps that T_eps needs (minibatch configs), at the forward+backward rate above, GPU "
        "compute only (decoding excluded, in fine-tuning's favour). Prediction: decoding, kernel, eigen step, step "
        "times, every simulation and the actor overhead.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--scaling", default="scaling.json", help="file under runs/bench/ (scaling_quick.json: a check)")
    args = ap.parse_args(argv)
    sc = read_json(args.scaling)
    if sc is None:
        raise SystemExit("bench/project.py: runs/bench/scaling.json is missing; run bench/scaling.py first")
    gpu = read_json("gpu_check.json")
    if gpu and gpu.get("facts", {}).get("smoke"):
        gpu = None
    p = project(sc, gpu)
    body = report(p)
    print(body)
    if args.no_write:
        return
    write_json("projection.json", p)
    from _report import write_section

    header = "# Scaling\n"
    write_section("projection", body, COMMAND, path=SCALING_MD, header=header)
    print("wrote docs/SCALING.md section 'projection' and runs/bench/projection.json", file=sys.stderr)


if __name__ == "__main__":
    main()
