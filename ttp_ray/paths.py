"""Where ttp-ray keeps its files: :func:`cache_dir`, the root ``$TTP_RAY_CACHE`` under which the datasets
(:func:`ttp_ray.data.data_dir`, unless ``$TTP_RAY_DATA``), the pre-trained backbones
(:mod:`ttp_ray.models`) and the kernel states (:mod:`ttp_ray.kernel.cache`) are cached.

It imports nothing from the package, so every module may import it (data.py and models.py both do,
without importing each other for it).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Root of ttp-ray's caches: ``$TTP_RAY_CACHE`` or the user cache dir (``~/.cache/ttp-ray``)."""
    env = os.environ.get("TTP_RAY_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ttp-ray"
