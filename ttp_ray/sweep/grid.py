"""A spec file's YAML and its grid's size, read without validating or expanding anything (and without importing
torch): what the CLI needs to refuse a huge grid at once. :mod:`ttp_ray.sweep.spec` validates the rest."""
from __future__ import annotations

from pathlib import Path
import math
from typing import Any, Dict, Mapping, Union

__all__ = ["SpecError", "read_spec", "grid_axes", "grid_size_text", "AXES"]

AXES = ("datasets", "model", "losses", "lr", "momentum", "batch_size")  # the grid: their product of configs
_LIST_KEYS = ("values", "absolute", "fraction_of_max_stable")  # lr: {KEY: [...]} (spec_types.LR_MODES and values)


class SpecError(ValueError):
    """An invalid sweep spec; the message is one line: ``<field>: <problem>; allowed: <values>``."""


def read_spec(path: Union[str, Path]) -> Any:
    """The YAML of a spec file (``yaml.safe_load``), not yet validated; a missing file or bad YAML is a SpecError."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec: file {p} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SpecError(f"spec: {p} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec: cannot read {p}: {type(exc).__name__}") from None


def grid_axes(data: Any) -> Dict[str, int]:
    """The length of every axis of a spec's grid, read off its YAML form without expanding anything (a
    ``{geomspace: [lo, hi, count]}`` counts ``count``); an axis that does not parse counts 1 (:func:`~ttp_ray.sweep.spec.parse_spec`
    reports it). The grid has the product of these lengths configs, so a huge grid is refused before it exists."""
    if not isinstance(data, Mapping):
        return {}

    def length(value: Any) -> int:
        if isinstance(value, Mapping) and len(value) == 1:
            key, inner = next(iter(value.items()))
            if key in ("geomspace", "linspace"):
                try:
                    return max(1, int(float(inner[2])))
                except (TypeError, ValueError, IndexError, OverflowError):
                    return 1
            if key in _LIST_KEYS:
                return length(inner)
        if isinstance(value, (list, tuple)):
            return max(1, len(value))
        return 1

    return {axis: length(data.get(axis)) for axis in AXES}


def grid_size_text(axes: Mapping[str, int], max_configs: int) -> str:
    """What ``--dry-run`` prints of a grid too large to expand: its size, from the axes' lengths alone."""
    total = math.prod(axes.values())
    return (f"grid: {total} configs = " + " x ".join(f"{k} {v}" for k, v in axes.items())
            + f"; the limit is {max_configs} (--max-configs): not expanded")
