"""Preflight of a sweep: everything that can be checked before any work starts, with the shared checks of
:mod:`ttp_ray.preflight` (the ones ``predict`` and ``finetune`` run too).

* :func:`check_grid` -- the grid's size from the YAML form (:mod:`.grid`), before anything is expanded or torch is
  imported (``--max-configs``);
* :func:`preflight` -- every dataset loaded (N, C; classes, labels, readable images), every backbone built with
  its head for every dataset and run on two images, and each dataset checked as each backbone takes it;
* :func:`check_plan` -- the plan's memory per actor (kernel N x k, simulation of a shard) against
  ``--max-memory-gb``, and its config count against ``--max-configs``;
* :func:`check_local` -- what only a local Ray can be held to: the output directory and ``resources.device``.

Run by the driver before Ray starts, or, attached to a cluster, :func:`preflight` as a Ray task there
(:func:`ttp_ray.sweep.actors.preflight_task`), where the data lives. Nothing here imports Ray.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

from ..preflight import (MemoryEstimate, ResourceLimits, check_configs, check_dataset, check_dataset_ref,
                         check_memory, check_model, check_output_dir, memory_estimate)
from .grid import grid_axes

if TYPE_CHECKING:  # the spec module imports torch (through the core dataclasses); the grid check must not
    from .spec import SweepSpec

__all__ = ["preflight", "check_grid", "check_plan", "check_local", "unit_memory", "SPEC_FIELDS"]

SPEC_FIELDS = {"k": "kernel.k", "steps": "budget", "paths": "simulation.paths"}  # what a memory refusal names


def check_grid(data: Any, limits: ResourceLimits = ResourceLimits()) -> Dict[str, int]:
    """The grid's axes (:func:`~ttp_ray.sweep.spec.grid_axes`) and their product checked against
    ``limits.max_configs`` before the spec is parsed (nothing expanded); returns the axes."""
    axes = grid_axes(data)
    check_configs(math.prod(axes.values()) if axes else 0, axes, limits)
    return axes


def preflight(spec: SweepSpec, *, allow_missing: bool = False,
              limits: ResourceLimits = ResourceLimits()) -> Dict[str, Dict[str, Any]]:
    """Load every dataset (N, C; :func:`ttp_ray.preflight.check_dataset`: labels, classes, readable images) and every
    backbone, and check each dataset as each backbone takes it (user images adapted to its input; channels it cannot
    take: :class:`~ttp_ray.inputs.InputMismatchError`, one line), the backbone built with its head for the dataset and
    run on two of its images (:func:`ttp_ray.preflight.check_model`). ``allow_missing`` (dry run): a paper dataset
    whose files are absent takes its size from :data:`ttp_ray.data.PAPER_DATASETS`, and the models are not loaded.
    Raises one-line ``ValueError`` subclasses (``DatasetError``, ``ModelError``, ``PreflightError``)."""
    from ..data import PAPER_DATASETS, DatasetError, load_dataset

    sizes: Dict[str, Dict[str, Any]] = {}
    for i, entry in enumerate(spec.datasets):
        field = f"datasets[{i}]"
        check_dataset_ref(entry.ref, limits, field)
        try:
            ds = load_dataset(entry.ref)
        except DatasetError:
            if not (allow_missing and entry.is_paper):
                raise
            info = PAPER_DATASETS[entry.name]
            n = int(info["images"]) if entry.subset is None else min(int(entry.subset), int(info["images"]))
            sizes[entry.label] = {"n": n, "num_classes": int(info["classes"]),
                                  "source": "paper table (data absent)"}
            continue
        check_dataset(ds, limits, field, ref=None if allow_missing else entry.ref)
        sizes[entry.label] = {"n": len(ds), "num_classes": int(ds.num_classes), "source": "loaded"}
    if not allow_missing:
        from ..models import load_backbone, load_dataset_for_model

        for model in spec.models:
            load_backbone(model)
            for entry in spec.datasets:
                ds = load_dataset_for_model(entry.ref, model, adapt=entry.input)
                check_model(model, ds)
    return sizes


def unit_memory(spec: SweepSpec, n: int, num_classes: int, shard_configs: int, budget_steps: int) -> MemoryEstimate:
    """The memory one actor needs for a (dataset, model) of ``n`` samples and ``num_classes`` classes: its kernel state
    and the simulation of one shard of ``shard_configs`` configs of at most ``budget_steps`` steps."""
    b = [x for x in spec.batch_size if x is not None and x < n]
    return memory_estimate(n, num_classes, fields=SPEC_FIELDS, kernel=spec.kernel.options(),
                           sim=spec.simulation.sim_options(), budget_steps=budget_steps, n_configs=shard_configs,
                           max_batch=max(b) if b else None, losses=tuple(spec.losses),
                           full_batch=len(b) < len(spec.batch_size), where="one actor")


def check_plan(spec: SweepSpec, plan, limits: ResourceLimits = ResourceLimits()) -> Optional[MemoryEstimate]:
    """The expanded plan against ``limits``: its configs, and the memory of its largest unit (per actor); returns
    that unit's estimate (None for an empty plan)."""
    axes = {"datasets": len(spec.datasets), "model": len(spec.models), "losses": len(spec.losses),
            "lr": len(spec.lr.values), "momentum": len(spec.momentum), "batch_size": len(spec.batch_size)}
    check_configs(plan.n_configs, axes, limits)
    worst: Optional[MemoryEstimate] = None
    for d in plan.datasets:
        steps = max((c.budget_steps for c in d.configs), default=0)
        shard = max((len(s.configs) for s in d.shards), default=0)
        est = unit_memory(spec, d.size.n, d.size.num_classes, shard, steps)
        if worst is None or est.total > worst.total:
            worst = est
    if worst is not None:
        check_memory(worst, limits)
    return worst


def check_local(spec: SweepSpec, out: str, cluster: Mapping[str, float]) -> None:
    """What a local run is held to before Ray starts: the output directory can be written (not a file), and
    ``resources.device: cuda`` has a GPU (a cluster's GPUs are known only there)."""
    from ..preflight import PreflightError

    check_output_dir(out, "output")
    if spec.resources.device == "cuda" and not float(cluster.get("GPU", 0.0)) >= 1:
        raise PreflightError("resources.device: cuda asked for, but torch sees no CUDA GPU here; allowed: auto, cpu "
                             "(or attach to a cluster with GPUs: --address)")
