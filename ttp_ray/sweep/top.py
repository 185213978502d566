"""The predicted-best configs of a dataset, fine-tuned for real (``ground_truth.top``; METHOD.md §12).

A ground-truth selection fixed in advance (``every``, ``max_configs``, ``where``) rarely holds the config the
ranking puts first, and then the ranking's top-1 regret is measured among configs nobody would launch. With
``ground_truth.top`` = K the driver also fine-tunes, once a dataset's predictions are all written, the K configs
per (dataset, loss) that :func:`ttp_ray.analysis.rank` orders first by its default objective (predicted cost to
the common target of the first criterion, which does not depend on ε; the first ε only picks the rows). The
choice is a function of the written predictions alone, so a resumed sweep chooses the same configs and skips the
runs already on disk.

pandas only; the driver (:mod:`ttp_ray.sweep.driver`) submits the runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import pandas as pd

from .plan import DatasetPlan, GroundTruthRun
from .spec import SweepSpec

__all__ = ["TopRun", "top_ground_truth"]


@dataclass(frozen=True)
class TopRun:
    """A fine-tune of a predicted-best config, with the lr and limit its prediction row resolved."""

    run: GroundTruthRun
    lr: float  # absolute lr of the prediction row (fractions resolved on the dataset's kernel)
    max_stable_lr: float  # of the dataset's kernel, for the ground-truth row
    rank: int  # its place in the (dataset, loss)'s ranking, 1 = predicted best


def top_ground_truth(spec: SweepSpec, unit: DatasetPlan, pred: pd.DataFrame, curves: pd.DataFrame) -> List[TopRun]:
    """The runs of the ``spec.ground_truth.top`` predicted-best configs of ``unit`` per loss, not already among
    its planned runs (``unit.ground_truth``), best first; ``pred`` / ``curves``: the sweep's prediction and curve
    tables (any datasets; this unit's rows are picked). Configs flagged (never reaching the target, diverging)
    are not chosen: fewer than K come back when fewer are ranked."""
    from .. import analysis

    k = spec.ground_truth.top
    if not spec.ground_truth.picks_top or not len(pred):
        return []
    by_id = {c.config_id: c for c in unit.configs}
    pred = pred[(pred.dataset.astype(str) == unit.label) & pred.config_id.isin(list(by_id))]
    if not len(pred):
        return []
    if len(curves):
        curves = curves[(curves.dataset.astype(str) == unit.label) & curves.config_id.isin(list(by_id))]
    ranked = analysis.rank(pred, curves=curves, criterion=spec.criteria[0], eps=spec.eps[0])
    ranked = ranked[ranked["rank"].notna()]
    planned = {g.key for g in unit.ground_truth}
    seeds: Sequence[int] = spec.ground_truth.seeds
    runs: List[TopRun] = []
    for _, group in ranked.groupby("loss", sort=True):
        for place, row in enumerate(group.sort_values("rank").head(k).itertuples(), start=1):
            config = by_id[row.config_id]
            # the seed only orders minibatches: a full-batch config runs once (as _select_ground_truth)
            for seed in (seeds if config.batch_size is not None else seeds[:1]):
                run = GroundTruthRun(config, seed)
                if run.key not in planned:
                    runs.append(TopRun(run, float(row.lr), float(row.max_stable_lr), place))
    return runs
