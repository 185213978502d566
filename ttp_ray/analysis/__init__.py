"""Analysis of a sweep's output for people: rank configs, validate predictions against real fine-tunes, plot.

Two modules, re-exported here (``from ttp_ray import analysis; analysis.rank(...)``):

* :mod:`ttp_ray.analysis.metrics` -- the numbers, pandas only: :func:`load_sweep` reads ``OUT``; ranking
  (:func:`rank`, :func:`flag`), validation against the real fine-tunes (:func:`validation_table`,
  :func:`validation_metrics`), the spectrum's power-law fit (:func:`fit_spectrum`), :func:`to_jsonable`;
* :mod:`ttp_ray.analysis.plots` -- the figures (matplotlib, imported there only) and :func:`write_plots`.

``ttp-ray rank | validate | plot`` (:mod:`ttp_ray.analysis_cli`) and notebooks/analysis.ipynb are thin
layers over them. Bad input raises :class:`AnalysisError` (a ``ValueError``) naming the field and the
allowed values.
"""
from .metrics import (GROUP_KEYS, RANK_KEYS, VALIDATION_FILE, AnalysisError, SweepTables, dataset_as_str,
                      default_selection, elr_over_gd_limit, fit_spectrum, flag, fmt, load_sweep, rank, rank_display,
                      select, to_jsonable, validated_configs, validation_metrics, validation_table, write_validation)
from .plots import (PLOT_KINDS, cost_heatmap_figure, curve_figure, curves_overview_figure, safe_name,
                    spectrum_figure, t_eps_scatter_figure, write_figure, write_plots)

__all__ = [
    "AnalysisError",
    "RANK_KEYS",
    "GROUP_KEYS",
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
    "rank_display",
    "validation_table",
    "validation_metrics",
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
