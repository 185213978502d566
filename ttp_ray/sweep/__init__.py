"""The sweep engine: YAML spec -> plan -> Ray actors (one per dataset state) -> Parquet tables.

Ray is imported only by :mod:`ttp_ray.sweep.actors` and :mod:`ttp_ray.sweep.driver` (at call time);
:mod:`.spec`, :mod:`.plan`, :mod:`.preflight`, :mod:`.output` and :mod:`.work` are plain Python; the tables'
schemas are in the core module :mod:`ttp_ray.tables`. The names below are loaded on first use, so importing
a submodule (``ttp_ray.sweep.cli``, for ``ttp-ray --help``) does not import the spec's core (torch).
"""
from __future__ import annotations

from typing import Any

__all__ = ["SpecError", "SweepSpec", "load_spec", "parse_spec", "run_sweep", "dry_run", "read_table"]


def __getattr__(name: str) -> Any:
    if name in ("SpecError", "SweepSpec", "load_spec", "parse_spec"):
        from . import spec

        value = getattr(spec, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ttp_ray.sweep' has no attribute {name!r}")


def run_sweep(*args, **kwargs):
    """See :func:`ttp_ray.sweep.driver.run_sweep`."""
    from .driver import run_sweep as _run

    return _run(*args, **kwargs)


def dry_run(*args, **kwargs):
    """See :func:`ttp_ray.sweep.driver.dry_run`."""
    from .driver import dry_run as _dry

    return _dry(*args, **kwargs)


def read_table(*args, **kwargs):
    """See :func:`ttp_ray.tables.read_table`."""
    from ..tables import read_table as _read

    return _read(*args, **kwargs)
