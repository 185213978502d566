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
same spec and ``--out`` skips them. With ``handle_signals`` (``ttp-ray sweep``), SIGINT and SIGTERM stop the
loop within a second (:class:`~ttp_ray.interrupts.Interrupted`), the actors are killed and Ray is shut down;
the CLI prints one line and exits 130 / 143. An ``--address`` that accepts no TCP connection fails before
``ray.init`` (:func:`check_address`, one line).
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

from ..interrupts import stop_on_signals
from ..progress import NULL_PROGRESS, Progress, Task, current

from ..preflight import PreflightError, ResourceLimits, check_output_dir
from .output import SPECTRUM_PART, SweepOutput, read_table
from .plan import DatasetSize, GroundTruthRun, Shard, SweepPlan, build_plan, dry_run_text, resolve_lr
from .preflight import check_local, check_plan, preflight
from .spec import SpecError, SweepSpec, ground_truth_from_identity

__all__ = ["SweepResult", "AddressError", "ADDRESS_TIMEOUT_S", "check_address", "preflight", "plan_sweep",
           "resource_view", "check_feasible", "dry_run", "run_sweep", "summary_text", "start_local_ray",
           "failure_text"]

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
    input_failures: List[str] = field(default_factory=list)  # the failures a re-run cannot fix (bad input)
    notes: List[str] = field(default_factory=list)  # what the run did besides the work (a stale lock taken over, ...)

    @property
    def retryable(self) -> bool:
        """Whether some failure may go away on a re-run (else every one was bad input found inside a worker)."""
        return len(self.failures) > len(self.input_failures)


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

def dry_run(spec: SweepSpec, *, address: Optional[str] = None, num_cpus: Optional[int] = None,
            limits: ResourceLimits = ResourceLimits()) -> Tuple[str, Optional[str]]:
    """The plan as text, without starting Ray and without data (paper datasets: sizes from the table), with the
    memory estimate of its largest unit; and the one-line refusal the run would meet (``limits``), or None."""
    sizes = preflight(spec, allow_missing=True, limits=limits)
    plan = plan_sweep(spec, sizes)
    view = resource_view(spec, plan, _local_cluster_guess(num_cpus))
    shown = _public(view)
    if address or os.environ.get("RAY_ADDRESS"):
        shown["cluster"] = f"attach to {address or os.environ['RAY_ADDRESS']} (GPUs 'auto' resolved there)"
    else:
        shown["cluster"] = "local Ray on 127.0.0.1, " + shown["cluster"]
    refusal = None
    try:
        check_plan(spec, plan, limits)
    except PreflightError as exc:
        refusal = str(exc)
    from .preflight import unit_memory

    worst = max((unit_memory(spec, d.size.n, d.size.num_classes, max((len(x.configs) for x in d.shards), default=0),
                             max((c.budget_steps for c in d.configs), default=0)) for d in plan.datasets),
                key=lambda e: e.total, default=None)
    lines = [dry_run_text(plan, shown), f"  limits: configs {plan.n_configs} of at most {limits.max_configs} "
                                        f"(--max-configs)"]
    if worst is not None:
        lines.append(f"  memory: {worst.text()}; limit {limits.max_memory_gb:g} GB per process (--max-memory-gb)")
    return "\n".join(lines), refusal


# ---------------------------------------------------------------------------------------------- Ray

def start_local_ray(num_cpus: Optional[int] = None, object_store_mb=None) -> None:
    """A private Ray on 127.0.0.1: no dashboard, nothing listening beyond loopback; none of its processes outlives
    this one, even when it is SIGKILLed (:func:`ttp_ray.sweep.reaper.watch`: Ray's agents alone take a minute)."""
    import logging

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray starts its workers at nice 15 (for a cluster's head node); here they are the sweep's whole work, and on a
    # shared machine any other process at the user's priority would starve them (a 2-core box with 4 busy processes
    # gave the actors ~1 % of a CPU): they run at the driver's priority instead (RAY_worker_niceness to change it)
    os.environ.setdefault("RAY_worker_niceness", "0")
    kw: Dict[str, Any] = {}
    if object_store_mb not in (None, "auto"):
        kw["object_store_memory"] = int(object_store_mb) * 1024 * 1024
    # address="local": always a new instance of our own, never one a `ray start` on this machine left running
    # (attaching to a cluster is --address / RAY_ADDRESS only)
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             logging_level=logging.WARNING, **kw)
    from .reaper import watch

    watch()


class AddressError(ValueError):
    """``--address`` (or ``RAY_ADDRESS``) names no Ray cluster this machine reaches: one line, exit code 2."""


ADDRESS_TIMEOUT_S = 5.0  # the TCP pre-check of --address before ray.init (whose own retries take minutes)
_ADDRESS_ALLOWED = ("allowed: the host:port of a running Ray head (`ray start --head` prints it; ray://host:port "
                    "for Ray Client), 'auto' on a node of a running cluster, or no --address (and no RAY_ADDRESS) "
                    "for a local Ray")


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail fast, one line, when ``address`` (``host:port`` or ``ray://host:port``) does not accept a TCP
    connection within ``timeout_s``; ``auto`` and ``local`` are left to Ray. Ray-free."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AddressError(f"--address: {address!r} is not host:port; {_ADDRESS_ALLOWED}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = (f"no answer within {timeout_s:g} s" if isinstance(exc, socket.timeout)
               else (exc.strerror or type(exc).__name__).lower())
        raise AddressError(f"--address: cannot reach {host}:{port} ({why}); {_ADDRESS_ALLOWED}") from None


def _connect(spec: SweepSpec, address: Optional[str], num_cpus: Optional[int]) -> bool:
    """Connect to Ray; returns True when this call started (and so must stop) it. An address that names
    no reachable cluster is an :class:`AddressError` (one line) within seconds, not minutes of Ray's retries."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, TimeoutError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise AddressError(f"--address: no Ray cluster at {address!r} ({first}); {_ADDRESS_ALLOWED}") from None
        return True
    start_local_ray(num_cpus, spec.resources.object_store_mb)
    return True


def _remote_preflight(spec: SweepSpec, limits: ResourceLimits) -> Dict[str, Dict[str, Any]]:
    import ray

    from .actors import preflight_task

    try:
        return ray.get(preflight_task.remote(spec, limits))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ValueError):
            raise cause from None
        raise


# --------------------------------------------------------------------------------------- the sweep

class _Reporter:
    """A sweep's progress (:mod:`ttp_ray.progress`): one task per kind of unit, prediction shards and
    ground-truth fine-tunes (done / total with an ETA each, as their costs differ; parts found on disk count as
    done), one open-ended task per (dataset, model) while its actor prepares the kernel state, and notes
    (kernel loaded, errors)."""

    def __init__(self, name: str, plan: SweepPlan, skipped: Dict[str, int], progress: Progress):
        self.progress = progress
        self.kernels: Dict[str, Task] = {}
        self.units: Dict[str, Task] = {}
        for kind, total, what, unit in (("predictions", plan.n_shards, "prediction shards", "shards"),
                                        ("ground_truth", plan.n_ground_truth, "fine-tunes (ground truth)", "runs")):
            if total:
                self.units[kind] = progress.task(f"sweep {name}: {what}", total=total, unit=unit,
                                                 completed=skipped[kind])

    def add_top(self, name: str, runs: int) -> None:
        """``runs`` more fine-tunes of predicted-best configs (``ground_truth.top``), chosen after the predictions."""
        if runs <= 0:
            return
        task = self.units.get("top")
        if task is None or task.total is None or task.completed >= task.total:
            self.units["top"] = self.progress.task(f"sweep {name}: fine-tunes of the predicted best", total=runs,
                                                   unit="runs")
        else:
            task.update(total=task.total + runs)

    def kernel_started(self, unit: str) -> None:
        self.kernels[unit] = self.progress.task(f"{unit}: actor start and kernel state")

    def kernel_done(self, unit: str) -> None:
        task = self.kernels.pop(unit, None)
        if task is not None:
            task.close()

    def advance(self, kind: str) -> None:
        task = self.units[kind]
        task.advance()
        if task.total is not None and task.completed >= task.total:
            task.close()

    def tick(self) -> None:
        """Time passed: plain lines are due every few seconds even when nothing finished."""
        for task in list(self.units.values()) + list(self.kernels.values()):
            task.tick()

    def note(self, text: str) -> None:
        self.progress.note(text)

    def close(self) -> None:
        for unit in list(self.kernels):
            self.kernel_done(unit)
        for task in self.units.values():
            task.close("stopped")  # a finished one closed when its last unit came


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
    top_chosen: bool = False  # its predicted-best configs (ground_truth.top) chosen and submitted


class _Sweep:
    """The driver loop of one run (state kept here so the loop reads as a list of events)."""

    def __init__(self, spec: SweepSpec, plan: SweepPlan, output: SweepOutput, view: Dict[str, Any],
                 reporter: _Reporter, crash_marker: Optional[str], stop_after: Optional[int],
                 check_stop: Callable[[], None]):
        import ray

        self.check_stop = check_stop  # raises Interrupted after a signal (ttp_ray.interrupts)
        self.ray = ray
        self.spec, self.plan, self.output, self.view, self.reporter = spec, plan, output, view, reporter
        self.crash_marker = crash_marker
        self.stop_after = stop_after
        self.refs: Dict[Any, Tuple[str, str, Any, int]] = {}
        self.failures: List[str] = []
        self.input_failures: List[str] = []  # those a re-run cannot fix
        self.written = {"predictions": 0, "ground_truth": 0}
        self.datasets: Dict[str, _DatasetRun] = {}
        self.actor_nodes: Dict[str, str] = {}
        self.shard_seconds = 0.0
        self.top_outstanding: Set[str] = set()  # keys of predicted-best fine-tunes submitted and not yet written

    # ---------------------------------------------------------------- submission
    def start(self, pending_shards: Dict[str, List[Shard]], pending_gt: Dict[str, List[GroundTruthRun]],
              pending_spectra: Sequence[str] = (), pending_top: Optional[Dict[str, List[Any]]] = None) -> None:
        pending_top = pending_top or {}
        for d in self.plan.datasets:
            run = _DatasetRun(d.key, d, collections.deque(pending_shards.get(d.key, [])),
                              list(pending_gt.get(d.key, [])), needs_spectrum=d.key in pending_spectra)
            self.datasets[d.key] = run
            if run.pending or run.gt_pending or run.needs_spectrum:
                actor = self._new_actor(run)
                self.refs[actor.prepare.remote(run.needs_spectrum)] = ("prepare", d.key, None, 0)
                self.reporter.kernel_started(d.key)
            if not run.pending:  # predictions all on disk: the predicted best were chosen when the output was opened
                run.top_chosen = True
                self._submit_top(run, pending_top.get(d.key, []))

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

        lam, n = run.info["limit"]
        for g in run.gt_pending:
            limit = max_stable_lr(lam, n, g.config.momentum)
            self._submit_fine_tune(run, g, resolve_lr(g.config, lambda m: max_stable_lr(lam, n, m)), limit)
        run.gt_pending = []

    def _submit_fine_tune(self, run: _DatasetRun, g: GroundTruthRun, lr: float, limit: float) -> None:
        """One ground-truth fine-tune of ``g`` at the resolved ``lr`` as a Ray task."""
        from .actors import ground_truth_task, task_options
        from .work import GroundTruthJob

        gt = self.spec.ground_truth
        opts = task_options(gt.cpus, self.view["_gt_gpus"], gt.max_retries)
        self.refs[ground_truth_task.options(**opts).remote(GroundTruthJob(self.spec, g, lr, limit))] = \
            ("gt", run.label, g, -1)

    def _submit_top(self, run: _DatasetRun, runs: Sequence[Any]) -> None:
        """Fine-tune the predicted-best configs ``runs`` (:class:`~ttp_ray.sweep.top.TopRun`, lr resolved)."""
        if not runs:
            return
        for t in runs:
            self._submit_fine_tune(run, t.run, t.lr, t.max_stable_lr)
            self.top_outstanding.add(t.run.key)
        self.reporter.add_top(self.spec.name, len(runs))
        self.reporter.note(f"{run.label}: fine-tuning the predicted best (ground_truth.top = "
                           f"{self.spec.ground_truth.top} per loss): "
                           + ", ".join(f"{t.run.config.loss} #{t.rank} {t.run.config.config_id}" for t in runs))

    def _choose_top(self, run: _DatasetRun) -> None:
        """Once every shard of ``run`` is written: choose its predicted-best configs and fine-tune them (with
        ``ground_truth.top``). A unit whose shards did not all come back chooses none (its failure is reported)."""
        if run.top_chosen or run.pending or any(run.inflight.values()):
            return
        run.top_chosen = True
        if not self.spec.ground_truth.picks_top:
            return
        if not {s.key for s in run.unit.shards} <= self.output.completed_keys("predictions"):
            return
        self._submit_top(run, _pending_top(self.spec, self.output, [run.unit]).get(run.label, []))

    def _release_if_done(self, run: _DatasetRun) -> None:
        if not run.pending and not any(run.inflight.values()):
            for actor in run.actors:
                self.ray.kill(actor)
            run.actors, run.inflight = [], {}

    # ---------------------------------------------------------------- events
    def loop(self) -> None:
        while self.refs:
            ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=1.0)
            self.check_stop()
            self.reporter.tick()
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
        self.reporter.kernel_done(run.label)
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
        self.reporter.advance("predictions")
        self._feed(run)
        self._release_if_done(run)
        self._choose_top(run)
        if self.stop_after is not None and self.written["predictions"] >= self.stop_after:
            raise KeyboardInterrupt(f"stopped after {self.stop_after} shard(s) (test hook)")

    def _on_gt(self, run: _DatasetRun, out, g: GroundTruthRun, _idx) -> None:
        self.output.write_parts(out.dataset, out.run_id, {"curves": out.curves, "ground_truth": out.rows})
        self.output.sync()
        self.written["ground_truth"] += 1
        if g.key in self.top_outstanding:
            self.top_outstanding.discard(g.key)
            self.reporter.advance("top")
        else:
            self.reporter.advance("ground_truth")

    def _failed(self, kind: str, run: _DatasetRun, payload, idx: int, exc: Exception) -> None:
        text, bad_input = failure_text(kind, run.label, getattr(payload, "key", ""), exc,
                                       dataset=run.unit.entry.ref, model=run.unit.model or str(self.spec.model))
        self.failures.append(text)
        if bad_input:
            self.input_failures.append(text)
        self.reporter.note(f"error: {self.failures[-1]}")
        if kind == "prepare":
            self.reporter.kernel_done(run.label)
            run.failed = True
            self.failures.append(f"{run.label}: {len(run.pending)} shard(s) and {len(run.gt_pending)} "
                                 f"ground-truth run(s) not attempted")
            if bad_input:
                self.input_failures.append(self.failures[-1])
            run.pending.clear()
            run.gt_pending = []
            self._release_if_done(run)
        elif kind == "shard":
            run.inflight[idx] -= 1
            self._feed(run)
            self._release_if_done(run)
            self._choose_top(run)

    def cancel_pending(self) -> None:
        """Cancel what is in flight (stopping early): fine-tune tasks are killed, shard calls dropped; so that Ray's
        shutdown has no failed task left to report."""
        for ref, (kind, *_rest) in list(self.refs.items()):
            try:
                self.ray.cancel(ref, force=kind == "gt")
            except Exception:  # pragma: no cover - already finished or gone
                pass
        self.refs.clear()

    def shutdown_actors(self) -> None:
        for run in self.datasets.values():
            for actor in run.actors:
                try:
                    self.ray.kill(actor)
                except Exception:  # pragma: no cover - already gone
                    pass
            run.actors = []


def failure_text(kind: str, unit: str, key: str, exc: BaseException, *, dataset: str, model: str) -> Tuple[str, bool]:
    """The line a failed actor call or task leaves (``kind``: prepare, shard, gt), and whether it is bad input that
    a re-run cannot fix: a ``ValueError`` (the core's one-line input errors: ``DatasetError``, ``ModelError``, ...)
    raised inside the worker, as opposed to a worker that died or a system error (retried by a re-run)."""
    cause = getattr(exc, "cause", None) or exc
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
    what = {"prepare": f"{unit}: kernel state", "shard": f"{key}: prediction", "gt": f"{key}: ground truth"}[kind]
    if isinstance(cause, ValueError):
        return (f"{what} failed on bad input (dataset {dataset}, model {model}), which a re-run cannot fix: "
                f"{type(cause).__name__}: {first}"), True
    return f"{what} failed: {type(cause).__name__}: {first}", False


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
              num_cpus: Optional[int] = None, progress: Union[bool, Progress] = False, handle_signals: bool = False,
              echo: Callable[[str], None] = print, limits: ResourceLimits = ResourceLimits(), keep_ray: bool = False,
              _crash_marker: Optional[str] = None, _stop_after_shards: Optional[int] = None) -> SweepResult:
    """Run (or resume) a sweep; see the module docstring.

    ``progress``: a :class:`~ttp_ray.progress.Progress` (units done / total with an ETA, a task per kernel
    phase, notes), True for the ambient one (:func:`ttp_ray.progress.current`) or False for none.
    ``handle_signals``: SIGINT and SIGTERM raise :class:`~ttp_ray.interrupts.Interrupted` (Ray is shut down on
    the way out; ``ttp-ray sweep`` prints one line and exits 130 / 143), set again after ``ray.init``, which
    installs its own SIGTERM handler. ``echo``: where notes go (a resumed lock, parts recomputed). ``limits``: the
    resource bounds the plan is checked against before anything runs. ``keep_ray``: a local Ray this call starts
    stays up when it returns (its actors ended; the caller shuts it down: ``ttp-ray tune`` runs its trials there);
    on an exception it is shut down as always. ``_crash_marker`` and
    ``_stop_after_shards`` are test hooks (an actor exits once mid-sweep; the driver stops as on Ctrl-C)."""
    traps = stop_on_signals() if handle_signals else contextlib.nullcontext()
    with traps as trap:
        return _run_sweep(spec, out, address=address, fresh=fresh, num_cpus=num_cpus,
                          progress=_progress(progress), trap=trap, echo=echo, limits=limits, keep_ray=keep_ray,
                          crash_marker=_crash_marker, stop_after=_stop_after_shards)


def _progress(progress: Union[bool, Progress]) -> Progress:
    if progress is True:
        return current() if current().enabled else Progress()
    return progress or NULL_PROGRESS


def _run_sweep(spec: SweepSpec, out: Optional[str], *, address: Optional[str], fresh: bool, num_cpus: Optional[int],
               progress: Progress, trap, echo: Callable[[str], None], limits: ResourceLimits, keep_ray: bool,
               crash_marker: Optional[str], stop_after: Optional[int]) -> SweepResult:
    import ray

    t0 = time.perf_counter()
    output = SweepOutput(out or spec.output_dir())
    attach = bool(address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    opened = None
    notes: List[str] = []
    if not attach:  # local: output directory, data, model, resources and plan checked before Ray starts
        cluster = ray.cluster_resources() if ray.is_initialized() else _local_cluster_guess(num_cpus)
        check_local(spec, str(output.root), cluster)
        sizes = preflight(spec, limits=limits)
        plan = plan_sweep(spec, sizes)
        check_plan(spec, plan, limits)
        check_feasible(spec, plan, cluster)
        opened = _open(spec, output, plan, fresh, sizes, notes, echo)
        if not _has_work(opened[2]):
            try:
                return _finish(spec, output, opened, None, t0, notes)
            finally:
                output.release_lock()
    else:
        check_output_dir(output.root, "output")
    # Ray's blocking calls turn an exception raised by a signal handler into a SystemError: from here on a
    # signal is recorded and raised by check() between them (at least once a second in the loop)
    with trap.deferred() if trap is not None else contextlib.nullcontext():
        return _run_on_ray(spec, output, opened, address=address, fresh=fresh, num_cpus=num_cpus, progress=progress,
                           trap=trap, echo=echo, limits=limits, notes=notes, keep_ray=keep_ray,
                           crash_marker=crash_marker, stop_after=stop_after, t0=t0)


def _run_on_ray(spec: SweepSpec, output: SweepOutput, opened, *, address: Optional[str], fresh: bool,
                num_cpus: Optional[int], progress: Progress, trap, echo: Callable[[str], None],
                limits: ResourceLimits, notes: List[str], keep_ray: bool, crash_marker: Optional[str],
                stop_after: Optional[int], t0: float) -> SweepResult:
    import ray

    check = trap.check if trap is not None else (lambda: None)
    started = _connect(spec, address, num_cpus)
    if trap is not None:
        trap.install()  # ray.init replaced the SIGTERM handler
    sweep = None
    finished = False
    try:
        check()
        if opened is None:
            sizes = _remote_preflight(spec, limits)
            plan = plan_sweep(spec, sizes)
            check_plan(spec, plan, limits)
            opened = _open(spec, output, plan, fresh, sizes, notes, echo)
            check()
        plan, _, pending = opened
        view = resource_view(spec, plan, ray.cluster_resources())
        reporter = _Reporter(spec.name, plan, _skipped(plan, pending), progress)
        try:
            if any(_skipped(plan, pending).values()):
                reporter.note(f"resuming {output.root}: " + ", ".join(
                    f"{v} {k} part(s)" for k, v in _skipped(plan, pending).items()) + " already written, skipped")
            sweep = _Sweep(spec, plan, output, view, reporter, crash_marker, stop_after, check)
            sweep.start(*pending)
            sweep.loop()
        except BaseException:
            if sweep is not None:
                sweep.cancel_pending()
            raise
        finally:
            reporter.close()
            if sweep is not None and (keep_ray or not started):  # Ray outlives this call: free its CPUs now
                sweep.shutdown_actors()  # (else ray.shutdown ends the job's actors, without retry noise)
        result = _finish(spec, output, opened, sweep, t0, notes)
        finished = True
        return result
    finally:
        try:
            if output.manifest:
                output.sync()
        except OSError:  # pragma: no cover - disk gone; the parts on disk stay the record
            pass
        output.release_lock()
        if started and not (keep_ray and finished):
            ray.shutdown()


def _open(spec: SweepSpec, output: SweepOutput, plan: SweepPlan, fresh: bool, sizes: Dict[str, Dict[str, Any]],
          notes: List[str], echo: Callable[[str], None]):
    """Claim the output directory for ``plan`` (its lock, then the manifest) and find what is left to do: parts that
    do not read back are dropped and recomputed."""
    _open_output(output, spec, plan, fresh, sizes, dry=True)  # refusals before the lock: nothing written
    note = output.acquire_lock()
    try:
        previous = _open_output(output, spec, plan, fresh, sizes)
        output.start(name=spec.name, spec_dict=spec.to_dict(), identity=spec.identity(),
                     spec_hash=spec.identity_hash(), layout_hash=plan.layout_hash(), plan_summary=_plan_summary(plan),
                     previous=previous)
        dropped = output.drop_unreadable_parts()
    except BaseException:
        output.release_lock()
        raise
    if note:
        notes.append(note)
    if dropped:
        notes.append(f"{output.root}: {len(dropped)} part(s) did not read back and will be recomputed: "
                     + ", ".join(dropped[:4]) + (" ..." if len(dropped) > 4 else ""))
    for line in notes:
        echo(f"note: {line}")
    done_shards = output.completed_keys("predictions")
    done_gt = output.completed_keys("ground_truth")
    pending_shards = {d.key: [s for s in d.shards if s.key not in done_shards] for d in plan.datasets}
    pending_gt = {d.key: [g for g in d.ground_truth if g.key not in done_gt] for d in plan.datasets}
    pending_top = _pending_top(spec, output, [d for d in plan.datasets if not pending_shards[d.key]])
    return plan, previous, (pending_shards, pending_gt, _pending_spectra(output, plan), pending_top)


def _pending_top(spec: SweepSpec, output: SweepOutput, units: Sequence[Any]) -> Dict[str, List[Any]]:
    """Per unit key, the fine-tunes of its predicted-best configs (``ground_truth.top``,
    :func:`ttp_ray.sweep.top.top_ground_truth`) not on disk yet; ``units``: those whose predictions are all written."""
    if not (spec.ground_truth.picks_top and units):
        return {}
    from .top import top_ground_truth

    labels = sorted({d.label for d in units})  # only these units' partitions: a unit done mid-sweep reads its own
    pred = read_table(output.root, "predictions", datasets=labels).to_pandas()
    curves = read_table(output.root, "curves", datasets=labels).to_pandas()
    done = output.completed_keys("ground_truth")
    return {d.key: [t for t in top_ground_truth(spec, d, pred, curves) if t.run.key not in done] for d in units}


def _pending_spectra(output: SweepOutput, plan: SweepPlan) -> List[str]:
    """Units (:attr:`~ttp_ray.sweep.plan.DatasetPlan.key`) whose ``spectra`` part is not on disk yet."""
    done = output.completed_keys("spectra")
    return [d.key for d in plan.datasets if f"{d.label}/{d.prefix}{SPECTRUM_PART}" not in done]


def _has_work(pending) -> bool:
    return any(pending[0].values()) or any(pending[1].values()) or bool(pending[2]) or any(pending[3].values())


def _skipped(plan: SweepPlan, pending) -> Dict[str, int]:
    return {"predictions": plan.n_shards - sum(map(len, pending[0].values())),
            "ground_truth": plan.n_ground_truth - sum(map(len, pending[1].values()))}


def _finish(spec: SweepSpec, output: SweepOutput, opened, sweep: Optional["_Sweep"], t0: float,
            notes: Sequence[str] = ()) -> SweepResult:
    plan, previous, pending = opened
    # planned parts only: OUT/ground_truth may also hold the runs of `ttp-ray tune` (parts tune-*)
    complete = ({s.key for d in plan.datasets for s in d.shards} <= output.completed_keys("predictions")
                and {g.key for d in plan.datasets for g in d.ground_truth} <= output.completed_keys("ground_truth")
                and not _pending_spectra(output, plan)
                and not (sweep is not None and (sweep.failures or sweep.top_outstanding)))
    output.sync(complete=complete)
    written = sweep.written if sweep is not None else {"predictions": 0, "ground_truth": 0}
    infos = {k: r.info for k, r in sweep.datasets.items() if r.info} if sweep is not None else {}
    return SweepResult(output.root, plan, complete, written, _skipped(plan, pending),
                       list(sweep.failures) if sweep is not None else [], infos, time.perf_counter() - t0,
                       dict(sweep.actor_nodes) if sweep is not None else {},
                       sweep.shard_seconds if sweep is not None else 0.0,
                       list(sweep.input_failures) if sweep is not None else [], list(notes))


def _open_output(output: SweepOutput, spec: SweepSpec, plan: SweepPlan, fresh: bool,
                 sizes: Dict[str, Dict[str, Any]], dry: bool = False) -> Optional[Dict[str, Any]]:
    """The manifest of the sweep ``output`` holds, if it is this one (``--fresh``: cleared, None); ``dry``: only the
    checks, nothing removed."""
    if fresh:
        if dry:
            output.check_clearable()
        else:
            output.clear()
        return None

    def relayout(old_ground_truth: Dict[str, Any]) -> str:
        """This spec's layout hash under the ground-truth selection an OUT was written with."""
        import dataclasses

        try:
            old = dataclasses.replace(spec, ground_truth=ground_truth_from_identity(old_ground_truth))
        except (TypeError, ValueError):
            return ""
        return plan_sweep(old, sizes).layout_hash()

    return output.check_compatible(spec.identity_hash(), plan.layout_hash(), spec.identity(), relayout)


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
    return ["extra work beyond the kernel (per-sample gradients of the drift and edge probes, per actor; docs/METHOD.md §14): "
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
