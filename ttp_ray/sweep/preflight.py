"""Preflight of a sweep: every dataset's size (N, C) and the backbones, checked before any work starts.

Run by the driver before Ray starts, or, attached to a cluster, as a Ray task there
(:func:`ttp_ray.sweep.actors.preflight_task`), where the data lives. Nothing here imports Ray.
"""
from __future__ import annotations

from typing import Any, Dict

from .spec import SweepSpec

__all__ = ["preflight"]


def preflight(spec: SweepSpec, *, allow_missing: bool = False) -> Dict[str, Dict[str, Any]]:
    """Load every dataset (N, C) and every backbone, and check each dataset as each backbone takes it (user
    images adapted to its input; channels it cannot take: :class:`~ttp_ray.inputs.InputMismatchError`, one line).
    ``allow_missing`` (dry run): a paper dataset whose files are absent takes its size from
    :data:`ttp_ray.data.PAPER_DATASETS`, and the models are not loaded. Raises
    :class:`~ttp_ray.data.DatasetError` / :class:`~ttp_ray.models.ModelError`."""
    from ..data import PAPER_DATASETS, DatasetError, load_dataset

    sizes: Dict[str, Dict[str, Any]] = {}
    for entry in spec.datasets:
        try:
            ds = load_dataset(entry.ref)
            sizes[entry.label] = {"n": len(ds), "num_classes": int(ds.num_classes), "source": "loaded"}
        except DatasetError:
            if not (allow_missing and entry.is_paper):
                raise
            info = PAPER_DATASETS[entry.name]
            n = int(info["images"]) if entry.subset is None else min(int(entry.subset), int(info["images"]))
            sizes[entry.label] = {"n": n, "num_classes": int(info["classes"]),
                                  "source": "paper table (data absent)"}
    if not allow_missing:
        from ..models import load_backbone, load_dataset_for_model

        for model in spec.models:
            load_backbone(model)
            for entry in spec.datasets:
                load_dataset_for_model(entry.ref, model, adapt=entry.input)
    return sizes
