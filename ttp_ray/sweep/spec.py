"""Sweep specification: a YAML file (read with ``yaml.safe_load``) validated into frozen dataclasses.

Every field, its default and its allowed values (``*`` marks the required ones)::

    name*: quickstart                  # [A-Za-z0-9_.-]+, names the run
    model*: digits-cnn                 # backbone (``ttp-ray models``), ARCH:PATH (a checkpoint), or a list of
                                       # distinct backbones: a grid axis, one kernel state per (dataset, model);
                                       # package.module:function is Python code the sweep imports and calls on
                                       # the driver and in every actor: refused unless the CLI has --allow-code
                                       # (or TTP_RAY_ALLOW_CODE=1)
    datasets*:                         # non-empty list; each entry a string or a mapping
      - digits-5to9                    #   registry name, npz:PATH, folder:ROOT, NAME:subset=N
      - {name: digits, subset: 300}    #   mapping: name*, subset (int > 0), label (partition value, default the
                                       #   name: at most 100 of letters, digits, _ . - : = , / + @ ~),
                                       #   input_size, input_channels (ints > 0), adapt (true): user images
                                       #   (npz, folder) brought to each backbone's input (ttp_ray.inputs)
    losses: [ce]                       # subset of mse, ce
    lr*: [0.01, 0.1]                   # absolute values in (0, 1e6], or {values: [...]}, or
                                       # {fraction_of_max_stable: [0.05, 0.5, 1.2]} (of each dataset's
                                       # 2(1+m)N/lambda_max, measured on the kernel), lists may be
                                       # written {geomspace: [lo, hi, count]} or {linspace: [...]}
    momentum: [0.0]                    # values in [0, 1)
    batch_size: [full]                 # ints > 0 or 'full' (B = N: gradient descent)
    eps: [0.01]                        # thresholds > 0 for T_eps
    criteria: [loss, error]            # subset of loss, error
    budget*: {steps: 300}              # or {epochs: E}: steps = E * (N // B) per config
    kernel:       {method: sketch, projection: countsketch, k: 2048, class_trace: true, class_probes: 1,
                   seed: 0, dtype: float64, memory_cap_mb: 512, batch_size: null, head_seed: 0,
                   trainable: all, cache: true, subset: null, subset_alpha: null}
                                       # subset N0 >= 2: the kernel of N0 samples only, the full set's spectrum
                                       # extrapolated (METHOD.md §7; losses [mse], batch_size [full], criteria
                                       # [loss]); subset_alpha null: ttp_ray.subset.DEFAULT_ALPHA
    simulation:   {method: auto, momentum_mode: auto, noise: rescaled, paths: 8, seed: 0, log_every: 1,
                   eps_mode: absolute, definition: threshold, window: 0, drift_reference: null}
                                       # drift_reference F in (0, 1]: full-batch configs predicted with the
                                       # kernel drift of one real plain-GD run at F x max_stable_lr(0) per
                                       # (dataset, loss, budget) (ttp_ray.drift); null: the frozen kernel
    cost:         {step_time_steps: 5, step_time_max_batch: 1024}
    ground_truth: off | on | {enabled: false, seeds: [0], every: null, max_configs: null, where: {},
                   top: 0, log_every: null, cpus: 1, gpus: auto, max_retries: 1}
                                       # top K: also the K configs per (dataset, loss) the default ranking
                                       # puts first, chosen once the dataset's predictions are written
    resources:    {actors: auto, cpus_per_actor: 1, gpus_per_actor: auto, device: auto, shard_size: auto,
                   max_restarts: 3, max_task_retries: 3, object_store_mb: auto}
    output:       {dir: null}          # null: runs/<name>; the CLI's --out overrides it
    predictor:    null                 # null: the default (probed); or a name (ttp_ray.predictors: probed,
                                       # frozen, subset, drift, relinearised, flow), or {name: drift, reference_fraction:
                                       # 0.6} with the predictor's options; kernel.subset and
                                       # simulation.drift_reference are its old spellings (deprecated)

Before anything runs (``ttp-ray sweep``, :mod:`ttp_ray.sweep.preflight` and :mod:`ttp_ray.preflight`): the grid's
size, the product of the axes' lengths read off the YAML (at most ``--max-configs``, default 100,000), the data
(finite values, labels, at most ``--max-classes`` classes, default 1,000, readable images), every backbone built
with its head and run on two images, the output directory, and the memory one actor needs (kernel N x k,
simulation of a shard; at most ``--max-memory-gb``, default 16). Each refusal is one line naming the field.

The defaults of the kernel and simulation options are those of :class:`ttp_ray.kernel.KernelOptions`,
:class:`ttp_ray.dynamics.SimOptions`, :class:`ttp_ray.predict.PredictSettings` (and ``trainable`` that of
:class:`ttp_ray.finetune.FinetuneConfig`), read from them; tests/test_sweep_spec.py checks this table against
the dataclasses.

Each rule lives in one dataclass's ``__post_init__``: the core option's own, or that of the spec's dataclass
(:mod:`ttp_ray.sweep.spec_types`) for a spec-only field. This module reads the YAML forms (numbers as strings,
'full', 'auto', ``{geomspace: ...}``, unknown keys), builds the dataclasses and turns their ``ValueError`` into a
:class:`SpecError` whose message is one line naming the field (its full path) and the allowed values. Nothing
here imports Ray.
"""
from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union, get_args, \
    get_origin, get_type_hints

from ..inputs import AdaptOptions
from ..objectives import LOSSES
from ..training_time import CRITERIA
from .grid import SpecError, grid_axes, read_spec
from .spec_types import (AUTO, GT_FILTER_FIELDS, LR_MODES, NAME_CHARS, Budget, CostSpec, DatasetEntry,
                         GroundTruthSpec, KernelSpec, LrGrid, OutputSpec, PredictorSpec, ResourcesSpec, SimulationSpec,
                         SweepSpec, freeze_value)

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
    "PredictorSpec",
    "SweepSpec",
    "LR_MODES",
    "GT_FILTER_FIELDS",
    "load_spec",
    "parse_spec",
    "read_spec",
    "grid_axes",
    "code_models",
    "check_code",
    "ground_truth_from_identity",
]


# ------------------------------------------------------------------- building: errors as SpecError

_FIELD = re.compile(r"^(?P<field>[\w.\[\]]+): (?P<problem>.*)$", re.S)
_CORE_FORMS = (re.compile(r"^(?P<value>.+) is not one of (?P<allowed>.+)$", re.S),  # the core dataclasses' forms
               re.compile(r"^must be (?P<allowed>.+), got (?P<value>.+)$", re.S))


def _build(cls, path: str, **kwargs):
    """``cls(**kwargs)``; a ValueError/TypeError of its checks becomes a one-line :class:`SpecError` naming the
    field by its full path under ``path`` ('' at the top level) and the allowed values."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        text = " ".join(str(exc).split())
        m = _FIELD.match(text)
        name, problem = (m["field"], m["problem"]) if m else ("", text)
        if name and re.split(r"[.\[]", name)[0] in {f.name for f in fields(cls)}:
            where = f"{path}.{name}" if path else name
        else:  # a rule of a core dataclass the field is checked with (its own name for it), or no field named
            where = path or name
        if "allowed" not in problem:
            for form in _CORE_FORMS:
                hit = form.match(problem)
                if hit:
                    problem = f"{hit['value']} is not allowed; allowed: {hit['allowed']}"
                    break
        raise SpecError(f"{where}: {problem}") from None


# ------------------------------------------------------------------------------- reading the YAML form

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


def _unique(items: Sequence[Any], path: str) -> tuple:
    seen = set()
    for x in items:
        key = freeze_value(x)
        if key in seen:
            _fail(path, f"value {_show(x)} is listed twice", "distinct values")
        seen.add(key)
    return tuple(items)


def _number(value: Any, path: str, allowed: str = "a number") -> float:
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


def _integer(value: Any, path: str, allowed: str = "an integer") -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        _fail(path, f"{_show(value)} is not an integer", allowed)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            _fail(path, f"{_show(value)} is not an integer", allowed)
    if not isinstance(value, (int, float)):
        _fail(path, f"{_show(value)} is not an integer", allowed)
    return int(value)


def _boolean(value: Any, path: str, allowed: str = "true, false") -> bool:
    if not isinstance(value, bool):
        _fail(path, f"{_show(value)} is not a boolean", allowed)
    return value


def _batch_size(value: Any, path: str) -> Optional[int]:
    """'full' -> None (B = N: gradient descent), else an integer."""
    if isinstance(value, str) and value.strip().lower() == "full":
        return None
    return _integer(value, path, "integers or full")


_READERS = {bool: _boolean, int: _integer, float: _number}
_WORDS = {bool: "true, false", int: "an integer", float: "a number"}
_PLURALS = {int: "integers", float: "numbers"}


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` read as the dataclass field type ``hint``: bool, int, float, str (passed on: the dataclass checks
    it), Optional[X] (null), Union[str, X] ('auto' or X), Tuple[X, ...] (a value or a list of distinct values)."""
    options = get_args(hint) if get_origin(hint) is Union else (hint,)
    kinds = [o for o in options if o is not type(None) and o is not str]
    if value is None and type(None) in options:
        return None
    if str in options and kinds and value == AUTO:
        return AUTO
    if not kinds:
        return value
    kind = kinds[0]
    if get_origin(kind) is tuple:
        inner = get_args(kind)[0]
        return _unique([_coerce(v, inner, path) for v in _as_list(value, path, _PLURALS[inner])], path)
    words = ("null or " if type(None) in options else "") + ("auto or " if str in options else "") + _WORDS[kind]
    return _READERS[kind](value, path, words)


def _section(cls, value: Any, path: str, preset: Optional[Mapping[str, Any]] = None,
             readers: Optional[Mapping[str, Callable[[Any], Any]]] = None):
    """The dataclass ``cls`` from the mapping ``value`` (None: all defaults), each key read as its field's type
    (or by ``readers[key]``), on top of ``preset``."""
    hints, readers = get_type_hints(cls), readers or {}
    kwargs = dict(preset or {})
    for key, v in _mapping(value, path, [f.name for f in fields(cls)]).items():
        kwargs[key] = readers[key](v) if key in readers else _coerce(v, hints[key], f"{path}.{key}")
    return _build(cls, path, **kwargs)


def _number_list(value: Any, path: str, allowed: str = "numbers") -> Tuple[float, ...]:
    """A list of distinct numbers, or {geomspace|linspace: [a, b, count]}."""
    if isinstance(value, Mapping):
        if len(value) != 1 or next(iter(value)) not in ("geomspace", "linspace"):
            _fail(path, f"{_show(value)} is not a list", f"{allowed}, or {{geomspace|linspace: [lo, hi, count]}}")
        kind, args = next(iter(value.items()))
        if not isinstance(args, (list, tuple)) or len(args) != 3:
            _fail(f"{path}.{kind}", f"must be [lo, hi, count], got {_show(args)}", "[lo, hi, count]")
        a = _number(args[0], f"{path}.{kind}", "numbers")
        b = _number(args[1], f"{path}.{kind}", "numbers")
        count = _integer(args[2], f"{path}.{kind}", "an integer >= 1")
        if count < 1:
            _fail(f"{path}.{kind}", f"count must be >= 1, got {count}", "an integer >= 1")
        if kind == "geomspace" and (a <= 0 or b <= 0):
            _fail(f"{path}.geomspace", "lo and hi must be > 0", "positive numbers")
        items = _spaced(kind, a, b, count)
    else:
        items = [_number(v, path, allowed) for v in _as_list(value, path, allowed)]
    return _unique(items, path)


def _spaced(kind: str, a: float, b: float, count: int) -> List[float]:
    if count == 1:
        return [a]
    if kind == "linspace":
        return [float(f"{a + (b - a) * i / (count - 1):.12g}") for i in range(count)]
    la, lb = math.log(a), math.log(b)
    return [float(f"{math.exp(la + (lb - la) * i / (count - 1)):.12g}") for i in range(count)]


# --------------------------------------------------------------------------------------- sections

def _parse_datasets(value: Any) -> Tuple[DatasetEntry, ...]:
    from ..data import DatasetError, PAPER_DATASETS, list_datasets, parse_dataset_ref

    registry = sorted({k.split(":")[0] for k in list_datasets()} | set(PAPER_DATASETS))
    allowed = ", ".join(registry) + " (npz:PATH, folder:ROOT; NAME:subset=N)"
    out = []
    for i, item in enumerate(_as_list(value, "datasets", "a list of dataset names")):
        path = f"datasets[{i}]"
        label = None
        subset = None
        adapt = AdaptOptions()
        if isinstance(item, Mapping):
            m = _mapping(item, path, ("name", "subset", "label") + _ADAPT_KEYS)
            if "name" not in m:
                _fail(f"{path}.name", "is required", allowed)
            text = m["name"]
            if m.get("subset") is not None:
                subset = _integer(m["subset"], f"{path}.subset")
            if m.get("label") is not None:
                label = str(m["label"])
            adapt = _parse_adapt(m, path)
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
            s = _integer(opts["subset"], f"{path}.subset")
            if subset is not None and s != subset:
                _fail(f"{path}.subset", f"given twice ({s} and {subset})", "one subset")
            subset = s
        params = tuple((k, v) for k, v in ref.params if k != "subset")
        if subset is not None:
            params = params + (("subset", str(subset)),)
        normal = str(type(ref)(ref.name, params))
        if ref.name in ("npz", "folder"):
            normal = f"{ref.name}:{opts['path']}" + (f",subset={subset}" if subset is not None else "")
        out.append(_build(DatasetEntry, path, ref=normal, name=ref.name, subset=subset, label=label or normal,
                          input=adapt))
    return tuple(out)


_ADAPT_KEYS = ("input_size", "input_channels", "adapt")


def _parse_adapt(m: Mapping[str, Any], path: str) -> AdaptOptions:
    """A dataset entry's ``input_size``, ``input_channels``, ``adapt`` as :class:`~ttp_ray.inputs.AdaptOptions`."""
    kw: Dict[str, Any] = {}
    for key, field_name in (("input_size", "size"), ("input_channels", "channels")):
        if m.get(key) is not None:
            kw[field_name] = _integer(m[key], f"{path}.{key}", "a positive integer")
            if kw[field_name] < 1:
                _fail(f"{path}.{key}", f"must be >= 1, got {kw[field_name]}", "a positive integer")
    if m.get("adapt") is not None:
        kw["adapt"] = _boolean(m["adapt"], f"{path}.adapt")
    try:
        return AdaptOptions(**kw)
    except ValueError as exc:  # its messages name the spec's keys (input_size, input_channels, adapt)
        raise SpecError(f"{path}.{exc}") from None


def _parse_model(value: Any) -> Union[str, Tuple[str, ...]]:
    """One backbone name, or a list of distinct ones (a one-element list is that name)."""
    from ..models import list_models

    known = [k for k in list_models() if ":" not in k]
    allowed = ", ".join(known + ["ARCH:PATH", "package.module:function"]) + " (or a list of them)"
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        _fail("model", "must not be empty", allowed)
    names = []
    for i, item in enumerate(items):
        path = f"model[{i}]" if isinstance(value, (list, tuple)) else "model"
        if not isinstance(item, str) or not item.strip():
            _fail(path, f"{_show(item)} is not a model name", allowed)
        item = item.strip()
        if ":" not in item and item not in known:
            _fail(path, f"unknown model {item!r}", allowed)
        names.append(item)
    names = _unique(names, "model")
    return names[0] if len(names) == 1 else tuple(names)


def _parse_lr(value: Any) -> LrGrid:
    if isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in ("values",) + LR_MODES:
        key, inner = next(iter(value.items()))
        mode = "fraction_of_max_stable" if key == "fraction_of_max_stable" else "absolute"
        return _build(LrGrid, f"lr.{key}", mode=mode, values=_number_list(inner, f"lr.{key}"))
    if isinstance(value, Mapping) and set(value) - {"geomspace", "linspace"}:
        _fail("lr", f"unknown form {_show(value)}", "a list of values > 0, {values: [...]}, "
              "{fraction_of_max_stable: [...]}")
    return _build(LrGrid, "lr", mode="absolute", values=_number_list(value, "lr"))


def _parse_ground_truth(value: Any) -> GroundTruthSpec:
    if value is None or isinstance(value, bool):
        return GroundTruthSpec(enabled=bool(value))
    if isinstance(value, str):
        if value.lower() not in ("on", "off"):
            _fail("ground_truth", f"{_show(value)} is not allowed", "on, off, or a mapping with keys "
                  + ", ".join(f.name for f in fields(GroundTruthSpec)))
        return GroundTruthSpec(enabled=value.lower() == "on")
    return _section(GroundTruthSpec, value, "ground_truth", preset={"enabled": True}, readers={"where": _parse_where})


def _parse_where(value: Any) -> Tuple[Tuple[str, Tuple[Any, ...]], ...]:
    read = {"dataset": lambda x, p: str(x), "model": lambda x, p: str(x), "loss": lambda x, p: x,
            "batch_size": _batch_size}  # else: numbers
    out = []
    for key, v in _mapping(value, "ground_truth.where", GT_FILTER_FIELDS).items():
        path = f"ground_truth.where.{key}"
        items = _as_list(v, path, "values")
        if key in ("loss", "model"):
            items = _unique(items, path)
        out.append((key, tuple(read.get(key, _number)(x, path) for x in items)))
    return tuple(sorted(out))


# -------------------------------------------------------------------------------------------- entry

_TOP_LEVEL = ("name", "model", "datasets", "losses", "lr", "momentum", "batch_size", "eps", "criteria", "budget",
              "kernel", "simulation", "cost", "ground_truth", "resources", "output", "predictor")
_REQUIRED = ("name", "model", "datasets", "lr", "budget")
_REQUIRED_HINT = {
    "name": NAME_CHARS,
    "model": "a backbone name (ttp-ray models) or a list of them",
    "datasets": "a list of dataset names (ttp-ray datasets)",
    "lr": "a list of values > 0 or {fraction_of_max_stable: [...]}",
    "budget": "{steps: T} or {epochs: E}",
}
_LISTS = {
    "losses": lambda v: _unique(_as_list(v, "losses", ", ".join(LOSSES)), "losses"),
    "momentum": lambda v: _number_list(v, "momentum"),
    "batch_size": lambda v: _unique([_batch_size(x, "batch_size") for x in _as_list(v, "batch_size", "integers or full")],
                                    "batch_size"),
    "eps": lambda v: _number_list(v, "eps"),
    "criteria": lambda v: _unique(_as_list(v, "criteria", ", ".join(CRITERIA)), "criteria"),
}
_SECTIONS = {"kernel": KernelSpec, "simulation": SimulationSpec, "cost": CostSpec, "resources": ResourcesSpec}


def _parse_predictor(value: Any) -> PredictorSpec:
    """``predictor: NAME`` or ``{name: NAME, <its options>}`` (:data:`ttp_ray.predictors.PREDICTORS`)."""
    from ..predictors import PREDICTORS

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        _fail("predictor", f"must be a predictor name or a mapping with a name, got {_show(value)}", ", ".join(PREDICTORS))
    options = {str(k): v for k, v in value.items() if k != "name"}
    return _build(PredictorSpec, "predictor", name=value["name"],
                  options=tuple(sorted((k, freeze_value(v)) for k, v in options.items())))


def parse_spec(data: Any) -> SweepSpec:
    """Validate a mapping (as ``yaml.safe_load`` returns it) into a :class:`SweepSpec`."""
    if not isinstance(data, Mapping):
        _fail("spec", f"must be a YAML mapping, got {type(data).__name__}", "keys " + ", ".join(_TOP_LEVEL))
    m = _mapping(data, "", _TOP_LEVEL)
    for key in _REQUIRED:
        if m.get(key) is None:
            _fail(key, "is required", _REQUIRED_HINT[key])
    kw: Dict[str, Any] = dict(name=m["name"], model=_parse_model(m["model"]), datasets=_parse_datasets(m["datasets"]),
                              lr=_parse_lr(m["lr"]), budget=_section(Budget, m["budget"], "budget"))
    kw.update({key: read(m[key]) for key, read in _LISTS.items() if key in m})
    kw.update({key: _section(cls, m[key], key) for key, cls in _SECTIONS.items() if key in m})
    if "ground_truth" in m:
        kw["ground_truth"] = _parse_ground_truth(m["ground_truth"])
    if m.get("predictor") is not None:
        kw["predictor"] = _parse_predictor(m["predictor"])
    if "output" in m:
        out = m["output"]
        kw["output"] = _section(OutputSpec, {"dir": out} if isinstance(out, str) else out, "output")
    return _build(SweepSpec, "", **kw)


def load_spec(path: Union[str, Path]) -> SweepSpec:
    """Read and validate a YAML spec file (``yaml.safe_load``)."""
    return parse_spec(read_spec(path))


def ground_truth_from_identity(d: Mapping[str, Any]) -> GroundTruthSpec:
    """The :class:`GroundTruthSpec` recorded in a manifest's ``identity`` (its resource fields take their defaults)."""
    known = {f.name for f in fields(GroundTruthSpec)}
    kw = {k: v for k, v in d.items() if k in known}
    if "seeds" in kw:
        kw["seeds"] = tuple(kw["seeds"])
    if "where" in kw:
        kw["where"] = tuple((str(k), tuple(v)) for k, v in kw["where"])
    return GroundTruthSpec(**kw)


def code_models(spec: SweepSpec) -> Tuple[str, ...]:
    """The spec's backbones that are Python factories (``package.module:function``): code the sweep imports and
    calls on the driver and in every actor."""
    from ..models import is_factory

    return tuple(m for m in spec.models if is_factory(m))


def check_code(spec: SweepSpec, allowed: bool) -> None:
    """A spec naming Python code (``model: pkg.mod:fn``) needs the user's consent: ``--allow-code`` or
    ``TTP_RAY_ALLOW_CODE=1``; else one-line SpecError naming ``model``."""
    code = code_models(spec)
    if code and not allowed:
        raise SpecError(f"model: {code[0]!r} is Python code (package.module:function) that the sweep would import "
                        f"and call on the driver and every actor; allowed: a backbone name or ARCH:PATH, or pass "
                        f"--allow-code (or set TTP_RAY_ALLOW_CODE=1) to run code from this spec")
