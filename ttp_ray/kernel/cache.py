"""The disk cache of kernel states: :func:`kernel_state` returns the cached
:class:`~ttp_ray.state.KernelState` when a valid one exists, else computes it
(:func:`ttp_ray.kernel.estimators.compute_kernel_state`, METHOD.md §6) and stores it.

The state is keyed by a content hash of the model (its state dict, weights and buffers, head included),
the dataset fingerprint (which covers a subset), ``trainable`` and every option that changes the result
(:func:`kernel_cache_key`), and stored at ``$TTP_RAY_CACHE/kernels/<key>.pt`` (:func:`kernels_cache_dir`;
plain tensors and a JSON string, written atomically, read with ``torch.load(weights_only=True)``). The
file holds its key and a SHA-256 of its payload; a file that cannot be read, fails its checksum or holds
another key raises :class:`KernelCacheError` on load and is recomputed and rewritten (with a warning),
never trusted.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..atomic import atomic_write
from ..paths import cache_dir
from ..state import KernelState
from .estimators import compute_kernel_state
from .options import KernelOptions

__all__ = [
    "KERNEL_CACHE_VERSION",
    "KernelCacheError",
    "kernels_cache_dir",
    "kernel_cache_key",
    "kernel_cache_path",
    "save_kernel_state",
    "load_kernel_state",
    "kernel_state",
    "model_fingerprint",
]

KERNEL_CACHE_VERSION = 1
_FILE_FORMAT = "ttp-ray-kernel-state"


class KernelCacheError(ValueError):
    """A cache file cannot be trusted: unreadable, truncated, tampered with, or holding another key."""


def kernels_cache_dir() -> Path:
    """``$TTP_RAY_CACHE/kernels`` (root from :func:`ttp_ray.paths.cache_dir`)."""
    return Path(cache_dir()) / "kernels"


def model_fingerprint(model: nn.Module) -> str:
    """Content hash of a model: its class and every tensor of its state dict (weights and buffers, head included)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def kernel_cache_key(model: nn.Module, dataset: Any, options: KernelOptions, *, trainable: str = "all"
                     ) -> Tuple[str, Dict[str, Any]]:
    """Content hash (and the fields hashed) of everything that changes the state: model weights and
    buffers (head included, so the head seed too), dataset fingerprint (which covers a subset), size and
    classes, ``trainable`` and :meth:`KernelOptions.result_fields`."""
    fields_ = {
        "version": KERNEL_CACHE_VERSION,
        "model": model_fingerprint(model),
        "head_seed": getattr(model, "head_seed", None),
        "dataset": str(dataset.fingerprint()),
        "n": len(dataset),
        "num_classes": int(dataset.num_classes),
        "trainable": trainable,
        "options": options.result_fields(),
    }
    blob = json.dumps(fields_, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:40], fields_


def kernel_cache_path(key: str, root: Optional[Union[str, Path]] = None) -> Path:
    """``<root>/<key>.pt``, ``root`` defaulting to :func:`kernels_cache_dir`."""
    return Path(root) / f"{key}.pt" if root is not None else kernels_cache_dir() / f"{key}.pt"


def _payload(state: KernelState) -> Dict[str, Any]:
    meta = {k: v for k, v in state.meta.items() if k != "cache"}
    return {
        "f0": state.f0.contiguous(),
        "targets": state.targets.contiguous(),
        "eigvals": state.eigvals.contiguous(),
        "eigvecs": state.eigvecs.contiguous(),
        "sketch": None if state.sketch is None else state.sketch.contiguous(),
        "num_classes": int(state.num_classes),
        "class_trace": bool(state.class_trace),
        "meta_json": json.dumps(meta, sort_keys=True, default=str),
    }


def _checksum(payload: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(payload):
        v = payload[name]
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def save_kernel_state(state: KernelState, path: Union[str, Path], key: str) -> Path:
    """Write ``state`` with its key and payload checksum, atomically (temp file + ``os.replace``)."""
    payload = _payload(state)
    blob = {"format": _FILE_FORMAT, "version": KERNEL_CACHE_VERSION, "key": key, "checksum": _checksum(payload),
            "payload": payload}
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_kernel_state(path: Union[str, Path], key: str) -> KernelState:
    """Read a cached state, verifying format, key and checksum; raises :class:`KernelCacheError`."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a torch file
        raise KernelCacheError(f"{path.name}: unreadable ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != _FILE_FORMAT or not isinstance(blob.get("payload"), dict):
        raise KernelCacheError(f"{path.name}: not a ttp-ray kernel state file")
    if blob.get("version") != KERNEL_CACHE_VERSION:
        raise KernelCacheError(f"{path.name}: cache version {blob.get('version')} != {KERNEL_CACHE_VERSION}")
    if blob.get("key") != key:
        raise KernelCacheError(f"{path.name}: holds key {blob.get('key')!r}, expected {key!r}")
    payload = blob["payload"]
    try:
        if _checksum(payload) != blob.get("checksum"):
            raise KernelCacheError(f"{path.name}: payload checksum mismatch")
        return KernelState(
            f0=payload["f0"], targets=payload["targets"], num_classes=int(payload["num_classes"]),
            eigvals=payload["eigvals"], eigvecs=payload["eigvecs"], class_trace=bool(payload["class_trace"]),
            sketch=payload["sketch"], meta=json.loads(payload["meta_json"]),
        )
    except KernelCacheError:
        raise
    except Exception as exc:
        raise KernelCacheError(f"{path.name}: malformed payload ({type(exc).__name__})") from None


def kernel_state(model: nn.Module, dataset: Any, options: KernelOptions = KernelOptions(), *,
                 device: Union[str, torch.device] = "cpu", trainable: str = "all", cache: bool = True,
                 cache_root: Optional[Union[str, Path]] = None) -> KernelState:
    """The cached :class:`KernelState` if a valid one exists, else :func:`compute_kernel_state` (stored).

    ``meta["cache"]`` records ``hit``, ``path``, ``load_seconds`` and, on a miss, ``reason``
    (``absent``, ``disabled`` or the :class:`KernelCacheError` message: a corrupt or mismatched file is
    recomputed and overwritten, with a warning) and ``stored`` (False, with a warning, when the file
    cannot be written). ``cache_root`` defaults to :func:`kernels_cache_dir`.
    """
    if not cache:
        state = compute_kernel_state(model, dataset, options, device=device, trainable=trainable)
        state.meta["cache"] = {"hit": False, "reason": "disabled", "path": None}
        return state
    key, key_fields = kernel_cache_key(model, dataset, options, trainable=trainable)
    path = kernel_cache_path(key, cache_root)
    reason = "absent"
    if path.exists():
        t0 = time.perf_counter()
        try:
            state = load_kernel_state(path, key)
            state.meta["cache"] = {"hit": True, "path": str(path), "key": key,
                                   "load_seconds": time.perf_counter() - t0}
            return state
        except KernelCacheError as exc:
            reason = str(exc)
            warnings.warn(f"kernel cache: {reason}; recomputing", RuntimeWarning, stacklevel=2)
    state = compute_kernel_state(model, dataset, options, device=device, trainable=trainable)
    state.meta["cache_key"] = key
    state.meta["cache_key_fields"] = key_fields
    stored = True
    try:
        save_kernel_state(state, path, key)
    except OSError as exc:  # e.g. a read-only cache: the state is still right, say so and go on
        stored = False
        warnings.warn(f"kernel cache: cannot write {path} ({exc}); state not cached", RuntimeWarning, stacklevel=2)
    state.meta["cache"] = {"hit": False, "reason": reason, "path": str(path), "key": key, "stored": stored}
    return state
