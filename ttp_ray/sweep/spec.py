"""Sweep specification: a YAML file (read with ``yaml.safe_load``) validated into frozen dataclasses.

Every field, its default and its allowed values (``*`` marks the required ones)::

    name*: quickstart                  # [A-Za-z0-9_.-]+, names the run
    model*: digits-cnn                 # backbone (``ttp-ray models``)
    datasets*:                         # non-empty list; each entry a string or a mapping
      - digits-5to9                    #   registry name, npz:PATH, folder:ROOT, NAME:subset=N
      - {name: digits, subset: 300}    #   mapping: name*, subset (int > 0), label (partition value)
    losses: [ce]                       # subset of mse, ce
    lr*: [0.01, 0.1]                   # absolute values > 0, or {values: [...]}, or
                                       # {fraction_of_max_stable: [0.05, 0.5, 1.2]} (of each dataset's
                                       # 2(1+m)N/lambda_max, measured on the kernel), lists may be
                                       # written {geomspace: [lo, hi, count]} or {linspace: [...]}
    momentum: [0.0]                    # values in [0, 1)
    batch_size: [full]                 # ints > 0 or 'full' (B = N: gradient descent)
    eps: [0.01]                        # thresholds > 0 for T_eps
    criteria: [loss, error]            # subset of loss, error
    budget*: {steps: 300}              # or {epochs: E}: steps = E * (N // B) per config
    kernel:       {method: sketch, projection: countsketch, k: 512, class_trace: false, class_probes: 1,
                   seed: 0, dtype: float64, memory_cap_mb: 512, batch_size: null, head_seed: 0,
                   trainable: all, cache: true}
    simulation:   {method: auto, momentum_mode: auto, noise: rescaled, paths: 8, seed: 0, log_every: 1,
                   eps_mode: absolute, definition: threshold, window: 0, drift_reference: null}
                                       # drift_reference F in (0, 1]: full-batch configs predicted with the
                                       # kernel drift of one real plain-GD run at F x max_stable_lr(0) per
                                       # (dataset, loss, budget) (ttp_ray.drift); null: the frozen kernel
    cost:         {step_time_steps: 5, step_time_max_batch: 1024}
    ground_truth: off | on | {enabled: false, seeds: [0], every: null, max_configs: null, where: {},
                   log_every: null, cpus: 1, gpus: auto, max_retries: 1}
    resources:    {actors: auto, cpus_per_actor: 1, gpus_per_actor: auto, device: auto, shard_size: auto,
                   max_restarts: 3, max_task_retries: 3, object_store_mb: auto}
    output:       {dir: null}          # null: runs/<name>; the CLI's --out overrides it

Any invalid field raises :class:`SpecError` whose message is one line naming the field and the allowed
values. Nothing here imports Ray.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "SpecError",
    "DatasetEntry",
    "LrGrid",
    "Budget",
    "KernelSpec",
    "SimulationSpec",
    "CostSpec",
    "GroundTruthSpec",
    "ResourcesSpec",
    "OutputSpec",
    "SweepSpec",
    "LR_MODES",
    "GT_FILTER_FIELDS",
    "load_spec",
    "parse_spec",
]


class SpecError(ValueError):
    """An invalid sweep spec; the message is one line: ``<field>: <problem>; allowed: <values>``."""


LR_MODES = ("absolute", "fraction_of_max_stable")
LOSSES = ("mse", "ce")
CRITERIA = ("loss", "error")
GT_FILTER_FIELDS = ("dataset", "loss", "lr", "lr_fraction", "momentum", "batch_size")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_AUTO = "auto"


# ----------------------------------------------------------------------------------- the dataclasses

@dataclass(frozen=True)
class DatasetEntry:
    """One target dataset: ``ref`` is what :func:`ttp_ray.data.load_dataset` reads."""

    ref: str  # normalised reference, e.g. "digits-5to9:subset=100" or "npz:/data/x.npz"
    name: str  # registry part: "digits-5to9", "npz", "cifar10", ...
    subset: Optional[int] = None
    label: str = ""  # partition value and display name; defaults to ref

    @property
    def is_paper(self) -> bool:
        from ..data import PAPER_DATASETS

        return self.name in PAPER_DATASETS


@dataclass(frozen=True)
class LrGrid:
    """Learning rates: absolute values, or fractions of each dataset's ``max_stable_lr(m)``."""

    mode: str  # one of LR_MODES
    values: Tuple[float, ...]

    @property
    def relative(self) -> bool:
        return self.mode == "fraction_of_max_stable"


@dataclass(frozen=True)
class Budget:
    """Step budget T of every config: fixed ``steps``, or ``epochs`` x (N // B) steps."""

    steps: Optional[int] = None
    epochs: Optional[int] = None

    def steps_for(self, n: int, batch_size: Optional[int]) -> int:
        """T for a dataset of ``n`` samples and batch size ``batch_size`` (None: full batch)."""
        if self.steps is not None:
            return int(self.steps)
        b = n if batch_size is None else min(int(batch_size), n)
        return int(self.epochs) * max(1, n // b)


@dataclass(frozen=True)
class KernelSpec:
    """Kernel estimation (:class:`ttp_ray.kernel.KernelOptions`) plus the fine-tuning model's set-up."""

    method: str = "sketch"
    projection: str = "countsketch"
    k: int = 2048  # KernelOptions' defaults (chosen by bench/kernel.py)
    class_trace: bool = True
    class_probes: int = 1
    seed: int = 0
    dtype: str = "float64"
    memory_cap_mb: float = 512.0
    batch_size: Optional[int] = None
    head_seed: int = 0  # seed of the new linear head (w0)
    trainable: str = "all"  # 'all' | 'head'
    cache: bool = True  # load/store the state in the kernel disk cache
    subset: Optional[int] = None  # kernel of N0 samples only, full set extrapolated (METHOD.md §7; mse, full batch)
    subset_alpha: Optional[float] = None  # exponent correction; None: ttp_ray.subset.DEFAULT_ALPHA

    def options(self):
        from ..kernel import KernelOptions

        return KernelOptions(method=self.method, projection=self.projection, k=self.k, class_trace=self.class_trace,
                             class_probes=self.class_probes, seed=self.seed, memory_cap_mb=self.memory_cap_mb,
                             batch_size=self.batch_size, dtype=self.dtype)


@dataclass(frozen=True)
class SimulationSpec:
    """How curves are simulated (:class:`ttp_ray.dynamics.SimOptions`) and T_eps read off."""

    method: str = "auto"
    momentum_mode: str = "auto"
    noise: str = "rescaled"
    paths: int = 8
    seed: int = 0
    log_every: int = 1
    eps_mode: str = "absolute"
    definition: str = "threshold"
    window: int = 0
    # full-batch configs: calibrate the kernel's drift on one real plain-GD fine-tune at this fraction of
    # max_stable_lr(0) per (dataset, loss, budget) and warp the frozen ODE (ttp_ray.drift); None: off
    drift_reference: Optional[float] = None

    def sim_options(self):
        from ..dynamics import SimOptions

        return SimOptions(method=self.method, momentum_mode=self.momentum_mode, noise=self.noise, paths=self.paths,
                          seed=self.seed, log_every=self.log_every)

    def settings(self, criteria: Sequence[str]):
        from ..predict import PredictSettings

        return PredictSettings(sim=self.sim_options(), eps_mode=self.eps_mode, criteria=tuple(criteria),
                               definition=self.definition, window=self.window)


@dataclass(frozen=True)
class CostSpec:
    """Step-time measurement for ``predicted_cost_s``: the median of ``step_time_steps`` SGD steps; a
    batch above ``step_time_max_batch`` is timed at that size and scaled linearly."""

    step_time_steps: int = 5
    step_time_max_batch: int = 1024


@dataclass(frozen=True)
class GroundTruthSpec:
    """Real fine-tunes (Ray tasks) of a selection of configs, per dataset: the ``where`` filter
    (field -> allowed values), then every ``every``-th config, then at most ``max_configs`` evenly
    spaced ones; each selected config runs once per seed (full-batch configs once, with the first seed:
    the seed only orders minibatches)."""

    enabled: bool = False
    seeds: Tuple[int, ...] = (0,)
    every: Optional[int] = None
    max_configs: Optional[int] = None
    where: Tuple[Tuple[str, Tuple[Any, ...]], ...] = ()
    log_every: Optional[int] = None  # None: simulation.log_every
    cpus: float = 1.0
    gpus: Union[str, float] = _AUTO  # 'auto': 1 when the cluster has GPUs, else 0
    max_retries: int = 1


@dataclass(frozen=True)
class ResourcesSpec:
    """Ray resources. ``actors``: per dataset ('auto' = 1); ``gpus_per_actor`` 'auto' = 1 when the
    cluster has GPUs; ``device`` 'auto' = cuda when the actor holds a GPU; ``shard_size`` 'auto' =
    about 20 shards per dataset (8..256 configs each); ``object_store_mb`` only for a local Ray."""

    actors: Union[str, int] = _AUTO
    cpus_per_actor: float = 1.0
    gpus_per_actor: Union[str, float] = _AUTO
    device: str = _AUTO  # 'auto' | 'cpu' | 'cuda'
    shard_size: Union[str, int] = _AUTO
    max_restarts: int = 3
    max_task_retries: int = 3
    object_store_mb: Union[str, int] = _AUTO


@dataclass(frozen=True)
class OutputSpec:
    dir: Optional[str] = None  # None: runs/<name>


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep; see the module docstring for every field."""

    name: str
    model: str
    datasets: Tuple[DatasetEntry, ...]
    lr: LrGrid
    budget: Budget
    losses: Tuple[str, ...] = ("ce",)
    momentum: Tuple[float, ...] = (0.0,)
    batch_size: Tuple[Optional[int], ...] = (None,)  # None = full batch
    eps: Tuple[float, ...] = (0.01,)
    criteria: Tuple[str, ...] = CRITERIA
    kernel: KernelSpec = field(default_factory=KernelSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    ground_truth: GroundTruthSpec = field(default_factory=GroundTruthSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    @property
    def grid_size(self) -> int:
        """Configs per dataset."""
        return len(self.losses) * len(self.lr.values) * len(self.momentum) * len(self.batch_size)

    def output_dir(self) -> str:
        return self.output.dir or f"runs/{self.name}"

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able form (tuples as lists), as recorded in the manifest."""
        return _jsonable(asdict(self))

    def identity(self) -> Dict[str, Any]:
        """The fields that decide the results and their layout: everything but where it is written
        and how many resources compute it (so a resumed run may use other resources)."""
        d = self.to_dict()
        d.pop("output")
        d["resources"] = {"shard_size": d["resources"]["shard_size"]}
        for key in ("cpus", "gpus", "max_retries"):
            d["ground_truth"].pop(key)
        d["kernel"].pop("memory_cap_mb")
        d["kernel"].pop("batch_size")
        return d

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ------------------------------------------------------------------------------------ field parsers

def _fail(path: str, problem: str, allowed: Optional[str] = None) -> None:
    msg = f"{path}: {problem}" + (f"; allowed: {allowed}" if allowed else "")
    raise SpecError(" ".join(msg.split()))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: Any, path: str, allowed_keys: Iterable[str]) -> Dict[str, Any]:
    allowed_keys = list(allowed_keys)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(path, f"must be a mapping, got {_show(value)}", "keys " + ", ".join(allowed_keys))
    for key in value:
        if key not in allowed_keys:
            _fail(f"{path}.{key}" if path else str(key), "unknown field", ", ".join(allowed_keys))
    return dict(value)


def _as_list(value: Any, path: str, what: str) -> List[Any]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif value is None or isinstance(value, Mapping):
        _fail(path, f"must be a value or a non-empty list, got {_show(value)}", what)
    else:
        items = [value]
    if not items:
        _fail(path, "must not be empty", what)
    return items


def _number(value: Any, path: str, allowed: str) -> float:
    if isinstance(value, bool):
        _fail(path, f"{_show(value)} is not a number", allowed)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            _fail(path, f"{_show(value)} is not a number", allowed)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        _fail(path, f"{_show(value)} is not a finite number", allowed)
    return float(value)


def _integer(value: Any, path: str, allowed: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        _fail(path, f"{_show(value)} is not an integer", allowed)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            _fail(path, f"{_show(value)} is not an integer", allowed)
    if not isinstance(value, (int, float)):
        _fail(path, f"{_show(value)} is not an integer", allowed)
    value = int(value)
    if minimum is not None and value < minimum:
        _fail(path, f"must be >= {minimum}, got {value}", allowed)
    return value


def _boolean(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    _fail(path, f"{_show(value)} is not a boolean", "true, false")


def _choice(value: Any, path: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        _fail(path, f"{_show(value)} is not allowed", ", ".join(allowed))
    return value


def _auto_or_number(value: Any, path: str, minimum: float, integer: bool = False):
    allowed = f"auto or a{'n integer' if integer else ' number'} >= {minimum:g}"
    if value == _AUTO:
        return _AUTO
    x = _integer(value, path, allowed) if integer else _number(value, path, allowed)
    if x < minimum:
        _fail(path, f"must be >= {minimum:g}, got {x}", allowed)
    return x


def _number_list(value: Any, path: str, allowed: str, lo: float, hi: float = math.inf,
                 lo_open: bool = True, hi_open: bool = True) -> Tuple[float, ...]:
    """A list of numbers in (lo, hi) (open/closed per flag), or {geomspace|linspace: [a, b, count]}."""
    if isinstance(value, Mapping):
        if len(value) != 1 or next(iter(value)) not in ("geomspace", "linspace"):
            _fail(path, f"{_show(value)} is not a list", f"{allowed}, or {{geomspace|linspace: [lo, hi, count]}}")
        kind, args = next(iter(value.items()))
        if not isinstance(args, (list, tuple)) or len(args) != 3:
            _fail(f"{path}.{kind}", f"must be [lo, hi, count], got {_show(args)}", "[lo, hi, count]")
        a = _number(args[0], f"{path}.{kind}", "numbers")
        b = _number(args[1], f"{path}.{kind}", "numbers")
        count = _integer(args[2], f"{path}.{kind}", "an integer >= 1", 1)
        if kind == "geomspace" and (a <= 0 or b <= 0):
            _fail(f"{path}.geomspace", "lo and hi must be > 0", "positive numbers")
        items = _spaced(kind, a, b, count)
    else:
        items = [_number(v, path, allowed) for v in _as_list(value, path, allowed)]
    for x in items:
        below = x <= lo if lo_open else x < lo
        above = x >= hi if hi_open else x > hi
        if below or above:
            _fail(path, f"{x:g} is out of range", allowed)
    return _unique(items, path)


def _spaced(kind: str, a: float, b: float, count: int) -> List[float]:
    if count == 1:
        return [a]
    if kind == "linspace":
        return [float(f"{a + (b - a) * i / (count - 1):.12g}") for i in range(count)]
    la, lb = math.log(a), math.log(b)
    return [float(f"{math.exp(la + (lb - la) * i / (count - 1)):.12g}") for i in range(count)]


def _unique(items: Sequence[Any], path: str) -> tuple:
    seen = []
    for x in items:
        if x in seen:
            _fail(path, f"value {_show(x)} is listed twice", "distinct values")
        seen.append(x)
    return tuple(seen)


# --------------------------------------------------------------------------------------- sections

def _parse_datasets(value: Any) -> Tuple[DatasetEntry, ...]:
    from ..data import DatasetError, PAPER_DATASETS, list_datasets, parse_dataset_ref

    registry = sorted({k.split(":")[0] for k in list_datasets()} | set(PAPER_DATASETS))
    allowed = ", ".join(registry) + " (npz:PATH, folder:ROOT; NAME:subset=N)"
    items = _as_list(value, "datasets", "a list of dataset names")
    out = []
    for i, item in enumerate(items):
        path = f"datasets[{i}]"
        label = None
        subset = None
        if isinstance(item, Mapping):
            m = _mapping(item, path, ("name", "subset", "label"))
            if "name" not in m:
                _fail(f"{path}.name", "is required", allowed)
            text = m["name"]
            if m.get("subset") is not None:
                subset = _integer(m["subset"], f"{path}.subset", "an integer >= 1", 1)
            if m.get("label") is not None:
                label = str(m["label"])
        else:
            text = item
        if not isinstance(text, str) or not text.strip():
            _fail(path, f"{_show(text)} is not a dataset name", allowed)
        try:
            ref = parse_dataset_ref(text)
        except DatasetError as exc:
            _fail(path, str(exc), allowed)
        if ref.name not in registry:
            _fail(path, f"unknown dataset {ref.name!r}", allowed)
        opts = ref.options
        if "subset" in opts:
            s = _integer(opts["subset"], f"{path}.subset", "an integer >= 1", 1)
            if subset is not None and s != subset:
                _fail(f"{path}.subset", f"given twice ({s} and {subset})", "one subset")
            subset = s
        params = tuple((k, v) for k, v in ref.params if k != "subset")
        if subset is not None:
            params = params + (("subset", str(subset)),)
        normal = str(type(ref)(ref.name, params))
        if ref.name in ("npz", "folder"):
            normal = f"{ref.name}:{opts['path']}" + (f",subset={subset}" if subset is not None else "")
        out.append(DatasetEntry(ref=normal, name=ref.name, subset=subset, label=label or normal))
    labels = [d.label for d in out]
    for lab in labels:
        if labels.count(lab) > 1:
            _fail("datasets", f"{lab!r} is listed twice", "distinct datasets (or distinct labels)")
    return tuple(out)


def _parse_model(value: Any) -> str:
    from ..models import list_models

    known = [k for k in list_models() if ":" not in k]
    allowed = ", ".join(known + ["ARCH:PATH", "package.module:function"])
    if not isinstance(value, str) or not value.strip():
        _fail("model", f"{_show(value)} is not a model name", allowed)
    value = value.strip()
    if ":" not in value and value not in known:
        _fail("model", f"unknown model {value!r}", allowed)
    return value


def _parse_lr(value: Any) -> LrGrid:
    absolute = "numbers > 0"
    if isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in ("values",) + LR_MODES:
        key, inner = next(iter(value.items()))
        if key == "fraction_of_max_stable":
            return LrGrid(key, _number_list(inner, "lr.fraction_of_max_stable", "fractions > 0 (1.0 = the stability limit)", 0.0))
        return LrGrid("absolute", _number_list(inner, f"lr.{key}", absolute, 0.0))
    if isinstance(value, Mapping) and set(value) - {"geomspace", "linspace"}:
        _fail("lr", f"unknown form {_show(value)}", "a list of values > 0, {values: [...]}, "
              "{fraction_of_max_stable: [...]}")
    return LrGrid("absolute", _number_list(value, "lr", absolute, 0.0))


def _parse_batch_sizes(value: Any) -> Tuple[Optional[int], ...]:
    allowed = "integers >= 1 or full"
    out = []
    for v in _as_list(value, "batch_size", allowed):
        if isinstance(v, str) and v.strip().lower() == "full":
            out.append(None)
        else:
            out.append(_integer(v, "batch_size", allowed, 1))
    return _unique(out, "batch_size")


def _parse_choices(value: Any, path: str, allowed: Sequence[str]) -> Tuple[str, ...]:
    items = _as_list(value, path, ", ".join(allowed))
    return _unique([_choice(v, path, allowed) for v in items], path)


def _parse_budget(value: Any) -> Budget:
    allowed = "{steps: T} or {epochs: E} (positive integers)"
    if not isinstance(value, Mapping):
        _fail("budget", f"must be a mapping, got {_show(value)}", allowed)
    m = _mapping(value, "budget", ("steps", "epochs"))
    if len(m) != 1:
        _fail("budget", "give exactly one of steps, epochs", allowed)
    key, v = next(iter(m.items()))
    n = _integer(v, f"budget.{key}", "a positive integer", 1)
    return Budget(**{key: n})


def _parse_kernel(value: Any) -> KernelSpec:
    from ..kernel import DTYPES, METHODS, PROJECTIONS

    d = KernelSpec()
    m = _mapping(value, "kernel", [f.name for f in fields(KernelSpec)])
    kw: Dict[str, Any] = {}
    for key, v in m.items():
        p = f"kernel.{key}"
        if key == "method":
            kw[key] = _choice(v, p, METHODS)
        elif key == "projection":
            kw[key] = _choice(v, p, PROJECTIONS)
        elif key == "dtype":
            kw[key] = _choice(v, p, DTYPES)
        elif key == "trainable":
            kw[key] = _choice(v, p, ("all", "head"))
        elif key in ("class_trace", "cache"):
            kw[key] = _boolean(v, p)
        elif key in ("k", "class_probes"):
            kw[key] = _integer(v, p, "an integer >= 1", 1)
        elif key in ("seed", "head_seed"):
            kw[key] = _integer(v, p, "an integer >= 0", 0)
        elif key == "memory_cap_mb":
            kw[key] = _number(v, p, "a number > 0")
            if kw[key] <= 0:
                _fail(p, f"must be > 0, got {kw[key]:g}", "a number > 0")
        elif key == "batch_size":
            kw[key] = None if v is None else _integer(v, p, "null or an integer >= 1", 1)
        elif key == "subset":
            kw[key] = None if v is None else _integer(v, p, "null or an integer >= 2", 2)
        elif key == "subset_alpha":
            kw[key] = None if v is None else _number(v, p, "a number >= 0")
            if kw[key] is not None and kw[key] < 0:
                _fail(p, f"must be >= 0, got {kw[key]:g}", "a number >= 0")
    return KernelSpec(**{**asdict(d), **kw})


def _parse_simulation(value: Any) -> SimulationSpec:
    from ..dynamics import METHODS, MOMENTUM_MODES, NOISE_MODELS
    from ..training_time import EPS_MODES, TIME_DEFINITIONS

    m = _mapping(value, "simulation", [f.name for f in fields(SimulationSpec)])
    kw: Dict[str, Any] = {}
    choices = {"method": METHODS, "momentum_mode": MOMENTUM_MODES, "noise": NOISE_MODELS, "eps_mode": EPS_MODES,
               "definition": TIME_DEFINITIONS}
    for key, v in m.items():
        p = f"simulation.{key}"
        if key in choices:
            kw[key] = _choice(v, p, choices[key])
        elif key in ("paths", "log_every"):
            kw[key] = _integer(v, p, "an integer >= 1", 1)
        elif key in ("seed", "window"):
            kw[key] = _integer(v, p, "an integer >= 0", 0)
        elif key == "drift_reference" and v is not None:
            f = _number(v, p, "null or a fraction of max_stable_lr(0) in (0, 1]")
            if not 0 < f <= 1:
                _fail(p, f"{_show(v)} is not allowed", "null or a fraction of max_stable_lr(0) in (0, 1]")
            kw[key] = f
    spec = SimulationSpec(**kw)
    if spec.definition == "plateau" and spec.window <= 0:
        _fail("simulation.window", "must be a positive number of steps with definition plateau", "an integer >= 1")
    if spec.momentum_mode == "heavy_ball" and spec.method in ("ode", "sde"):
        _fail("simulation.momentum_mode", f"heavy_ball is exact only for the discrete and minibatch methods, "
              f"not {spec.method}", "auto, elr (or method discrete, minibatch, auto)")
    return spec


def _parse_cost(value: Any) -> CostSpec:
    m = _mapping(value, "cost", [f.name for f in fields(CostSpec)])
    kw = {k: _integer(v, f"cost.{k}", "an integer >= 1", 1) for k, v in m.items()}
    return CostSpec(**kw)


def _parse_ground_truth(value: Any) -> GroundTruthSpec:
    if value is None or isinstance(value, bool):
        return GroundTruthSpec(enabled=bool(value))
    if isinstance(value, str):
        if value.lower() not in ("on", "off"):
            _fail("ground_truth", f"{_show(value)} is not allowed", "on, off, or a mapping with keys "
                  + ", ".join(f.name for f in fields(GroundTruthSpec)))
        return GroundTruthSpec(enabled=value.lower() == "on")
    m = _mapping(value, "ground_truth", [f.name for f in fields(GroundTruthSpec)])
    kw: Dict[str, Any] = {"enabled": True}
    for key, v in m.items():
        p = f"ground_truth.{key}"
        if key == "enabled":
            kw[key] = _boolean(v, p)
        elif key == "seeds":
            kw[key] = _unique([_integer(s, p, "integers >= 0", 0) for s in _as_list(v, p, "integers >= 0")], p)
        elif key in ("every", "max_configs", "log_every"):
            kw[key] = None if v is None else _integer(v, p, "null or an integer >= 1", 1)
        elif key == "max_retries":
            kw[key] = _integer(v, p, "an integer >= 0", 0)
        elif key == "cpus":
            kw[key] = _number(v, p, "a number >= 0")
            if kw[key] < 0:
                _fail(p, f"must be >= 0, got {kw[key]:g}", "a number >= 0")
        elif key == "gpus":
            kw[key] = _auto_or_number(v, p, 0.0)
        elif key == "where":
            kw[key] = _parse_where(v)
    return GroundTruthSpec(**kw)


def _parse_where(value: Any) -> Tuple[Tuple[str, Tuple[Any, ...]], ...]:
    m = _mapping(value, "ground_truth.where", GT_FILTER_FIELDS)
    out = []
    for key, v in m.items():
        p = f"ground_truth.where.{key}"
        if key == "dataset":
            vals = tuple(str(x) for x in _as_list(v, p, "dataset labels"))
        elif key == "loss":
            vals = _parse_choices(v, p, LOSSES)
        elif key == "batch_size":
            vals = tuple(None if str(x).lower() == "full" else _integer(x, p, "integers or full", 1)
                         for x in _as_list(v, p, "integers or full"))
        else:
            vals = tuple(_number(x, p, "numbers") for x in _as_list(v, p, "numbers"))
        out.append((key, vals))
    return tuple(sorted(out))


def _parse_resources(value: Any) -> ResourcesSpec:
    m = _mapping(value, "resources", [f.name for f in fields(ResourcesSpec)])
    kw: Dict[str, Any] = {}
    for key, v in m.items():
        p = f"resources.{key}"
        if key == "actors":
            kw[key] = _auto_or_number(v, p, 1, integer=True)
        elif key == "shard_size":
            kw[key] = _auto_or_number(v, p, 1, integer=True)
        elif key == "object_store_mb":
            kw[key] = _auto_or_number(v, p, 80, integer=True)
        elif key == "gpus_per_actor":
            kw[key] = _auto_or_number(v, p, 0.0)
        elif key == "cpus_per_actor":
            kw[key] = _number(v, p, "a number > 0")
            if kw[key] <= 0:
                _fail(p, f"must be > 0, got {kw[key]:g}", "a number > 0")
        elif key == "device":
            kw[key] = _choice(v, p, (_AUTO, "cpu", "cuda"))
        elif key in ("max_restarts", "max_task_retries"):
            kw[key] = _integer(v, p, "an integer >= -1 (-1: unlimited)", -1)
    return ResourcesSpec(**kw)


def _parse_output(value: Any) -> OutputSpec:
    if isinstance(value, str):
        value = {"dir": value}
    m = _mapping(value, "output", ("dir",))
    d = m.get("dir")
    if d is not None and (not isinstance(d, str) or not d.strip()):
        _fail("output.dir", f"{_show(d)} is not a directory path", "a path")
    return OutputSpec(dir=d)


# -------------------------------------------------------------------------------------------- entry

_TOP_LEVEL = ("name", "model", "datasets", "losses", "lr", "momentum", "batch_size", "eps", "criteria", "budget",
              "kernel", "simulation", "cost", "ground_truth", "resources", "output")
_REQUIRED = ("name", "model", "datasets", "lr", "budget")


def parse_spec(data: Any) -> SweepSpec:
    """Validate a mapping (as ``yaml.safe_load`` returns it) into a :class:`SweepSpec`."""
    if not isinstance(data, Mapping):
        _fail("spec", f"must be a YAML mapping, got {type(data).__name__}", "keys " + ", ".join(_TOP_LEVEL))
    m = _mapping(data, "", _TOP_LEVEL)
    for key in _REQUIRED:
        if m.get(key) is None:
            _fail(key, "is required", _REQUIRED_HINT[key])
    name = m["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        _fail("name", f"{_show(name)} is not a valid name", "letters, digits, '_', '.', '-'")
    kw: Dict[str, Any] = dict(
        name=name,
        model=_parse_model(m["model"]),
        datasets=_parse_datasets(m["datasets"]),
        lr=_parse_lr(m["lr"]),
        budget=_parse_budget(m["budget"]),
    )
    if "losses" in m:
        kw["losses"] = _parse_choices(m["losses"], "losses", LOSSES)
    if "momentum" in m:
        kw["momentum"] = _number_list(m["momentum"], "momentum", "numbers in [0, 1)", 0.0, 1.0, lo_open=False)
    if "batch_size" in m:
        kw["batch_size"] = _parse_batch_sizes(m["batch_size"])
    if "eps" in m:
        kw["eps"] = _number_list(m["eps"], "eps", "numbers > 0", 0.0)
    if "criteria" in m:
        kw["criteria"] = _parse_choices(m["criteria"], "criteria", CRITERIA)
    sections = {"kernel": _parse_kernel, "simulation": _parse_simulation, "cost": _parse_cost,
                "ground_truth": _parse_ground_truth, "resources": _parse_resources, "output": _parse_output}
    for key, parse in sections.items():
        if key in m:
            kw[key] = parse(m[key])
    spec = SweepSpec(**kw)
    if spec.kernel.subset is not None:  # the extrapolation is an MSE, full-batch, loss-curve method (issue 5)
        if set(spec.losses) != {"mse"}:
            _fail("losses", "kernel.subset predicts mse only", "[mse] with kernel.subset")
        if any(b is not None for b in spec.batch_size):
            _fail("batch_size", "kernel.subset predicts full-batch GD only", "[full] with kernel.subset")
        if tuple(spec.criteria) != ("loss",):
            _fail("criteria", "kernel.subset gives a loss curve only", "[loss] with kernel.subset")
        if spec.simulation.drift_reference is not None:
            _fail("simulation.drift_reference", "needs the full set's kernel, not kernel.subset", "null with kernel.subset")
    return spec


_REQUIRED_HINT = {
    "name": "letters, digits, '_', '.', '-'",
    "model": "a backbone name (ttp-ray models)",
    "datasets": "a list of dataset names (ttp-ray datasets)",
    "lr": "a list of values > 0 or {fraction_of_max_stable: [...]}",
    "budget": "{steps: T} or {epochs: E}",
}


def load_spec(path: Union[str, Path]) -> SweepSpec:
    """Read and validate a YAML spec file (``yaml.safe_load``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec: file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SpecError(f"spec: {p} is not valid YAML{where}: {problem}") from None
    return parse_spec(data)
