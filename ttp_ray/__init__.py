"""ttp-ray: predict fine-tuning training time without training (linearised NTK dynamics), swept on Ray.

What a notebook imports (loaded on first use, so ``import ttp_ray`` and the CLI stay light)::

    from ttp_ray import PredictionInputs, SimConfig, PredictSettings, get_predictor
    prepared = get_predictor("frozen").prepare(PredictionInputs("digits-cnn", "digits-5to9"))
    rows = prepared.predict([SimConfig(lr=0.01, momentum=0.9)], budget_steps=150, eps_list=[0.01])

The map of modules is docs/DESIGN.md; the equations they implement are docs/METHOD.md.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> module that defines it
    "PredictionInputs": "predictors", "Predictor": "predictors", "PreparedPredictor": "predictors",
    "PREDICTORS": "predictors", "DEFAULT_PREDICTOR": "predictors", "get_predictor": "predictors",
    "SimConfig": "dynamics", "SimOptions": "dynamics", "SimResult": "dynamics", "simulate": "dynamics",
    "PredictSettings": "predict", "PredictedConfig": "predict", "load_state": "predict",
    "KernelOptions": "kernel", "KernelState": "state",
    "max_stable_lr": "stability",
    "FinetuneConfig": "finetune", "FinetuneResult": "finetune",
    "load_dataset": "data", "build_finetune_model": "models",
    "curve_training_times": "training_time",
    "load_sweep": "analysis", "rank": "analysis", "validation_table": "analysis", "validation_metrics": "analysis",
    "pareto_front": "analysis", "ranking_metrics": "analysis",
    "SweepSpec": "sweep", "load_spec": "sweep", "run_sweep": "sweep",
    "TuneOptions": "tune", "run_tune": "tune",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ttp_ray' has no attribute {name!r}")
