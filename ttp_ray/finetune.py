"""Ground truth: real fine-tuning with ``torch.optim.SGD`` and the full training-set curves it yields.

What is measured (METHOD.md §1, §5, §13): at steps 0, log_every, 2*log_every, ..., T the loss and error of
the model on the *whole* training set (batch norm frozen, no augmentation), the mean wall time of an
optimiser step (forward + backward + update on one batch), and divergence (a non-finite loss, or one
above ``DIVERGENCE_FACTOR`` times the initial loss) which stops the run instead of crashing it.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .data import ImageDataset
from .models import FinetuneModel, check_trainable, trainable_names
from .objectives import check_loss, error_rate, loss_value
from .progress import Progress, resolve
from .sampling import batch_schedule

__all__ = ["FinetuneConfig", "FinetuneResult", "LoggedPoint", "finetune", "evaluate", "measure_step_time",
           "result_summary", "DIVERGENCE_FACTOR", "finetune_memory"]

DIVERGENCE_FACTOR = 1e3  # a loss above this multiple of L_0 (or non-finite) counts as diverged


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run; every default stated."""

    lr: float
    momentum: float = 0.0
    batch_size: Optional[int] = None  # None: full batch (B = N), i.e. gradient descent
    loss: str = "ce"  # 'mse' (1/2 ||f - y||^2 summed over classes, mean over samples) or 'ce'
    steps: int = 500  # budget T
    seed: int = 0  # minibatch order
    log_every: int = 1  # log the full-set loss and error every this many steps
    trainable: str = "all"  # 'all' or 'head' (linear probing: the linearisation is then exact)

    @property
    def effective_lr(self) -> float:
        """``lr / (1 - m)`` (docs/METHOD.md §3)."""
        return self.lr / (1.0 - self.momentum)

    def validate(self, n: Optional[int] = None) -> "FinetuneConfig":
        """Check every field; ``n`` (the dataset size) bounds the batch size when known."""
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ValueError(f"batch_size: must be a positive integer or 'full', got {self.batch_size}")
        if self.batch_size is not None and n is not None and self.batch_size > n:
            raise ValueError(f"batch_size: must be in 1..{n} (the dataset size) or 'full', got {self.batch_size}")
        if self.steps <= 0:
            raise ValueError(f"steps: must be a positive integer, got {self.steps}")
        if self.log_every <= 0:
            raise ValueError(f"log_every: must be a positive integer, got {self.log_every}")
        check_loss(self.loss)
        check_trainable(self.trainable)
        return self


@dataclass
class FinetuneResult:
    config: FinetuneConfig
    n: int
    steps: np.ndarray  # logged step indices, 0 .. T (truncated at divergence)
    loss: np.ndarray
    error: np.ndarray
    diverged: bool
    step_time_s: float  # mean wall time of one optimiser step
    train_seconds: float  # wall time of all steps, evaluations excluded
    total_seconds: float
    device: str
    extra: Dict[str, float] = field(default_factory=dict)
    # full batch only: ||grad_w L(w_t)||^2 at every step t that took a gradient (0 .. T-1; None for minibatches).
    # Along gradient flow dL/dtau = -||grad L||^2: the real loss-decrease rate (ttp_ray.drift calibrates on it)
    grad_norm_sq: Optional[np.ndarray] = None
    outputs: Optional[np.ndarray] = None  # (steps, N, C) float32 f(w_t) at every step, when record_outputs (full batch)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size or self.n

    def curves(self) -> Dict[str, np.ndarray]:
        return {"loss": self.loss, "error": self.error}


@dataclass(frozen=True)
class LoggedPoint:
    """What :func:`finetune` hands its ``on_log`` callback at every logged step (the run paused at w_t)."""

    step: int
    loss: float  # full-set loss at w_t
    error: float  # full-set error at w_t
    train_seconds: float  # wall time of the optimiser steps so far (0 .. t-1)
    snapshot: Callable[[], Dict[str, Any]]  # the run's state now, for ``finetune(..., resume=)``: tensors, numbers,
    #                                         lists and strings only (torch.save / torch.load(weights_only=True))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ImageDataset, loss: str, *, device="cpu",
             batch_size: int = 2048) -> tuple:
    """(full-set loss, error) of ``model`` in eval mode, batched."""
    model.eval()
    outs = []
    for s in range(0, len(dataset), batch_size):
        outs.append(model(dataset.images(slice(s, s + batch_size)).to(device)).double())
    out = torch.cat(outs)
    y = dataset.targets.to(device)
    return float(loss_value(out, y, loss)), float(error_rate(out, y))


def finetune(model: FinetuneModel, dataset: ImageDataset, config: FinetuneConfig, *, device="cpu",
             eval_batch_size: int = 2048, record_outputs: bool = False,
             progress: Optional[Progress] = None, on_log: Optional[Callable[[LoggedPoint], None]] = None,
             resume: Optional[Dict[str, Any]] = None) -> FinetuneResult:
    """Fine-tune ``model`` in place with SGD(lr, momentum), batch norm frozen; log full-set curves.

    ``record_outputs`` (full batch only) keeps f(w_t) at every step (``FinetuneResult.outputs``; N C floats a
    step), which :func:`ttp_ray.drift.calibrate_drift` reads. ``progress``: one task over the steps, with an
    ETA (default: the ambient one, :func:`ttp_ray.progress.current`). ``on_log`` is called at every logged step
    with a :class:`LoggedPoint` (``ttp_ray.tune`` reports it to Ray Tune and checkpoints its ``snapshot()``);
    ``resume`` is such a snapshot, of this very config: the run continues from its step with the same weights,
    momentum buffers, minibatch order and curve so far, as if it had never stopped."""
    t_start = time.perf_counter()
    n = len(dataset)
    config.validate(n)
    if resume is not None and record_outputs:
        raise ValueError("resume: cannot be combined with record_outputs (the outputs before the snapshot are not kept)")
    b = config.batch_size or n
    model.to(device).eval()
    names = set(trainable_names(model, config.trainable))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, dampening=0.0, nesterov=False,
                          weight_decay=0.0)
    y_all = dataset.targets.to(device)
    full_batch = b == n
    x_all = dataset.x.to(device) if full_batch else None

    steps: List[int] = []
    losses: List[float] = []
    errors: List[float] = []
    grad_sq: List[float] = []
    outs: List[np.ndarray] = []
    diverged = False
    step_seconds = 0.0
    l0 = None
    start = 0
    if resume is not None:
        start = _check_snapshot(resume, config)
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        steps, losses, errors = list(resume["steps"]), list(resume["loss"]), list(resume["error"])
        grad_sq = list(resume["grad_norm_sq"])
        step_seconds, l0 = float(resume["train_seconds"]), losses[0]

    def snapshot(t: int) -> Dict[str, Any]:
        return {"config": asdict(config), "step": t, "train_seconds": step_seconds,
                "steps": list(steps), "loss": list(losses), "error": list(errors), "grad_norm_sq": list(grad_sq),
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": copy.deepcopy(opt.state_dict())}

    callback_seconds = 0.0  # time spent in on_log during the current step (not the step's own time)

    def log(step: int, loss_v: float, err_v: float) -> bool:
        nonlocal l0, diverged, callback_seconds
        if l0 is None:
            l0 = loss_v
        if not math.isfinite(loss_v) or loss_v > DIVERGENCE_FACTOR * max(l0, 1e-12):
            diverged = True
            return False
        steps.append(step)
        losses.append(loss_v)
        errors.append(err_v)
        if on_log is not None:
            c0 = time.perf_counter()
            on_log(LoggedPoint(step, loss_v, err_v, step_seconds, lambda: snapshot(step)))
            callback_seconds = time.perf_counter() - c0
        return True

    schedule = iter(batch_schedule(n, b, config.steps, seed=config.seed)[start:]) if not full_batch else None
    task = resolve(progress).task(f"fine-tuning (lr {config.lr:.4g}, m {config.momentum:g}, B {b}, "
                                  f"{config.loss})", total=config.steps, unit="steps", completed=start)
    for t in range(start, config.steps + 1):
        if t > start:
            task.advance()
        # a resumed run logged its first step before the snapshot was taken
        logging_now = (t % config.log_every == 0 or t == config.steps) and not (resume is not None and t == start)
        if full_batch:
            # B = N: the step's own forward pass is the full-set evaluation at w_t (eval mode, BN frozen)
            callback_seconds = 0.0
            t0 = time.perf_counter()
            out = model(x_all)
            loss = loss_value(out, y_all, config.loss)
            if logging_now and not log(t, float(loss.detach()), float(error_rate(out.detach().double(), y_all))):
                break
            if record_outputs:
                outs.append(out.detach().float().cpu().numpy())
            if t == config.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_sq.append(float(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)))
            opt.step()
            step_seconds += time.perf_counter() - t0 - callback_seconds
        else:
            if logging_now and not log(t, *evaluate(model, dataset, config.loss, device=device,
                                                    batch_size=eval_batch_size)):
                break
            if t == config.steps:
                break
            idx = next(schedule)
            t0 = time.perf_counter()
            xb = dataset.images(idx).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_value(model(xb), y_all[idx.to(device)], config.loss)
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
            step_seconds += time.perf_counter() - t0
    task.close()
    n_steps = max(1, steps[-1] if steps else 1)
    if diverged:
        n_steps = max(1, t)
    for p in model.parameters():
        p.requires_grad_(True)
    return FinetuneResult(
        config=config, n=n, steps=np.asarray(steps, dtype=np.int64), loss=np.asarray(losses),
        error=np.asarray(errors), diverged=diverged, step_time_s=step_seconds / n_steps,
        train_seconds=step_seconds, total_seconds=time.perf_counter() - t_start, device=str(device),
        grad_norm_sq=np.asarray(grad_sq) if full_batch else None,
        outputs=np.stack(outs) if outs else None,
    )


def finetune_memory(n: int, config: FinetuneConfig) -> Dict[str, int]:
    """Bytes :func:`finetune` holds for its bookkeeping, by what drives them (an upper estimate, for refusing a run
    before it starts; the model and the images are not counted): ``batches`` (the minibatch schedule, ``T x B``
    indices, built whole) and ``records`` (the logged curves; full batch: a gradient norm per step)."""
    t = int(config.steps)
    b = int(config.batch_size or n)
    logged = t // int(config.log_every) + 2
    minibatch = b < n
    return {"batches": 16 * t * b if minibatch else 0,
            "records": 3 * 32 * logged + (0 if minibatch else 32 * t)}


def _check_snapshot(snap: Dict[str, Any], config: FinetuneConfig) -> int:
    """The step a snapshot of :func:`finetune` resumes at; a ValueError naming ``resume`` if it is of another
    config or holds no logged point."""
    want = asdict(config)
    got = snap.get("config")
    if got != want:
        diff = sorted(k for k in want if not isinstance(got, dict) or got.get(k) != want[k])
        raise ValueError(f"resume: the snapshot is of another fine-tuning config (differs in {', '.join(diff)})")
    if not snap.get("steps") or snap["steps"][-1] != snap.get("step"):
        raise ValueError("resume: the snapshot holds no logged point at its step")
    return int(snap["step"])


def result_summary(result: FinetuneResult) -> Dict[str, object]:
    """Settings and final figures as plain JSON-able values."""
    d = asdict(result.config)
    d["batch_size"] = result.batch_size
    return {
        **d,
        "n": result.n,
        "diverged": result.diverged,
        "final_loss": None if result.diverged or not len(result.loss) else float(result.loss[-1]),
        "final_error": None if result.diverged or not len(result.error) else float(result.error[-1]),
        "step_time_s": result.step_time_s,
        "train_seconds": result.train_seconds,
        "device": result.device,
    }


def measure_step_time(model: FinetuneModel, dataset: ImageDataset, batch_size: Optional[int], loss: str = "ce", *,
                      device="cpu", steps: int = 5, warmup: int = 1, trainable: str = "all",
                      progress: Optional[Progress] = None) -> float:
    """Median wall time of one SGD step (forward + backward + update) at batch size B on ``device``.

    Runs on a copy of ``model``, so the caller's weights are untouched; used for ``predicted_cost_s``.
    ``progress``: one task over the timed steps (default: the ambient one).
    """
    m = copy.deepcopy(model).to(device).eval()
    b = batch_size or len(dataset)
    names = set(trainable_names(m, trainable))
    params = [p for n_, p in m.named_parameters() if n_ in names]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    y = dataset.targets
    times = []
    task = resolve(progress).task(f"measuring the step time (B {b}, {loss})", total=steps + warmup, unit="steps")
    for i, idx in enumerate(batch_schedule(len(dataset), b, steps + warmup, seed=0)):
        xb, yb = dataset.images(idx).to(device), y[idx].to(device)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_value(m(xb), yb, loss).backward()
        opt.step()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        task.advance()
    task.close()
    return float(np.median(times))
