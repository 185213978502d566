"""The epsilon-training-time of a loss or error curve (METHOD.md §5, supplement Algorithm 1).

One function serves real curves (from :mod:`ttp_ray.finetune`) and predicted ones (from
:mod:`ttp_ray.dynamics`), so the two are read off identically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "EPS_MODES",
    "TIME_DEFINITIONS",
    "eps_training_time",
    "plateau_training_time",
    "training_time",
    "smooth_curve",
    "TrainingTime",
    "CRITERIA",
    "curve_training_times",
]

EPS_MODES = ("absolute", "relative")
TIME_DEFINITIONS = ("threshold", "plateau")


@dataclass(frozen=True)
class TrainingTime:
    steps: Optional[int]  # None when not reached (diverged curve, or plateau never met)
    fraction: Optional[float]  # steps / budget

    def as_dict(self) -> dict:
        return {"steps": self.steps, "fraction": self.fraction}


def _threshold(values: np.ndarray, eps: float, eps_mode: str) -> float:
    if eps <= 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    if eps_mode == "absolute":
        return float(eps)
    if eps_mode == "relative":
        # epsilon relative to the curve's own drop L_0 - L_T (issue: loss scales differ across datasets)
        drop = abs(float(values[0]) - float(values[-1]))
        return float(eps) * drop
    raise ValueError(f"eps_mode: {eps_mode!r} is not one of {', '.join(EPS_MODES)}")


def smooth_curve(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` logged points (1 = no smoothing)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(values.size):
        lo = max(0, i + 1 - window)
        out[i] = (csum[i + 1] - csum[lo]) / (i + 1 - lo)
    return out


def eps_training_time(
    steps: Sequence[int],
    values: Sequence[float],
    eps: float,
    *,
    eps_mode: str = "absolute",
    smooth: int = 1,
) -> Optional[int]:
    """``T_eps = min{t : |L_t - L_T| < eps}`` over the logged steps (Algorithm 1, line 10).

    ``steps`` are the logged step indices (ascending, the last is the budget T); ``values`` the curve
    there. Returns ``None`` if the curve is empty or not finite (a diverged run has no T_eps).
    With ``eps_mode="relative"`` the threshold is ``eps * |L_0 - L_T|``.
    """
    steps = np.asarray(steps)
    v = smooth_curve(np.asarray(values, dtype=np.float64), smooth)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    thr = _threshold(v, eps, eps_mode)
    inside = np.abs(v - v[-1]) < thr
    # Algorithm 1, line 10: the first logged t with |L_t - L_T| < eps (t = T always qualifies)
    idx = int(np.argmax(inside)) if inside.any() else v.size - 1
    return int(steps[idx])


def plateau_training_time(
    steps: Sequence[int],
    values: Sequence[float],
    eps: float,
    *,
    window: int,
    eps_mode: str = "absolute",
    smooth: int = 1,
) -> Optional[int]:
    """First logged step t with ``values[t - window] - values[t] < eps``: the curve decreased by less
    than eps over the last ``window`` steps (supplement App. C, "different training time definitions").

    ``window`` is in steps; returns ``None`` when the decrease never falls below eps within the budget.
    """
    steps = np.asarray(steps)
    v = smooth_curve(np.asarray(values, dtype=np.float64), smooth)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    thr = _threshold(v, eps, eps_mode)
    for j in range(v.size):
        back = np.searchsorted(steps, steps[j] - window)
        if steps[j] - window < steps[0]:
            continue
        if v[back] - v[j] < thr:
            return int(steps[j])
    return None


def training_time(
    steps: Sequence[int],
    values: Sequence[float],
    eps: float,
    *,
    budget: int,
    definition: str = "threshold",
    eps_mode: str = "absolute",
    window: int = 0,
    smooth: int = 1,
    diverged: bool = False,
) -> TrainingTime:
    """T_eps in steps and as a fraction of the budget, by either definition (METHOD.md §5)."""
    if diverged:
        return TrainingTime(None, None)
    if definition == "threshold":
        t = eps_training_time(steps, values, eps, eps_mode=eps_mode, smooth=smooth)
    elif definition == "plateau":
        t = plateau_training_time(steps, values, eps, window=window, eps_mode=eps_mode, smooth=smooth)
    else:
        raise ValueError(f"definition: {definition!r} is not one of {', '.join(TIME_DEFINITIONS)}")
    return TrainingTime(t, None if t is None else t / float(budget))


CRITERIA = ("loss", "error")


def curve_training_times(
    steps: Sequence[int],
    curves: dict,
    eps_list: Sequence[float],
    *,
    budget: int,
    eps_mode: str = "absolute",
    definition: str = "threshold",
    window: int = 0,
    smooth: int = 1,
    diverged: bool = False,
) -> list:
    """T_eps for every criterion in ``curves`` (``{"loss": [...], "error": [...]}``) and every eps.

    Returns rows ``{"criterion", "eps", "steps", "fraction"}``; used for real and predicted curves.
    """
    rows = []
    for criterion, values in curves.items():
        for eps in eps_list:
            t = training_time(steps, values, eps, budget=budget, definition=definition, eps_mode=eps_mode,
                              window=window, smooth=smooth, diverged=diverged)
            rows.append({"criterion": criterion, "eps": float(eps), "steps": t.steps, "fraction": t.fraction})
    return rows
