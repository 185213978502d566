"""The step time of a config, for predicted costs (``T̂ε × step time``): measured once per (model, timed batch,
loss, device) on at most ``max_batch`` samples, scaled linearly to the batch size asked, and cached on disk beside
the kernel states (``$TTP_RAY_CACHE/kernels/step-times/<key>.json``), so ``ttp-ray predict`` and every sweep
actor on the same machine time a backbone once, not one epoch per call.

The key holds what changes the figure: the model's content hash (:func:`ttp_ray.kernel.model_fingerprint`), the
sample shape, the timed batch, loss, ``trainable``, the device (and its name), the host, torch's thread count and
version. A file that cannot be read or holds another key is measured again and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import platform
import socket
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .atomic import atomic_write
from .data import ImageDataset
from .finetune import measure_step_time
from .kernel import kernels_cache_dir, model_fingerprint
from .models import FinetuneModel

__all__ = ["STEP_TIME_MAX_BATCH", "STEP_TIME_STEPS", "step_time", "step_time_path"]

STEP_TIME_MAX_BATCH = 256  # a batch above this is timed at this size and scaled linearly
STEP_TIME_STEPS = 3  # timed steps (after one warm-up step); their median is kept


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _key(model: FinetuneModel, dataset: ImageDataset, timed: int, loss: str, device: str, trainable: str,
         steps: int) -> str:
    fields = {
        "model": model_fingerprint(model), "sample": list(dataset.images(torch.arange(1)).shape[1:]),
        "timed_batch": int(timed), "loss": loss, "trainable": trainable, "steps": int(steps),
        "device": str(device), "device_name": _device_name(device), "host": socket.gethostname(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


def step_time_path(key: str) -> Path:
    """Where the step time of ``key`` is cached."""
    return kernels_cache_dir() / "step-times" / f"{key}.json"


def _read(path: Path, key: str) -> Optional[float]:
    try:
        d: Dict[str, Any] = json.loads(path.read_text())
        seconds = float(d["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return seconds if d.get("key") == key and seconds > 0 else None


def step_time(model: FinetuneModel, dataset: ImageDataset, batch_size: Optional[int], loss: str = "ce", *,
              device: str = "cpu", trainable: str = "all", max_batch: int = STEP_TIME_MAX_BATCH,
              steps: int = STEP_TIME_STEPS, cache: bool = True) -> float:
    """Seconds per SGD step (forward + backward + update) at batch size ``batch_size`` (None: N) on ``device``:
    the median of ``steps`` steps at ``min(B, max_batch)`` samples (:func:`ttp_ray.finetune.measure_step_time`),
    times ``B / min(B, max_batch)``; read from the disk cache when this machine has timed it before."""
    n = len(dataset)
    b = n if batch_size is None else min(int(batch_size), n)
    timed = max(1, min(b, int(max_batch)))
    seconds = None
    path = None
    if cache:
        key = _key(model, dataset, timed, loss, str(device), trainable, steps)
        path = step_time_path(key)
        seconds = _read(path, key) if path.exists() else None
    if seconds is None:
        seconds = measure_step_time(model, dataset, timed, loss, device=device, steps=steps, trainable=trainable)
        if path is not None:
            blob = json.dumps({"key": key, "seconds": seconds, "timed_batch": timed, "steps": steps})
            try:
                atomic_write(path, lambda tmp: tmp.write_text(blob))
            except OSError:  # a read-only cache: the figure is still right
                pass
    return seconds * b / timed
