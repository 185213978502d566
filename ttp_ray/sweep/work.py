"""The work Ray distributes, as plain functions and classes (Ray-free, testable without a cluster):

* :class:`DatasetWork` -- one (dataset, model)'s prepared state (kernel computed once, or loaded from the disk
  cache), predicting shard after shard with :func:`ttp_ray.predict.predict_grid` and measuring step times
  with :func:`ttp_ray.step_time.step_time` (cached on disk); its Theta spectrum as a table (:meth:`spectrum_table`);
* :func:`run_ground_truth` -- one real fine-tune (:func:`ttp_ray.finetune.finetune`), T_eps read off its
  curve by :func:`ttp_ray.training_time.curve_training_times` exactly as off the predicted ones.

Both return rows in the schemas of :mod:`ttp_ray.tables`.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .plan import GroundTruthRun, PlannedConfig, Shard, resolve_lr, sim_config
from .spec import SweepSpec

__all__ = ["WorkerJob", "DatasetWork", "ShardOutput", "GroundTruthJob", "GroundTruthOutput", "run_ground_truth",
           "ground_truth_tables", "pick_device", "spec_predictor"]


def pick_device(preference: str, has_gpu: bool) -> str:
    """'auto' -> cuda when this process holds a GPU (and torch sees one), else cpu."""
    import torch

    if preference == "cpu":
        return "cpu"
    if preference == "cuda" or (preference == "auto" and has_gpu):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


@dataclass(frozen=True)
class WorkerJob:
    """What a dataset actor needs: the spec, which dataset (by label) and which model (None: the spec's only one)."""

    spec: SweepSpec
    dataset_label: str
    device: str = "cpu"  # resolved by the caller (see pick_device)
    crash_marker: Optional[str] = None  # test hook: exit the process once, mid-sweep (see DatasetWork)
    model: Optional[str] = None

    @property
    def entry(self):
        return next(d for d in self.spec.datasets if d.label == self.dataset_label)

    @property
    def backbone(self) -> str:
        if self.model is not None:
            return self.model
        if len(self.spec.models) > 1:
            raise ValueError(f"model: the spec has {len(self.spec.models)} models; the job must name one")
        return self.spec.models[0]


@dataclass
class ShardOutput:
    dataset: str
    shard_id: str
    predictions: Any  # pyarrow.Table (PREDICTION_SCHEMA)
    curves: Any  # pyarrow.Table (CURVE_SCHEMA)
    configs: int
    simulations: int
    seconds: float
    host: str = ""


class DatasetWork:
    """One dataset's state and the shards predicted on it."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self._prepared = None
        self._step_times: Dict[Tuple[int, str], float] = {}
        self._settings = job.spec.simulation.settings(job.spec.criteria)

    # ------------------------------------------------------------------------------ state
    @property
    def prepared(self):
        """The spec's predictor prepared on this dataset (``ttp_ray.predictors``): kernel state computed once
        (or loaded from the disk cache), and what the predictor shares across shards."""
        if self._prepared is None:
            from ..predictors import PredictionInputs

            spec, k = self.job.spec, self.job.spec.kernel
            entry = self.job.entry
            inputs = PredictionInputs(model=self.job.backbone, dataset=entry.ref, kernel=k.options(),
                                      head_seed=k.head_seed, trainable=k.trainable, device=self.job.device,
                                      cache=k.cache, adapt=entry.input)
            self._prepared = spec_predictor(spec).prepare(inputs)
            base = self._prepared.base
            if self.job.device != "cpu" and hasattr(base, "kernel"):  # the kernel comes back on the CPU; simulate there
                base.state = base.state.to(self.job.device)
        return self._prepared

    def info(self) -> Dict[str, Any]:
        """Facts of the state the driver records and needs (n and lambda_max: the stability limits of lr fractions)."""
        p = self.prepared
        meta = p.state.meta
        return {
            "n": p.n, "num_classes": int(p.state.num_classes), "lambda_max": p.lambda_max, "limit": list(p.limit),
            "rank": int(p.state.eigvals.numel()), "predictor": p.predictor.name,
            "kernel_seconds": float(meta.get("total_seconds", p.kernel_seconds)),
            "kernel_load_seconds": float(p.kernel_seconds), "kernel_cache_hit": bool(p.cache_hit),
            "kernel_method": meta.get("method"), "device": self.job.device, "host": socket.gethostname(),
            "pid": os.getpid(), "model": self.job.backbone,
            **({"input": p.dataset.meta["input"]} if "input" in p.dataset.meta else {}),
        }

    def max_stable_lr(self, momentum: float) -> float:
        return self.prepared.max_stable_lr(momentum)

    def spectrum_table(self):
        """The state's eigenvalues lambda_k of Theta and residual projections p_k = ||v_k^T (Y - F0)||^2
        (``SPECTRUM_SCHEMA``, kind ``kernel``); with ``kernel.subset`` the subset's measured spectrum
        (``subset_kernel``, on N0 samples) and the full set's extrapolated one (``extrapolated``, METHOD.md §7)."""
        from ..subset import state_spectrum
        from ..tables import as_table

        p = self.prepared
        state = p.state.to(device="cpu")
        c, trace = int(state.num_classes), bool(state.class_trace)
        parts = [("subset_kernel" if self.job.spec.kernel.subset is not None else "kernel", state_spectrum(state))]
        if self.job.spec.kernel.subset is not None:
            parts.append(("extrapolated", p.base.spectrum))
        rows = []
        for kind, sp in parts:  # Spectrum holds lambda_k / n and p_k / n
            n = int(sp.n)
            for i, (lam, q) in enumerate(zip(np.asarray(sp.eigvals), np.asarray(sp.projections))):
                rows.append({"kind": kind, "k": i + 1, "eigenvalue": float(lam) * n, "projection": float(q) * n,
                             "n": n, "num_classes": c, "class_trace": trace, "model": self.job.backbone})
        return as_table(rows, "spectra")

    def step_time(self, batch_size: Optional[int], loss: str) -> float:
        """SGD step time at batch size B (None: N) on this device (:func:`ttp_ray.step_time.step_time`: timed at
        most at ``cost.step_time_max_batch`` samples and scaled, cached on disk), looked up once per (B, loss)."""
        from ..step_time import step_time

        p = self.prepared
        b = p.n if batch_size is None else min(int(batch_size), p.n)
        key = (b, loss)
        if key not in self._step_times:
            cost, k = self.job.spec.cost, self.job.spec.kernel
            self._step_times[key] = step_time(p.model, p.dataset, b, loss, device=self.job.device,
                                              trainable=k.trainable, max_batch=cost.step_time_max_batch,
                                              steps=cost.step_time_steps, cache=k.cache)
        return self._step_times[key]

    # ------------------------------------------------------------------------------ shards
    def predict_shard(self, shard: Shard) -> ShardOutput:
        """Predict every config of ``shard`` (grouped by budget, one vectorised call per budget)."""
        from ..tables import as_table, curve_table

        self._maybe_crash(shard)
        t0 = time.perf_counter()
        p = self.prepared
        rows: List[Dict[str, Any]] = []
        curves: List[Dict[str, Any]] = []
        sims = 0
        for budget, cfgs in _by_budget(shard.configs):
            lrs = [resolve_lr(c, p.max_stable_lr) for c in cfgs]
            sim_cfgs = [sim_config(c, lr) for c, lr in zip(cfgs, lrs)]
            predicted = p.predict(sim_cfgs, budget_steps=budget, eps_list=list(self.job.spec.eps),
                                  settings=self._settings)
            sims += len({(pc.result.method, pc.result.group) for pc in predicted})
            for c, pc in zip(cfgs, predicted):
                rows += self._prediction_rows(shard, c, pc)
                curves.append(_curve(c.config_id, "predicted", None, pc.result.steps, pc.result.loss,
                                     pc.result.error))
        return ShardOutput(shard.dataset, shard.shard_id, as_table(rows, "predictions"), curve_table(curves),
                           len(shard.configs), sims, time.perf_counter() - t0, socket.gethostname())

    def _prediction_rows(self, shard: Shard, c: PlannedConfig, pc) -> List[Dict[str, Any]]:
        p = self.prepared
        st = self.step_time(c.batch_size, c.loss)
        meta = p.state.meta
        out = []
        for r in pc.rows:
            steps = r["predicted_steps"]
            row = dict(r)
            row.update(
                config_id=c.config_id, model=c.model, lr_fraction=c.lr_fraction, full_batch=c.batch_size is None,
                n=p.n, step_time_s=st,
                predicted_cost_s=None if steps is None or r["diverged"] else steps * st,
                kernel_seconds=float(meta.get("total_seconds", p.kernel_seconds)), kernel_cache_hit=bool(p.cache_hit),
                device=self.job.device, shard=shard.shard_id,
            )
            out.append(row)
        return out

    def _maybe_crash(self, shard: Shard) -> None:
        """Test hook: with ``crash_marker`` set, the first process to reach a shard other than the first
        creates the marker and exits abruptly (as a killed actor would); Ray restarts it."""
        marker = self.job.crash_marker
        if marker and shard.index > 0:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, f"{os.getpid()} {shard.key}\n".encode())
            os.close(fd)
            os._exit(1)


def spec_predictor(spec: SweepSpec):
    """The predictor a spec selects (:meth:`SweepSpec.chosen_predictor`)."""
    return spec.chosen_predictor()


def _by_budget(configs: Sequence[PlannedConfig]):
    budgets: Dict[int, List[PlannedConfig]] = {}
    for c in configs:
        budgets.setdefault(c.budget_steps, []).append(c)
    return sorted(budgets.items())


def _curve(cid: str, source: str, seed: Optional[int], steps, loss, error) -> Dict[str, Any]:
    return {"config_id": cid, "source": source, "seed": seed, "steps": np.asarray(steps), "loss": np.asarray(loss),
            "error": None if error is None else np.asarray(error)}


# ------------------------------------------------------------------------------------ ground truth

@dataclass(frozen=True)
class GroundTruthJob:
    spec: SweepSpec
    run: GroundTruthRun
    lr: float  # resolved absolute lr
    max_stable_lr: float  # of the dataset's kernel, for the row
    device: str = "cpu"


@dataclass
class GroundTruthOutput:
    dataset: str
    run_id: str
    rows: Any  # pyarrow.Table (GROUND_TRUTH_SCHEMA)
    curves: Any  # pyarrow.Table (CURVE_SCHEMA)
    seconds: float
    host: str = ""


def run_ground_truth(job: GroundTruthJob) -> GroundTruthOutput:
    """Fine-tune one config for real with ``torch.optim.SGD`` and read T_eps off its curves."""
    from ..finetune import FinetuneConfig, finetune
    from ..models import build_finetune_model, load_dataset_for_model

    t0 = time.perf_counter()
    spec, run = job.spec, job.run
    c = run.config
    entry = next(d for d in spec.datasets if d.label == c.dataset)
    ds = load_dataset_for_model(entry.ref, c.model, adapt=entry.input)
    model = build_finetune_model(c.model, ds.num_classes, spec.kernel.head_seed)
    log_every = spec.ground_truth.log_every or spec.simulation.log_every
    cfg = FinetuneConfig(lr=job.lr, momentum=c.momentum, batch_size=c.batch_size, loss=c.loss, steps=c.budget_steps,
                         seed=run.seed, log_every=log_every, trainable=spec.kernel.trainable)
    res = finetune(model, ds, cfg, device=job.device)
    n = len(ds)
    columns = {"config_id": c.config_id, "model": c.model, "loss": c.loss, "lr": job.lr, "lr_fraction": c.lr_fraction,
               "momentum": c.momentum, "batch_size": n if c.batch_size is None else int(c.batch_size),
               "full_batch": c.batch_size is None, "effective_lr": cfg.effective_lr,
               "eps_mode": spec.simulation.eps_mode, "budget_steps": c.budget_steps, "n": n,
               "max_stable_lr": job.max_stable_lr, "seed": run.seed, "device": str(job.device)}
    rows, curves = ground_truth_tables(spec, columns, res)
    return GroundTruthOutput(c.dataset, run.run_id, rows, curves, time.perf_counter() - t0, socket.gethostname())


def ground_truth_tables(spec: SweepSpec, columns: Dict[str, Any], run) -> Tuple[Any, Any]:
    """The ``ground_truth`` rows (one per criterion and ε of ``spec``) and the real ``curves`` rows of one fine-tune
    ``run`` (a :class:`~ttp_ray.finetune.FinetuneResult`) of the config described by ``columns`` (the config's
    columns of ``GROUND_TRUTH_SCHEMA``: ``config_id``, ..., ``budget_steps``, ``seed``, ``device``), as pyarrow
    tables. T_eps is read off the curve as the spec's simulation reads the predicted ones (METHOD.md §5), against
    the run's last logged value; a run that ended before ``budget_steps`` without diverging (stopped early) has
    no L_T, so its T_eps is null."""
    from ..tables import as_table, curve_table, ground_truth_rows
    from ..training_time import curve_training_times

    budget = int(columns["budget_steps"])
    curves = {k: v for k, v in run.curves().items() if k in spec.criteria}
    sim = spec.simulation
    times = curve_training_times(run.steps, curves, list(spec.eps), budget=budget, eps_mode=sim.eps_mode,
                                 definition=sim.definition, window=sim.window, diverged=run.diverged)
    stopped_early = not run.diverged and (not len(run.steps) or int(run.steps[-1]) < budget)
    if stopped_early:
        times = [{**t, "steps": None, "fraction": None} for t in times]
    rows = ground_truth_rows(run, times, columns)
    curve = _curve(columns["config_id"], "actual", columns["seed"], run.steps, run.loss, run.error)
    return as_table(rows, "ground_truth"), curve_table([curve])
