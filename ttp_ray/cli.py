"""The ``ttp-ray`` command line: a thin click layer over the core.

Bad input ends in one line ``error: <field>: <what is allowed>`` on stderr and exit code 2, never a
traceback.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import click

__all__ = ["main", "cli", "InputError"]


class InputError(ValueError):
    """Bad user input: reported as one line, exit code 2."""


def _user_errors():
    from .data import DatasetError
    from .models import ModelError

    from .sweep.spec import SpecError

    return (InputError, DatasetError, ModelError, SpecError, ValueError)


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def main(argv=None) -> None:
    """Entry point: runs the click group and turns user errors into one line, exit code 2."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        cli.main(args=argv, prog_name="ttp-ray", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "))
    except _user_errors() as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        click.echo("interrupted: results written so far are kept", err=True)
        sys.exit(130)


class BatchSize(click.ParamType):
    """An integer batch size or ``full`` (B = N)."""

    name = "INT|full"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "full":
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not an integer or 'full'", param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ttp-ray")
def cli() -> None:
    """Predict how many SGD steps fine-tuning will take, without training (Zancato et al. 2020)."""


@cli.command()
def datasets() -> None:
    """List the datasets ttp-ray can load."""
    from .data import list_datasets

    for name, desc in list_datasets().items():
        click.echo(f"{name:52s} {desc}")


@cli.command()
def models() -> None:
    """List the backbones ttp-ray can fine-tune."""
    from .models import list_models

    for name, desc in list_models().items():
        click.echo(f"{name:26s} {desc}")


@cli.command()
@click.option("--model", "names", multiple=True, default=("digits-cnn", "digits-resnet"), show_default=True,
              help="Embedded backbone(s) to (re)build.")
def pretrain(names) -> None:
    """Rebuild the embedded backbones on digits-0to4 (deterministic) and report their accuracy."""
    from .models import load_pretrained_digits

    for name in names:
        if name not in ("digits-cnn", "digits-resnet"):
            raise InputError(f"model: {name!r} is not pre-trained by ttp-ray; allowed: digits-cnn, digits-resnet")
        _, rep = load_pretrained_digits(name, rebuild=True, verbose=True)
        click.echo(f"{name}: train accuracy {rep['train_accuracy']:.4f}, held-out accuracy "
                   f"{rep['holdout_accuracy']:.4f}, {rep['seconds']:.1f} s, recipe {rep['recipe']}")


def common_run_options(f):
    """Flags shared by ``finetune`` and ``predict`` so the two compare line by line."""
    opts = [
        click.option("--dataset", default="digits-5to9", show_default=True, help="Dataset name (ttp-ray datasets)."),
        click.option("--subset", type=int, default=None, help="Class-balanced seeded subset of N0 samples."),
        click.option("--model", default="digits-cnn", show_default=True, help="Backbone (ttp-ray models)."),
        click.option("--lr", type=float, required=True, help="SGD learning rate eta (> 0)."),
        click.option("--momentum", type=float, default=0.0, show_default=True, help="SGD momentum m in [0, 1)."),
        click.option("--batch-size", type=BatchSize(), default="full", show_default=True,
                     help="Batch size B, or 'full' for gradient descent."),
        click.option("--loss", type=click.Choice(["mse", "ce"]), default="ce", show_default=True),
        click.option("--steps", type=int, default=500, show_default=True, help="Step budget T."),
        click.option("--eps", "eps_list", type=float, multiple=True, default=(0.01,), show_default=True,
                     help="Threshold(s) epsilon for T_eps (repeatable)."),
        click.option("--eps-mode", type=click.Choice(["absolute", "relative"]), default="absolute",
                     show_default=True, help="relative: eps times the curve's drop L_0 - L_T."),
        click.option("--log-every", type=int, default=1, show_default=True, help="Log the curve every k steps."),
        click.option("--seed", type=int, default=0, show_default=True, help="Minibatch-order seed."),
        click.option("--head-seed", type=int, default=0, show_default=True, help="Seed of the new linear head."),
        click.option("--trainable", type=click.Choice(["all", "head"]), default="all", show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--download", is_flag=True, help="Allow downloading missing datasets/weights."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _validate_common(kw, n: Optional[int] = None) -> None:
    from .finetune import FinetuneConfig

    if any(e <= 0 for e in kw["eps_list"]):
        raise InputError(f"eps: every value must be > 0, got {', '.join(map(str, kw['eps_list']))}")
    if kw["subset"] is not None and kw["subset"] <= 0:
        raise InputError(f"subset: must be a positive integer, got {kw['subset']}")
    FinetuneConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"],
                   steps=kw["steps"], seed=kw["seed"], log_every=kw["log_every"],
                   trainable=kw["trainable"]).validate(n)


def _load_inputs(kw):
    from .data import load_dataset
    from .models import build_finetune_model

    _validate_common(kw)
    ds = load_dataset(kw["dataset"], subset=kw["subset"], download=kw["download"])
    _validate_common(kw, len(ds))
    model = build_finetune_model(kw["model"], ds.num_classes, kw["head_seed"], allow_download=kw["download"])
    return ds, model


def _curve_rows(steps, curves, kw, diverged):
    from .training_time import curve_training_times

    return curve_training_times(steps, curves, kw["eps_list"], budget=kw["steps"], eps_mode=kw["eps_mode"],
                                diverged=diverged)


@cli.command()
@common_run_options
def finetune(**kw) -> None:
    """Fine-tune for real (ground truth): full-set loss/error curve, T_eps, step time."""
    from .finetune import FinetuneConfig, finetune as run_finetune

    ds, model = _load_inputs(kw)
    cfg = FinetuneConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"],
                         steps=kw["steps"], seed=kw["seed"], log_every=kw["log_every"], trainable=kw["trainable"])
    res = run_finetune(model, ds, cfg, device=kw["device"])
    times = _curve_rows(res.steps, res.curves(), kw, res.diverged)
    out = {
        "kind": "finetune",
        "dataset": kw["dataset"], "model": kw["model"], "n": res.n, "num_classes": ds.num_classes,
        "lr": cfg.lr, "momentum": cfg.momentum, "batch_size": res.batch_size, "loss": cfg.loss,
        "steps": cfg.steps, "seed": cfg.seed, "head_seed": kw["head_seed"], "trainable": cfg.trainable,
        "effective_lr": cfg.lr / (1 - cfg.momentum), "eps_mode": kw["eps_mode"],
        "diverged": res.diverged,
        "final_loss": None if res.diverged else float(res.loss[-1]),
        "final_error": None if res.diverged else float(res.error[-1]),
        "training_times": times,
        "step_time_s": res.step_time_s, "train_seconds": res.train_seconds, "device": res.device,
        "curve": {"steps": res.steps.tolist(), "loss": res.loss.tolist(), "error": res.error.tolist()},
    }
    if kw["as_json"]:
        click.echo(json.dumps(out))
        return
    _print_run(out)


def prediction_options(f):
    """Kernel and dynamics options of ``predict`` (defaults are those of KernelOptions / SimOptions)."""
    from .dynamics import METHODS, MOMENTUM_MODES, NOISE_MODELS
    from .kernel import KernelOptions
    from .relinearise import RelinearisationOptions

    d = KernelOptions()
    r = RelinearisationOptions()
    opts = [
        click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
                     help="Dynamics: ode, discrete (GD), sde, minibatch (SGD); auto picks discrete / sde."),
        click.option("--momentum-mode", type=click.Choice(MOMENTUM_MODES), default="auto", show_default=True,
                     help="elr: lr/(1-m) (paper); heavy_ball: exact momentum."),
        click.option("--noise", type=click.Choice(NOISE_MODELS), default="rescaled", show_default=True,
                     help="SDE noise: rescaled by L_t/L_0 (paper) or constant (ablation)."),
        click.option("--paths", type=int, default=8, show_default=True, help="SDE / minibatch sample paths."),
        click.option("--kernel-method", type=click.Choice(["sketch", "exact"]), default=d.method, show_default=True),
        click.option("--projection", default=d.projection, show_default=True, help="Sketch projection kind."),
        click.option("--k", "sketch_k", type=int, default=d.k, show_default=True, help="Sketch width k."),
        click.option("--class-trace/--full-kernel", default=None,
                     help="Class-trace kernel Theta_N (x) I_C instead of the full NC x NC kernel "
                          "[default: class trace; full kernel with --relinearise]."),
        click.option("--kernel-seed", type=int, default=d.seed, show_default=True),
        click.option("--no-cache", is_flag=True, help="Recompute the kernel even if a cached state exists."),
        click.option("--validate", is_flag=True, help="Also fine-tune for real and print the relative error."),
        click.option("--relinearise", is_flag=True,
                     help="Full-batch GD only: re-linearise along the predicted trajectory (one kernel per "
                          "segment, segments sized by local error control; ttp_ray.relinearise). Costs a "
                          "sizeable fraction of the fine-tuning it predicts."),
        click.option("--relin-tolerance", type=float, default=r.tolerance, show_default=True,
                     help="--relinearise: accepted ||f(w') - f(w_k) - J_k dw|| / ||J_k dw|| per segment."),
        click.option("--max-kernels", type=int, default=r.max_kernels, show_default=True,
                     help="--relinearise: kernel sketches per prediction at most."),
        click.option("--drift-reference", type=float, default=None, metavar="FRACTION",
                     help="Full-batch GD: calibrate the kernel's drift on one real plain-GD fine-tune at FRACTION "
                          "x max_stable_lr(0) (same loss and budget), then warp the frozen ODE (ttp_ray.drift). "
                          "Costs one real fine-tune per (dataset, loss), which a grid of configs would share."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@cli.command()
@common_run_options
@prediction_options
@click.option("--kernel-subset", type=int, default=None,
              help="Kernel of a seeded subset of N0 samples only; the full set's spectrum is extrapolated "
                   "(METHOD.md §7; mse, full-batch GD; loss curve only).")
@click.option("--kernel-subset-alpha", type=float, default=None,
              help="Exponent correction alpha of --kernel-subset [default: ttp_ray.subset.DEFAULT_ALPHA].")
def predict(**kw) -> None:
    """Predict the loss/error curve and T_eps without training (Algorithm 1); --validate trains too."""
    from .dynamics import SimConfig, SimOptions
    from .finetune import measure_step_time
    from .kernel import KernelOptions
    from .predict import PredictSettings, load_state, load_subset_state, predict_one, predict_subset_one

    if kw["paths"] <= 0:
        raise InputError(f"paths: must be a positive integer, got {kw['paths']}")
    if kw["sketch_k"] <= 0:
        raise InputError(f"k: must be a positive integer, got {kw['sketch_k']}")
    if kw["relinearise"] and kw["kernel_subset"] is not None:
        raise InputError("relinearise: cannot be combined with --kernel-subset (it needs the full set's kernel)")
    if kw["relinearise"] and kw["batch_size"] is not None:
        raise InputError(f"batch_size: --relinearise simulates full-batch GD only; allowed: full, got {kw['batch_size']}")
    if kw["drift_reference"] is not None:
        f = kw["drift_reference"]
        if not (0 < f <= 1):
            raise InputError(f"drift_reference: must be a fraction of max_stable_lr(0) in (0, 1], got {f}")
        if kw["batch_size"] is not None:
            raise InputError(f"batch_size: --drift-reference predicts full-batch GD only; allowed: full, got {kw['batch_size']}")
        if kw["relinearise"] or kw["kernel_subset"] is not None:
            raise InputError("drift_reference: cannot be combined with --relinearise or --kernel-subset")
    ds, model = _load_inputs(kw)
    class_trace = kw["class_trace"]
    if class_trace is None:
        class_trace = False if kw["relinearise"] else KernelOptions().class_trace
    kopt = KernelOptions(method=kw["kernel_method"], projection=kw["projection"], k=kw["sketch_k"],
                         class_trace=class_trace, seed=kw["kernel_seed"])
    if kw["relinearise"]:
        _predict_relinearised(kw, ds, model, kopt)
        return
    if kw["kernel_subset"] is not None:  # issue 5: extrapolate the full set's spectrum from a subset
        from .subset import DEFAULT_ALPHA, SubsetOptions

        alpha = DEFAULT_ALPHA if kw["kernel_subset_alpha"] is None else kw["kernel_subset_alpha"]
        prepared = load_subset_state(kw["model"], ds, kw["kernel_subset"], kopt, options=SubsetOptions(alpha=alpha),
                                     head_seed=kw["head_seed"], trainable=kw["trainable"], device=kw["device"],
                                     cache=not kw["no_cache"])
    else:
        prepared = load_state(kw["model"], ds, kopt, head_seed=kw["head_seed"], trainable=kw["trainable"],
                              device=kw["device"], cache=not kw["no_cache"])
    if kw["drift_reference"] is not None:
        _predict_with_drift(kw, ds, prepared)
        return
    sim = SimOptions(method=kw["method"], momentum_mode=kw["momentum_mode"], noise=kw["noise"], paths=kw["paths"],
                     seed=kw["seed"], log_every=kw["log_every"])
    settings = PredictSettings(sim=sim, eps_mode=kw["eps_mode"])
    cfg = SimConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"])
    predict_fn = predict_one if kw["kernel_subset"] is None else predict_subset_one
    pred = predict_fn(prepared, cfg, budget_steps=kw["steps"], eps_list=kw["eps_list"], settings=settings)
    res = pred.result
    step_time = measure_step_time(prepared.model, ds, kw["batch_size"], kw["loss"], device=kw["device"],
                                  trainable=kw["trainable"])
    times = [{"criterion": r["criterion"], "eps": r["eps"], "steps": r["predicted_steps"],
              "fraction": r["predicted_fraction"]} for r in pred.rows]
    out = {
        **_prediction_header(kw, ds, cfg, res.diverged, res.loss, res.error, times, step_time),
        "max_stable_lr": res.max_stable_lr, "method": res.method, "momentum_mode": res.momentum_mode,
        "kernel": {k: v for k, v in prepared.state.meta.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "kernel_seconds": prepared.kernel_seconds, "kernel_cache_hit": prepared.cache_hit,
        "simulate_seconds": res.seconds, "note": res.note,
        "curve": {"steps": res.steps.tolist(), "loss": res.loss.tolist(),
                  "error": None if res.error is None else res.error.tolist()},
    }
    if kw["kernel_subset"] is not None:
        out["kernel_subset"] = prepared.spectrum.summary()
    _emit_prediction(kw, ds, out, f"method {out['method']} ({out['momentum_mode']}), kernel {out['kernel_seconds']:.2f} s"
                                  f"{' (cached)' if out['kernel_cache_hit'] else ''}, simulation "
                                  f"{out['simulate_seconds']:.3f} s")


def _prediction_header(kw, ds, cfg, diverged: bool, loss, error, times, step_time: float) -> dict:
    """The fields ``predict --json`` shares with ``finetune --json`` (compared line by line)."""
    return {
        "kind": "predict",
        "dataset": kw["dataset"], "model": kw["model"], "n": len(ds), "num_classes": ds.num_classes,
        "lr": cfg.lr, "momentum": cfg.momentum, "batch_size": kw["batch_size"] or len(ds), "loss": cfg.loss,
        "steps": kw["steps"], "seed": kw["seed"], "head_seed": kw["head_seed"], "trainable": kw["trainable"],
        "effective_lr": cfg.effective_lr, "eps_mode": kw["eps_mode"],
        "diverged": diverged,
        "final_loss": None if diverged else float(loss[-1]),
        "final_error": None if diverged or error is None else float(error[-1]),
        "training_times": times,
        "step_time_s": step_time, "device": kw["device"],
    }


def _emit_prediction(kw, ds, out: dict, detail: str) -> None:
    """Optionally fine-tune for real (``--validate``), then print ``out`` as JSON or as text."""
    if kw["validate"]:
        out["validation"] = _validate_against_training(kw, ds, out)
    if kw["as_json"]:
        click.echo(json.dumps(out))
        return
    _print_run(out)
    click.echo(f"  max stable lr {out['max_stable_lr']:.4g} (2(1+m)N/lambda_max at w0), {detail}")
    for v in out.get("validation", {}).get("training_times", []):
        err = "n/a" if v["relative_error"] is None else f"{100 * v['relative_error']:.1f}%"
        click.echo(f"  real T_eps[{v['criterion']}, eps={v['eps']:g}] = {v['actual_steps']}, "
                   f"predicted {v['predicted_steps']}, relative error {err}")


def _logged_points(count: int, log_every: int):
    """Mask of the points of a per-step curve that ``--log-every`` keeps: every log_every-th, and the last one
    reached (the budget, or the last before divergence)."""
    import numpy as np

    keep = np.arange(count) % log_every == 0
    keep[-1] = True
    return keep


def _predict_with_drift(kw, ds, prepared) -> None:
    """``predict --drift-reference F``: one real reference run calibrates s(L), the frozen ODE is warped by it."""
    import time

    from .drift import reference_drift, simulate_with_drift
    from .dynamics import SimConfig
    from .finetune import measure_step_time

    cfg = SimConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=None, loss=kw["loss"])
    t0 = time.perf_counter()
    drift, real = reference_drift(prepared.model, ds, prepared.state, kw["loss"], kw["drift_reference"], kw["steps"],
                                  trainable=kw["trainable"], device=kw["device"])
    ref_seconds = time.perf_counter() - t0
    (res,) = simulate_with_drift(prepared.state, [cfg], kw["steps"], drift)
    keep = _logged_points(len(res.steps), kw["log_every"])
    steps, loss_c = res.steps[keep], res.loss[keep]
    err_c = None if res.error is None else res.error[keep]
    curves = {"loss": loss_c} if err_c is None else {"loss": loss_c, "error": err_c}
    times = _curve_rows(steps, curves, kw, res.diverged)
    step_time = measure_step_time(prepared.model, ds, None, kw["loss"], device=kw["device"], trainable=kw["trainable"])
    out = {
        **_prediction_header(kw, ds, cfg, res.diverged, res.loss, res.error, times, step_time),
        "max_stable_lr": res.max_stable_lr, "method": res.method, "momentum_mode": res.momentum_mode,
        "kernel": {k: v for k, v in prepared.state.meta.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "kernel_seconds": prepared.kernel_seconds, "kernel_cache_hit": prepared.cache_hit,
        "simulate_seconds": res.seconds, "note": res.note,
        "drift": {"reference_lr": real.config.lr, "reference_fraction": kw["drift_reference"],
                  "reference_diverged": bool(real.diverged), "reference_seconds": ref_seconds,
                  "scale_min": float(drift.scale.min()), "scale_max": drift.max_scale},
        "curve": {"steps": steps.tolist(), "loss": loss_c.tolist(), "error": None if err_c is None else err_c.tolist()},
    }
    _emit_prediction(kw, ds, out, f"method {res.method}: drift s(L) in [{drift.scale.min():.2f}, {drift.max_scale:.2f}] "
                                  f"from a real reference run at lr {real.config.lr:.4g} ({ref_seconds:.1f} s), kernel "
                                  f"{prepared.kernel_seconds:.2f} s, simulation {res.seconds:.2f} s")


def _predict_relinearised(kw, ds, model, kopt) -> None:
    """``predict --relinearise``: the same output fields, from :func:`ttp_ray.relinearise.relinearised_curves`."""
    from .dynamics import SimConfig
    from .finetune import measure_step_time
    from .relinearise import RelinearisationOptions, relinearised_curves

    try:
        opts = RelinearisationOptions(tolerance=kw["relin_tolerance"], max_kernels=kw["max_kernels"], kernel=kopt)
    except ValueError as e:
        raise InputError(str(e)) from None
    cfg = SimConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=None, loss=kw["loss"])
    res = relinearised_curves(model, ds, cfg, kw["steps"], opts, trainable=kw["trainable"], device=kw["device"])
    keep = _logged_points(len(res.steps), kw["log_every"])
    steps, loss_c, err_c = res.steps[keep], res.loss[keep], res.error[keep]
    times = _curve_rows(steps, {"loss": loss_c, "error": err_c}, kw, res.diverged)
    step_time = measure_step_time(model, ds, None, kw["loss"], device=kw["device"], trainable=kw["trainable"])
    out = {
        **_prediction_header(kw, ds, cfg, res.diverged, res.loss, res.error, times, step_time),
        "max_stable_lr": res.max_stable_lr, "method": res.method, "momentum_mode": "heavy_ball",
        "kernel": {"kind": kopt.method, "class_trace": kopt.class_trace, "projection": kopt.projection,
                   "k": kopt.k, "seed": kopt.seed},
        "kernel_seconds": res.kernel_seconds, "kernel_cache_hit": False,
        "simulate_seconds": res.seconds - res.kernel_seconds, "note": res.note,
        "kernels": res.kernels, "rejected_segments": res.rejected, "segment_ends": res.segment_ends,
        "curve": {"steps": steps.tolist(), "loss": loss_c.tolist(), "error": err_c.tolist()},
    }
    _emit_prediction(kw, ds, out, f"method relinearised: {res.kernels} kernels ({res.rejected} segments redone), "
                                  f"kernels {res.kernel_seconds:.2f} s, whole prediction {res.seconds:.2f} s"
                                  f"{'; ' + res.note if res.note else ''}")


def _validate_against_training(kw, ds, predicted: dict) -> dict:
    """Fine-tune the same config for real and compare T_eps (|T_hat - T| / T, METHOD.md §5)."""
    from .finetune import FinetuneConfig, finetune as run_finetune
    from .models import build_finetune_model

    model = build_finetune_model(kw["model"], ds.num_classes, kw["head_seed"], allow_download=kw["download"])
    cfg = FinetuneConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"],
                         steps=kw["steps"], seed=kw["seed"], log_every=kw["log_every"], trainable=kw["trainable"])
    res = run_finetune(model, ds, cfg, device=kw["device"])
    real = _curve_rows(res.steps, res.curves(), kw, res.diverged)
    rows = []
    for p, r in zip(predicted["training_times"], real):
        rel = None
        if p["steps"] is not None and r["steps"]:
            rel = abs(p["steps"] - r["steps"]) / r["steps"]
        rows.append({"criterion": r["criterion"], "eps": r["eps"], "predicted_steps": p["steps"],
                     "actual_steps": r["steps"], "relative_error": rel})
    return {"diverged": res.diverged, "final_loss": None if res.diverged else float(res.loss[-1]),
            "final_error": None if res.diverged else float(res.error[-1]), "train_seconds": res.train_seconds,
            "step_time_s": res.step_time_s, "training_times": rows,
            "curve": {"steps": res.steps.tolist(), "loss": res.loss.tolist(), "error": res.error.tolist()}}


def _print_run(out: dict) -> None:
    click.echo(f"{out['kind']}: {out['model']} on {out['dataset']} (N={out['n']}, C={out['num_classes']}), "
               f"loss {out['loss']}, lr {out['lr']}, momentum {out['momentum']}, B {out['batch_size']}, "
               f"T {out['steps']}")
    if out["diverged"]:
        click.echo("  diverged")
    else:
        err = "n/a" if out["final_error"] is None else f"{out['final_error']:.4f}"
        click.echo(f"  final loss {out['final_loss']:.5g}, final error {err}")
    for row in out["training_times"]:
        t = "not reached" if row["steps"] is None else f"{row['steps']} steps ({row['fraction']:.3f} of budget)"
        click.echo(f"  T_eps[{row['criterion']}, eps={row['eps']:g}] = {t}")
    if "step_time_s" in out:
        click.echo(f"  step time {out['step_time_s'] * 1e3:.2f} ms on {out['device']}")


from .sweep.cli import sweep as _sweep_command  # noqa: E402
cli.add_command(_sweep_command)

from .analysis_cli import plot as _plot_command, rank as _rank_command, validate as _validate_command  # noqa: E402
cli.add_command(_rank_command)
cli.add_command(_validate_command)
cli.add_command(_plot_command)


if __name__ == "__main__":  # pragma: no cover
    main()
