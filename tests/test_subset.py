"""Subset extrapolation (METHOD.md §7, supplement App. D): power-law fit, corrected spectrum, projection tail
constraints, closed-form curves against the dynamics, and a random-feature problem where both the subset
and the full kernel are exact."""
import json

import numpy as np
import pytest
import torch

from ttp_ray.dynamics import SimConfig, SimOptions, simulate
from ttp_ray.state import KernelState
from ttp_ray.subset import (
    SUBSET_METHOD,
    ExtrapolatedSpectrum,
    PowerLaw,
    SubsetOptions,
    corrected_exponent,
    extrapolate_projections,
    extrapolate_spectrum,
    extrapolate_state,
    fit_power_law,
    fit_tail,
    simulate_spectrum,
    state_spectrum,
)

from conftest import run_cli


# ------------------------------------------------------------------------------------------ power law

@pytest.mark.parametrize("s", [0.7, 1.3, 2.1])
def test_fit_power_law_recovers_known_exponents(s):
    rng = np.random.default_rng(0)
    k = np.arange(1, 801)
    values = 3.0 * k ** -s * np.exp(0.05 * rng.standard_normal(k.size))
    fit = fit_power_law(values, (5, 600))
    assert abs(fit.s - s) < 0.02
    assert fit.c == pytest.approx(3.0, rel=0.06)
    assert (fit.k_lo, fit.k_hi, fit.points) == (5, 600, 596)
    assert fit(np.array([10.0]))[0] == pytest.approx(fit.c * 10 ** -fit.s)


def test_fit_power_law_is_robust_to_outlying_modes():
    rng = np.random.default_rng(1)
    k = np.arange(1, 501)
    values = 2.0 * k ** -1.5 * np.exp(0.03 * rng.standard_normal(k.size))
    bad = rng.choice(np.arange(10, 60), 8, replace=False)  # a few modes far off, where the 1/k weights are large
    values[bad] *= 30.0
    robust = fit_power_law(values, (5, 400))
    plain = fit_power_law(values, (5, 400), robust=False)
    assert abs(robust.s - 1.5) < 0.03
    assert abs(robust.s - 1.5) < abs(plain.s - 1.5)


def test_corrected_exponent_is_steeper_for_a_smaller_subset():
    assert corrected_exponent(1.2, 0.1, 100, 1000) == pytest.approx(1.2 + 0.1 * 0.9)
    assert corrected_exponent(1.2, 0.1, 1000, 1000) == pytest.approx(1.2)
    fit = PowerLaw(c=2.0, s=1.2, k_lo=5, k_hi=50, rms_log_residual=0.0, points=46)
    measured = 2.0 * np.arange(1, 101) ** -1.2 * 1.1
    lam = extrapolate_spectrum(measured, 1000, n0=100, n=1000, alpha=0.1, fit=fit, head=20)
    k = np.arange(1, 1001)
    delta = 0.1 * 0.9
    np.testing.assert_allclose(lam[:20], measured[:20] * k[:20] ** -delta)  # measured head, same correction
    np.testing.assert_allclose(lam[20:], 2.0 * k[20:] ** -(1.2 + delta))  # corrected law beyond
    slope = np.polyfit(np.log(k[20:]), np.log(lam[20:]), 1)[0]
    assert slope == pytest.approx(-(1.2 + delta))  # the predicted full-set spectrum decays faster
    assert lam[0] == measured[0]  # k^-delta = 1 at k = 1: the top mode (stability limit) is the subset's


# ------------------------------------------------------------------------------------------ projections

@pytest.mark.parametrize("anchor,k0,count,mass", [(1e-3, 100, 1000, 0.05), (2e-4, 100, 4000, 0.3),
                                                  (0.01, 10, 50, 0.1), (5e-5, 100, 40000, 0.02)])
def test_tail_satisfies_continuity_and_sum(anchor, k0, count, mass):
    tail = fit_tail(anchor, k0, count, mass)
    assert not tail.clipped
    assert tail.a * k0 ** -tail.b == pytest.approx(anchor, rel=1e-10)  # continuity at k0
    k = np.arange(k0, count + 1)
    assert np.sum(tail.a * k ** -tail.b) == pytest.approx(mass, rel=1e-9)  # the sum
    assert tail.b > 0


def test_tail_clips_when_the_mass_cannot_be_carried():
    rising = fit_tail(1e-3, 100, 1000, 10.0)  # more than a flat tail holds: b < 0, both constraints still met
    assert not rising.clipped and rising.b < 0 and rising.achieved == pytest.approx(10.0)
    flat = fit_tail(1e-3, 100, 1000, 1e9)  # beyond even the steepest rising tail
    assert flat.clipped and flat.b == -4.0
    none = fit_tail(1e-3, 100, 1000, 5e-4)  # less than the anchor itself
    assert none.clipped and none.achieved == pytest.approx(1e-3, rel=1e-6)


def _noisy_projections(n0=300, seed=0):
    rng = np.random.default_rng(seed)
    k = np.arange(1, n0 + 1)
    return 0.5 * k ** -1.3 * rng.chisquare(2, n0) / 2


@pytest.mark.parametrize("rule", ["norm", "ratio"])
def test_extrapolated_projections_keep_the_head_and_meet_both_constraints(rule):
    q0 = _noisy_projections()
    total = 1.02 * q0.sum() + 0.01
    q, tail, info = extrapolate_projections(q0, 3000, total, k0=100, subset_mass=q0.sum(), tail_mass=rule)
    assert info["tail_mass_rule"] == rule
    rho = info["rho"]
    assert rho == (1.0 if rule == "norm" else pytest.approx(total / q0.sum()))
    np.testing.assert_allclose(q[:99], rho * q0[:99])  # p_hat_k = p'_k for k < k0
    assert q[99] == pytest.approx(rho * q0[99])  # continuity at k0 (anchor = p'_k0)
    assert q.sum() == pytest.approx(total, rel=1e-9)  # sum_k p_hat_k = ||Y - F0||^2 (normalised)
    assert tail.b > 0 and np.all(np.diff(q[99:]) <= 0)  # a decreasing power-law tail here
    assert not tail.clipped


def test_norm_rule_falls_back_to_ratio_when_the_head_exceeds_the_full_norm():
    q0 = _noisy_projections()
    total = 0.9 * q0[:99].sum()  # a sampling accident: the subset's head alone is above the full set's norm
    q, tail, info = extrapolate_projections(q0, 3000, total, k0=100, subset_mass=q0.sum(), tail_mass="norm")
    assert info["tail_mass_rule"] == "ratio"
    assert q.sum() == pytest.approx(total, rel=1e-9)


def test_anchor_window_averages_around_k0():
    q0 = _noisy_projections()
    q, tail, _ = extrapolate_projections(q0, 3000, q0.sum(), k0=100, anchor_window=21, tail_mass="ratio",
                                         subset_mass=q0.sum())
    assert tail.anchor == pytest.approx(q0[89:110].mean())


# ------------------------------------------------------------------------------------------ curves

def _random_state(n=24, c=3, class_trace=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = n if class_trace else n * c
    z = torch.randn(rows, 2 * rows, generator=g, dtype=torch.float64) * torch.arange(1, 2 * rows + 1) ** -0.8
    lam, vec = torch.linalg.eigh(z @ z.T)
    lam, vec = lam.flip(0)[: rows - 2], vec.flip(1)[:, : rows - 2]  # two modes dropped: a constant rest
    return KernelState(f0=0.3 * torch.randn(n, c, generator=g, dtype=torch.float64),
                       targets=torch.randint(0, c, (n,), generator=g), num_classes=c, eigvals=lam, eigvecs=vec,
                       class_trace=class_trace)


@pytest.mark.parametrize("class_trace", [True, False])
@pytest.mark.parametrize("method,mode,momentum", [("discrete", "elr", 0.0), ("ode", "elr", 0.5),
                                                  ("discrete", "heavy_ball", 0.8), ("discrete", "elr", 0.5)])
def test_spectrum_curves_match_the_dynamics(class_trace, method, mode, momentum):
    state = _random_state(class_trace=class_trace)
    cfg = SimConfig(lr=0.4 * state.max_stable_lr(momentum), momentum=momentum, loss="mse")
    opt = SimOptions(method=method, momentum_mode=mode, compute_error=False, log_every=3)
    ref = simulate(state, [cfg], 60, opt)[0]
    got = simulate_spectrum(state_spectrum(state), [cfg], 60, opt)[0]
    np.testing.assert_array_equal(got.steps, ref.steps)
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-9, atol=1e-12)
    assert got.method == ref.method and got.momentum_mode == ref.momentum_mode
    assert got.max_stable_lr == pytest.approx(ref.max_stable_lr) and got.error is None


def test_refuses_cross_entropy_and_sgd():
    sp = state_spectrum(_random_state())
    with pytest.raises(ValueError, match=r"^loss: .*mse"):
        simulate_spectrum(sp, [SimConfig(lr=0.1, loss="ce")], 10)
    with pytest.raises(ValueError, match=r"^batch_size: .*full-batch"):
        simulate_spectrum(sp, [SimConfig(lr=0.1, batch_size=4)], 10)


def test_divergence_beyond_the_predicted_stability_limit():
    sp = state_spectrum(_random_state())
    res = simulate_spectrum(sp, [SimConfig(lr=1.5 * sp.max_stable_lr())], 200)[0]
    assert res.diverged and res.blew_up and np.all(np.isfinite(res.loss))


# ------------------------------------------------------------------------------------------ random features

def _rf_state(x, r):
    x = torch.as_tensor(x)
    lam, vec = torch.linalg.eigh(x @ x.T)
    lam, vec = lam.flip(0), vec.flip(1)
    keep = lam > 1e-10 * lam[0]
    y = torch.zeros(x.shape[0], dtype=torch.long)
    f0 = torch.nn.functional.one_hot(y, 2).double() - torch.as_tensor(r)  # residual Y - F0 = r
    return KernelState(f0=f0, targets=y, num_classes=2, eigvals=lam[keep], eigvecs=vec[:, keep], class_trace=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_features_extrapolated_curve_beats_the_subset_curve(seed):
    """Theta = X X^T with power-law feature variances (d = 2N features): subset (N0 = 150) and full (N = 600)
    kernels are exact. The subset's own curve misses the slow modes beyond N0 and decays too fast; the
    extrapolated curve, on the full set's N modes, must follow the full-kernel curve more closely (mean
    |log10 L_hat / L| over log-spaced t while L > 1e-3 L_0)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    n, n0, d = 600, 150, 1200
    j = np.arange(1, d + 1)
    x = rng.standard_normal((n, d)) * j ** -0.75
    r = x @ (rng.standard_normal((d, 2)) * j[:, None] ** -0.25) + 0.05 * rng.standard_normal((n, 2))
    full = _rf_state(x, r)
    idx = rng.choice(n, n0, replace=False)
    sub = _rf_state(x[idx], r[idx])
    fs, ns = state_spectrum(full), state_spectrum(sub)
    ex = extrapolate_state(sub, full.f0, full.targets)  # default options
    assert isinstance(ex, ExtrapolatedSpectrum) and ex.eigvals.size == n and ex.n0 == n0
    assert ex.projections.sum() == pytest.approx(fs.projections.sum() + fs.rest, rel=1e-9)  # the known norm
    assert ex.exponent > ex.eig_fit.s
    lr = 1.0 / fs.lambda_max
    steps = np.unique(np.geomspace(1, 1e7, 200).astype(int))
    lf = fs.loss_fn(lr, method="ode")(steps)
    keep = lf >= 1e-3 * lf[0]

    def err(sp):
        lv = sp.loss_fn(lr, method="ode")(steps)[keep]
        return float(np.mean(np.abs(np.log10(np.maximum(lv, 1e-300) / lf[keep]))))

    assert err(ex) < 0.85 * err(ns)


def test_extrapolate_state_validates_sizes():
    state = _random_state(n=24)
    with pytest.raises(ValueError, match="^kernel_subset:"):
        extrapolate_state(state, state.f0, state.targets)  # N0 == N
    f0 = torch.zeros(30, 4)
    with pytest.raises(ValueError, match="^full_f0:"):
        extrapolate_state(state, f0, torch.zeros(30, dtype=torch.long))
    with pytest.raises(ValueError, match="^alpha:"):
        SubsetOptions(alpha=-0.1)


# ------------------------------------------------------------------------------------------ predict + CLI

def test_predict_subset_rows(digits_5to9):
    from ttp_ray.kernel import KernelOptions
    from ttp_ray.predict import PredictSettings, load_subset_state, predict_subset_grid

    ps = load_subset_state("digits-cnn", digits_5to9, 120, KernelOptions(k=256))
    assert ps.n == len(digits_5to9) and ps.spectrum.n0 == 120 and ps.state.n == 120
    cfgs = [SimConfig(lr=f * ps.max_stable_lr(), loss="mse") for f in (0.3, 0.6)]
    out = predict_subset_grid(ps, cfgs, budget_steps=100, eps_list=[0.05, 0.01],
                              settings=PredictSettings(eps_mode="relative"))
    rows = [r for p in out for r in p.rows]
    assert len(rows) == 4 and {r["criterion"] for r in rows} == {"loss"}
    assert all(r["method"] == SUBSET_METHOD and r["kernel_subset"] == 120 and r["dynamics"] == "discrete" for r in rows)
    assert all(r["predicted_steps"] is not None and r["batch_size"] == len(digits_5to9) for r in rows)
    assert out[0].result.loss[0] == pytest.approx(float(((ps.spectrum.projections.sum()) / 2)))
    with pytest.raises(ValueError, match="^criteria:"):
        predict_subset_grid(ps, cfgs, budget_steps=10, eps_list=[0.1], settings=PredictSettings(criteria=("error",)))


def test_cli_predict_kernel_subset(capsys):
    code, out, err = run_cli(["predict", "--dataset", "digits-5to9", "--loss", "mse", "--lr", "0.005", "--steps", "40",
                              "--kernel-subset", "120", "--k", "256", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["method"] == SUBSET_METHOD and d["kernel_subset"]["kernel_subset"] == 120 and d["n"] == 896
    assert d["final_error"] is None and [t["criterion"] for t in d["training_times"]] == ["loss"]
    code, out, err = run_cli(["predict", "--dataset", "digits-5to9", "--lr", "0.005", "--steps", "40",
                              "--kernel-subset", "120", "--k", "256"], capsys)
    assert code == 2 and err.startswith("error: loss:")
    code, out, err = run_cli(["predict", "--dataset", "digits-5to9", "--loss", "mse", "--lr", "0.005",
                              "--kernel-subset", "5000"], capsys)
    assert code == 2 and err.startswith("error: kernel_subset:")
