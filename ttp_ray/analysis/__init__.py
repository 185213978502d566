"""Analysis of a sweep's output for people: rank configs, validate predictions against real fine-tunes, plot.

Two modules, re-exported here (``from ttp_ray import analysis; analysis.rank(...)``):

* :mod:`ttp_ray.analysis.metrics` -- the numbers, pandas only: :func:`load_sweep` reads ``OUT``; ranking
  (:func:`rank`, :func:`flag`, :func:`pareto_front`), validation against the real fine-tunes
  (:func:`validation_table`, :func:`validation_metrics`) and the quality of the ranking there
  (:func:`ranking_metrics`, :func:`ranking_summary`), the spectrum's power-law fit (:func:`fit_spectrum`),
  :func:`to_jsonable`;
* :mod:`ttp_ray.analysis.targets` -- the common target of a (dataset, loss) and the steps and cost for a
  curve to reach it (the default ranking objective);
* :mod:`ttp_ray.analysis.retime` -- T̂ε and Tε for another ε, ε mode or criterion, read off the stored curves
  (:func:`retime_predictions`, :func:`retime_ground_truth`, :func:`with_timing`);
* :mod:`ttp_ray.analysis.errors` -- :class:`AnalysisError`;
* :mod:`ttp_ray.analysis.plots` -- the figures (matplotlib, imported there only) and :func:`write_plots`.

``ttp-ray rank | validate | plot`` (:mod:`ttp_ray.analysis_cli`) and notebooks/analysis.ipynb are thin
layers over them. Bad input raises :class:`AnalysisError` (a ``ValueError``) naming the field and the
allowed values.
"""
from .errors import AnalysisError
from .metrics import (DEFAULT_RANK_KEY, GROUP_KEYS, PLATEAUS, RANK_KEYS, RANKING_GROUPS, RANKING_OBJECTIVES,
                      STEP_RANK_KEYS, TARGET_RANK_KEYS, VALIDATION_FILE, SweepTables, dataset_as_str,
                      default_selection, elr_over_gd_limit, fit_spectrum, flag, fmt, load_sweep, pareto_front, rank,
                      rank_display, ranking_metrics, ranking_summary, regime_label, select, to_jsonable,
                      validated_configs, validation_metrics, validation_table, write_validation,
                      pooled_step_time)
from .targets import TARGET_MARGIN, derive_targets, steps_to_target, with_cost_to_target
from .retime import has_timing, retime_ground_truth, retime_predictions, timing_settings, with_timing
from .plots import (PLOT_KINDS, cost_heatmap_figure, curve_figure, curves_overview_figure, safe_name,
                    spectrum_figure, t_eps_scatter_figure, write_figure, write_plots)

__all__ = [
    "AnalysisError",
    "RANK_KEYS",
    "TARGET_RANK_KEYS",
    "STEP_RANK_KEYS",
    "DEFAULT_RANK_KEY",
    "PLATEAUS",
    "TARGET_MARGIN",
    "GROUP_KEYS",
    "RANKING_GROUPS",
    "RANKING_OBJECTIVES",
    "PLOT_KINDS",
    "VALIDATION_FILE",
    "SweepTables",
    "dataset_as_str",
    "load_sweep",
    "default_selection",
    "select",
    "flag",
    "elr_over_gd_limit",
    "rank",
    "pooled_step_time",
    "pareto_front",
    "regime_label",
    "rank_display",
    "derive_targets",
    "steps_to_target",
    "with_cost_to_target",
    "timing_settings",
    "retime_predictions",
    "retime_ground_truth",
    "has_timing",
    "with_timing",
    "validation_table",
    "validation_metrics",
    "ranking_metrics",
    "ranking_summary",
    "write_validation",
    "validated_configs",
    "fit_spectrum",
    "curve_figure",
    "curves_overview_figure",
    "t_eps_scatter_figure",
    "spectrum_figure",
    "cost_heatmap_figure",
    "write_figure",
    "write_plots",
    "safe_name",
    "fmt",
    "to_jsonable",
]
