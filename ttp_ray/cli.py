"""The ``ttp-ray`` command line: a thin click layer over the core.

Bad input ends in one line ``error: <field>: <what is allowed>`` on stderr and exit code 2, never a
traceback. Importing this module imports neither torch nor Ray (nor pandas): every command imports the core
when it runs, and the commands whose options are read from the core (``predict``) or live in a module that
needs pandas (``rank``, ``validate``, ``plot``) are built on first use (:class:`LazyGroup`), so ``ttp-ray
--help`` and ``ttp-ray sweep SPEC --dry-run`` pay only for what they use.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import click

from .preflight import DEFAULT_MAX_CLASSES, DEFAULT_MAX_MEMORY_GB

__all__ = ["main", "cli", "InputError", "LazyGroup"]


class InputError(ValueError):
    """Bad user input: reported as one line, exit code 2."""


def _user_errors():
    # DatasetError, ModelError, SpecError and AnalysisError are ValueErrors: nothing to import for them here
    return (InputError, ValueError)


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def main(argv=None) -> None:
    """Entry point: runs the click group and turns user errors into one line, exit code 2."""
    from .interrupts import INTERRUPTED_MESSAGE, Interrupted

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        cli.main(args=argv, prog_name="ttp-ray", standalone_mode=False)
    except Interrupted as exc:  # a sweep stopped by SIGINT / SIGTERM: its parts are on disk, Ray is shut down
        click.echo(INTERRUPTED_MESSAGE, err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # nothing is left to do: skip the interpreter's teardown (torch's and Ray's threads take seconds more)
        os._exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "))
    except _user_errors() as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        click.echo(INTERRUPTED_MESSAGE, err=True)
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


class LazyGroup(click.Group):
    """A click group with commands built on first use: ``lazy[name] = (build, summary)``, where ``build()``
    returns the command (importing what it needs) and ``summary`` is the first paragraph of its help, which the
    group's ``--help`` shortens as click does, without building it (tests/test_cli.py checks it against the
    built command's help)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy: Dict[str, Tuple[Callable[[], click.Command], str]] = {}

    def add_lazy_command(self, name: str, build: Callable[[], click.Command], short_help: str) -> None:
        self.lazy[name] = (build, short_help)

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            self.add_command(self.lazy[name][0](), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            cmd = self.commands.get(name)
            if cmd is None:
                rows.append((name, click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)))
            elif not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def with_progress(f):
    """A ``--quiet`` flag, and the command run with progress (with ETA, on stderr) unless it is given: the
    core's long work (pre-training, kernel, step time, simulations, fine-tuning) reports to it."""
    @click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (results on stdout are the same).")
    @functools.wraps(f)
    def run(*args, quiet: bool, **kw):
        from .progress import Progress, using

        with using(Progress(enabled=not quiet)):
            return f(*args, **kw)

    return run


@cli.command()
@click.option("--model", "names", multiple=True, default=("digits-cnn", "digits-resnet"), show_default=True,
              help="Embedded backbone(s) to (re)build.")
@with_progress
def pretrain(names) -> None:
    """Rebuild the embedded backbones on digits-0to4 (deterministic) and report their accuracy."""
    from .models import load_pretrained_digits

    for name in names:
        if name not in ("digits-cnn", "digits-resnet"):
            raise InputError(f"model: {name!r} is not pre-trained by ttp-ray; allowed: digits-cnn, digits-resnet")
        _, rep = load_pretrained_digits(name, rebuild=True)
        click.echo(f"{name}: train accuracy {rep['train_accuracy']:.4f}, held-out accuracy "
                   f"{rep['holdout_accuracy']:.4f}, {rep['seconds']:.1f} s, recipe {rep['recipe']}")


def common_run_options(f):
    """Flags shared by ``finetune`` and ``predict`` so the two compare line by line."""
    opts = [
        click.option("--dataset", default="digits-5to9", show_default=True, help="Dataset name (ttp-ray datasets)."),
        click.option("--subset", type=int, default=None, help="Class-balanced seeded subset of N0 samples."),
        click.option("--model", default="digits-cnn", show_default=True, help="Backbone (ttp-ray models)."),
        click.option("--input-size", type=int, default=None, metavar="S",
                     help="Adapt user images (npz, folder) to S x S instead of the backbone's declared size."),
        click.option("--input-channels", type=int, default=None, metavar="C",
                     help="Adapt user images to C channels (1: grey by luminance, 3: RGB) instead of the backbone's."),
        click.option("--no-adapt", is_flag=True,
                     help="Use user images as loaded (npz: [0, 1] pixels; folder: RGB 224 x 224, ImageNet-normalised) "
                          "instead of adapting them to the backbone's input (channels, size, values)."),
        click.option("--lr", type=float, default=None, help="SGD learning rate eta (> 0); or --lr-fraction."),
        click.option("--lr-fraction", type=float, default=None, metavar="F",
                     help="The lr as a fraction F of the stability limit 2(1+m)N/lambda_max of the dataset's kernel "
                          "(max_stable_lr; above 1 diverges). predict: of the kernel it prepares; finetune: of the "
                          "default predictor's kernel (default kernel options), computed once and cached on disk "
                          "(the same limit as `predict` with its defaults). Exactly one of --lr, --lr-fraction."),
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
        click.option("--max-classes", type=click.IntRange(min=1), default=DEFAULT_MAX_CLASSES, show_default=True,
                     help="Refuse a dataset with more classes (the new head's outputs)."),
        click.option("--max-memory-gb", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_MEMORY_GB,
                     show_default=True, help="Refuse a run whose estimated memory (kernel N x k, simulation paths x N "
                                             "x C, per-step records) exceeds this many GB."),
        click.option("--download", is_flag=True, help="Allow downloading missing datasets/weights."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _validate_common(kw, n: Optional[int] = None) -> None:
    from .finetune import FinetuneConfig
    from .preflight import check_device, check_lr

    if (kw["lr"] is None) == (kw["lr_fraction"] is None):
        raise InputError("lr: give exactly one of --lr (absolute) or --lr-fraction (of max_stable_lr)")
    if kw["lr_fraction"] is not None and not kw["lr_fraction"] > 0:
        raise InputError(f"lr_fraction: must be > 0 (a fraction of max_stable_lr), got {kw['lr_fraction']}")
    for name in ("lr", "lr_fraction"):
        if kw[name] is not None:
            check_lr(kw[name], name)
    check_device(kw["device"])
    if any(e <= 0 for e in kw["eps_list"]):
        raise InputError(f"eps: every value must be > 0, got {', '.join(map(str, kw['eps_list']))}")
    if kw["subset"] is not None and kw["subset"] <= 0:
        raise InputError(f"subset: must be a positive integer, got {kw['subset']}")
    lr = kw["lr"] if kw["lr"] is not None else 1.0  # a fraction's lr is known once the kernel is
    FinetuneConfig(lr=lr, momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"],
                   steps=kw["steps"], seed=kw["seed"], log_every=kw["log_every"],
                   trainable=kw["trainable"]).validate(n)


def _adapt_options(kw):
    from .inputs import AdaptOptions

    return AdaptOptions(adapt=not kw["no_adapt"], size=kw["input_size"], channels=kw["input_channels"])


def _limits(kw):
    from .preflight import ResourceLimits

    return ResourceLimits(max_memory_gb=kw["max_memory_gb"], max_classes=kw["max_classes"])


def _load_dataset(kw):
    """The dataset as the backbone takes it (user images adapted to its input; a mismatch: one line), checked by
    the preflight (:mod:`ttp_ray.preflight`: labels, classes, readable images) and the backbone built and run on it."""
    from .models import load_dataset_for_model
    from .preflight import check_dataset, check_dataset_ref, check_model

    _validate_common(kw)
    check_dataset_ref(kw["dataset"], _limits(kw))
    ds = load_dataset_for_model(kw["dataset"], kw["model"], adapt=_adapt_options(kw), subset=kw["subset"],
                                download=kw["download"])
    check_dataset(ds, _limits(kw), ref=kw["dataset"])
    _validate_common(kw, len(ds))
    check_model(kw["model"], ds, allow_download=kw["download"])
    return ds


def _check_memory(kw, ds, kernel=None, sim=None, finetune=None) -> None:
    """The run's estimated memory against ``--max-memory-gb`` (:func:`ttp_ray.preflight.memory_estimate`)."""
    from .preflight import check_memory, memory_estimate

    est = memory_estimate(len(ds), int(ds.num_classes), fields={"k": "k", "steps": "steps", "paths": "paths"},
                          kernel=kernel, sim=sim, budget_steps=kw["steps"], n_configs=1, max_batch=kw["batch_size"],
                          finetune=finetune, losses=(kw["loss"],),
                          full_batch=kw["batch_size"] is None or kw["batch_size"] >= len(ds))
    check_memory(est, _limits(kw))


def _load_inputs(kw):
    from .finetune import FinetuneConfig
    from .models import build_finetune_model

    ds = _load_dataset(kw)
    lr = kw["lr"] if kw["lr"] is not None else 1.0
    cfg = FinetuneConfig(lr=lr, momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"],
                         steps=kw["steps"], seed=kw["seed"], log_every=kw["log_every"], trainable=kw["trainable"])
    kernel = None
    if kw["lr_fraction"] is not None:  # the default predictor's kernel gives the limit (_finetune_lr)
        from .kernel import KernelOptions

        kernel = KernelOptions()
    _check_memory(kw, ds, kernel=kernel, finetune=cfg)
    model = build_finetune_model(kw["model"], ds.num_classes, kw["head_seed"], allow_download=kw["download"])
    return ds, model


def _finetune_lr(kw, ds) -> Optional[float]:
    """``finetune --lr-fraction``: sets ``kw["lr"]`` to the fraction of max_stable_lr(m) of the default predictor's
    kernel (prepared with the default kernel options, from the disk cache when there); returns that limit."""
    if kw["lr_fraction"] is None:
        return None
    from .predictors import PredictionInputs, get_predictor

    prepared = get_predictor().prepare(PredictionInputs(model=kw["model"], dataset=ds, head_seed=kw["head_seed"],
                                                        trainable=kw["trainable"], device=kw["device"],
                                                        allow_download=kw["download"]))
    limit = prepared.max_stable_lr(kw["momentum"])
    kw["lr"] = kw["lr_fraction"] * limit
    return limit


def _curve_rows(steps, curves, kw, diverged):
    from .training_time import curve_training_times

    return curve_training_times(steps, curves, kw["eps_list"], budget=kw["steps"], eps_mode=kw["eps_mode"],
                                diverged=diverged)


@cli.command()
@common_run_options
@with_progress
def finetune(**kw) -> None:
    """Fine-tune for real (ground truth): full-set loss/error curve, T_eps, step time."""
    from .finetune import FinetuneConfig, finetune as run_finetune

    ds, model = _load_inputs(kw)
    limit = _finetune_lr(kw, ds)
    cfg = FinetuneConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"],
                         steps=kw["steps"], seed=kw["seed"], log_every=kw["log_every"], trainable=kw["trainable"])
    res = run_finetune(model, ds, cfg, device=kw["device"])
    times = _curve_rows(res.steps, res.curves(), kw, res.diverged)
    out = {
        "kind": "finetune",
        "dataset": kw["dataset"], "model": kw["model"], "n": res.n, "num_classes": ds.num_classes,
        "lr": cfg.lr, "lr_fraction": kw["lr_fraction"], "momentum": cfg.momentum, "batch_size": res.batch_size,
        "loss": cfg.loss, "steps": cfg.steps, "seed": cfg.seed, "head_seed": kw["head_seed"],
        "trainable": cfg.trainable, "effective_lr": cfg.effective_lr, "eps_mode": kw["eps_mode"],
        "input": ds.meta.get("input"), "max_stable_lr": limit,
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
    """Kernel, dynamics and predictor options of ``predict`` (defaults are those of the core dataclasses)."""
    from .dynamics import METHODS, MOMENTUM_MODES, NOISE_MODELS, SimOptions
    from .kernel import KernelOptions
    from .predictors import DEFAULT_PREDICTOR, PREDICTORS
    from .relinearise import RelinearisationOptions

    d, r, s = KernelOptions(), RelinearisationOptions(), SimOptions()
    opts = [
        click.option("--predictor", type=click.Choice(list(PREDICTORS)), default=None,
                     help=f"How to predict (ttp_ray.predictors) [default: {DEFAULT_PREDICTOR}]: frozen kernel; subset "
                          "(spectrum extrapolated from --subset-size samples); drift (one real reference run warps "
                          "the frozen ODE); relinearised (per config); flow (one re-linearised path per loss). "
                          "Configs a predictor does not simulate go to its fallback (frozen)."),
        click.option("--method", type=click.Choice(METHODS), default=s.method, show_default=True,
                     help="Dynamics: ode, discrete (GD), sde, minibatch (SGD); auto picks discrete / minibatch (sde with --momentum-mode elr)."),
        click.option("--momentum-mode", type=click.Choice(MOMENTUM_MODES), default=s.momentum_mode, show_default=True,
                     help="elr: lr/(1-m) (paper); heavy_ball: exact momentum; auto: elr for GD, heavy_ball for minibatch."),
        click.option("--noise", type=click.Choice(NOISE_MODELS), default=s.noise, show_default=True,
                     help="SDE noise: rescaled by L_t/L_0 (paper) or constant (ablation)."),
        click.option("--paths", type=int, default=s.paths, show_default=True, help="SDE / minibatch sample paths."),
        click.option("--kernel-method", type=click.Choice(["sketch", "exact"]), default=d.method, show_default=True),
        click.option("--projection", default=d.projection, show_default=True, help="Sketch projection kind."),
        click.option("--k", "sketch_k", type=int, default=d.k, show_default=True, help="Sketch width k."),
        click.option("--class-trace/--full-kernel", default=None,
                     help="Class-trace kernel Theta_N (x) I_C instead of the full NC x NC kernel "
                          "[default: class trace; the full kernel for the relinearised and flow predictors]."),
        click.option("--kernel-seed", type=int, default=d.seed, show_default=True),
        click.option("--no-cache", is_flag=True, help="Recompute the kernel even if a cached state exists."),
        click.option("--validate", is_flag=True, help="Also fine-tune for real and print the relative error."),
        click.option("--subset-size", type=int, default=None, metavar="N0",
                     help="subset predictor: the kernel of a seeded subset of N0 samples (METHOD.md §7)."),
        click.option("--subset-alpha", type=float, default=None,
                     help="subset predictor: exponent correction alpha [default: ttp_ray.subset.DEFAULT_ALPHA]."),
        click.option("--reference-fraction", type=float, default=None, metavar="FRACTION",
                     help="drift / flow predictors: the reference run's lr as a fraction of max_stable_lr(0) "
                          "[default: the predictor's]."),
        click.option("--relin-tolerance", type=float, default=r.tolerance, show_default=True,
                     help="relinearised / flow: accepted ||f(w') - f(w_k) - J_k dw|| / ||J_k dw|| per segment."),
        click.option("--max-kernels", type=int, default=r.max_kernels, show_default=True,
                     help="relinearised / flow: kernel sketches per prediction at most."),
        # old spellings, kept as aliases (a deprecation note is printed)
        click.option("--relinearise", is_flag=True, hidden=True, help="Deprecated: --predictor relinearised."),
        click.option("--drift-reference", type=float, default=None, hidden=True,
                     help="Deprecated: --predictor drift --reference-fraction F."),
        click.option("--kernel-subset", type=int, default=None, hidden=True,
                     help="Deprecated: --predictor subset --subset-size N0."),
        click.option("--kernel-subset-alpha", type=float, default=None, hidden=True,
                     help="Deprecated: --subset-alpha."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


_ALIASES = {  # old flag -> (predictor, its option, the new spelling)
    "relinearise": ("relinearised", None, "--predictor relinearised"),
    "drift_reference": ("drift", "reference_fraction", "--predictor drift --reference-fraction F"),
    "kernel_subset": ("subset", "size", "--predictor subset --subset-size N0"),
}


def _chosen_predictor(kw):
    """The predictor ``predict`` runs: ``--predictor`` and its options, or an old spelling (with a note)."""
    from .predictors import get_predictor
    from .relinearise import RelinearisationOptions

    name, options, notes = kw["predictor"], {}, []
    for flag, (alias, option, spelling) in _ALIASES.items():
        value = kw[flag]
        if value is None or value is False:
            continue
        if name is not None and name != alias:
            raise InputError(f"predictor: --{flag.replace('_', '-')} selects {alias!r}, cannot be combined with {name!r}")
        name = alias
        if option is not None:
            options[option] = value
        notes.append(f"note: --{flag.replace('_', '-')} is deprecated; use {spelling}")
    if kw["kernel_subset_alpha"] is not None:
        kw["subset_alpha"] = kw["kernel_subset_alpha"]
        notes.append("note: --kernel-subset-alpha is deprecated; use --subset-alpha")
    if name == "subset":
        options.setdefault("size", kw["subset_size"] if kw["subset_size"] is not None else 0)
        if kw["subset_alpha"] is not None:
            options["alpha"] = kw["subset_alpha"]
    if name in ("drift", "flow") and kw["reference_fraction"] is not None:
        options.setdefault("reference_fraction", kw["reference_fraction"])
    if name in ("relinearised", "flow"):
        options["options"] = RelinearisationOptions(tolerance=kw["relin_tolerance"], max_kernels=kw["max_kernels"])
    return get_predictor(name, **options), notes


def predict(**kw) -> None:
    """Predict the loss/error curve and T_eps without training (Algorithm 1); --validate trains too."""
    from .dynamics import SimConfig, SimOptions
    from .kernel import KernelOptions
    from .predict import PredictSettings
    from .predictors import PredictionInputs
    from .step_time import step_time as cached_step_time

    if kw["paths"] <= 0:
        raise InputError(f"paths: must be a positive integer, got {kw['paths']}")
    if kw["sketch_k"] <= 0:
        raise InputError(f"k: must be a positive integer, got {kw['sketch_k']}")
    predictor, notes = _chosen_predictor(kw)
    ds = _load_dataset(kw)
    class_trace = kw["class_trace"]
    if class_trace is None:
        class_trace = False if predictor.needs_full_kernel else KernelOptions().class_trace
    kopt = KernelOptions(method=kw["kernel_method"], projection=kw["projection"], k=kw["sketch_k"],
                         class_trace=class_trace, seed=kw["kernel_seed"])
    sim = SimOptions(method=kw["method"], momentum_mode=kw["momentum_mode"], noise=kw["noise"], paths=kw["paths"],
                     seed=kw["seed"], log_every=kw["log_every"])
    if kw["validate"]:
        from .finetune import FinetuneConfig

        tuned = FinetuneConfig(lr=kw["lr"] or 1.0, momentum=kw["momentum"], batch_size=kw["batch_size"],
                               loss=kw["loss"], steps=kw["steps"], log_every=kw["log_every"])
    _check_memory(kw, ds, kernel=kopt, sim=sim, finetune=tuned if kw["validate"] else None)
    prepared = predictor.prepare(PredictionInputs(model=kw["model"], dataset=ds, kernel=kopt, head_seed=kw["head_seed"],
                                                  trainable=kw["trainable"], device=kw["device"],
                                                  cache=not kw["no_cache"], allow_download=kw["download"]))
    if kw["lr_fraction"] is not None:  # of this kernel's limit; --validate fine-tunes at the same lr
        kw["lr"] = kw["lr_fraction"] * prepared.max_stable_lr(kw["momentum"])
    cfg = SimConfig(lr=kw["lr"], momentum=kw["momentum"], batch_size=kw["batch_size"], loss=kw["loss"])
    settings = PredictSettings(sim=sim, eps_mode=kw["eps_mode"])
    (pred,) = prepared.predict([cfg], budget_steps=kw["steps"], eps_list=kw["eps_list"], settings=settings)
    res = pred.result
    step_time = cached_step_time(prepared.model, ds, kw["batch_size"], kw["loss"], device=kw["device"],
                                 trainable=kw["trainable"], cache=not kw["no_cache"])
    times = [{"criterion": r["criterion"], "eps": r["eps"], "steps": r["predicted_steps"],
              "fraction": r["predicted_fraction"]} for r in pred.rows]
    meta = prepared.state.meta
    out = {
        **_prediction_header(kw, ds, cfg, res.diverged, res.loss, res.error, times, step_time),
        "predictor": predictor.name, "max_stable_lr": res.max_stable_lr, "method": res.method,
        "momentum_mode": res.momentum_mode,
        "kernel": {"class_trace": kopt.class_trace,
                   **{k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool, type(None)))}},
        "kernel_seconds": prepared.kernel_seconds, "kernel_cache_hit": prepared.cache_hit,
        "simulate_seconds": res.seconds, "note": res.note, "extra_work": dict(prepared.work),
        "intervals": [{"criterion": r["criterion"], "eps": r["eps"], "low": r.get("predicted_steps_low"),
                       "high": r.get("predicted_steps_high")} for r in pred.rows],
        "predicted_drift": pred.rows[0].get("predicted_drift") if pred.rows else None,
        "drift_beyond_probes": pred.rows[0].get("drift_beyond_probes") if pred.rows else None,
        "elr_over_gd_limit": pred.rows[0].get("elr_over_gd_limit") if pred.rows else None,
        **res.extras,
        "curve": {"steps": res.steps.tolist(), "loss": res.loss.tolist(),
                  "error": None if res.error is None else res.error.tolist()},
    }
    if predictor.name == "subset":
        out["kernel_subset"] = prepared.base.spectrum.summary()
    _emit_prediction(kw, ds, out, f"predictor {predictor.name}, method {out['method']} ({out['momentum_mode']}), "
                                  f"kernel {out['kernel_seconds']:.2f} s{' (cached)' if out['kernel_cache_hit'] else ''}, "
                                  f"simulation {out['simulate_seconds']:.3f} s{'; ' + res.note if res.note else ''}")
    for line in notes:
        click.echo(line, err=True)


def _prediction_header(kw, ds, cfg, diverged: bool, loss, error, times, step_time: float) -> dict:
    """The fields ``predict --json`` shares with ``finetune --json`` (compared line by line)."""
    return {
        "kind": "predict",
        "dataset": kw["dataset"], "model": kw["model"], "n": len(ds), "num_classes": ds.num_classes,
        "lr": cfg.lr, "lr_fraction": kw["lr_fraction"], "momentum": cfg.momentum,
        "batch_size": kw["batch_size"] or len(ds), "loss": cfg.loss,
        "steps": kw["steps"], "seed": kw["seed"], "head_seed": kw["head_seed"], "trainable": kw["trainable"],
        "effective_lr": cfg.effective_lr, "eps_mode": kw["eps_mode"], "input": ds.meta.get("input"),
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
    frac = "" if out.get("lr_fraction") is None else f" ({out['lr_fraction']:g} x max stable lr)"
    click.echo(f"{out['kind']}: {out['model']} on {out['dataset']} (N={out['n']}, C={out['num_classes']}), "
               f"loss {out['loss']}, lr {out['lr']:.6g}{frac}, momentum {out['momentum']}, B {out['batch_size']}, "
               f"T {out['steps']}")
    if out.get("input"):
        click.echo(f"  images adapted to the backbone's input: {out['input']}")
    if out["diverged"]:
        click.echo("  diverged")
    else:
        err = "n/a" if out["final_error"] is None else f"{out['final_error']:.4f}"
        click.echo(f"  final loss {out['final_loss']:.5g}, final error {err}")
    intervals = {(i["criterion"], i["eps"]): i for i in out.get("intervals", []) if i["low"] is not None}
    for row in out["training_times"]:
        t = "not reached" if row["steps"] is None else f"{row['steps']} steps ({row['fraction']:.3f} of budget)"
        i = intervals.get((row["criterion"], row["eps"]))
        within = "" if i is None or row["steps"] is None else f", interval {i['low']}-{i['high']}"
        click.echo(f"  T_eps[{row['criterion']}, eps={row['eps']:g}] = {t}{within}")
    if out.get("predicted_drift") is not None:
        click.echo(f"  predicted kernel drift s = {out['predicted_drift']:.3g} at the end (Θ_T ~ s Θ0); effective lr "
                   f"{out['elr_over_gd_limit']:.3g} x the plain-GD limit")
    if out.get("drift_beyond_probes"):  # §14: below the probes' lowest level s is held, and T̂ε misses more
        click.echo(f"  the predicted loss goes {math.exp(out['drift_beyond_probes']):.3g}x below the lowest level the "
                   f"probes reached: the drift there is held, not measured (column drift_beyond_probes)")
    if out.get("extra_work"):
        click.echo("  extra work beyond the kernel: " + ", ".join(f"{k} {v:g}" for k, v in out["extra_work"].items()))
    if "step_time_s" in out:
        click.echo(f"  step time {out['step_time_s'] * 1e3:.2f} ms on {out['device']}")


def _predict_command() -> click.Command:
    """``predict``: its options' choices and defaults are read from the core's dataclasses (imports torch)."""
    return click.command("predict")(common_run_options(prediction_options(with_progress(predict))))


def _rank_command() -> click.Command:
    from .analysis_cli import rank

    return rank


def _validate_command() -> click.Command:
    from .analysis_cli import validate

    return validate


def _plot_command() -> click.Command:
    from .analysis_cli import plot

    return plot


from .sweep.cli import sweep as _sweep_command  # noqa: E402  (click only)
cli.add_command(_sweep_command)
cli.add_lazy_command("predict", _predict_command, predict.__doc__)
cli.add_lazy_command("rank", _rank_command,
                     "Rank a sweep's configs (OUT: the --out of `ttp-ray sweep`) by predicted cost to a common target; "
                     "configs that never reach it and diverging ones are listed after the ranked ones, flagged.")
cli.add_lazy_command("validate", _validate_command,
                     "Compare predicted with real T_eps (the sweep's ground truth): writes OUT/validation.parquet and "
                     "prints the relative error |T_hat - T| / T (mean, median) and Pearson r, overall and per "
                     "(dataset, loss, GD/SGD); then how well the predicted costs rank the fine-tuned configs (Spearman "
                     "rho, top-1 regret, top-3 hit) per (dataset, model, loss, criterion, eps), for the cost to a common "
                     "target and for T_eps x step time.")
cli.add_lazy_command("plot", _plot_command,
                     "PNG plots of a sweep (headless): real vs predicted curves per validated config, predicted vs "
                     "real T_eps, the Theta spectrum with its power-law fit, predicted cost over (lr, batch size) per "
                     "dataset.")

from .tune_cli import tune as _tune_command  # noqa: E402
cli.add_command(_tune_command)


if __name__ == "__main__":  # pragma: no cover
    main()
