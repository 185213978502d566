import numpy as np
import pytest

from ttp_ray.training_time import (curve_training_times, eps_training_time, plateau_training_time, smooth_curve,
                                   training_time)


def test_threshold_definition_algorithm1():
    steps = np.arange(0, 11)
    loss = np.array([10, 5, 3, 2, 1.5, 1.2, 1.1, 1.05, 1.02, 1.01, 1.0])
    # |L_t - L_T| < 0.25 first at t=5 (0.2); < 0.06 first at t=7 (0.05)
    assert eps_training_time(steps, loss, 0.25) == 5
    assert eps_training_time(steps, loss, 0.06) == 7
    assert eps_training_time(steps, loss, 100) == 0
    assert eps_training_time(steps, loss, 1e-9) == 10  # t = T always qualifies
    # relative: eps * (L_0 - L_T) = 0.1 * 9 = 0.9 -> first |L_t - 1| < 0.9 is t=4 (0.5)
    assert eps_training_time(steps, loss, 0.1, eps_mode="relative") == 4


def test_logged_steps_and_fraction():
    steps = np.array([0, 10, 20, 30, 40])
    vals = np.array([1.0, 0.5, 0.3, 0.21, 0.2])
    t = training_time(steps, vals, 0.05, budget=40)
    assert t.steps == 30 and t.fraction == pytest.approx(0.75)
    assert training_time(steps, vals, 0.05, budget=40, diverged=True).steps is None


def test_non_finite_curve_has_no_time():
    assert eps_training_time([0, 1, 2], [1.0, np.nan, 0.5], 0.1) is None


def test_plateau_definition():
    steps = np.arange(0, 9)
    err = np.array([0.9, 0.6, 0.4, 0.3, 0.25, 0.24, 0.235, 0.234, 0.234])
    # decrease over the last 2 steps below 0.02: err[t-2] - err[t]: t=6: 0.25-0.235=0.015 -> 6
    assert plateau_training_time(steps, err, 0.02, window=2) == 6
    assert plateau_training_time(steps, err, 1e-6, window=2) is None


def test_smoothing_is_trailing_mean():
    assert np.allclose(smooth_curve(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])


def test_curve_training_times_rows():
    rows = curve_training_times([0, 1, 2], {"loss": [1, 0.5, 0.4], "error": [0.5, 0.2, 0.2]}, [0.2, 0.01], budget=2)
    assert [(r["criterion"], r["eps"], r["steps"]) for r in rows] == [
        ("loss", 0.2, 1), ("loss", 0.01, 2), ("error", 0.2, 1), ("error", 0.01, 1)]
    with pytest.raises(ValueError, match="eps"):
        eps_training_time([0, 1], [1, 0], 0)
    with pytest.raises(ValueError, match="eps_mode"):
        eps_training_time([0, 1], [1, 0], 0.1, eps_mode="percent")
