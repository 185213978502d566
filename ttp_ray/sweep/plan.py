"""The plan of a sweep: the grid expanded per (dataset, model), a stable ``config_id`` per config, shards (groups
of configs one actor call predicts), the ground-truth selection, and the ``--dry-run`` text. Ray-free.

A spec with one model plans one unit per dataset, keyed by its label, with parts ``part-00000`` ...; a list of
models plans one unit per (dataset, model), keyed ``<label> @ <model>``, whose parts carry the model in their
file name (``part-<model>-00000``, the model percent-encoded) under the same ``dataset=<label>`` partition.

Configs of a dataset are ordered so that those sharing one simulation after the time-rescaling collapse
(:func:`ttp_ray.dynamics.simulation_groups`: equal eta/(1-m) for GD, equal temperature eta_eff/B for SGD)
are contiguous, and shards are cut along those groups where the shard size allows: a shard then
simulates each of its groups once.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

from .spec import DatasetEntry, SpecError, SweepSpec

__all__ = [
    "DatasetSize",
    "PlannedConfig",
    "Shard",
    "GroundTruthRun",
    "DatasetPlan",
    "SweepPlan",
    "config_id",
    "part_prefix",
    "unit_key",
    "auto_shard_size",
    "build_plan",
    "resolve_lr",
    "sim_config",
    "dry_run_text",
]

SHARDS_PER_DATASET = 20  # 'auto' shard size aims at about this many shards per dataset ...
MIN_SHARD, MAX_SHARD = 8, 256  # ... of 8..256 configs each


@dataclass(frozen=True)
class DatasetSize:
    """What the plan needs to know of a dataset before any kernel: N and C, and where they came from."""

    n: int
    num_classes: int
    source: str  # 'loaded' | 'paper table (data absent)'


@dataclass(frozen=True)
class PlannedConfig:
    """One training configuration of one dataset, before its lr is resolved (``lr_fraction`` mode)."""

    config_id: str
    dataset: str  # the dataset label (partition value)
    model: str
    loss: str
    lr: Optional[float]  # absolute lr, None in fraction mode (resolved on the state)
    lr_fraction: Optional[float]  # fraction of max_stable_lr(momentum), None in absolute mode
    momentum: float
    batch_size: Optional[int]  # None: full batch
    budget_steps: int

    def as_dict(self) -> Dict[str, object]:
        return {"config_id": self.config_id, "dataset": self.dataset, "model": self.model, "loss": self.loss,
                "lr": self.lr, "lr_fraction": self.lr_fraction, "momentum": self.momentum,
                "batch_size": self.batch_size, "budget_steps": self.budget_steps}


@dataclass(frozen=True)
class Shard:
    """Configs predicted by one actor call and written as one Parquet part."""

    dataset: str
    index: int
    configs: Tuple[PlannedConfig, ...]
    prefix: str = ""  # part_prefix of its model ('' with one model)

    @property
    def shard_id(self) -> str:
        """The part name: ``00000``, or ``<model>-00000`` in a sweep of several models."""
        return f"{self.prefix}{self.index:05d}"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.shard_id}"


@dataclass(frozen=True)
class GroundTruthRun:
    """One real fine-tune: a config and a minibatch-order seed."""

    config: PlannedConfig
    seed: int

    @property
    def run_id(self) -> str:
        return f"gt-{self.config.config_id}-s{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.config.dataset}/{self.run_id}"


@dataclass(frozen=True)
class DatasetPlan:
    """One unit of work: a dataset with one model (one kernel state, one actor)."""

    entry: DatasetEntry
    size: DatasetSize
    configs: Tuple[PlannedConfig, ...]
    shards: Tuple[Shard, ...]
    ground_truth: Tuple[GroundTruthRun, ...]
    distinct_simulations: int  # after the collapse, the grid taken whole
    sharded_simulations: int  # as the shards will run them (a group cut by a shard boundary counts twice)
    model: str = ""
    prefix: str = ""  # part_prefix of the model ('' with one model)

    @property
    def label(self) -> str:
        return self.entry.label

    @property
    def key(self) -> str:
        """The unit's key (manifest, progress): the label, or ``<label> @ <model>`` with several models."""
        return unit_key(self.label, self.model) if self.prefix else self.label


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    datasets: Tuple[DatasetPlan, ...]
    shard_size: int

    @property
    def n_configs(self) -> int:
        return sum(len(d.configs) for d in self.datasets)

    @property
    def n_shards(self) -> int:
        return sum(len(d.shards) for d in self.datasets)

    @property
    def n_ground_truth(self) -> int:
        return sum(len(d.ground_truth) for d in self.datasets)

    def shards(self) -> List[Shard]:
        return [s for d in self.datasets for s in d.shards]

    def ground_truth_runs(self) -> List[GroundTruthRun]:
        return [g for d in self.datasets for g in d.ground_truth]

    def dataset(self, label: str) -> DatasetPlan:
        """The (first) unit of dataset ``label``."""
        return next(d for d in self.datasets if d.label == label)

    def unit(self, key: str) -> DatasetPlan:
        """The unit of key ``key`` (:attr:`DatasetPlan.key`)."""
        return next(d for d in self.datasets if d.key == key)

    def layout(self) -> Dict[str, object]:
        """Shard and ground-truth membership by config_id: what a resumed run must find unchanged."""
        return {
            "shards": {s.key: [c.config_id for c in s.configs] for s in self.shards()},
            "ground_truth": sorted(g.key for g in self.ground_truth_runs()),
        }

    def layout_hash(self) -> str:
        blob = json.dumps(self.layout(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------- identities

def config_id(model: str, dataset_ref: str, loss: str, lr: Optional[float], lr_fraction: Optional[float],
              momentum: float, batch_size: Optional[int], budget_steps: int, head_seed: int, trainable: str) -> str:
    """Stable 16-hex hash of a training configuration (equal in the prediction and ground-truth tables)."""
    key = {
        "model": model, "dataset": dataset_ref, "loss": loss,
        "lr": None if lr is None else float(f"{lr:.12g}"),
        "lr_fraction": None if lr_fraction is None else float(f"{lr_fraction:.12g}"),
        "momentum": float(f"{momentum:.12g}"), "batch_size": "full" if batch_size is None else int(batch_size),
        "budget_steps": int(budget_steps), "head_seed": int(head_seed), "trainable": trainable,
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def part_prefix(spec: SweepSpec, model: str) -> str:
    """What a model's part names start with: '' with one model, else ``<model percent-encoded>-``."""
    return f"{quote(model, safe='')}-" if len(spec.models) > 1 else ""


def unit_key(label: str, model: str) -> str:
    """The key of a (dataset, model) unit in a sweep of several models."""
    return f"{label} @ {model}"


def resolve_lr(cfg: PlannedConfig, max_stable_lr) -> float:
    """The absolute lr of ``cfg``; ``max_stable_lr(m)`` gives a dataset's stability limit for momentum m."""
    if cfg.lr is not None:
        return float(cfg.lr)
    return float(cfg.lr_fraction) * float(max_stable_lr(cfg.momentum))


def sim_config(cfg: PlannedConfig, lr: float):
    """The :class:`ttp_ray.dynamics.SimConfig` of a planned config at absolute ``lr``."""
    from ..dynamics import SimConfig

    return SimConfig(lr=lr, momentum=cfg.momentum, batch_size=cfg.batch_size, loss=cfg.loss)


# -------------------------------------------------------------------------------------------- build

def auto_shard_size(n_configs: int) -> int:
    return int(min(MAX_SHARD, max(MIN_SHARD, math.ceil(n_configs / SHARDS_PER_DATASET))))


def _expand(spec: SweepSpec, entry: DatasetEntry, size: DatasetSize, model: str) -> List[PlannedConfig]:
    relative = spec.lr.relative
    out = []
    for loss, b, m, x in itertools.product(spec.losses, spec.batch_size, spec.momentum, spec.lr.values):
        if b is not None and b > size.n:
            raise SpecError(f"batch_size: {b} exceeds the size of dataset {entry.label} (N={size.n}); "
                            f"allowed: 1..{size.n} or full")
        lr, frac = (None, x) if relative else (x, None)
        budget = spec.budget.steps_for(size.n, b)
        cid = config_id(model, entry.key, loss, lr, frac, m, b, budget, spec.kernel.head_seed,
                        spec.kernel.trainable)
        out.append(PlannedConfig(cid, entry.label, model, loss, lr, frac, m, b, budget))
    return out


def _placeholder_sim_configs(spec: SweepSpec, configs: Sequence[PlannedConfig], n: int):
    """SimConfigs for grouping before any kernel: a fraction f becomes lr = f * 2(1+m)N/lambda with
    lambda = 1. Groups are invariant to that common scale, and with it the ELR fallback test
    (eta_eff lambda h / N >= 2) is exact for fraction grids."""
    from ..stability import max_stable_lr

    return [sim_config(c, resolve_lr(c, lambda m: max_stable_lr(1.0, n, m))) for c in configs]


def _groups(spec: SweepSpec, configs: Sequence[PlannedConfig], n: int) -> List[List[int]]:
    """Indices of ``configs`` grouped by shared simulation (same budget, same collapse key)."""
    from ..dynamics import simulation_groups

    sims = _placeholder_sim_configs(spec, configs, n)
    lam = 1.0 if spec.lr.relative else None
    opt = spec.simulation.sim_options()
    out: List[List[int]] = []
    budgets = sorted({c.budget_steps for c in configs})
    for budget in budgets:
        idx = [i for i, c in enumerate(configs) if c.budget_steps == budget]
        for g in simulation_groups([sims[i] for i in idx], opt, n, lam):
            out.append([idx[j] for j in g])
    return out


def _cut_shards(label: str, configs: Sequence[PlannedConfig], groups: List[List[int]], shard_size: int,
                prefix: str = "") -> Tuple[Tuple[Shard, ...], int]:
    """Pack whole groups into shards of at most ``shard_size`` configs (a larger group is split)."""
    shards: List[List[int]] = []
    cur: List[int] = []
    pieces = 0
    for g in groups:
        if cur and len(cur) + len(g) > shard_size:
            shards.append(cur)
            cur = []
        while len(g) > shard_size:
            if cur:
                shards.append(cur)
                cur = []
            shards.append(g[:shard_size])
            pieces += 1
            g = g[shard_size:]
        cur = cur + g
        pieces += 1
    if cur:
        shards.append(cur)
    return tuple(Shard(label, i, tuple(configs[j] for j in s), prefix) for i, s in enumerate(shards)), pieces


def _matches(cfg: PlannedConfig, where) -> bool:
    for key, allowed in where:
        value = getattr(cfg, key)
        if key in ("lr", "lr_fraction", "momentum"):
            if value is None or not any(math.isclose(value, a, rel_tol=1e-9, abs_tol=0.0) for a in allowed):
                return False
        elif value not in allowed:
            return False
    return True


def _select_ground_truth(spec: SweepSpec, configs: Sequence[PlannedConfig]) -> Tuple[GroundTruthRun, ...]:
    gt = spec.ground_truth
    if not gt.enabled:
        return ()
    chosen = [c for c in configs if _matches(c, gt.where)]
    if gt.every:
        chosen = chosen[::gt.every]
    if gt.max_configs is not None and len(chosen) > gt.max_configs:
        if gt.max_configs == 1:
            chosen = [chosen[0]]
        else:
            step = (len(chosen) - 1) / (gt.max_configs - 1)
            chosen = [chosen[int(round(i * step))] for i in range(gt.max_configs)]
    # the seed only orders minibatches: full-batch runs would repeat one identical run per seed
    return tuple(GroundTruthRun(c, s) for c in chosen for s in (gt.seeds if c.batch_size is not None else gt.seeds[:1]))


def build_plan(spec: SweepSpec, sizes: Mapping[str, DatasetSize]) -> SweepPlan:
    """Expand ``spec`` on datasets of the given sizes (keyed by label) into shards and ground-truth runs, one unit
    per (dataset, model)."""
    per_dataset = []
    shard_size = spec.resources.shard_size
    if shard_size == "auto":
        shard_size = auto_shard_size(spec.grid_size)
    for entry in spec.datasets:
        size = sizes[entry.label]
        for model in spec.models:
            expanded = _expand(spec, entry, size, model)
            groups = _groups(spec, expanded, size.n)
            ordered = [expanded[i] for g in groups for i in g]
            regroup = []
            pos = 0
            for g in groups:
                regroup.append(list(range(pos, pos + len(g))))
                pos += len(g)
            prefix = part_prefix(spec, model)
            shards, pieces = _cut_shards(entry.label, ordered, regroup, int(shard_size), prefix)
            per_dataset.append(DatasetPlan(entry, size, tuple(expanded), shards, _select_ground_truth(spec, expanded),
                                           len(groups), pieces, model, prefix))
    return SweepPlan(spec, tuple(per_dataset), int(shard_size))


# ---------------------------------------------------------------------------------------- dry run

def _fmt_values(values, fmt="{:g}") -> str:
    return "[" + ", ".join("full" if v is None else fmt.format(v) for v in values) + "]"


def dry_run_text(plan: SweepPlan, resources: Mapping[str, object]) -> str:
    """What ``--dry-run`` prints: grid, per-dataset configs / distinct simulations / shards / ground
    truth, actors and resources. ``resources`` is the driver's view (see ``driver.resource_view``)."""
    spec = plan.spec
    lr_desc = ("fraction of max_stable_lr " if spec.lr.relative else "") + _fmt_values(spec.lr.values)
    several = len(spec.models) > 1
    w = max([34] + [len(d.key) for d in plan.datasets]) if several else 34  # column of the unit's name
    models = f"models {', '.join(spec.models)}" if several else f"model {spec.model}"
    lines = [
        f"sweep {spec.name!r}: {models}, {len(spec.datasets)} dataset(s), {plan.n_configs} configs, "
        f"{plan.n_shards} shards of <= {plan.shard_size}, {plan.n_ground_truth} ground-truth run(s)"
        + (f" + the predicted best {spec.ground_truth.top} per (dataset, loss), chosen after the predictions"
           if spec.ground_truth.picks_top else ""),
        f"  grid per {'(dataset, model)' if several else 'dataset'} ({spec.grid_size}): loss {list(spec.losses)} x "
        f"lr {lr_desc} x momentum {_fmt_values(spec.momentum)} x batch_size {_fmt_values(spec.batch_size, '{}')}",
        "  budget: " + (f"{spec.budget.steps} steps" if spec.budget.steps else f"{spec.budget.epochs} epochs")
        + f"; eps {list(spec.eps)} ({spec.simulation.eps_mode}); criteria {list(spec.criteria)}",
        f"  kernel: {spec.kernel.method} k={spec.kernel.k} {spec.kernel.projection}"
        f"{' class-trace' if spec.kernel.class_trace else ''}, cache {'on' if spec.kernel.cache else 'off'}; "
        f"simulation: method {spec.simulation.method}, momentum {spec.simulation.momentum_mode}, "
        f"paths {spec.simulation.paths}, log_every {spec.simulation.log_every}",
        "",
        f"  {'dataset @ model' if several else 'dataset':{w}s} {'N':>7s} {'C':>4s} {'configs':>8s} {'distinct sims':>14s} "
        f"{'shards':>7s} {'gt runs':>8s}",
    ]
    for d in plan.datasets:
        sims = f"{d.distinct_simulations}" + (f" ({d.sharded_simulations})" if d.sharded_simulations != d.distinct_simulations else "")
        lines.append(f"  {d.key[:w]:{w}s} {d.size.n:7d} {d.size.num_classes:4d} {len(d.configs):8d} "
                     f"{sims:>14s} {len(d.shards):7d} {len(d.ground_truth):8d}"
                     + ("" if d.size.source == "loaded" else f"  [N from the {d.size.source}]"))
    total_sims = sum(d.distinct_simulations for d in plan.datasets)
    lines += [
        f"  distinct simulations after the eta/(1-m) and eta_eff/B collapse: {total_sims} for {plan.n_configs} "
        f"configs (in parentheses: as cut into shards)"
        + ("" if spec.lr.relative else "; before the kernel, the ELR-to-heavy-ball fallback is not counted"),
        "",
        "  resources: " + ", ".join(f"{k} {v}" for k, v in resources.items()),
        f"  output: {spec.output_dir()}/{{predictions,ground_truth,curves,spectra}}/dataset=.../"
        f"{'part-<model>-*' if several else '*'}.parquet + manifest.json",
    ]
    return "\n".join(lines)
