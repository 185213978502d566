"""How far the empirical NTK moves during real fine-tuning (why the predictor misses at large momentum).

The predictor assumes Theta stays at its value at w0 (METHOD.md §2). This bench fine-tunes for real
(full-batch GD, digits-5to9, both embedded backbones, mse and ce) and recomputes the kernel state at the
weights reached after t steps: the ratio tr Theta_t / tr Theta_0 (and lambda_max) says how much the
linearisation's kernel is off at step t. Configs: m = 0 at 0.6 x max_stable_lr(0) and m = 0.9 at 0.05, 0.2,
0.6 x max_stable_lr(0.9) (the lr fractions of bench/accuracy.py). Kernel: class-trace countsketch, k = 512
(the trace is what matters here; the default k = 2048 gives the same ratios to a few %).

Run: ``.venv/bin/python bench/kernel_drift.py`` (about 5 minutes here); writes the ``kernel-drift`` section
of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import md_table, write_section  # noqa: E402

from ttp_ray.data import load_dataset  # noqa: E402
from ttp_ray.finetune import FinetuneConfig, finetune  # noqa: E402
from ttp_ray.kernel import KernelOptions, compute_kernel_state  # noqa: E402
from ttp_ray.models import build_finetune_model  # noqa: E402
from ttp_ray.predict import load_state  # noqa: E402

CONFIGS = ((0.0, 0.6), (0.9, 0.05), (0.9, 0.2), (0.9, 0.6))  # (momentum, fraction of max_stable_lr(m))
CHECKPOINTS = (10, 20, 40)


def kernel_trace(model, ds, options: KernelOptions) -> tuple:
    lam = compute_kernel_state(model, ds, options).eigvals.double()
    return float(lam.sum()), float(lam.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits-5to9")
    ap.add_argument("--backbones", nargs="+", default=["digits-cnn", "digits-resnet"])
    ap.add_argument("--k", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(args.dataset)
    opts = KernelOptions(k=args.k)
    rows = []
    t_all = time.perf_counter()
    for backbone in args.backbones:
        limit = load_state(backbone, ds, KernelOptions())  # lrs as in bench/accuracy.py (default kernel)
        for loss in ("mse", "ce"):
            for momentum, frac in CONFIGS:
                lr = frac * limit.max_stable_lr(momentum)
                model = build_finetune_model(backbone, ds.num_classes, 0)
                tr0, lm0 = kernel_trace(model, ds, opts)
                ratios = []
                for t in CHECKPOINTS:
                    # a fresh run to t each time: continuing in segments would drop the momentum buffer
                    model = build_finetune_model(backbone, ds.num_classes, 0)
                    res = finetune(model, ds, FinetuneConfig(lr=lr, momentum=momentum, batch_size=None, loss=loss,
                                                             steps=t, seed=0, log_every=t))
                    if res.diverged:
                        ratios.append(("diverged", "diverged"))
                        continue
                    tr, lm = kernel_trace(model, ds, opts)
                    ratios.append((f"{tr / tr0:.2f}", f"{lm / lm0:.2f}"))
                rows.append([backbone, loss, momentum, f"{frac}x", f"{lr / (1 - momentum) / limit.max_stable_lr(0.0):.1f}"]
                            + [r[0] for r in ratios] + [ratios[-1][1]])
                print(rows[-1], flush=True)
    body = ("## Kernel drift during real fine-tuning (bench/kernel_drift.py)\n\n"
            f"Full-batch GD on {args.dataset}; the kernel state (class-trace countsketch, k = {args.k}) recomputed at "
            "the weights after t real steps, as a ratio to the kernel at w0. *ELR / GD limit*: "
            "lr/(1-m) x lambda_max / 2N, the effective lr as a multiple of the plain-GD stability limit "
            "(> 1: beyond the regime where the linearised ELR map is stable).\n\n"
            + md_table(["backbone", "loss", "m", "lr (x max_stable_lr(m))", "ELR / GD limit"]
                       + [f"tr Θ_{t} / tr Θ_0" for t in CHECKPOINTS] + [f"λmax_{CHECKPOINTS[-1]} / λmax_0"], rows)
            + f"\n\nWall time {time.perf_counter() - t_all:.0f} s.")
    write_section("kernel-drift", body, "python bench/kernel_drift.py")
    print(body)


if __name__ == "__main__":
    main()
