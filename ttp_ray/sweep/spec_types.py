"""The sweep spec's frozen dataclasses: every field, its default and its rule, stated once.

Defaults of core options are read from the core dataclasses (:class:`ttp_ray.kernel.KernelOptions`,
:class:`ttp_ray.dynamics.SimOptions` and :class:`~ttp_ray.dynamics.SimConfig`,
:class:`ttp_ray.predict.PredictSettings`, :class:`ttp_ray.finetune.FinetuneConfig`), and their values are checked
by those dataclasses; a spec-only field (resources, cost, ground truth, output, ...) has its default and its
check here. Every check raises ``ValueError("<field>: <problem>")``; :mod:`ttp_ray.sweep.spec` reads the YAML
form and reports these as one-line :class:`~ttp_ray.sweep.spec.SpecError` with the field's full path.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union
from urllib.parse import quote

from ..drift import check_reference_fraction
from ..dynamics import SimConfig, SimOptions
from ..finetune import FinetuneConfig
from ..inputs import AdaptOptions
from ..kernel import KernelOptions
from ..models import check_trainable
from ..objectives import check_loss
from ..predict import PredictSettings
from ..preflight import check_label, check_lr
from ..subset import SubsetOptions

__all__ = [
    "DatasetEntry",
    "LrGrid",
    "Budget",
    "KernelSpec",
    "SimulationSpec",
    "CostSpec",
    "GroundTruthSpec",
    "ResourcesSpec",
    "OutputSpec",
    "PredictorSpec",
    "freeze_value",
    "SweepSpec",
    "LR_MODES",
    "GT_FILTER_FIELDS",
    "DEVICES",
    "AUTO",
    "NAME_CHARS",
]

LR_MODES = ("absolute", "fraction_of_max_stable")
GT_FILTER_FIELDS = ("dataset", "model", "loss", "lr", "lr_fraction", "momentum", "batch_size")
AUTO = "auto"  # resolved at run time (see the fields that allow it)
DEVICES = (AUTO, "cpu", "cuda")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
NAME_CHARS = "letters, digits, '_', '.', '-'"
MAX_MODEL_PREFIX = 180  # bytes of a percent-encoded model name in part file names (a file name has at most 255)
_KERNEL = KernelOptions()  # the defaults of the core options
_PREDICT = PredictSettings()  # .sim: SimOptions()


def _default(cls, name: str) -> Any:
    """The declared default of field ``name`` of the dataclass ``cls`` (one that has required fields)."""
    return next(f.default for f in fields(cls) if f.name == name)


# ------------------------------------------------------------------------------ rules of spec-only fields

def _check_min(name: str, value: Any, minimum: float, *, also: Tuple[Any, ...] = ()) -> None:
    """ValueError unless ``value >= minimum`` or ``value`` is one of ``also`` (None, 'auto')."""
    if value in also:
        return
    if not value >= minimum:
        allowed = " or ".join(["null" if a is None else str(a) for a in also] + [f">= {minimum:g}"])
        raise ValueError(f"{name}: must be {allowed}, got {value}")


_FIELD_PREFIX = re.compile(r"^[\w.\[\]]+: ")


def _as_field(name: str, check: Callable, *args, **kwargs) -> Any:
    """``check(*args, **kwargs)`` (a core rule), its ValueError re-raised under the spec's field ``name``."""
    try:
        return check(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{name}: {_FIELD_PREFIX.sub('', str(exc), count=1)}") from None


# ----------------------------------------------------------------------------------- the dataclasses

@dataclass(frozen=True)
class DatasetEntry:
    """One target dataset: ``ref`` is what :func:`ttp_ray.data.load_dataset` reads."""

    ref: str  # normalised reference, e.g. "digits-5to9:subset=100" or "npz:/data/x.npz"
    name: str  # registry part: "digits-5to9", "npz", "cifar10", ...
    subset: Optional[int] = None
    label: str = ""  # partition value and display name; defaults to ref
    input: AdaptOptions = field(default_factory=AdaptOptions)  # user images brought to the backbone's input

    def __post_init__(self):
        _check_min("subset", self.subset, 1, also=(None,))
        check_label(self.label)  # it names the dataset's directories under OUT

    @property
    def key(self) -> str:
        """What identifies the data a backbone sees (``config_id``): ``ref``, and the adaptation when not default."""
        tag = self.input.tag()
        return f"{self.ref}|{tag}" if tag else self.ref

    @property
    def is_paper(self) -> bool:
        from ..data import PAPER_DATASETS

        return self.name in PAPER_DATASETS


@dataclass(frozen=True)
class LrGrid:
    """Learning rates: absolute values, or fractions of each dataset's ``max_stable_lr(m)``."""

    mode: str  # one of LR_MODES
    values: Tuple[float, ...]

    def __post_init__(self):
        if self.mode not in LR_MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(LR_MODES)}")
        for value in self.values:  # SimConfig's lr rule; a fraction of max_stable_lr is > 0 exactly when its lr is
            SimConfig(lr=value)
            _as_field("values", check_lr, value)  # the preflight's bound (MAX_LR), for absolute lrs and fractions

    @property
    def relative(self) -> bool:
        return self.mode == "fraction_of_max_stable"


@dataclass(frozen=True)
class Budget:
    """Step budget T of every config: fixed ``steps``, or ``epochs`` x (N // B) steps."""

    steps: Optional[int] = None
    epochs: Optional[int] = None

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("budget: give exactly one of steps, epochs; allowed: {steps: T} or {epochs: E} "
                             "(positive integers)")
        name, value = ("steps", self.steps) if self.steps is not None else ("epochs", self.epochs)
        _check_min(name, value, 1)

    def steps_for(self, n: int, batch_size: Optional[int]) -> int:
        """T for a dataset of ``n`` samples and batch size ``batch_size`` (None: full batch)."""
        if self.steps is not None:
            return int(self.steps)
        b = n if batch_size is None else min(int(batch_size), n)
        return int(self.epochs) * max(1, n // b)


@dataclass(frozen=True)
class KernelSpec:
    """Kernel estimation (:class:`ttp_ray.kernel.KernelOptions`, whose defaults these are) plus the fine-tuning
    model's set-up."""

    method: str = _KERNEL.method
    projection: str = _KERNEL.projection
    k: int = _KERNEL.k
    class_trace: bool = _KERNEL.class_trace
    class_probes: int = _KERNEL.class_probes
    seed: int = _KERNEL.seed
    dtype: str = _KERNEL.dtype
    memory_cap_mb: float = _KERNEL.memory_cap_mb
    batch_size: Optional[int] = _KERNEL.batch_size
    head_seed: int = 0  # seed of the new linear head (w0)
    trainable: str = _default(FinetuneConfig, "trainable")  # 'all' | 'head'
    cache: bool = True  # load/store the state in the kernel disk cache
    subset: Optional[int] = None  # kernel of N0 samples only, full set extrapolated (METHOD.md §7; mse, full batch)
    subset_alpha: Optional[float] = None  # exponent correction; None: ttp_ray.subset.DEFAULT_ALPHA

    def __post_init__(self):
        self.options()  # KernelOptions checks its own fields
        _check_min("seed", self.seed, 0)  # KernelOptions does not check its seed
        _check_min("head_seed", self.head_seed, 0)
        check_trainable(self.trainable)
        _check_min("subset", self.subset, 2, also=(None,))
        if self.subset_alpha is not None:
            _as_field("subset_alpha", SubsetOptions, alpha=self.subset_alpha)

    def options(self) -> KernelOptions:
        return KernelOptions(method=self.method, projection=self.projection, k=self.k, class_trace=self.class_trace,
                             class_probes=self.class_probes, seed=self.seed, memory_cap_mb=self.memory_cap_mb,
                             batch_size=self.batch_size, dtype=self.dtype)


@dataclass(frozen=True)
class SimulationSpec:
    """How curves are simulated (:class:`ttp_ray.dynamics.SimOptions`) and T_eps read off
    (:class:`ttp_ray.predict.PredictSettings`); their defaults."""

    method: str = _PREDICT.sim.method
    momentum_mode: str = _PREDICT.sim.momentum_mode
    noise: str = _PREDICT.sim.noise
    paths: int = _PREDICT.sim.paths
    seed: int = _PREDICT.sim.seed
    log_every: int = _PREDICT.sim.log_every
    eps_mode: str = _PREDICT.eps_mode
    definition: str = _PREDICT.definition
    window: int = _PREDICT.window
    # full-batch configs: calibrate the kernel's drift on one real plain-GD fine-tune at this fraction of
    # max_stable_lr(0) per (dataset, loss, budget) and warp the frozen ODE (ttp_ray.drift); None: off
    drift_reference: Optional[float] = None

    def __post_init__(self):
        self.settings(_PREDICT.criteria)  # SimOptions and PredictSettings check their own fields
        if self.momentum_mode == "heavy_ball" and self.method in ("ode", "sde"):  # whatever the batch size
            raise ValueError(f"momentum_mode: heavy_ball is exact only for the discrete and minibatch methods, "
                             f"not {self.method}; allowed: auto, elr (or method discrete, minibatch, auto)")
        if self.drift_reference is not None:
            _as_field("drift_reference", check_reference_fraction, self.drift_reference)

    def sim_options(self) -> SimOptions:
        return SimOptions(method=self.method, momentum_mode=self.momentum_mode, noise=self.noise, paths=self.paths,
                          seed=self.seed, log_every=self.log_every)

    def settings(self, criteria: Sequence[str]) -> PredictSettings:
        return PredictSettings(sim=self.sim_options(), eps_mode=self.eps_mode, criteria=tuple(criteria),
                               definition=self.definition, window=self.window)


@dataclass(frozen=True)
class CostSpec:
    """Step-time measurement for ``predicted_cost_s`` (:func:`ttp_ray.step_time.step_time`, cached on disk with
    the kernel when ``kernel.cache``): the median of ``step_time_steps`` SGD steps; a batch above
    ``step_time_max_batch`` is timed at that size and scaled linearly."""

    step_time_steps: int = 5
    step_time_max_batch: int = 1024

    def __post_init__(self):
        _check_min("step_time_steps", self.step_time_steps, 1)
        _check_min("step_time_max_batch", self.step_time_max_batch, 1)


@dataclass(frozen=True)
class GroundTruthSpec:
    """Real fine-tunes (Ray tasks) of a selection of configs, per dataset: the ``where`` filter
    (field -> allowed values), then every ``every``-th config, then at most ``max_configs`` evenly
    spaced ones; each selected config runs once per seed (full-batch configs once, with the first seed:
    the seed only orders minibatches). ``top`` = K > 0: besides, once a dataset's predictions are all
    written, the K configs per (dataset, loss) that the default ranking puts first (cost to the common target
    of the first criterion, :func:`ttp_ray.analysis.rank`): the configs a user would launch, so that the
    ranking's top-1 regret is measured on the predicted best (:mod:`ttp_ray.sweep.top`)."""

    enabled: bool = False
    seeds: Tuple[int, ...] = (0,)
    every: Optional[int] = None
    max_configs: Optional[int] = None
    where: Tuple[Tuple[str, Tuple[Any, ...]], ...] = ()
    top: int = 0  # the predicted-best configs per (dataset, loss) also fine-tuned, chosen after the predictions
    log_every: Optional[int] = None  # None: simulation.log_every
    cpus: float = 1.0
    gpus: Union[str, float] = AUTO  # 'auto': 1 when the cluster has GPUs, else 0
    max_retries: int = 1

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds: must not be empty; allowed: integers >= 0")
        for seed in self.seeds:
            _check_min("seeds", seed, 0)
        for name in ("every", "max_configs", "log_every"):
            _check_min(name, getattr(self, name), 1, also=(None,))
        _check_min("top", self.top, 0)
        _check_min("cpus", self.cpus, 0)
        _check_min("gpus", self.gpus, 0, also=(AUTO,))
        _check_min("max_retries", self.max_retries, 0)
        for key, values in self.where:
            if key not in GT_FILTER_FIELDS:
                raise ValueError(f"where.{key}: unknown field; allowed: {', '.join(GT_FILTER_FIELDS)}")
            if key == "loss":
                for loss in values:
                    _as_field("where.loss", check_loss, loss)
            if key == "batch_size" and any(b is not None and b < 1 for b in values):
                raise ValueError(f"where.batch_size: must be >= 1 or full, got {list(values)}")

    @property
    def picks_top(self) -> bool:
        """Whether the predicted-best configs are fine-tuned too (``enabled`` and ``top`` > 0)."""
        return self.enabled and self.top > 0


@dataclass(frozen=True)
class ResourcesSpec:
    """Ray resources. ``actors``: per dataset ('auto' = 1); ``gpus_per_actor`` 'auto' = 1 when the
    cluster has GPUs; ``device`` 'auto' = cuda when the actor holds a GPU; ``shard_size`` 'auto' =
    about 20 shards per dataset (8..256 configs each); ``object_store_mb`` only for a local Ray."""

    actors: Union[str, int] = AUTO
    cpus_per_actor: float = 1.0
    gpus_per_actor: Union[str, float] = AUTO
    device: str = AUTO  # one of DEVICES
    shard_size: Union[str, int] = AUTO
    max_restarts: int = 3  # -1: unlimited
    max_task_retries: int = 3  # -1: unlimited
    object_store_mb: Union[str, int] = AUTO

    def __post_init__(self):
        _check_min("actors", self.actors, 1, also=(AUTO,))
        if not self.cpus_per_actor > 0:
            raise ValueError(f"cpus_per_actor: must be > 0, got {self.cpus_per_actor}")
        _check_min("gpus_per_actor", self.gpus_per_actor, 0, also=(AUTO,))
        if self.device not in DEVICES:
            raise ValueError(f"device: {self.device!r} is not one of {', '.join(DEVICES)}")
        _check_min("shard_size", self.shard_size, 1, also=(AUTO,))
        _check_min("max_restarts", self.max_restarts, -1)
        _check_min("max_task_retries", self.max_task_retries, -1)
        _check_min("object_store_mb", self.object_store_mb, 80, also=(AUTO,))


@dataclass(frozen=True)
class OutputSpec:
    dir: Optional[str] = None  # None: runs/<name>

    def __post_init__(self):
        if self.dir is not None and (not isinstance(self.dir, str) or not self.dir.strip()):
            raise ValueError(f"dir: {self.dir!r} is not a directory path; allowed: null or a path")


@dataclass(frozen=True)
class PredictorSpec:
    """Which predictor predicts every config (:mod:`ttp_ray.predictors`) and its options; ``name`` None: the
    default predictor (or the old spellings ``kernel.subset`` / ``simulation.drift_reference``)."""

    name: Optional[str] = None
    options: Tuple[Tuple[str, Any], ...] = ()  # (option, value) pairs, sorted; mappings for dataclass options

    def __post_init__(self):
        if self.name is not None or self.options:
            self.build()

    def build(self):
        """The :class:`~ttp_ray.predictors.Predictor` (its own checks raise one-line ValueErrors)."""
        from ..predictors import get_predictor

        return get_predictor(self.name, **{k: _thaw(v) for k, v in self.options})


def freeze_value(value: Any) -> Any:
    """A hashable form of a YAML value (mappings as sorted pairs)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze_value(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(freeze_value(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return {k: _thaw(v) for k, v in value}
    return value


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep; see the module docstring for every field."""

    name: str
    model: Union[str, Tuple[str, ...]]  # one backbone, or a grid axis of several (distinct)
    datasets: Tuple[DatasetEntry, ...]
    lr: LrGrid
    budget: Budget
    losses: Tuple[str, ...] = ("ce",)
    momentum: Tuple[float, ...] = (_default(SimConfig, "momentum"),)
    batch_size: Tuple[Optional[int], ...] = (_default(SimConfig, "batch_size"),)  # None = full batch
    eps: Tuple[float, ...] = (0.01,)
    criteria: Tuple[str, ...] = _PREDICT.criteria
    kernel: KernelSpec = field(default_factory=KernelSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    ground_truth: GroundTruthSpec = field(default_factory=GroundTruthSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    predictor: PredictorSpec = field(default_factory=PredictorSpec)

    def __post_init__(self):
        if not (isinstance(self.name, str) and _NAME_RE.match(self.name)):
            raise ValueError(f"name: {self.name!r} is not a valid name; allowed: {NAME_CHARS}")
        if isinstance(self.model, tuple) and (len(self.model) < 2 or len(set(self.model)) != len(self.model)):
            raise ValueError(f"model: a list must hold at least two distinct backbones, got {list(self.model)}")
        for i, model in enumerate(self.model if isinstance(self.model, tuple) else ()):
            if len(quote(model, safe="").encode()) > MAX_MODEL_PREFIX:  # it starts every part's file name
                raise ValueError(f"model[{i}]: {model[:40]!r}... is too long to name part files once percent-encoded "
                                 f"(> {MAX_MODEL_PREFIX} bytes); allowed: a shorter name or path")
        labels = [d.label for d in self.datasets]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"datasets: {label!r} is listed twice; allowed: distinct datasets (or distinct labels)")
        for loss in self.losses:
            _as_field("losses", check_loss, loss)
        for m, b in itertools.product(self.momentum, self.batch_size):  # SimConfig's momentum and batch-size rules
            SimConfig(lr=self.lr.values[0], momentum=m, batch_size=b)
        for eps in self.eps:
            if not eps > 0:
                raise ValueError(f"eps: must be > 0, got {eps}")
        self.simulation.settings(self.criteria)  # PredictSettings' criteria rule
        legacy = [name for name, value in (("kernel.subset", self.kernel.subset),
                                           ("simulation.drift_reference", self.simulation.drift_reference))
                  if value is not None]
        if self.predictor.name is not None and legacy:
            raise ValueError(f"predictor: cannot be combined with {legacy[0]} (its old spelling); allowed: one of them")
        if self.kernel.subset is not None and self.simulation.drift_reference is not None:
            raise ValueError("simulation.drift_reference: needs the full set's kernel, not kernel.subset; "
                             "allowed: null with kernel.subset")
        chosen = self.chosen_predictor()
        if chosen.name == "subset" and tuple(self.criteria) != ("loss",):
            raise ValueError("criteria: the subset predictor gives a loss curve only; allowed: [loss] with it")
        if chosen.fallback is None:  # every config must be one it simulates
            for loss, m, b in itertools.product(self.losses, self.momentum, self.batch_size):
                reason = chosen.unsupported(SimConfig(lr=self.lr.values[0], momentum=m, batch_size=b, loss=loss),
                                            None, self.simulation.settings(self.criteria))
                if reason:  # the config's field named as the spec's list of them
                    raise ValueError(re.sub(r"^loss:", "losses:", reason))
        if chosen.needs_full_kernel and self.kernel.class_trace:
            raise ValueError(f"kernel.class_trace: the {chosen.name} predictor re-linearises on the full NC x NC "
                             "kernel; allowed: false with it")

    def chosen_predictor(self):
        """The :class:`~ttp_ray.predictors.Predictor` this spec selects: ``predictor:``, else the old spellings
        (``kernel.subset`` -> subset, ``simulation.drift_reference`` -> drift), else the default."""
        from ..predictors import get_predictor
        from ..subset import DEFAULT_ALPHA

        k, sim = self.kernel, self.simulation
        if k.subset is not None:
            return get_predictor("subset", size=k.subset,
                                 alpha=DEFAULT_ALPHA if k.subset_alpha is None else k.subset_alpha)
        if sim.drift_reference is not None:
            return get_predictor("drift", reference_fraction=sim.drift_reference)
        return self.predictor.build()

    def deprecations(self) -> Tuple[str, ...]:
        """One line per old spelling this spec uses, with the new one."""
        out = []
        if self.kernel.subset is not None:
            out.append("kernel.subset is deprecated; use predictor: {name: subset, size: N0, alpha: A}")
        if self.simulation.drift_reference is not None:
            out.append("simulation.drift_reference is deprecated; use predictor: {name: drift, reference_fraction: F}")
        return tuple(out)

    @property
    def models(self) -> Tuple[str, ...]:
        """The backbones of the sweep (``model`` as a tuple)."""
        return self.model if isinstance(self.model, tuple) else (self.model,)

    @property
    def grid_size(self) -> int:
        """Configs per (dataset, model)."""
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
        for entry in d["datasets"]:  # default adaptation: older specs keep their identity
            if entry["input"] == _jsonable(asdict(AdaptOptions())):
                entry.pop("input")
        chosen = self.chosen_predictor()
        legacy = self.kernel.subset is not None or self.simulation.drift_reference is not None
        if legacy or (chosen.name == "frozen" and not d["predictor"]["options"]):
            d.pop("predictor")  # the frozen kernel (the default before the probed one): older specs keep their identity
        else:
            d["predictor"]["name"] = chosen.name  # the default resolved: a new default is a new identity
            if type(chosen).revision > 1:  # results changed since the predictor was introduced: not mixed on resume
                d["predictor"]["revision"] = type(chosen).revision
        sim = d["simulation"]
        if sim["method"] == sim["momentum_mode"] == "auto" and any(b is not None for b in d["batch_size"]):
            sim["auto_sgd"] = "minibatch"  # auto once meant the sde for SGD (METHOD.md §4): such OUTs are not mixed
        d["resources"] = {"shard_size": d["resources"]["shard_size"]}
        for key in ("cpus", "gpus", "max_retries"):
            d["ground_truth"].pop(key)
        if not d["ground_truth"]["top"]:
            d["ground_truth"].pop("top")  # added later: specs without it keep their identity
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
