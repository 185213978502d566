"""The tables of a sweep's output: one table = one fixed Parquet schema; rows are dicts; unknown keys are an error.

Four tables (:data:`TABLES`), each with its schema in :data:`SCHEMAS`:

* ``predictions`` (:data:`PREDICTION_SCHEMA`): one row per (config, criterion, ε) predicted on a kernel state;
* ``ground_truth`` (:data:`GROUND_TRUTH_SCHEMA`): one row per (config, criterion, ε, seed) fine-tuned for real;
* ``curves`` (:data:`CURVE_SCHEMA`): the predicted and real curves, long (one row per logged step);
* ``spectra`` (:data:`SPECTRUM_SCHEMA`): the eigenvalues of a dataset's Θ and the residual's projections.

:func:`as_table` turns rows (dicts) into a table of one schema: a key the schema lacks raises
:class:`ValueError` naming the table and the keys (a column is never dropped silently); a column a row
lacks is null. :func:`curve_table` builds the long curve table from per-curve arrays. :func:`read_table`
reads every part of a table under a sweep's output directory (``OUT/<table>/dataset=<label>/part-*.parquet``)
with its ``dataset`` column from the partition path, and :func:`read_manifest` reads ``OUT/manifest.json``.
Writing, resume and the rest of the directory's bookkeeping live in :mod:`ttp_ray.sweep.output`.

The row builders (:func:`prediction_rows`, :func:`ground_truth_rows`) live here, beside the schemas they fill.
pyarrow and numpy only: nothing here imports Ray, torch or pandas.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import pyarrow as pa

from .training_time import curve_training_times

__all__ = [
    "TABLES",
    "PREDICTION_SCHEMA",
    "GROUND_TRUTH_SCHEMA",
    "CURVE_SCHEMA",
    "SPECTRUM_SCHEMA",
    "SCHEMAS",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "ManifestError",
    "as_table",
    "prediction_rows",
    "ground_truth_rows",
    "curve_table",
    "read_table",
    "read_manifest",
]

TABLES = ("predictions", "ground_truth", "curves", "spectra")
MANIFEST = "manifest.json"  # OUT/manifest.json: the sweep's spec, versions and what is complete
MANIFEST_FORMAT = "ttp-ray-sweep"  # its "format" field

_CONFIG_FIELDS = [
    ("config_id", pa.string()),
    ("model", pa.string()),
    ("loss", pa.string()),
    ("lr", pa.float64()),
    ("lr_fraction", pa.float64()),  # null for absolute lr grids
    ("momentum", pa.float64()),
    ("batch_size", pa.int64()),  # B actually used (N for full batch)
    ("full_batch", pa.bool_()),
    ("effective_lr", pa.float64()),  # lr / (1 - momentum)
    ("criterion", pa.string()),
    ("eps", pa.float64()),
    ("eps_mode", pa.string()),
    ("budget_steps", pa.int64()),
    ("n", pa.int64()),  # dataset size
    ("max_stable_lr", pa.float64()),  # 2(1+m)N/lambda_max of the dataset's kernel
]

PREDICTION_SCHEMA = pa.schema(_CONFIG_FIELDS + [
    ("predicted_steps", pa.int64()),  # null when not reached (diverged)
    ("predicted_fraction", pa.float64()),
    ("diverged", pa.bool_()),
    ("predicted_final_loss", pa.float64()),
    ("predicted_final_error", pa.float64()),
    ("step_time_s", pa.float64()),  # measured for (model, dataset, B, loss) on the actor's device
    ("predicted_cost_s", pa.float64()),  # predicted_steps * step_time_s; null when not reached
    ("predicted_steps_low", pa.int64()),  # the interval of T̂ε (drift-aware predictor; docs/METHOD.md §14); null otherwise
    ("predicted_steps_high", pa.int64()),
    ("elr_over_gd_limit", pa.float64()),  # the regime: eta/(1-m) over the plain-GD limit 2N/lambda_max
    ("predicted_drift", pa.float64()),  # the kernel's predicted drift s at the end of the run (Θ_T ~ s Θ0); null: frozen
    ("drift_beyond_probes", pa.float64()),  # e-folds of loss the predicted curve goes below every probe's lowest level (s held there, not measured; docs/METHOD.md §14); 0: within; null: not probed
    ("extra_gradients", pa.int64()),  # per-sample gradients the predictor spent beyond Θ0 for this (dataset, model, loss)
    ("limit_from", pa.string()),  # which lambda_max the limit is from: 'class-trace kernel' | 'full kernel' | 'extrapolated spectrum'
    ("method", pa.string()),
    ("momentum_mode", pa.string()),
    ("dynamics", pa.string()),  # subset extrapolation only: 'discrete' | 'ode'; null otherwise
    ("kernel_subset", pa.int64()),  # subset extrapolation only: N0, the subset the kernel is on
    ("subset_alpha", pa.float64()),  # subset extrapolation only: the projections' power-law exponent
    ("kernel_seconds", pa.float64()),  # wall time of computing the kernel state (whenever it was)
    ("kernel_cache_hit", pa.bool_()),
    ("simulate_seconds", pa.float64()),
    ("device", pa.string()),
    ("shard", pa.string()),
])

GROUND_TRUTH_SCHEMA = pa.schema(_CONFIG_FIELDS + [
    ("seed", pa.int64()),
    ("actual_steps", pa.int64()),  # null when not reached (diverged)
    ("actual_fraction", pa.float64()),
    ("diverged", pa.bool_()),
    ("actual_final_loss", pa.float64()),
    ("actual_final_error", pa.float64()),
    ("step_time_s", pa.float64()),
    ("actual_cost_s", pa.float64()),
    ("train_seconds", pa.float64()),
    ("device", pa.string()),
    # the last logged step of the real curve: budget_steps for a whole run, fewer when it diverged or was stopped
    # early (ttp_ray.tune: at its predicted budget or its target; T_eps is then null); null in older parts
    ("last_step", pa.int64()),
])

CURVE_SCHEMA = pa.schema([
    ("config_id", pa.string()),
    ("source", pa.string()),  # 'predicted' | 'actual'
    ("seed", pa.int64()),  # ground-truth seed; null for predicted curves
    ("step", pa.int64()),
    ("loss", pa.float64()),
    ("error", pa.float64()),
])

SPECTRUM_SCHEMA = pa.schema([
    ("kind", pa.string()),  # 'kernel' (the dataset's Theta) | 'subset_kernel' and 'extrapolated' (kernel.subset)
    ("k", pa.int64()),  # 1-based mode index, eigenvalues descending
    ("eigenvalue", pa.float64()),  # lambda_k of Theta = J J^T (not divided by N; state.py's convention)
    ("projection", pa.float64()),  # p_k = ||v_k^T (Y - F0)||^2, summed over classes with the class-trace kernel
    ("n", pa.int64()),  # samples of the set this kernel is on (N, or N0 for 'subset_kernel')
    ("num_classes", pa.int64()),
    ("class_trace", pa.bool_()),
    ("model", pa.string()),  # the backbone whose kernel this is (null in parts written before the column existed)
])

SCHEMAS = {"predictions": PREDICTION_SCHEMA, "ground_truth": GROUND_TRUTH_SCHEMA, "curves": CURVE_SCHEMA,
           "spectra": SPECTRUM_SCHEMA}


class ManifestError(ValueError):
    """``OUT/manifest.json`` exists but is not a ttp-ray sweep manifest (``readable``: whether it is JSON)."""

    def __init__(self, message: str, readable: bool):
        super().__init__(message)
        self.readable = readable


def as_table(rows: Sequence[Dict[str, Any]], table: str) -> pa.Table:
    """Rows (dicts) as a table of the fixed schema of ``table``: a key the schema lacks is a
    :class:`ValueError` naming the table and the keys; a column a row lacks is null."""
    schema = SCHEMAS[table]
    unknown = sorted({k for r in rows for k in r} - set(schema.names))
    if unknown:
        raise ValueError(f"{table}: row keys not in the table's schema: {', '.join(unknown)}")
    columns = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def curve_table(curves: Sequence[Dict[str, Any]]) -> pa.Table:
    """The long curve table from per-curve arrays: each item has ``config_id``, ``source``, ``seed``
    (None for predicted curves), ``steps``, ``loss`` and ``error`` (None when not computed)."""
    import numpy as np

    lengths = [len(c["steps"]) for c in curves]
    total = int(sum(lengths))

    def repeat(key, typ):
        return pa.array([c[key] for c, k in zip(curves, lengths) for _ in range(k)], type=typ)

    def concat(key):
        parts = [np.full(k, np.nan) if c[key] is None else np.asarray(c[key], dtype=np.float64)
                 for c, k in zip(curves, lengths)]
        values = np.concatenate(parts) if parts else np.zeros(0)
        return pa.array(values, type=pa.float64(), from_pandas=True)  # NaN (no error curve) -> null

    steps = np.concatenate([np.asarray(c["steps"], dtype=np.int64) for c in curves]) if curves else np.zeros(0, np.int64)
    cols = [repeat("config_id", pa.string()), repeat("source", pa.string()), repeat("seed", pa.int64()),
            pa.array(steps, type=pa.int64()), concat("loss"), concat("error")]
    assert all(len(c) == total for c in cols)
    return pa.Table.from_arrays(cols, schema=CURVE_SCHEMA)


def read_table(root: Union[str, Path], table: str, columns: Optional[List[str]] = None,
               datasets: Optional[Sequence[str]] = None) -> pa.Table:
    """All parts of ``table`` under ``root`` with the ``dataset`` column from the partition path (columns a
    part lacks, e.g. one written before the column existed, are null); ``datasets``: only those partitions."""
    base = Path(root) / table
    schema = SCHEMAS[table].append(pa.field("dataset", pa.string()))
    if not base.is_dir():
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    import pyarrow.dataset as pads  # here only: its import costs more than the rest of the tables

    ds = pads.dataset(str(base), format="parquet", schema=schema,
                      partitioning=pads.partitioning(pa.schema([("dataset", pa.string())]), flavor="hive"),
                      exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    where = None if datasets is None else pads.field("dataset").isin(list(datasets))
    return ds.to_table(columns=columns, filter=where)


def read_manifest(root: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The manifest of the sweep directory ``root`` (a dict), or None when ``root`` has no ``manifest.json``;
    :class:`ManifestError` when it is not readable JSON or not a ttp-ray sweep manifest."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ManifestError(f"{path} is not readable JSON", readable=False) from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a ttp-ray sweep manifest", readable=True)
    return m


def prediction_rows(res, n: int, budget_steps: int, eps_list: Sequence[float], settings,
                    extra: Optional[Dict[str, object]] = None) -> List[Dict[str, object]]:
    """The T̂ε rows of one predicted curve (a :class:`~ttp_ray.dynamics.SimResult`; one row per criterion and eps,
    read as :class:`~ttp_ray.predict.PredictSettings` ``settings`` says): the columns every predictor shares,
    plus ``extra`` (a predictor's own columns, e.g. the subset's ``kernel_subset``). The sweep adds its
    columns (``config_id``, cost, ...) before :func:`as_table`."""
    c = res.config
    curves = {"loss": res.loss, "error": res.error}
    curves = {k: v for k, v in curves.items() if k in settings.criteria and v is not None}
    times = curve_training_times(res.steps, curves, eps_list, budget=budget_steps, eps_mode=settings.eps_mode,
                                 definition=settings.definition, window=settings.window, diverged=res.diverged)
    final_loss = None if res.diverged else float(res.loss[-1])
    final_error = None if res.diverged or res.error is None else float(res.error[-1])
    own = dict(res.extras.get("row_fields", {}))  # per-config columns a predictor adds (e.g. predicted_drift)
    halfwidth = res.extras.get("interval_log_halfwidth")  # T̂ε interval: T̂ε exp(±w), within [0, budget]
    rows = []
    for t in times:
        interval = {}
        if halfwidth is not None and t["steps"] is not None:
            interval = {"predicted_steps_low": int(math.floor(t["steps"] * math.exp(-halfwidth))),
                        "predicted_steps_high": int(min(budget_steps, math.ceil(t["steps"] * math.exp(halfwidth))))}
        rows.append({
            "loss": c.loss, "lr": float(c.lr), "momentum": float(c.momentum),
            "batch_size": int(c.batch_size) if c.batch_size is not None and c.batch_size < n else n,
            "effective_lr": float(c.effective_lr), "criterion": t["criterion"], "eps": t["eps"],
            "eps_mode": settings.eps_mode, "budget_steps": int(budget_steps),
            "predicted_steps": t["steps"], "predicted_fraction": t["fraction"],
            "diverged": bool(res.diverged), "predicted_final_loss": final_loss,
            "predicted_final_error": final_error, "max_stable_lr": float(res.max_stable_lr),
            "method": res.method, "momentum_mode": res.momentum_mode, "simulate_seconds": float(res.seconds),
            "elr_over_gd_limit": float(c.effective_lr) * (1.0 + float(c.momentum)) / float(res.max_stable_lr),
            **own, **interval, **(extra or {}),
        })
    return rows

def ground_truth_rows(run, times: Sequence[Dict[str, Any]], columns: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The T_ε rows of one real fine-tune (a :class:`~ttp_ray.finetune.FinetuneResult`; ``times`` from
    :func:`~ttp_ray.training_time.curve_training_times`, one row each): the config's ``columns``, then what the
    run measured (``actual_final_*``: at its last logged step, ``last_step``)."""
    final_loss = None if run.diverged or not len(run.loss) else float(run.loss[-1])
    final_error = None if run.diverged or not len(run.error) else float(run.error[-1])
    last = int(run.steps[-1]) if len(run.steps) else None
    return [{**columns, "criterion": t["criterion"], "eps": t["eps"], "actual_steps": t["steps"],
             "actual_fraction": t["fraction"], "diverged": bool(run.diverged), "actual_final_loss": final_loss,
             "actual_final_error": final_error, "step_time_s": run.step_time_s,
             "actual_cost_s": None if t["steps"] is None else t["steps"] * run.step_time_s,
             "train_seconds": run.train_seconds, "last_step": last} for t in times]
