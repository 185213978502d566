"""Kernel bench (issue 3): accuracy of the projected NTK sketches against the exact kernel, judged by the
loss curves and T_eps they imply; their cost against one epoch of forward+backward; scaling in N.

    .venv/bin/python bench/kernel.py                 # everything, writes the "kernel" section of docs/BENCHMARKS.md
    .venv/bin/python bench/kernel.py --no-write --models digits-cnn --skip-scaling

Accuracy (METHOD.md §2, §5, §6): on ``digits-5to9`` with each backbone (trainable all), the exact full kernel
is the reference (computed once, then read from the kernel cache). For each estimate: relative Frobenius
error of the implied full kernel (class trace: ``Theta_N (x) I_C``), top-10 eigenvalue relative errors,
and the MSE loss curve of discrete GD on the linearised model, ``L_t = (1/2N) sum_k p_k (1 - eta lambda_k/N)^(2t)``
plus the residual outside the kept eigenvectors (constant), at ``eta = 0.5 * max_stable_lr`` of the exact
kernel, 500 steps: its maximum relative deviation and the relative error of T_eps at relative eps 0.01 and
0.05 (``ttp_ray.training_time.eps_training_time``). Means over seeds.

Cost: median over repeats, interleaved in one process, of the kernel estimate (gradient pass + projection;
the eigen step reported apart) divided by one epoch of forward+backward (MSE, same set) at batch 128 and
full batch. One thread (``torch.set_num_threads(1)``): the machine is shared and multi-threaded timings
there are erratic.

Scaling: one subprocess per N on ``synthetic:n=N,classes=10,size=8`` (digits-cnn backbone, default
options): wall time, and peak RSS above the RSS at the call (psutil, sampled every 5 ms) for the streamed
gradient pass alone and for the whole state (Z and the eigen step included).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _measure import PeakRSS, log, run_workers, write_json  # noqa: E402

from ttp_ray.data import load_dataset  # noqa: E402
from ttp_ray.kernel import (  # noqa: E402
    KernelOptions,
    PerSampleGradients,
    class_trace_kernel,
    compute_kernel_state,
    eigendecompose_kernel,
    eigendecompose_sketch,
    gram_matrix,
    kernel_sketch,
    kernel_sketches,
    kernel_state,
)
from ttp_ray.models import build_finetune_model  # noqa: E402
from ttp_ray.training_time import eps_training_time  # noqa: E402

DATASET = "digits-5to9"
MODELS = ("digits-cnn", "digits-resnet")
STEPS = 500
EPS = (0.01, 0.05)
EPOCH_BATCH = 128
BREAKDOWN_PARTS = ("forward_backward", "assemble", "project", "gram", "eigh")


# ------------------------------------------------------------------------------------- reference

class Reference:
    """Exact full kernel, its class trace, residual, learning rate and reference curve for one model."""

    def __init__(self, model, ds) -> None:
        opts = KernelOptions(method="exact", class_trace=False, dtype="float32")  # float32 Gram/eigh: ample here
        t0 = time.perf_counter()
        st = kernel_state(model, ds, opts)
        log(f"  exact kernel: {'cache hit' if st.meta['cache']['hit'] else 'computed'} "
            f"in {time.perf_counter() - t0:.1f}s (rank {st.eigvals.numel()})")
        self.meta = st.meta
        lam, vec = st.eigvals.double(), st.eigvecs.double()
        self.theta = (vec * lam) @ vec.T
        self.n, self.c = st.n, st.num_classes
        self.theta_n = class_trace_kernel(self.theta, self.c)
        self.theta_norm = float(self.theta.norm())
        self.lam, self.vec = lam, vec
        self.residual = st.residual().double()  # (N, C): Y - F0
        self.eta = 0.5 * st.max_stable_lr()
        self.curve = self.loss_curve(lam, vec, class_trace=False)
        self.t_eps = {e: eps_training_time(np.arange(STEPS + 1), self.curve, e, eps_mode="relative") for e in EPS}

    def loss_curve(self, lam: torch.Tensor, vec: torch.Tensor, class_trace: bool) -> np.ndarray:
        """METHOD.md §2, discrete GD on the linearised MSE model, from eigenpairs (dropped modes frozen)."""
        r = self.residual
        p = ((vec.T @ r) ** 2).sum(1) if class_trace else (vec.T @ r.reshape(-1)) ** 2
        rest = float((r ** 2).sum() - p.sum())
        q = (1.0 - self.eta * lam / self.n).abs()
        t = torch.arange(STEPS + 1, dtype=torch.float64)
        decay = torch.exp(2 * t[None, :] * torch.log(q.clamp_min(1e-300))[:, None])
        return ((p[:, None] * decay).sum(0) + rest).numpy() / (2 * self.n)

    def metrics(self, lam: torch.Tensor, vec: torch.Tensor, class_trace: bool,
                gram: Optional[torch.Tensor] = None) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if gram is not None:
            if class_trace:  # ||A (x) I - Theta||^2 = C||A||^2 - 2C <A, Theta_N> + ||Theta||^2
                sq = self.c * float((gram * gram).sum()) - 2 * self.c * float((gram * self.theta_n).sum()) \
                    + self.theta_norm ** 2
                out["frob"] = math.sqrt(max(sq, 0.0)) / self.theta_norm
            else:
                out["frob"] = float((gram - self.theta).norm()) / self.theta_norm
        top = lam.repeat_interleave(self.c) if class_trace else lam
        top = torch.cat([top[:10], torch.zeros(max(0, 10 - top.numel()), dtype=top.dtype)])
        rel = (top - self.lam[:10]).abs() / self.lam[:10]
        out["eig_max"], out["eig_mean"] = float(rel.max()), float(rel.mean())
        curve = self.loss_curve(lam, vec, class_trace)
        if not np.all(np.isfinite(curve)) or float(lam[0]) * self.eta / self.n >= 2:
            out["curve"] = float("inf")
            out.update({f"t{e}": float("inf") for e in EPS})
            return out
        out["curve"] = float(np.max(np.abs(curve - self.curve) / self.curve))
        for e in EPS:
            t_hat = eps_training_time(np.arange(STEPS + 1), curve, e, eps_mode="relative")
            out[f"t{e}"] = abs(t_hat - self.t_eps[e]) / self.t_eps[e]
        return out


# --------------------------------------------------------------------------------------- accuracy

def accuracy_study(model, ds, ref: Reference, seeds: List[int], quick: bool) -> List[dict]:
    rows = []
    ex_ct_lam, ex_ct_vec = eigendecompose_kernel(ref.theta_n)
    rows.append({"estimate": "exact class-trace", "k": "-", **ref.metrics(ex_ct_lam, ex_ct_vec, True, ref.theta_n)})
    grads = PerSampleGradients.from_module(model, "all")
    default = KernelOptions()
    plans = {
        # mode: (class_trace, list of (projection, k), outer_width)
        "full": (False, [(p, k) for p in ("countsketch", "subset") for k in ((512, 2048) if quick else (256, 512, 1024, 2048))], 0),
        "class-trace": (True, [(p, k) for p in ("countsketch", "subset") for k in ((512, 2048) if quick else (256, 1024, 2048, 4096, 8192))]
                        + ([] if quick else [("gaussian", 256)]), 0),
        f"class-trace, outer_width {default.outer_width} (default)": (True, [(default.projection, default.k)],
                                                                       default.outer_width),
    }
    for mode, (ct, projs, outer) in plans.items():
        acc: Dict[Tuple[str, int], List[dict]] = {}
        for seed in seeds:
            t0 = time.perf_counter()
            sks = kernel_sketches(grads, ds, ds.num_classes, projs, class_trace=ct, seed=seed, outer_width=outer)
            log(f"  {mode} seed {seed}: gradient pass with {len(projs)} projections {time.perf_counter() - t0:.1f}s")
            for (kind, k), sk in zip(projs, sks):
                lam, vec = eigendecompose_sketch(sk.z, eigh_dtype=getattr(torch, KernelOptions().eigh_dtype))
                z = sk.z.double()
                acc.setdefault((kind, k), []).append(ref.metrics(lam, vec, ct, z @ z.T))
        for (kind, k), ms in acc.items():
            mean = {key: float(np.mean([m[key] for m in ms])) for key in ms[0]}
            rows.append({"estimate": f"{mode} {kind}", "k": k, **mean})
    return rows


def fmt_pct(x: float) -> str:
    if not math.isfinite(x):
        return "diverged"
    return f"{100 * x:.1f}%"


def accuracy_table(rows: List[dict]) -> str:
    from _report import md_table

    head = ["estimate", "k", "Frobenius", "top-10 eig max", "top-10 eig mean", "curve max dev",
            "T_eps err (0.01)", "T_eps err (0.05)"]
    body = [[r["estimate"], r["k"], fmt_pct(r.get("frob", float("nan"))), fmt_pct(r["eig_max"]),
             fmt_pct(r["eig_mean"]), fmt_pct(r["curve"]), fmt_pct(r["t0.01"]), fmt_pct(r["t0.05"])] for r in rows]
    return md_table(head, body)


# ------------------------------------------------------------------------------------------- cost

def epoch_seconds(model, ds, batch_size: int) -> float:
    """One epoch of forward + backward (MSE, METHOD.md §1) over ``ds``; parameter gradients only."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    x, y = ds.x, torch.nn.functional.one_hot(ds.targets, ds.num_classes).float()
    t0 = time.perf_counter()
    for s in range(0, len(ds), batch_size):
        out = model(x[s:s + batch_size])
        loss = 0.5 * ((out - y[s:s + batch_size]) ** 2).sum(1).mean()
        torch.autograd.grad(loss, params)
    return time.perf_counter() - t0


def cost_study(model, ds, configs: Dict[str, Tuple[KernelOptions, bool]], repeats: int
               ) -> Tuple[Dict[str, float], Dict[str, dict]]:
    """Median kernel-estimate seconds per config (gradient pass + projection, as compute_kernel_state runs
    it) and, for the configs flagged True (the default and the previous default), the eigen step too;
    interleaved with the epochs, so that every ratio is taken within one run."""
    epochs: Dict[str, List[float]] = {"128": [], "full": []}
    runs: Dict[str, List[Tuple[float, float]]] = {name: [] for name in configs}
    for _ in range(repeats):
        epochs["128"].append(epoch_seconds(model, ds, EPOCH_BATCH))
        epochs["full"].append(epoch_seconds(model, ds, len(ds)))
        for name, (o, with_eigen) in configs.items():
            if with_eigen:
                st = compute_kernel_state(model, ds, o)
                runs[name].append((st.meta["kernel_seconds"], st.meta["eigen_seconds"]))
                continue
            grads = PerSampleGradients.from_module(model, "all", o.engine)
            sk = kernel_sketch(grads, ds, ds.num_classes, k=o.k, projection=o.projection, class_trace=o.class_trace,
                               class_probes=o.class_probes, seed=o.seed, memory_cap_mb=o.memory_cap_mb,
                               outer_width=o.outer_width)
            runs[name].append((sk.seconds, float("nan")))
    ep = {k: float(np.median(v)) for k, v in epochs.items()}
    res = {}
    for name, r in runs.items():
        ks, es = float(np.median([a for a, _ in r])), float(np.median([b for _, b in r]))
        tot = float(np.median([a + b for a, b in r]))
        res[name] = {"kernel_s": ks, "eigen_s": es, "ratio_128": ks / ep["128"], "ratio_full": ks / ep["full"],
                     "ratio_with_eigen_128": tot / ep["128"]}
    return ep, res


def breakdown_study(model, ds, options: KernelOptions, repeats: int) -> Dict[str, float]:
    """Where the default estimate's time goes, medians over ``repeats`` interleaved with the epochs (B=128): the
    hooked forward and backward (outputs and each layer's output gradients), the assembly of per-sample
    gradients from them, their projection, and the eigen step split into its Gram matrix and its eigh.
    Same chunking as :func:`ttp_ray.kernel.kernel_sketch` (samples whose largest gradient block fits 4 MiB)."""
    from ttp_ray.kernel import class_probe_cotangents
    from ttp_ray.kernel.projections import PROJECTION_CLASSES, input_side_projection

    grads = PerSampleGradients.from_module(model, "all", options.engine)
    cot = class_probe_cotangents(ds.num_classes, options.class_probes, options.seed, grads.dtype)
    reduce = {}  # KernelOptions.outer_width, as kernel_sketch applies it
    for name in (grads.outer_products(ds.x[:1]) if options.outer_width else []):
        t = grads.names.index(name)
        fan_in = grads.sizes[t] // grads.shapes[t][0]
        if fan_in > options.outer_width:
            reduce[name] = input_side_projection(fan_in, options.outer_width, options.seed, t, grads.dtype, "cpu")
    lengths = [cot.shape[0] * (grads.shapes[t][0] * options.outer_width if name in reduce else size)
               for t, (name, size) in enumerate(zip(grads.names, grads.sizes))]
    proj = PROJECTION_CLASSES[options.projection](lengths, options.k, options.seed, grads.dtype, grads.device)
    n = len(ds)
    chunk = max(1, 4 * 2**20 // (max(lengths) * 4))
    parts: Dict[str, List[float]] = {key: [] for key in ("epoch", "forward_backward", "assemble", "project",
                                                          "gram", "eigh")}
    for _ in range(repeats):
        parts["epoch"].append(epoch_seconds(model, ds, EPOCH_BATCH))
        t0 = time.perf_counter()
        out, block = grads.compute(ds.x, cot, reduce)
        parts["forward_backward"].append(time.perf_counter() - t0)
        ws = proj.begin(n)
        assemble = project = 0.0
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            for t, name in enumerate(grads.names):
                a0 = time.perf_counter()
                g = block(name, lo, hi).reshape(hi - lo, lengths[t])
                a1 = time.perf_counter()
                proj.accumulate(t, g, ws[lo:hi])
                assemble, project = assemble + a1 - a0, project + time.perf_counter() - a1
        z = proj.finish(ws)
        parts["assemble"].append(assemble)
        parts["project"].append(project)
        t0 = time.perf_counter()
        zd = z.to(options.torch_dtype)
        gram = gram_matrix(zd if zd.shape[0] < zd.shape[1] else zd.T.contiguous())
        t1 = time.perf_counter()
        torch.linalg.eigh(gram.to(getattr(torch, options.eigh_dtype)))
        parts["gram"].append(t1 - t0)
        parts["eigh"].append(time.perf_counter() - t1)
    return {key: float(np.median(v)) for key, v in parts.items()}


# ---------------------------------------------------------------------------------------- scaling

def scaling_worker(n: int) -> None:
    """Subprocess body: default kernel state on a synthetic set of size n; prints one JSON line."""
    torch.set_num_threads(1)
    ds = load_dataset(f"synthetic:n={n},classes=10,size=8,seed=0")
    model = build_finetune_model("digits-cnn", 10)
    opts = KernelOptions()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        st = compute_kernel_state(model, ds, opts)
    wall = time.perf_counter() - t0
    grad_only = KernelOptions(k=opts.k)  # the streaming part alone: gradients + projection, no eigen step
    grads = PerSampleGradients.from_module(model, "all", grad_only.engine)
    with PeakRSS() as mem_stream:
        kernel_sketch(grads, ds, ds.num_classes, k=grad_only.k, class_trace=grad_only.class_trace,
                      memory_cap_mb=grad_only.memory_cap_mb)
    print(json.dumps({"n": n, "wall_s": wall, "kernel_s": st.meta["kernel_seconds"], "eigen_s": st.meta["eigen_seconds"],
                      "batch_size": st.meta["batch_size"], "rank": st.meta["rank"], "delta_mb": mem.delta_mb,
                      "stream_delta_mb": mem_stream.delta_mb,
                      "z_mb": st.sketch.numel() * st.sketch.element_size() / 2**20}))


def scaling_study(ns: List[int], budget_s: float) -> List[dict]:
    return run_workers(Path(__file__), [["--scaling-worker", str(n)] for n in ns], budget_s, "scaling",
                       lambda r: f"{r['wall_s']:.1f}s, peak +{r['stream_delta_mb']:.0f} MB streaming, "
                                 f"+{r['delta_mb']:.0f} MB with eigen")


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer k values")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-ns", default="500,1000,2000,5000,10000,20000")
    ap.add_argument("--scaling-budget", type=float, default=150.0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--scaling-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scaling_worker is not None:
        scaling_worker(args.scaling_worker)
        return
    from _report import md_table, write_section

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    ds = load_dataset(DATASET)
    default = KernelOptions()
    parts = [
        f"Default `KernelOptions()`: method={default.method}, projection={default.projection}, k={default.k}, "
        f"class_trace={default.class_trace}, class_probes={default.class_probes}, engine={default.engine}, "
        f"eigen_solver={default.eigen_solver}, dtype={default.dtype}, eigh_dtype={default.eigh_dtype}. Dataset `{DATASET}` "
        f"(N={len(ds)}, C={ds.num_classes}), trainable all, one thread. Why this default: "
        "the note after this section.\n\n"
        "Reading the accuracy tables: every estimate is judged against the exact *full* kernel. Class-trace "
        "rows stop improving with k: their error is the class-trace approximation (the `exact class-trace` "
        "row) plus the draw of the single shared class probe, not the projection. Full-kernel sketches have "
        "rank <= k < NC, so their loss curves converge only as k approaches the number of modes that move "
        "within the budget. T_eps errors are relative to the exact kernel's own T_eps, not to real training; "
        "`diverged` = the sketched lambda_max puts the fixed lr beyond the stability limit.",
    ]
    summary = {}
    for name in args.models.split(","):
        log(f"{name}")
        model = build_finetune_model(name, ds.num_classes)
        d = sum(p.numel() for p in model.parameters())
        ref_seconds = None
        if not args.skip_accuracy:
            ref = Reference(model, ds)
            rows = accuracy_study(model, ds, ref, list(range(args.seeds)), args.quick)
            parts.append(
                f"### {name}: accuracy against the exact kernel (D={d}, NC={ref.n * ref.c})\n\n"
                f"Reference: exact full kernel (kernel {ref.meta['kernel_seconds']:.0f}s + eigh "
                f"{ref.meta['eigen_seconds']:.0f}s when computed); lr = 0.5 x max stable = {ref.eta:.4g}; "
                f"T_eps(0.01) = {ref.t_eps[0.01]}, T_eps(0.05) = {ref.t_eps[0.05]} of {STEPS} steps. "
                f"Sketch rows: mean over {args.seeds} seeds (projection and class probes).\n\n"
                + accuracy_table(rows))
            summary[name] = {"accuracy": rows}
            ref_seconds = ref.meta["kernel_seconds"] + ref.meta["eigen_seconds"]
        if not args.skip_cost:
            log("  cost")
            c = ds.num_classes
            previous = replace(default, eigh_dtype="float64", outer_width=0)
            configs = {
                f"default (class-trace, 1 probe, countsketch, k=2048, hooks, outer_width {default.outer_width}, "
                f"eigh {default.eigh_dtype})": (default, True),
                "previous default (outer_width 0, eigh float64)": (previous, True),
                "default with outer_width 0": (replace(default, outer_width=0), False),
                "class-trace, 1 probe, countsketch, engine vmap": (replace(default, engine="vmap"), False),
                "class-trace, 1 probe, subset": (replace(default, projection="subset"), False),
                f"class-trace, {c} probes (exact trace), countsketch": (replace(default, class_probes=c), False),
                "full, countsketch, k=2048": (replace(default, class_trace=False), False),
                "full, countsketch, k=2048, engine vmap": (replace(default, class_trace=False, engine="vmap"), False),
            }
            ep, res = cost_study(model, ds, configs, args.repeats)
            body = [[cfg, f"{r['kernel_s']:.3f}", f"{r['ratio_128']:.2f}", f"{r['ratio_full']:.2f}",
                     "-" if math.isnan(r["eigen_s"]) else f"{r['eigen_s']:.3f}",
                     "-" if math.isnan(r["eigen_s"]) else f"{r['ratio_with_eigen_128']:.2f}"] for cfg, r in res.items()]
            parts.append(
                f"### {name}: cost (median of {args.repeats})\n\nOne epoch forward+backward: "
                f"{ep['128']:.3f}s at batch {EPOCH_BATCH}, {ep['full']:.3f}s full batch.\n\n"
                + md_table(["estimate", "kernel s", f"ratio (epoch B={EPOCH_BATCH})", "ratio (full-batch epoch)",
                            "eigen s", f"ratio incl. eigen (B={EPOCH_BATCH})"], body)
                + (f"\n\nExact full kernel (reference above): {ref_seconds:.1f}s when computed, "
                   f"{ref_seconds / ep['128']:.0f} epochs (B={EPOCH_BATCH})." if ref_seconds else ""))
            summary.setdefault(name, {})["cost"] = {"epoch": ep, "runs": res}
            bd = breakdown_study(model, ds, default, args.repeats)
            body = [[part, f"{bd[part]:.3f}", f"{bd[part] / bd['epoch']:.2f}"]
                    for part in BREAKDOWN_PARTS]
            body.append(["total", f"{sum(bd[p] for p in BREAKDOWN_PARTS):.3f}",
                         f"{sum(bd[p] for p in BREAKDOWN_PARTS) / bd['epoch']:.2f}"])
            parts.append(
                f"### {name}: where the default estimate's time goes (median of {args.repeats})\n\n"
                f"Separately timed parts of the default estimate, interleaved with the epochs (B={EPOCH_BATCH}: "
                f"{bd['epoch']:.3f}s in this study): the hooked forward and backward to each layer's output, the "
                "assembly of per-sample gradients from layer inputs and output gradients, their count-sketch "
                "projection, and the eigen step (Gram matrix in float64, its eigh in "
                f"{default.eigh_dtype}). Timing each part separately adds a little overhead.\n\n"
                + md_table(["part", "seconds", "epochs (B=128)"], body))
            summary[name]["breakdown"] = bd
    if not args.skip_scaling:
        log("scaling")
        ns = [int(v) for v in args.scaling_ns.split(",")]
        sc = scaling_study(ns, args.scaling_budget)
        body = [[r["n"], f"{r['wall_s']:.1f}", f"{r['kernel_s']:.1f}", f"{r['eigen_s']:.1f}",
                 f"{1e3 * r['kernel_s'] / r['n']:.2f}", r["batch_size"], f"{r['z_mb']:.0f}", f"{r['stream_delta_mb']:.0f}",
                 f"{r['delta_mb']:.0f}"] for r in sc]
        parts.append(
            "### Scaling in N (digits-cnn, synthetic 8x8, C=10, default options, one subprocess per N)\n\n"
            f"memory_cap_mb = {KernelOptions().memory_cap_mb:.0f} bounds the streamed working set; Z (N x k float32) "
            "and the eigen step (Gram matrix in float64, its eigh in float32) grow with N. Peak RSS above the RSS at the call, sampled every 5 ms.\n\n"
            + md_table(["N", "wall s", "kernel s", "eigen s", "kernel ms / sample", "batch", "Z MB",
                        "peak MB, gradient pass", "peak MB, with eigen step"], body))
        summary["scaling"] = sc
    log(f"total {time.perf_counter() - t_all:.0f}s")
    text = "## Kernel (issue 3)\n\n" + "\n\n".join(parts)
    if args.no_write:
        print(text)
    else:
        write_json("kernel.json", summary)  # runs/bench/kernel.json: the figures bench/report.py gathers
        write_section("kernel", text, ".venv/bin/python bench/kernel.py")


if __name__ == "__main__":
    main()
