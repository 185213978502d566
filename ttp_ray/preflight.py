"""Checks that run before any work, shared by ``predict``, ``finetune`` and ``sweep`` (before Ray starts).

What is checked, each failure one line naming the field and what is allowed (a ``ValueError``: the CLI prints it,
exit code 2, nothing written):

* the device (``cpu``, ``cuda``, ``cuda:N`` with that GPU present) and learning rates (finite, ``0 < lr <=``
  :data:`MAX_LR`);
* the data: values finite (``npz``: :func:`ttp_ray.data.load_dataset`), labels in ``0..C-1``, at most
  ``max_classes`` classes (:data:`DEFAULT_MAX_CLASSES`, ``--max-classes`` raises it), a ``synthetic`` set's size
  before it is generated, and every image of a folder set readable (:func:`ttp_ray.data.check_readable_images`);
* the backbone: built with its new head for the dataset's classes (a factory ``pkg.mod:fn`` that raises, needs
  arguments or returns no ``nn.Module`` with a replaceable linear classifier is one line naming ``model``) and
  run on two images;
* output directories (writable, not a file) and dataset labels (:data:`MAX_LABEL_CHARS`, :data:`LABEL_CHARS`);
* resources: the memory a run needs (:func:`memory_estimate`: the kernel estimate, N x k, and the simulation,
  paths x configs x N x C, as :func:`ttp_ray.kernel.kernel_memory`, :func:`ttp_ray.dynamics.simulation_memory` and
  :func:`ttp_ray.finetune.finetune_memory` read it off what they allocate) against ``max_memory_gb``
  (:data:`DEFAULT_MAX_MEMORY_GB`, ``--max-memory-gb``); a sweep's number of configs against ``max_configs``
  (:data:`DEFAULT_MAX_CONFIGS`, ``--max-configs``). A refusal names the field that drives the estimate and the
  option that raises the limit.

Ray-free; the sweep's own checks (:mod:`ttp_ray.sweep.preflight`) call these.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union
from urllib.parse import quote

__all__ = [
    "PreflightError",
    "ResourceError",
    "ResourceLimits",
    "MAX_LR",
    "DEFAULT_MAX_CLASSES",
    "DEFAULT_MAX_CONFIGS",
    "DEFAULT_MAX_MEMORY_GB",
    "MAX_LABEL_CHARS",
    "LABEL_CHARS",
    "check_device",
    "check_lr",
    "check_label",
    "check_output_dir",
    "check_dataset_ref",
    "check_dataset",
    "check_model",
    "MemoryEstimate",
    "memory_estimate",
    "check_memory",
    "check_configs",
    "format_bytes",
]

MAX_LR = 1e6  # learning rates (absolute, or fractions of max_stable_lr) above this are refused as typos
DEFAULT_MAX_CLASSES = 1000  # classes of a dataset (outputs of the new head); --max-classes raises it
DEFAULT_MAX_CONFIGS = 100_000  # configs of a sweep's grid; --max-configs raises it
DEFAULT_MAX_MEMORY_GB = 16.0  # per process (the CLI's, or one sweep actor's); --max-memory-gb sets it
MAX_LABEL_CHARS = 100  # a dataset label names a directory (its partition) under OUT
LABEL_CHARS = "letters, digits and _ . - : = , / + @ ~"
_LABEL = re.compile(r"^[A-Za-z0-9_.:=,/+@~-]+$")
_NAME_MAX = 255  # bytes of one path component on the usual file systems
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class PreflightError(ValueError):
    """Input refused before any work: one line naming the field and what is allowed."""


class ResourceError(PreflightError):
    """A run above a stated resource limit: one line naming the field that drives it and the option that raises
    the limit."""


@dataclass(frozen=True)
class ResourceLimits:
    """Bounds a run is checked against before it starts (each raised by the CLI option named in its comment)."""

    max_configs: int = DEFAULT_MAX_CONFIGS  # --max-configs
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB  # --max-memory-gb
    max_classes: int = DEFAULT_MAX_CLASSES  # --max-classes

    def __post_init__(self):
        for name in ("max_configs", "max_memory_gb", "max_classes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise PreflightError(f"{name}: must be a positive number, got {value}")

    @property
    def max_memory_bytes(self) -> int:
        return int(self.max_memory_gb * 2 ** 30)


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 2 ** 40), ("GB", 2 ** 30), ("MB", 2 ** 20), ("kB", 2 ** 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------ simple values

def check_device(device: str, field: str = "device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, with a CUDA GPU (number N) visible to torch."""
    m = _DEVICE.match(str(device))
    if not m or (m[1] == "cpu" and m[2] is not None):
        raise PreflightError(f"{field}: {device!r} is not a device; allowed: cpu, cuda, cuda:N")
    if m[1] == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PreflightError(f"{field}: {device} asked for, but torch sees no CUDA GPU here; allowed: cpu")
        if m[2] is not None and int(m[2]) >= count:
            raise PreflightError(f"{field}: {device}: torch sees {count} CUDA GPU(s) here; allowed: cpu, cuda, "
                                 f"cuda:0..{count - 1}")
    return str(device)


def check_lr(value: float, field: str = "lr") -> float:
    """A learning rate (or a fraction of max_stable_lr): finite, ``0 < value <= MAX_LR``."""
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise PreflightError(f"{field}: must be a finite number > 0, got {value}")
    if value > MAX_LR:
        raise PreflightError(f"{field}: {value:g} is above {MAX_LR:g}, where nothing trains (a typo?); allowed: "
                             f"0 < {field} <= {MAX_LR:g}")
    return float(value)


def check_label(label: str, field: str = "label") -> str:
    """A dataset label: it names the dataset's partition directory under OUT (``dataset=<label>``, percent-encoded)."""
    text = str(label)
    shown = text if len(text) <= 40 else text[:37] + "..."
    if len(text) > MAX_LABEL_CHARS or not _LABEL.match(text):
        why = (f"has {len(text)} characters" if len(text) > MAX_LABEL_CHARS else "holds other characters")
        raise PreflightError(f"{field}: {shown!r} {why}; allowed: at most {MAX_LABEL_CHARS} characters of "
                             f"{LABEL_CHARS} (a dataset entry takes label: SHORT_NAME)")
    if len(f"dataset={quote(text, safe='')}".encode()) > _NAME_MAX:
        raise PreflightError(f"{field}: {shown!r} is too long once percent-encoded as a directory name "
                             f"(> {_NAME_MAX} bytes); allowed: a shorter label")
    return text


def check_output_dir(path: Union[str, Path], field: str = "output") -> Path:
    """A directory the run can create or write into: not a file, every component a valid name, the nearest existing
    ancestor a writable directory. Writes nothing."""
    p = Path(path).expanduser()
    if any(len(part.encode()) > _NAME_MAX for part in p.parts):
        raise PreflightError(f"{field}: {str(p)[:60]}...: a path component is longer than {_NAME_MAX} bytes; "
                             f"allowed: a directory path")
    if p.exists() and not p.is_dir():
        raise PreflightError(f"{field}: {p} is a file, not a directory; allowed: a new or existing directory")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise PreflightError(f"{field}: {probe} (on the way to {p}) is a file, not a directory; allowed: a new or "
                             f"existing directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"{field}: {probe} is not writable by this user; allowed: a directory you can write")
    return p


# ------------------------------------------------------------------------------------------------ data

def check_dataset_ref(ref: str, limits: ResourceLimits = ResourceLimits(), field: str = "dataset") -> None:
    """What can be checked of a dataset reference before loading it: a ``synthetic`` set's classes and size (it is
    generated in memory)."""
    from .data import parse_dataset_ref

    parsed = parse_dataset_ref(ref)
    if parsed.name != "synthetic":
        return
    opts = parsed.options
    try:
        size = {k: int(opts.get(k, d)) for k, d in (("n", 1000), ("classes", 10), ("size", 8), ("channels", 1))}
    except ValueError:
        return  # load_dataset names the bad option
    if size["classes"] > limits.max_classes:
        raise ResourceError(f"{field}: {ref} has {size['classes']} classes, above the limit of {limits.max_classes}; "
                            f"allowed: fewer classes, or raise the limit with --max-classes")
    need = 4 * size["n"] * size["channels"] * size["size"] ** 2
    if need > limits.max_memory_bytes:
        raise ResourceError(f"{field}: {ref} needs about {format_bytes(need)} of images, above the limit of "
                            f"{limits.max_memory_gb:g} GB; allowed: a smaller set, or raise the limit with "
                            f"--max-memory-gb")


def check_dataset(ds, limits: ResourceLimits = ResourceLimits(), field: str = "dataset",
                  ref: Optional[str] = None) -> None:
    """A loaded :class:`~ttp_ray.data.ImageDataset`: at least one sample, labels in ``0..C-1``, ``C <= max_classes``,
    and (folder sets) every image readable. ``npz`` values are checked finite when loaded."""
    from .data import check_readable_images

    shown = ref or ds.name
    if len(ds) == 0:
        raise PreflightError(f"{field}: {shown} holds no samples; allowed: a dataset with at least one image")
    c = int(ds.num_classes)
    if c > limits.max_classes:
        raise ResourceError(f"{field}: {shown} has {c} classes (labels up to {c - 1}), above the limit of "
                            f"{limits.max_classes}; allowed: labels 0..C-1 with C <= {limits.max_classes}, or raise "
                            f"the limit with --max-classes")
    lo, hi = int(ds.targets.min()), int(ds.targets.max())
    if lo < 0 or hi >= c:
        raise PreflightError(f"{field}: {shown} has labels in {lo}..{hi}; allowed: 0..{c - 1}")
    if ref is not None:
        check_readable_images(ref)


def check_model(name: str, ds, *, field: str = "model", allow_download: bool = False):
    """Build backbone ``name`` with its new head for ``ds``'s classes and run it on two of its images: the factory
    must be callable without arguments, return an ``nn.Module`` with a replaceable linear classifier, and map
    ``(B, ch, H, W)`` images to ``(B, C)`` outputs. Returns the model (``FinetuneModel``)."""
    import torch

    from .models import ModelError, build_finetune_model

    model = build_finetune_model(name, int(ds.num_classes), allow_download=allow_download)
    x = ds.images(slice(0, min(2, len(ds))))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the user's module on these images: one line, no traceback
        raise ModelError(" ".join(f"{field} {name}: its forward pass fails on {ds.name}'s images "
                                  f"{tuple(x.shape[1:])}: {type(exc).__name__}: {exc}".split())[:400]) from None
    if tuple(out.shape) != (x.shape[0], int(ds.num_classes)):
        raise ModelError(f"{field} {name}: maps {tuple(x.shape)} images to {tuple(out.shape)}, not (B, C) = "
                         f"({x.shape[0]}, {ds.num_classes}); allowed: a backbone whose features feed the new head")
    return model


# ------------------------------------------------------------------------------------------- resources

@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one process, by part: ``(what, bytes, the field that drives it)``."""

    parts: Tuple[Tuple[str, int, str], ...]
    where: str = "this process"

    @property
    def total(self) -> int:
        return int(sum(b for _, b, _ in self.parts))

    def largest(self) -> Tuple[str, int, str]:
        return max(self.parts, key=lambda p: p[1])

    def text(self) -> str:
        shown = ", ".join(f"{what} {format_bytes(b)}" for what, b, _ in self.parts if b)
        return f"about {format_bytes(self.total)} in {self.where} ({shown})"


_SIM_PARTS = {  # simulation_memory's parts: (what, which of the fields drives it)
    "steps": ("simulation: per-step arrays", "steps"),
    "records": ("simulation: curves of configs x paths", "steps"),
    "working_set": ("simulation: paths x N x C trajectories", "paths"),
    "closed_form": ("simulation: mse GD rows and lifts", "steps"),
    "ode": ("simulation: ce flow Jacobians", "k"),
    "batches": ("simulation: minibatch schedule", "steps"),
    "basis": ("simulation: eigenbasis", "k"),
}


def memory_estimate(n: int, num_classes: int, *, fields: Mapping[str, str], kernel=None, sim=None,
                    budget_steps: int = 0, n_configs: int = 1, max_batch: Optional[int] = None, finetune=None,
                    losses: Tuple[str, ...] = ("mse", "ce"), full_batch: Optional[bool] = None,
                    where: str = "this process") -> MemoryEstimate:
    """The memory a run needs: the kernel estimate (``kernel``: :class:`~ttp_ray.kernel.KernelOptions`), the
    simulation of ``n_configs`` configs of ``budget_steps`` steps (``sim``: :class:`~ttp_ray.dynamics.SimOptions`),
    a real fine-tune (``finetune``: :class:`~ttp_ray.finetune.FinetuneConfig`); ``max_batch``, ``losses`` and
    ``full_batch`` say which simulation engines run (:func:`~ttp_ray.dynamics.simulation_memory`). ``fields``
    names, for the keys ``k``, ``steps``, ``paths``, the field (or flag) of each that a refusal names."""
    parts = []
    rank = 0
    if kernel is not None:
        from .kernel import kernel_memory

        parts.append(("kernel: N x k sketch and eigenvectors", kernel_memory(n, num_classes, kernel), fields["k"]))
        rows = n if kernel.class_trace else n * num_classes
        rank = rows if kernel.method == "exact" else min(rows, int(kernel.k))
    if sim is not None:
        from .dynamics import simulation_memory

        class_trace = bool(kernel.class_trace) if kernel is not None else True
        for key, b in simulation_memory(n, num_classes, rank, class_trace, budget_steps, n_configs, sim,
                                        max_batch, losses, full_batch).items():
            what, drive = _SIM_PARTS[key]
            parts.append((what, int(b), fields[drive]))
    if finetune is not None:
        from .finetune import finetune_memory

        for key, b in finetune_memory(n, finetune).items():
            parts.append((f"fine-tune: {key}", int(b), fields["steps"]))
    return MemoryEstimate(tuple(parts), where)


def check_memory(estimate: MemoryEstimate, limits: ResourceLimits) -> None:
    """:class:`ResourceError` when ``estimate`` exceeds ``limits.max_memory_gb``, naming the field behind its
    largest part and ``--max-memory-gb``."""
    if estimate.total <= limits.max_memory_bytes:
        return
    what, _, field = estimate.largest()
    raise ResourceError(f"{field}: the run needs {estimate.text()}, above the limit of {limits.max_memory_gb:g} GB "
                        f"(largest: {what}); allowed: lower {field}, or raise the limit with --max-memory-gb")


def check_configs(count: int, axes: Mapping[str, int], limits: ResourceLimits) -> None:
    """:class:`ResourceError` when a grid of ``count`` configs (the product of ``axes``' lengths) exceeds
    ``limits.max_configs``; names the longest axis and ``--max-configs``."""
    if count <= limits.max_configs:
        return
    longest = max(axes, key=lambda k: axes[k])
    shape = " x ".join(f"{k} {v}" for k, v in axes.items())
    raise ResourceError(f"{longest}: the grid has {count} configs ({shape}), above the limit of {limits.max_configs}; "
                        f"allowed: a smaller grid, or raise the limit with --max-configs")
