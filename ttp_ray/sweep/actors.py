"""Ray wrappers, kept thin: every method forwards to :mod:`ttp_ray.sweep.work`.

* :class:`DatasetActor` -- holds one dataset's state for the whole sweep (restartable: a restarted actor
  reloads the state from the kernel disk cache and Ray retries the shard it was running);
* :func:`ground_truth_task` -- one real fine-tune as a Ray task with its own resources;
* :func:`preflight_task` -- dataset sizes and model check, run on the cluster when attaching to one.
"""
from __future__ import annotations

from typing import Any, Dict

import ray

from .plan import Shard
from .preflight import preflight
from .work import DatasetWork, GroundTruthJob, GroundTruthOutput, ShardOutput, WorkerJob, pick_device, run_ground_truth

__all__ = ["DatasetActor", "ground_truth_task", "preflight_task", "actor_options", "task_options"]


def _holds_gpu() -> bool:
    try:
        return len(ray.get_gpu_ids()) > 0
    except Exception:  # pragma: no cover - outside a worker
        return False


@ray.remote
class DatasetActor:
    """One dataset's kernel state, computed (or loaded) once and reused by every shard sent here."""

    def __init__(self, job: WorkerJob):
        import dataclasses

        device = pick_device(job.spec.resources.device, _holds_gpu())
        self._work = DatasetWork(dataclasses.replace(job, device=device))

    def prepare(self, with_spectrum: bool = False) -> Dict[str, Any]:
        info = self._work.info()
        info["node_id"] = ray.get_runtime_context().get_node_id()
        if with_spectrum:  # the driver writes it to OUT/spectra (not into the manifest)
            info["spectrum"] = self._work.spectrum_table()
        return info

    def predict_shard(self, shard: Shard) -> ShardOutput:
        return self._work.predict_shard(shard)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote
def ground_truth_task(job: GroundTruthJob) -> GroundTruthOutput:
    import dataclasses

    device = pick_device(job.spec.resources.device, _holds_gpu())
    return run_ground_truth(dataclasses.replace(job, device=device))


@ray.remote(num_cpus=0)
def preflight_task(spec, limits=None) -> Dict[str, Any]:
    """:func:`ttp_ray.sweep.preflight.preflight` on the cluster (where the data lives)."""
    return preflight(spec) if limits is None else preflight(spec, limits=limits)


def actor_options(cpus: float, gpus: float, max_restarts: int, max_task_retries: int,
                  spread: bool = True) -> Dict[str, Any]:
    opts: Dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": max_restarts,
                            "max_task_retries": max_task_retries}
    if spread:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def task_options(cpus: float, gpus: float, max_retries: int) -> Dict[str, Any]:
    return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": max_retries}
