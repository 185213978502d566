"""Scaling bench (issue 7): time and peak memory of each step of a prediction against N, k and C, with
fitted exponents; the per-sample cost of a ResNet-18 kernel at 224 x 224.

    .venv/bin/python bench/scaling.py                   # writes section "scaling" and runs/bench/scaling.json
    .venv/bin/python bench/scaling.py --quick      # small sizes: runs/bench/scaling_quick.json only

Steps measured, each in a fresh subprocess per point (bench/_measure.py ``run_worker``; one thread):

* **kernel**: the default sketch (:class:`ttp_ray.kernel.KernelOptions`: one-probe class-trace count sketch),
  :func:`ttp_ray.kernel.kernel_sketch` on ``synthetic:n=N,classes=C,size=8`` with the digits-cnn backbone;
* **eigen**: :func:`ttp_ray.kernel.eigendecompose_sketch` of Z (N x k float32 -> float64 Gram, eigh, U);
* **simulation** (:func:`ttp_ray.dynamics.simulate` on that state, ``--configs`` configs per class at lr
  fractions of max_stable_lr, budget ``--budget`` steps, logged every 20, error curves on), the engines a
  sweep runs (8 paths): GD-MSE (discrete, closed form), GD-CE (discrete map), minibatch-CE (exact heavy-ball
  SGD on the linearised model, B = 128, m = 0.9: what ``method: auto`` runs for SGD, as
  ``sweeps/all_datasets.yaml`` does, METHOD.md §4), SDE-MSE and SDE-CE (the paper's SDE with the effective lr,
  B = 128, m = 0: ``method: sde`` or ``momentum_mode: elr``; where the ELR step would be unstable the sde
  falls back to minibatch);
* **dense rates** (``--rates``): one thread's float32 matmul (N x r) @ (r x C P) and float64 Gram Z^T Z,
  GFLOP/s: what bench/project.py scales to a GPU.

Peak memory: RSS above the RSS at the start of the step (psutil, every 5 ms); on CUDA also
``torch.cuda.max_memory_allocated`` above the allocation at the start. Exponents: least squares of
log(time) on log(N) (over N >= k, where the rank is k), log(k) and log(C).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import PeakRSS, log, loglog_fit, run_worker, run_workers, write_json  # noqa: E402

COMMAND = ".venv/bin/python bench/scaling.py"
LR_FRACTIONS = (0.3, 0.6, 0.45, 0.15)  # the first --configs of them
SIM_CLASSES: Dict[str, dict] = {  # the engines a sweep runs (auto: discrete for GD, minibatch for SGD; sde asked for)
    "GD-MSE": {"method": "discrete", "momentum_mode": "elr", "loss": "mse", "batch": None, "m": 0.0, "paths": 1},
    "GD-CE": {"method": "discrete", "momentum_mode": "elr", "loss": "ce", "batch": None, "m": 0.0, "paths": 1},
    "SDE-MSE": {"method": "sde", "momentum_mode": "elr", "loss": "mse", "batch": 128, "m": 0.0, "paths": 8},
    "SDE-CE": {"method": "sde", "momentum_mode": "elr", "loss": "ce", "batch": 128, "m": 0.0, "paths": 8},
    "minibatch-CE": {"method": "minibatch", "momentum_mode": "heavy_ball", "loss": "ce", "batch": 128, "m": 0.9,
                     "paths": 8},
}
STEPS = ("kernel", "eigen") + tuple(SIM_CLASSES)
LOG_EVERY = 20  # as sweeps/all_datasets.yaml


# ------------------------------------------------------------------------------------------ worker

class _Peak:
    """Host peak RSS and, on CUDA, peak allocated device memory over a block (MB above the start)."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")

    def __enter__(self) -> "_Peak":
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self._alloc0 = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._rss = PeakRSS().__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self._rss.__exit__(*exc)
        self.rss_mb = self._rss.delta_mb
        self.gpu_mb = (torch.cuda.max_memory_allocated() - self._alloc0) / 2**20 if self.cuda else None


def measure_point(p: dict) -> dict:
    """Kernel, eigen step and simulations at one point; ``p``: n, k, classes, size, channels, model, device,
    budget, configs, sims (bool), epoch (bool: also one epoch of forward+backward at batch 32), seed."""
    from ttp_ray.data import load_dataset
    from ttp_ray.dynamics import SimConfig, SimOptions, simulate
    from ttp_ray.kernel import KernelOptions, PerSampleGradients, eigendecompose_sketch, kernel_sketch
    from ttp_ray.models import build_finetune_model
    from ttp_ray.state import KernelState

    n, k, c = int(p["n"]), int(p.get("k", 2048)), int(p.get("classes", 10))
    device = p.get("device", "cpu")
    ds = load_dataset(f"synthetic:n={n},classes={c},size={p.get('size', 8)},channels={p.get('channels', 1)},"
                      f"seed={p.get('seed', 0)}")
    model = build_finetune_model(p.get("model", "digits-cnn"), c).to(device).eval()
    opts = KernelOptions(k=k, memory_cap_mb=float(p.get("memory_cap_mb", KernelOptions().memory_cap_mb)))
    grads = PerSampleGradients.from_module(model, "all", opts.engine)
    out: Dict[str, object] = {"point": p, "n": n, "k": k, "classes": c, "device": str(device),
                              "num_params": grads.num_params, "engine": grads.engine}
    if p.get("epoch"):
        out["epoch"] = epoch_seconds(model, ds, int(p.get("epoch_batch", 32)), device)
    with _Peak(device) as m:
        sk = kernel_sketch(grads, ds, c, k=k, projection=opts.projection, class_trace=opts.class_trace,
                           class_probes=opts.class_probes, seed=opts.seed, memory_cap_mb=opts.memory_cap_mb,
                           batch_size=p.get("batch_size"))
    out["kernel"] = {"seconds": m.seconds, "rss_mb": m.rss_mb, "gpu_mb": m.gpu_mb, "batch_size": sk.batch_size,
                     "ms_per_sample": 1e3 * m.seconds / n}
    z_mb = sk.z.numel() * sk.z.element_size() / 2**20
    with _Peak(device) as m:
        lam, vec = eigendecompose_sketch(sk.z, dtype=opts.torch_dtype, rtol=opts.eig_rtol, solver=opts.eigen_solver)
    out["eigen"] = {"seconds": m.seconds, "rss_mb": m.rss_mb, "gpu_mb": m.gpu_mb, "rank": int(lam.numel()),
                    "z_mb": z_mb, "eigvecs_mb": vec.numel() * vec.element_size() / 2**20}
    state = KernelState(f0=sk.f0.detach(), targets=ds.targets.clone().to(device), num_classes=c, eigvals=lam,
                        eigvecs=vec, class_trace=True, sketch=sk.z, meta={})
    del grads
    if p.get("sims", True):
        budget, ncfg = int(p.get("budget", 100)), int(p.get("configs", 2))
        for name, cl in SIM_CLASSES.items():
            m0 = cl["m"]
            limit = state.max_stable_lr(m0)
            cfgs = [SimConfig(lr=f * limit, momentum=m0, batch_size=cl["batch"], loss=cl["loss"])
                    for f in LR_FRACTIONS[:ncfg]]
            so = SimOptions(method=cl["method"], momentum_mode=cl["momentum_mode"], paths=cl["paths"],
                            log_every=LOG_EVERY)
            with _Peak(device) as m:
                res = simulate(state, cfgs, budget, so)
            out[name] = {"seconds": m.seconds, "per_config_s": m.seconds / len(cfgs), "rss_mb": m.rss_mb,
                         "gpu_mb": m.gpu_mb, "configs": len(cfgs), "budget": budget, "paths": cl["paths"],
                         "log_every": LOG_EVERY, "method": res[0].method, "diverged": sum(r.diverged for r in res)}
    return out


def epoch_seconds(model, ds, batch: int, device) -> dict:
    """One epoch of forward + backward (MSE) over ``ds`` at batch ``batch`` (bench/kernel.py's measure, on ``device``)."""
    import torch

    params = list(model.parameters())
    for q in params:
        q.requires_grad_(True)
    y = torch.nn.functional.one_hot(ds.targets, ds.num_classes).float()
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(ds), batch):
        x = ds.images(slice(s, s + batch)).to(device)
        out = model(x)
        loss = 0.5 * ((out - y[s:s + batch].to(device)) ** 2).sum(1).mean()
        torch.autograd.grad(loss, params)
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return {"seconds": sec, "batch": batch, "ms_per_sample": 1e3 * sec / len(ds)}


def dense_rates(n: int = 8000, r: int = 2048, cp: int = 160, repeats: int = 3) -> dict:
    """GFLOP/s of one thread on the dense products that dominate the eigen step (float64 Gram Z^T Z) and the
    stepped simulations (float32 lift (N x r) @ (r x C P)), median of ``repeats``."""
    import torch

    g = torch.Generator().manual_seed(0)
    v = torch.randn(n, r, generator=g)
    a = torch.randn(r, cp, generator=g)
    z = torch.randn(n, r, generator=g, dtype=torch.float64)
    out = {}
    # the SDE's noise: one torch.randn(N, float64) per path and step from a CPU generator (ttp_ray.dynamics),
    # moved to the device: on a GPU this stays on the CPU
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(8):
            torch.randn(50000, generator=g, dtype=torch.float64)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    out["randn_fp64"] = {"draws_per_s": 8 * 50000 / ts[len(ts) // 2], "shape": [8, 50000]}
    for name, fn, flops in (("fp32_lift", lambda: v @ a, 2.0 * n * r * cp), ("fp64_gram", lambda: z.T @ z, 2.0 * n * r * r)):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        out[name] = {"gflops": flops / ts[len(ts) // 2] / 1e9, "shape": [n, r, cp if name == "fp32_lift" else r]}
    return out


def decode_rates(repeats: int = 20) -> dict:
    """ms per image of the paper datasets' input path (ttp_ray.data.image_transform(224): resize, centre crop,
    ToTensor, normalise), one thread: a CIFAR image (32 x 32 PIL, upsampled) and a 500 x 375 JPEG decoded from
    bytes (the ImageFolder sets: CUB-200, MIT-67, MINC-2500; FGVC-Aircraft and Stanford Cars are of that kind)."""
    import io

    import numpy as np
    from PIL import Image

    from ttp_ray.data import image_transform

    tf = image_transform(224)
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    out = {}
    for name, fn in (("cifar_32px", lambda: tf(small)), ("jpeg_500x375", lambda: tf(Image.open(io.BytesIO(jpeg)).convert("RGB")))):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = {"ms_per_image": 1e3 * (time.perf_counter() - t0) / repeats}
    return out


def worker_main(spec: str) -> None:
    import torch

    torch.set_num_threads(1)
    print(json.dumps(measure_point(json.loads(spec)), default=float))


# ------------------------------------------------------------------------------------------ driver

def sweep(points: List[dict], budget_s: float, label: str) -> List[dict]:
    """One subprocess per point, in order, until ``budget_s`` is spent (the rest skipped, said so)."""
    return run_workers(Path(__file__), [["--worker", json.dumps(p)] for p in points], budget_s, label,
                       lambda r: f"kernel {r['kernel']['seconds']:.1f}s, eigen {r['eigen']['seconds']:.1f}s, "
                                 + ", ".join(f"{s} {r[s]['seconds']:.1f}s" for s in SIM_CLASSES if s in r))


def fits(rows: List[dict], var: str, min_value: Optional[float] = None) -> Dict[str, float]:
    use = [r for r in rows if min_value is None or r[var] >= min_value]
    return {s: loglog_fit([r[var] for r in use if s in r], [r[s]["seconds"] for r in use if s in r])[0] for s in STEPS}


def resnet18_checkpoint() -> str:
    """``resnet18:PATH``: torchvision's ResNet-18 with seeded random weights (no ImageNet download), saved once
    under runs/bench/ (a backbone reference models.py loads like any checkpoint)."""
    import torch
    from torchvision.models import resnet18

    from _measure import ROOT

    path = ROOT / "runs" / "bench" / "resnet18-random-seed0.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = resnet18(weights=None)
        tmp = path.with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    return f"resnet18:{path}"


def fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(rows: List[dict], var: str) -> str:
    from _report import md_table

    head = [var, "rank"] + [f"{s} s" for s in STEPS] + ["kernel MB", "eigen MB", "Z MB", "V MB"] + \
        [f"{s} MB" for s in SIM_CLASSES]
    body = []
    for r in rows:
        body.append([r[var], r["eigen"]["rank"]] + [fmt_s(r[s]["seconds"]) if s in r else "-" for s in STEPS]
                    + [f"{r['kernel']['rss_mb']:.0f}", f"{r['eigen']['rss_mb']:.0f}", f"{r['eigen']['z_mb']:.0f}",
                       f"{r['eigen']['eigvecs_mb']:.0f}"]
                    + [f"{r[s]['rss_mb']:.0f}" if s in r else "-" for s in SIM_CLASSES])
    return md_table(head, body)


def fit_row(label: str, f: Dict[str, float]) -> list:
    return [label] + ["-" if math.isnan(f[s]) else f"{f[s]:.2f}" for s in STEPS]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="1000,2000,4000,8000,16000,32000")
    ap.add_argument("--ks", default="256,512,1024,2048,4096")
    ap.add_argument("--n-for-k", type=int, default=8000)
    ap.add_argument("--cs", default="5,10,20,50,100")
    ap.add_argument("--n-for-c", type=int, default=4000)
    ap.add_argument("--budget", type=int, default=100, help="simulated steps per config")
    ap.add_argument("--configs", type=int, default=2, help="configs per simulation class")
    ap.add_argument("--arch-n", type=int, default=64, help="images for the ResNet-18 224x224 per-sample cost")
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds per sweep (N, k, C) before skipping")
    ap.add_argument("--quick", action="store_true", help="small sizes (for a check or the test)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite the docs section from runs/bench/scaling.json (no measurement)")
    ap.add_argument("--update-rates", action="store_true",
                    help="re-measure only the dense rates, noise draws and decoding; rewrite the section")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        if args.worker in ("rates", "decode"):
            import torch

            torch.set_num_threads(1)
            print(json.dumps(dense_rates() if args.worker == "rates" else decode_rates()))
        else:
            worker_main(args.worker)
        return
    import torch

    from _measure import read_json
    from _report import md_table, write_section

    torch.set_num_threads(1)  # every measurement runs in a one-thread worker; the facts line says so
    if args.from_json or args.update_rates:
        result = read_json("scaling.json")
        if args.update_rates:  # re-measure the dense rates, the noise draws and the image decoding only
            result["rates"] = run_worker(Path(__file__), ["--worker", "rates"])
            result["decode"] = run_worker(Path(__file__), ["--worker", "decode"])
            result["rates_date"] = time.strftime("%Y-%m-%d %H:%M")
            write_json("scaling.json", result)
        write_section("scaling", report(result, md_table), COMMAND + (f"; {COMMAND} --update-rates" if result.get("rates_date") else ""))
        return
    if args.quick:
        args.ns, args.ks, args.n_for_k, args.cs, args.n_for_c = "300,600", "64,128", 300, "5,10", 300
        args.budget, args.arch_n = 20, 10
    t_all = time.perf_counter()
    base = {"k": 2048, "classes": 10, "size": 8, "channels": 1, "model": "digits-cnn", "budget": args.budget,
            "configs": args.configs}
    if args.quick:
        base["k"] = 128
    k0 = base["k"]
    log("N sweep")
    by_n = sweep([dict(base, n=n) for n in map(int, args.ns.split(","))], args.time_budget, "N")
    log("k sweep")
    by_k = sweep([dict(base, n=args.n_for_k, k=k) for k in map(int, args.ks.split(","))], args.time_budget, "k")
    log("C sweep")
    by_c = sweep([dict(base, n=args.n_for_c, classes=c) for c in map(int, args.cs.split(","))], args.time_budget, "C")
    arch = None
    if args.arch_n:
        log("ResNet-18 at 224x224")
        p = {"n": args.arch_n, "k": 2048, "classes": 10, "size": 224, "channels": 3, "model": resnet18_checkpoint(),
             "sims": False, "epoch": True, "epoch_batch": 32}
        arch = run_worker(Path(__file__), ["--worker", json.dumps(p)])
        log(f"  kernel {arch['kernel']['ms_per_sample']:.0f} ms/sample, epoch {arch['epoch']['ms_per_sample']:.0f} ms/sample")
    rates = run_worker(Path(__file__), ["--worker", "rates"])
    log("  dense rates: " + ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s" if "gflops" in v else
                                      f"{k} {v['draws_per_s'] / 1e6:.0f} M draws/s" for k, v in rates.items()))
    decode = run_worker(Path(__file__), ["--worker", "decode"])
    log("  decode: " + ", ".join(f"{k} {v['ms_per_image']:.2f} ms" for k, v in decode.items()))
    f_n, f_k, f_c = fits(by_n, "n", k0), fits(by_k, "k"), fits(by_c, "classes")
    result = {"by_n": by_n, "by_k": by_k, "by_c": by_c, "arch": arch, "rates": rates, "decode": decode, "fits": {"n": f_n, "k": f_k, "c": f_c},
              "fit_n_min": k0, "base": base, "n_for_k": args.n_for_k, "n_for_c": args.n_for_c,
              "lr_fractions": LR_FRACTIONS[:args.configs], "sim_classes": SIM_CLASSES, "log_every": LOG_EVERY,
              "total_s": time.perf_counter() - t_all}
    body = report(result, md_table)
    print(body)
    if args.no_write:
        return
    if args.quick:  # machine-readable only, for bench/project.py --scaling (the test); no docs section
        write_json("scaling_quick.json", result)
        return
    write_json("scaling.json", result)
    write_section("scaling", body, COMMAND)
    log("wrote docs/BENCHMARKS.md section 'scaling' and runs/bench/scaling.json")


def report(r: dict, md_table) -> str:
    base = r["base"]
    lines = [
        "## Scaling: time and memory of each prediction step vs N, k and C (issue 7)",
        "",
        f"digits-cnn backbone on `synthetic:n=N,classes=C,size=8` (seeded Gaussian mixture), default kernel "
        f"(one-probe class-trace count sketch, k = {base['k']} unless varied), one thread, one subprocess per "
        f"point. Simulation: {base['configs']} configs per class (lr {', '.join(map(str, r['lr_fractions']))} x "
        f"max_stable_lr), {base['budget']} steps logged every {r['log_every']}, error curves on, 8 paths for the "
        "stochastic ones: the engines `sweeps/all_datasets.yaml` runs. GD-MSE = discrete closed form, GD-CE = "
        "discrete map, SDE-MSE / SDE-CE = the paper's SDE with the effective lr (B = 128, m = 0), minibatch-CE = "
        "exact heavy-ball SGD on the linearised model (B = 128, m = 0.9; the sweep's fallback where the ELR step "
        "is unstable). Times in seconds for the whole class (divide by the configs for one). Memory: peak RSS "
        "above the RSS at the start of the step (the state, Z and V, already "
        "held, is not counted again by the simulations).",
        "",
        f"### vs N (k = {base['k']}, C = {base['classes']})",
        "",
        table(r["by_n"], "n"),
        "",
        f"### vs k (N = {r['n_for_k']}, C = {base['classes']})",
        "",
        table(r["by_k"], "k"),
        "",
        f"### vs C (N = {r['n_for_c']}, k = {base['k']})",
        "",
        table(r["by_c"], "classes"),
        "",
        "### Fitted exponents (time ~ x^a, log-log least squares)",
        "",
        md_table(["variable"] + list(STEPS), [fit_row(f"N (points with N >= k = {r['fit_n_min']})", r["fits"]["n"]),
                                             fit_row("k", r["fits"]["k"]), fit_row("C", r["fits"]["c"])]),
    ]
    a = r.get("arch")
    if a:
        lines += [
            "",
            "### ResNet-18 at 224 x 224 (random weights, CPU, one thread)",
            "",
            f"N = {a['n']} synthetic 3 x 224 x 224 images, C = {a['classes']}, D = {a['num_params']:,} parameters, "
            f"engine {a['engine']}: default kernel sketch {a['kernel']['ms_per_sample']:.0f} ms / sample "
            f"(batch {a['kernel']['batch_size']}, peak +{a['kernel']['rss_mb']:.0f} MB); one epoch of "
            f"forward + backward at batch {a['epoch']['batch']}: {a['epoch']['ms_per_sample']:.0f} ms / sample; "
            f"kernel / epoch = **{a['kernel']['seconds'] / a['epoch']['seconds']:.2f}**.",
        ]
    rt = r["rates"]
    lines += ["", f"Dense rates of one thread here (median of 3): float32 lift (N x r) @ (r x CP) "
              f"{rt['fp32_lift']['shape']}: {rt['fp32_lift']['gflops']:.1f} GFLOP/s; float64 Gram Z^T Z "
              f"{rt['fp64_gram']['shape'][:2]}: {rt['fp64_gram']['gflops']:.1f} GFLOP/s"
              + (f"; float64 normal draws from a CPU generator (the SDE's noise, {rt['randn_fp64']['shape']} per "
                 f"step): {rt['randn_fp64']['draws_per_s'] / 1e6:.0f} M/s" if "randn_fp64" in rt else "")
              + (f" (rates measured {r['rates_date']} with `--update-rates`)" if r.get("rates_date") else "") + ".",
              "", "Input path of the paper datasets (`ttp_ray.data.image_transform(224)`: resize, centre crop, "
              "ToTensor, normalise; one thread, mean of 20): CIFAR 32 x 32 image "
              f"{r['decode']['cifar_32px']['ms_per_image']:.2f} ms, 500 x 375 JPEG decoded from bytes "
              f"{r['decode']['jpeg_500x375']['ms_per_image']:.2f} ms per image.",
              "", f"Bench runtime {r['total_s']:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
