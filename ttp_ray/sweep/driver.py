"""Sweep orchestration: preflight, plan, Ray start/attach, actors per dataset, shards, ground truth,
Parquet output, resume, summary.

Order of events (:func:`run_sweep`):

1. **preflight** (:mod:`ttp_ray.sweep.preflight`, before Ray): every dataset is loaded (N, C; missing files
   fail here, one line) and the backbone is loaded (pre-trained and cached once, here, not by every actor).
   Attached to a cluster (``--address``), the same check runs as a Ray task there, where the data lives;
2. **plan** (:mod:`ttp_ray.sweep.plan`) and the output directory: a manifest of another spec is refused
   (``--fresh`` clears it); parts already on disk are skipped (resume);
3. **Ray**: a local instance on 127.0.0.1 without dashboard (default), or the cluster at ``--address`` /
   ``RAY_ADDRESS``, or the instance this process is already connected to;
4. per dataset (per (dataset, model) with a list of models) with work left, one
   :class:`~ttp_ray.sweep.actors.DatasetActor` (more with ``resources.actors``), GPU-requesting when the cluster has GPUs, spread over nodes. Its ``prepare``
   computes the kernel state once (or loads it from the disk cache) and, when ``OUT/spectra`` lacks the
   dataset's part, returns the Theta spectrum, written there at once; then shards flow to it, at most
   two in flight per actor, each written as soon as it returns. Actors are restartable
   (``max_restarts``) and their shard calls retried (``max_task_retries``);
5. ground-truth fine-tunes run as separate Ray tasks with their own resources, submitted once their
   dataset's ``max_stable_lr`` is known (lr fractions); a dataset's actors are released when its
   shards are done, so their CPUs go to the fine-tunes;
6. the manifest is marked complete when every part exists; :func:`summary_text` ranks configs by
   predicted cost to a common target (``analysis.rank``'s default) and, with ground truth, says how well
   that ranking and ``predicted_cost_s``'s order the fine-tuned configs (``analysis.ranking_metrics``).

Ctrl-C or a killed driver loses nothing already written: parts are atomic and the next run with the
same spec and ``--out`` skips them.
"""
from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from .output import SPECTRUM_PART, SweepOutput, read_table
from .plan import DatasetSize, GroundTruthRun, Shard, SweepPlan, build_plan, dry_run_text, resolve_lr
from .preflight import preflight
from .spec import SpecError, SweepSpec

__all__ = ["SweepResult", "preflight", "plan_sweep", "resource_view", "check_feasible", "dry_run", "run_sweep",
           "summary_text", "start_local_ray"]

MAX_INFLIGHT_PER_ACTOR = 2


@dataclass
class SweepResult:
    out: Path
    plan: SweepPlan
    complete: bool
    written: Dict[str, int]  # parts written by this run: predictions, ground_truth
    skipped: Dict[str, int]  # parts found on disk and skipped
    failures: List[str]
    datasets: Dict[str, Dict[str, Any]]  # per unit (the dataset label, or '<label> @ <model>'): prepare() info
    seconds: float
    actor_nodes: Dict[str, str] = field(default_factory=dict)  # unit -> node id of its first actor
    shard_seconds: float = 0.0  # actor-side wall time of the shards predicted by this run, summed


# -------------------------------------------------------------------------------------------- plan

def plan_sweep(spec: SweepSpec, sizes: Dict[str, Dict[str, Any]]) -> SweepPlan:
    return build_plan(spec, {k: DatasetSize(**v) for k, v in sizes.items()})


# ----------------------------------------------------------------------------------------- resources

def resource_view(spec: SweepSpec, plan: SweepPlan, cluster: Dict[str, float]) -> Dict[str, Any]:
    """Actors and resources the sweep will use on a cluster with ``cluster`` resources (CPU, GPU)."""
    r, gt = spec.resources, spec.ground_truth
    gpus = float(cluster.get("GPU", 0.0))
    per_actor_gpus = (1.0 if gpus >= 1 else 0.0) if r.gpus_per_actor == "auto" else float(r.gpus_per_actor)
    gt_gpus = (1.0 if gpus >= 1 else 0.0) if gt.gpus == "auto" else float(gt.gpus)
    per_dataset = {d.key: actors_for(spec, len(d.shards)) for d in plan.datasets}
    return {
        "cluster": f"{cluster.get('CPU', 0):g} CPU, {gpus:g} GPU",
        "actors": sum(per_dataset.values()),
        "actors per dataset": max(per_dataset.values()) if per_dataset else 0,
        "per actor": f"{r.cpus_per_actor:g} CPU + {per_actor_gpus:g} GPU",
        "per ground-truth task": f"{gt.cpus:g} CPU + {gt_gpus:g} GPU",
        "_actor_gpus": per_actor_gpus, "_gt_gpus": gt_gpus, "_per_dataset": per_dataset,
    }


def check_feasible(spec: SweepSpec, plan: SweepPlan, cluster: Dict[str, float]) -> None:
    """On a Ray that cannot grow (local), an actor or task asking for more than the whole cluster would
    wait forever: refuse it up front, one line. (Attached to a cluster, the autoscaler may add nodes.)"""
    view = resource_view(spec, plan, cluster)
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    r, gt = spec.resources, spec.ground_truth
    asks = [("resources.cpus_per_actor", r.cpus_per_actor, cpus, "CPU"),
            ("resources.gpus_per_actor", view["_actor_gpus"], gpus, "GPU")]
    if plan.n_ground_truth:
        asks += [("ground_truth.cpus", gt.cpus, cpus, "CPU"), ("ground_truth.gpus", view["_gt_gpus"], gpus, "GPU")]
    for name, want, have, kind in asks:
        if want > have:
            hint = " (or more with --num-cpus)" if kind == "CPU" else ""
            raise SpecError(f"{name}: {want:g} exceeds the {have:g} {kind}(s) of this Ray; allowed: <= {have:g}{hint}")


def actors_for(spec: SweepSpec, pending_shards: int) -> int:
    want = 1 if spec.resources.actors == "auto" else int(spec.resources.actors)
    return max(1, min(want, pending_shards)) if pending_shards else 0


def _local_cluster_guess(num_cpus: Optional[int]) -> Dict[str, float]:
    import torch

    return {"CPU": float(num_cpus or os.cpu_count() or 1),
            "GPU": float(torch.cuda.device_count() if torch.cuda.is_available() else 0)}


def _public(view: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in view.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------- dry run

def dry_run(spec: SweepSpec, *, address: Optional[str] = None, num_cpus: Optional[int] = None) -> str:
    """The plan as text, without starting Ray and without data (paper datasets: sizes from the table)."""
    sizes = preflight(spec, allow_missing=True)
    plan = plan_sweep(spec, sizes)
    view = resource_view(spec, plan, _local_cluster_guess(num_cpus))
    shown = _public(view)
    if address or os.environ.get("RAY_ADDRESS"):
        shown["cluster"] = f"attach to {address or os.environ['RAY_ADDRESS']} (GPUs 'auto' resolved there)"
    else:
        shown["cluster"] = "local Ray on 127.0.0.1, " + shown["cluster"]
    return dry_run_text(plan, shown)


# ---------------------------------------------------------------------------------------------- Ray

def start_local_ray(num_cpus: Optional[int] = None, object_store_mb=None) -> None:
    """A private Ray on 127.0.0.1: no dashboard, nothing listening beyond loopback."""
    import logging

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kw: Dict[str, Any] = {}
    if object_store_mb not in (None, "auto"):
        kw["object_store_memory"] = int(object_store_mb) * 1024 * 1024
    # address="local": always a new instance of our own, never one a `ray start` on this machine left running
    # (attaching to a cluster is --address / RAY_ADDRESS only)
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             logging_level=logging.WARNING, **kw)


def _connect(spec: SweepSpec, address: Optional[str], num_cpus: Optional[int]) -> bool:
    """Connect to Ray; returns True when this call started (and so must stop) it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    start_local_ray(num_cpus, spec.resources.object_store_mb)
    return True


def _remote_preflight(spec: SweepSpec) -> Dict[str, Dict[str, Any]]:
    import ray

    from .actors import preflight_task

    try:
        return ray.get(preflight_task.remote(spec))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ValueError):
            raise cause from None
        raise


# --------------------------------------------------------------------------------------- the sweep

class _Reporter:
    """Progress: a rich bar on a terminal, else one line per finished part."""

    def __init__(self, plan: SweepPlan, skipped: Dict[str, int], echo: Callable[[str], None], enabled: bool):
        self.echo = echo
        self.enabled = enabled
        self.bar = None
        self.done = dict(skipped)
        self.total = {"predictions": plan.n_shards, "ground_truth": plan.n_ground_truth}
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description:>24s}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True))
            self.tasks = {}
            for kind, label in (("predictions", "prediction shards"), ("ground_truth", "ground-truth runs")):
                if self.total[kind]:
                    self.tasks[kind] = self.bar.add_task(label, total=self.total[kind], completed=self.done[kind])
            self.bar.start()

    def advance(self, kind: str, text: str) -> None:
        self.done[kind] += 1
        if self.bar is not None:
            self.bar.update(self.tasks[kind], advance=1)
        elif self.enabled:
            self.echo(f"[{self.done[kind]}/{self.total[kind]}] {text}")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.enabled:
            self.echo(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@dataclass
class _DatasetRun:
    label: str  # the unit's key (DatasetPlan.key): the dataset label, or '<label> @ <model>'
    unit: Any  # its DatasetPlan
    pending: Deque[Shard]
    gt_pending: List[GroundTruthRun]
    actors: List[Any] = field(default_factory=list)
    inflight: Dict[int, int] = field(default_factory=dict)  # actor index -> shards in flight
    info: Optional[Dict[str, Any]] = None
    failed: bool = False
    needs_spectrum: bool = False  # OUT/spectra lacks this unit's part


class _Sweep:
    """The driver loop of one run (state kept here so the loop reads as a list of events)."""

    def __init__(self, spec: SweepSpec, plan: SweepPlan, output: SweepOutput, view: Dict[str, Any],
                 reporter: _Reporter, crash_marker: Optional[str], stop_after: Optional[int]):
        import ray

        self.ray = ray
        self.spec, self.plan, self.output, self.view, self.reporter = spec, plan, output, view, reporter
        self.crash_marker = crash_marker
        self.stop_after = stop_after
        self.refs: Dict[Any, Tuple[str, str, Any, int]] = {}
        self.failures: List[str] = []
        self.written = {"predictions": 0, "ground_truth": 0}
        self.datasets: Dict[str, _DatasetRun] = {}
        self.actor_nodes: Dict[str, str] = {}
        self.shard_seconds = 0.0

    # ---------------------------------------------------------------- submission
    def start(self, pending_shards: Dict[str, List[Shard]], pending_gt: Dict[str, List[GroundTruthRun]],
              pending_spectra: Sequence[str] = ()) -> None:
        for d in self.plan.datasets:
            run = _DatasetRun(d.key, d, collections.deque(pending_shards.get(d.key, [])),
                              list(pending_gt.get(d.key, [])), needs_spectrum=d.key in pending_spectra)
            self.datasets[d.key] = run
            if run.pending or run.gt_pending or run.needs_spectrum:
                actor = self._new_actor(run)
                self.refs[actor.prepare.remote(run.needs_spectrum)] = ("prepare", d.key, None, 0)

    def _new_actor(self, run: _DatasetRun):
        from .actors import DatasetActor, actor_options
        from .work import WorkerJob

        r = self.spec.resources
        opts = actor_options(r.cpus_per_actor, self.view["_actor_gpus"], r.max_restarts, r.max_task_retries)
        job = WorkerJob(self.spec, run.unit.label, crash_marker=self.crash_marker, model=run.unit.model)
        actor = DatasetActor.options(**opts).remote(job)
        run.actors.append(actor)
        run.inflight[len(run.actors) - 1] = 0
        return actor

    def _feed(self, run: _DatasetRun) -> None:
        for i, actor in enumerate(run.actors):
            while run.pending and run.inflight[i] < MAX_INFLIGHT_PER_ACTOR:
                shard = run.pending.popleft()
                self.refs[actor.predict_shard.remote(shard)] = ("shard", run.label, shard, i)
                run.inflight[i] += 1

    def _submit_ground_truth(self, run: _DatasetRun) -> None:
        from ..stability import max_stable_lr
        from .actors import ground_truth_task, task_options
        from .work import GroundTruthJob

        gt = self.spec.ground_truth
        opts = task_options(gt.cpus, self.view["_gt_gpus"], gt.max_retries)
        lam, n = run.info["limit"]
        for g in run.gt_pending:
            limit = max_stable_lr(lam, n, g.config.momentum)
            lr = resolve_lr(g.config, lambda m: max_stable_lr(lam, n, m))
            job = GroundTruthJob(self.spec, g, lr, limit)
            self.refs[ground_truth_task.options(**opts).remote(job)] = ("gt", run.label, g, -1)
        run.gt_pending = []

    def _release_if_done(self, run: _DatasetRun) -> None:
        if not run.pending and not any(run.inflight.values()):
            for actor in run.actors:
                self.ray.kill(actor)
            run.actors, run.inflight = [], {}

    # ---------------------------------------------------------------- events
    def loop(self) -> None:
        while self.refs:
            ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=1.0)
            for ref in ready:
                kind, label, payload, idx = self.refs.pop(ref)
                run = self.datasets[label]
                try:
                    value = self.ray.get(ref)
                except self.ray.exceptions.RayError as exc:
                    self._failed(kind, run, payload, idx, exc)
                    continue
                getattr(self, f"_on_{kind}")(run, value, payload, idx)

    def _on_prepare(self, run: _DatasetRun, info: Dict[str, Any], _payload, _idx) -> None:
        spectrum = info.pop("spectrum", None)
        if spectrum is not None:
            self.output.write_parts(run.unit.label, run.unit.prefix + SPECTRUM_PART, {"spectra": spectrum})
            run.needs_spectrum = False
        run.info = info
        self.actor_nodes[run.label] = info.get("node_id", "")
        self.output.record_dataset(run.label, {k: v for k, v in info.items() if k not in ("pid",)})
        hit = "loaded from cache" if info.get("kernel_cache_hit") else "computed"
        self.reporter.note(f"{run.label}: kernel state {hit} in {info['kernel_load_seconds']:.1f} s on "
                           f"{info['host']} ({info['device']}), N={info['n']}, lambda_max={info['lambda_max']:.4g}")
        for _ in range(self.view["_per_dataset"][run.label] - 1):
            self._new_actor(run)
        self._feed(run)
        self._submit_ground_truth(run)
        self._release_if_done(run)

    def _on_shard(self, run: _DatasetRun, out, shard: Shard, idx: int) -> None:
        self.output.write_parts(out.dataset, out.shard_id, {"curves": out.curves, "predictions": out.predictions})
        self.output.sync()
        self.written["predictions"] += 1
        self.shard_seconds += out.seconds
        run.inflight[idx] -= 1
        self.reporter.advance("predictions", f"{shard.key}: {out.configs} configs, {out.simulations} simulations, "
                                             f"{out.seconds:.2f} s on {out.host}")
        self._feed(run)
        self._release_if_done(run)
        if self.stop_after is not None and self.written["predictions"] >= self.stop_after:
            raise KeyboardInterrupt(f"stopped after {self.stop_after} shard(s) (test hook)")

    def _on_gt(self, run: _DatasetRun, out, g: GroundTruthRun, _idx) -> None:
        self.output.write_parts(out.dataset, out.run_id, {"curves": out.curves, "ground_truth": out.rows})
        self.output.sync()
        self.written["ground_truth"] += 1
        self.reporter.advance("ground_truth", f"{g.key}: {out.seconds:.1f} s on {out.host}")

    def _failed(self, kind: str, run: _DatasetRun, payload, idx: int, exc: Exception) -> None:
        cause = getattr(exc, "cause", None) or exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
        what = {"prepare": f"{run.label}: kernel state", "shard": f"{getattr(payload, 'key', '')}: prediction",
                "gt": f"{getattr(payload, 'key', '')}: ground truth"}[kind]
        self.failures.append(f"{what} failed: {type(cause).__name__}: {first}")
        self.reporter.note(f"error: {self.failures[-1]}")
        if kind == "prepare":
            run.failed = True
            self.failures.append(f"{run.label}: {len(run.pending)} shard(s) and {len(run.gt_pending)} "
                                 f"ground-truth run(s) not attempted")
            run.pending.clear()
            run.gt_pending = []
            self._release_if_done(run)
        elif kind == "shard":
            run.inflight[idx] -= 1
            self._feed(run)
            self._release_if_done(run)

    def shutdown_actors(self) -> None:
        for run in self.datasets.values():
            for actor in run.actors:
                try:
                    self.ray.kill(actor)
                except Exception:  # pragma: no cover - already gone
                    pass
            run.actors = []


def _plan_summary(plan: SweepPlan) -> Dict[str, Any]:
    return {
        "configs": plan.n_configs, "shards": plan.n_shards, "shard_size": plan.shard_size,
        "ground_truth_runs": plan.n_ground_truth,
        "datasets": {d.key: {"ref": d.entry.ref, "n": d.size.n, "num_classes": d.size.num_classes,
                             "configs": len(d.configs), "shards": len(d.shards),
                             "distinct_simulations": d.distinct_simulations,
                             "ground_truth_runs": len(d.ground_truth),
                             **({"model": d.model, "label": d.label} if d.prefix else {})} for d in plan.datasets},
    }


def run_sweep(spec: SweepSpec, out: Optional[str] = None, *, address: Optional[str] = None, fresh: bool = False,
              num_cpus: Optional[int] = None, progress: bool = True, echo: Callable[[str], None] = print,
              _crash_marker: Optional[str] = None, _stop_after_shards: Optional[int] = None) -> SweepResult:
    """Run (or resume) a sweep; see the module docstring. ``_crash_marker`` and ``_stop_after_shards``
    are test hooks (an actor exits once mid-sweep; the driver stops as on Ctrl-C)."""
    import ray

    t0 = time.perf_counter()
    output = SweepOutput(out or spec.output_dir())
    attach = bool(address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    opened = None
    if not attach:  # local: data, model, resources, plan and output directory checked before Ray starts
        plan = plan_sweep(spec, preflight(spec))
        cluster = ray.cluster_resources() if ray.is_initialized() else _local_cluster_guess(num_cpus)
        check_feasible(spec, plan, cluster)
        opened = _open(spec, output, plan, fresh)
        if not _has_work(opened[2]):
            return _finish(spec, output, opened, None, t0)
    started = _connect(spec, address, num_cpus)
    sweep = None
    try:
        if opened is None:
            opened = _open(spec, output, plan_sweep(spec, _remote_preflight(spec)), fresh)
        plan, _, pending = opened
        view = resource_view(spec, plan, ray.cluster_resources())
        reporter = _Reporter(plan, _skipped(plan, pending), echo, progress)
        try:
            if any(_skipped(plan, pending).values()):
                reporter.note(f"resuming {output.root}: " + ", ".join(
                    f"{v} {k} part(s)" for k, v in _skipped(plan, pending).items()) + " already written, skipped")
            sweep = _Sweep(spec, plan, output, view, reporter, _crash_marker, _stop_after_shards)
            sweep.start(*pending)
            sweep.loop()
        finally:
            reporter.close()
            if sweep is not None:
                sweep.shutdown_actors()
        return _finish(spec, output, opened, sweep, t0)
    finally:
        try:
            if output.manifest:
                output.sync()
        except OSError:  # pragma: no cover - disk gone; the parts on disk stay the record
            pass
        if started:
            ray.shutdown()


def _open(spec: SweepSpec, output: SweepOutput, plan: SweepPlan, fresh: bool):
    """Claim the output directory for ``plan`` and find what is left to do."""
    previous = _open_output(output, spec, plan, fresh)
    output.start(name=spec.name, spec_dict=spec.to_dict(), identity=spec.identity(), spec_hash=spec.identity_hash(),
                 layout_hash=plan.layout_hash(), plan_summary=_plan_summary(plan), previous=previous)
    done_shards = output.completed_keys("predictions")
    done_gt = output.completed_keys("ground_truth")
    pending_shards = {d.key: [s for s in d.shards if s.key not in done_shards] for d in plan.datasets}
    pending_gt = {d.key: [g for g in d.ground_truth if g.key not in done_gt] for d in plan.datasets}
    return plan, previous, (pending_shards, pending_gt, _pending_spectra(output, plan))


def _pending_spectra(output: SweepOutput, plan: SweepPlan) -> List[str]:
    """Units (:attr:`~ttp_ray.sweep.plan.DatasetPlan.key`) whose ``spectra`` part is not on disk yet."""
    done = output.completed_keys("spectra")
    return [d.key for d in plan.datasets if f"{d.label}/{d.prefix}{SPECTRUM_PART}" not in done]


def _has_work(pending) -> bool:
    return any(pending[0].values()) or any(pending[1].values()) or bool(pending[2])


def _skipped(plan: SweepPlan, pending) -> Dict[str, int]:
    return {"predictions": plan.n_shards - sum(map(len, pending[0].values())),
            "ground_truth": plan.n_ground_truth - sum(map(len, pending[1].values()))}


def _finish(spec: SweepSpec, output: SweepOutput, opened, sweep: Optional["_Sweep"], t0: float) -> SweepResult:
    plan, previous, pending = opened
    # planned parts only: OUT/ground_truth may also hold the runs of `ttp-ray tune` (parts tune-*)
    complete = ({s.key for d in plan.datasets for s in d.shards} <= output.completed_keys("predictions")
                and {g.key for d in plan.datasets for g in d.ground_truth} <= output.completed_keys("ground_truth")
                and not _pending_spectra(output, plan)
                and not (sweep is not None and sweep.failures))
    output.sync(complete=complete)
    written = sweep.written if sweep is not None else {"predictions": 0, "ground_truth": 0}
    infos = {k: r.info for k, r in sweep.datasets.items() if r.info} if sweep is not None else {}
    return SweepResult(output.root, plan, complete, written, _skipped(plan, pending),
                       list(sweep.failures) if sweep is not None else [], infos, time.perf_counter() - t0,
                       dict(sweep.actor_nodes) if sweep is not None else {},
                       sweep.shard_seconds if sweep is not None else 0.0)


def _open_output(output: SweepOutput, spec: SweepSpec, plan: SweepPlan, fresh: bool) -> Optional[Dict[str, Any]]:
    if fresh:
        output.clear()
        return None
    return output.check_compatible(spec.identity_hash(), plan.layout_hash(), spec.identity())


# ------------------------------------------------------------------------------------------- summary

def summary_text(out: Path, spec: SweepSpec, top: int = 10) -> str:
    """Top configs by predicted cost to a common target for the first criterion and eps (``analysis.rank``'s
    default objective: never reaching the target, then diverging, last), the ground-truth comparison and the
    ranking quality over the fine-tuned configs when there are some, and where the tables are."""
    import pandas as pd

    from .. import analysis

    pred = read_table(out, "predictions").to_pandas()
    lines = []
    if len(pred):
        crit, eps = spec.criteria[0], spec.eps[0]
        curves = read_table(out, "curves").to_pandas()
        sel = analysis.rank(pred, curves=curves, criterion=crit, eps=eps)
        targets = sel.drop_duplicates(["dataset", "loss"])
        lines.append(f"top {min(top, len(sel))} of {len(sel)} configs by predicted cost to a common {crit} target "
                     f"(eps {eps:g} for T_hat; never reaching the target, then diverging, last); target per "
                     f"(dataset, loss): " + ", ".join(f"{r.dataset}/{r.loss} {r.target:.4g} ({r.target_rule})"
                                                      for r in targets.itertuples()))
        lines.append(f"  {'dataset':24s} {'loss':4s} {'lr':>10s} {'frac':>6s} {'mom':>5s} {'B':>6s} "
                     f"{'to_tgt':>6s} {'cost_s':>9s} {'final_err':>9s} {'T_hat':>7s} {'T_hat_cost_s':>12s}  "
                     f"{'config_id'}")
        for r in sel.head(top).itertuples():
            t = "diverges" if r.diverged else ("-" if pd.isna(r.predicted_steps) else f"{int(r.predicted_steps)}")
            to = "-" if pd.isna(r.predicted_steps_to_target) else f"{int(r.predicted_steps_to_target)}"
            frac = "" if pd.isna(r.lr_fraction) else f"{r.lr_fraction:g}"
            lines.append(f"  {str(r.dataset)[:24]:24s} {r.loss:4s} {r.lr:10.4g} {frac:>6s} {r.momentum:5g} "
                         f"{int(r.batch_size):6d} {to:>6s} {analysis.fmt(r.predicted_cost_to_target_s, '.3g'):>9s} "
                         f"{analysis.fmt(r.predicted_final_error, '.3f'):>9s} {t:>7s} "
                         f"{analysis.fmt(r.predicted_cost_s, '.3g'):>12s}  {r.config_id}")
        lines.append(f"  (`ttp-ray rank {out}`: the table with flags and regime; `--by predicted_cost_s`: by "
                     f"T_hat x step time, against each run's own final value; `--pareto`: the cost / final-error "
                     f"front)")
        lines += _extra_work_lines(pred)
        gt = read_table(out, "ground_truth").to_pandas()
        if len(gt):
            val = analysis.validation_table(pred, gt, curves)
            overall = analysis.validation_metrics(val)["overall"]
            head = f"ground truth: {gt.config_id.nunique()} config(s) fine-tuned"
            if overall["compared"]:
                lines.append(f"{head}; relative error |T_hat - T| / T over {overall['compared']} (criterion, eps, "
                             f"seed) rows: median {overall['median_relative_error']:.3f}, mean "
                             f"{overall['mean_relative_error']:.3f} (`ttp-ray validate {out}` for the slices)")
            else:
                lines.append(f"{head}; none with T_eps both predicted and real")
            lines += _ranking_lines(analysis, val)
    else:
        lines.append("no predictions written")
    lines.append(f"tables: {out}/predictions, {out}/ground_truth, {out}/curves, {out}/spectra (Parquet, "
                 f"hive-partitioned by dataset); manifest: {out}/manifest.json")
    return "\n".join(lines)


def _extra_work_lines(pred) -> List[str]:
    """What the predictor spent beyond the Θ0 sketch, per (dataset, model, loss), from the rows' ``extra_gradients``."""
    if "extra_gradients" not in pred or not pred.extra_gradients.notna().any():
        return []
    work = pred.dropna(subset=["extra_gradients"]).groupby(["dataset", "model", "loss"]).agg(
        g=("extra_gradients", "max"), n=("n", "first"), method=("method", "first"))
    return ["extra work beyond the kernel (per-sample gradients of the drift probes, per actor; docs/METHOD.md §14): "
            + ", ".join(f"{d}/{m}/{l} {int(r.g)} ({r.g / r.n:.1f} N)" for (d, m, l), r in work.iterrows())]


def _ranking_lines(analysis, val) -> List[str]:
    """The ranking quality over the fine-tuned configs (``analysis.ranking_summary``), one line per objective."""
    summary = analysis.ranking_summary(analysis.ranking_metrics(val))
    names = {"cost_to_target": "cost to target", "cost": "T_hat x step time"}
    out = []
    for obj, s in summary.items():
        none = (f"; {s['groups_nothing_reached']} group(s) left out: no fine-tuned config reaches there on one "
                f"side, predicted or real" if s["groups_nothing_reached"] else "")
        flagged = (f"; flagged rows (diverging or never reaching, ranked at the budget): {s['flagged_predicted']} "
                   f"predicted, {s['flagged_actual']} real")
        if not s["groups"]:
            out.append(f"ranking by {names.get(obj, obj)}: no group of >= 3 fine-tuned configs to compare{none}"
                       f"{flagged}")
            continue
        out.append(f"ranking by {names.get(obj, obj)} over {s['groups']} group(s) of >= 3 fine-tuned configs: "
                   f"Spearman rho median {analysis.fmt(s['median_spearman'], '.2f')} (min "
                   f"{analysis.fmt(s['min_spearman'], '.2f')}), top-1 regret mean "
                   f"{analysis.fmt(s['mean_top1_regret'], '.2f')} (max {analysis.fmt(s['max_top1_regret'], '.2f')}), "
                   f"top-3 hit rate {analysis.fmt(s['top3_hit_rate'], '.2f')}{none}{flagged}")
    return out
