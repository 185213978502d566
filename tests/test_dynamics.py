"""Linearised dynamics (ttp_ray.dynamics) against direct torch training of an exactly linear model.

A random-feature model f(x_i) = f0_i + Phi_i w is its own linearisation, with Theta = Phi Phi^T; its
eigenpairs (torch.linalg.eigh) and sketch Z = Phi make a KernelState whose predicted curves must equal
real ``torch.optim.SGD`` runs on that model (same loss convention, same batch sampling).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ttp_ray.dynamics import (
    SimConfig,
    SimOptions,
    batch_schedule,
    curve_values,
    distinct_simulations,
    effective_batch_size,
    logged_steps,
    simulate,
    simulation_groups,
)
from ttp_ray.objectives import error_rate, loss_value
from ttp_ray.state import KernelState


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: OpenMP barriers only cost time on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_state(N=24, C=3, k=10, class_trace=False, seed=0, f0_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    rows = N if class_trace else N * C
    phi = torch.randn(rows, k, generator=g, dtype=torch.float64)
    ev, V = torch.linalg.eigh(phi @ phi.T)
    ev, V = ev.flip(0), V.flip(1)
    keep = ev > 1e-9 * ev[0]
    f0 = f0_scale * torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return KernelState(f0, y, C, ev[keep], V[:, keep], class_trace, sketch=phi), phi


def direct(state, phi, lr, mom, T, loss, schedule=None):
    """Real torch SGD on the linear model F = F0 + Phi w (w (k,) or (k, C) with class_trace)."""
    N, C = state.f0.shape
    k = phi.shape[1]
    w = torch.zeros((k, C) if state.class_trace else (k,), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=mom)
    L, E = [], []
    for t in range(T + 1):
        F = state.f0 + (phi @ w).view(N, C)
        L.append(float(loss_value(F.detach(), state.targets, loss)))
        E.append(float(error_rate(F.detach(), state.targets)))
        if t == T:
            break
        idx = torch.arange(N) if schedule is None else schedule[t]
        opt.zero_grad()
        loss_value(F[idx], state.targets[idx], loss).backward()
        opt.step()
    return np.array(L), np.array(E)


def finite(res):
    for r in res:
        assert r.steps[0] == 0 and len(r.steps) == len(r.loss) >= 1
        for a in (r.loss, r.error, r.loss_spread, r.error_spread):
            if a is not None:
                assert np.all(np.isfinite(a)), r


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------------------------------ helpers


def test_logged_steps_and_schedule():
    assert logged_steps(10, 3).tolist() == [0, 3, 6, 9, 10]
    assert logged_steps(9, 3).tolist() == [0, 3, 6, 9]
    assert logged_steps(0).tolist() == [0]
    s = batch_schedule(10, 3, 7, seed=5)
    assert s.shape == (7, 3)
    # 3 steps per epoch (drop_last), each epoch a fresh permutation: disjoint within an epoch
    for e in range(2):
        ep = s[3 * e:3 * e + 3].reshape(-1)
        assert len(set(ep.tolist())) == 9
    g = torch.Generator().manual_seed(5)
    assert torch.equal(s[:3].reshape(-1), torch.randperm(10, generator=g)[:9])
    assert torch.equal(s, batch_schedule(10, 3, 7, seed=5))
    assert not torch.equal(s, batch_schedule(10, 3, 7, seed=6))
    assert batch_schedule(10, 10, 4).shape == (4, 10)
    assert effective_batch_size(5, 30) == pytest.approx(5 * 29 / 25)
    assert effective_batch_size(5, 30, fpc=False) == 5


def test_curve_values_and_validation():
    F = torch.randn(2, 7, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    lv, ev = curve_values(F, y, "ce")
    assert torch.allclose(lv, loss_value(F, y, "ce")) and torch.allclose(ev, error_rate(F, y))
    with pytest.raises(ValueError):
        SimConfig(lr=-1.0)
    with pytest.raises(ValueError):
        SimConfig(lr=0.1, momentum=1.0)
    with pytest.raises(ValueError):
        SimOptions(method="euler")
    st, _ = make_state()
    with pytest.raises(ValueError):
        simulate(st, [SimConfig(0.01, 0.5)], 5, SimOptions(method="ode", momentum_mode="heavy_ball"))
    no_sketch = KernelState(st.f0, st.targets, st.num_classes, st.eigvals, st.eigvecs, False)
    with pytest.raises(ValueError):
        simulate(no_sketch, [SimConfig(0.01, 0.0, 4)], 5, SimOptions(method="minibatch", features="sketch"))


# ------------------------------------------------------------------------------- GD, exact maps


@pytest.mark.parametrize("ct", [False, True])
def test_mse_discrete_equals_direct_gd(ct):
    st, phi = make_state(class_trace=ct)
    ms = st.max_stable_lr()
    cfgs = [SimConfig(f * ms) for f in (0.3, 0.9)]
    res = simulate(st, cfgs, 40, SimOptions(method="discrete"))
    finite(res)
    for c, r in zip(cfgs, res):
        L, E = direct(st, phi, c.lr, 0.0, 40, "mse")
        assert rel(r.loss, L) < 1e-6
        assert np.array_equal(r.error, E)
        assert not r.diverged and r.method == "discrete" and r.momentum_mode == "elr"
        assert r.max_stable_lr == pytest.approx(2 * st.n / st.lambda_max)


@pytest.mark.parametrize("ct", [False, True])
def test_ce_discrete_equals_direct_gd(ct):
    st, phi = make_state(class_trace=ct, seed=1)
    lr = 0.6 * st.max_stable_lr()
    r = simulate(st, [SimConfig(lr, loss="ce")], 40, SimOptions(method="discrete"))[0]
    L, E = direct(st, phi, lr, 0.0, 40, "ce")
    assert rel(r.loss, L) < 1e-6
    assert np.array_equal(r.error, E)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("ct", [False, True])
def test_heavy_ball_equals_direct_momentum_sgd(loss, ct):
    st, phi = make_state(class_trace=ct, seed=2)
    lr, m = 0.5 * st.max_stable_lr(), 0.7
    r = simulate(st, [SimConfig(lr, m, loss=loss)], 40, SimOptions(method="discrete", momentum_mode="heavy_ball", log_every=3))[0]
    L, E = direct(st, phi, lr, m, 40, loss)
    assert r.steps.tolist() == logged_steps(40, 3).tolist()
    assert rel(r.loss, L[r.steps]) < 1e-6
    assert np.array_equal(r.error, E[r.steps])
    assert r.momentum_mode == "heavy_ball"


def test_elr_approximates_heavy_ball_at_small_lr():
    st, _ = make_state()
    c = SimConfig(0.02 * st.max_stable_lr(), 0.5)
    e = simulate(st, [c], 200, SimOptions(method="discrete", momentum_mode="elr"))[0]
    h = simulate(st, [c], 200, SimOptions(method="discrete", momentum_mode="heavy_ball"))[0]
    assert np.max(np.abs(e.loss - h.loss) / h.loss) < 0.02


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("ct", [False, True])
def test_ode_close_to_discrete_at_small_lr(loss, ct):
    st, _ = make_state(class_trace=ct, seed=3)
    cfgs = [SimConfig(0.005 * st.max_stable_lr(), loss=loss), SimConfig(0.01 * st.max_stable_lr(), 0.5, loss=loss)]
    o = simulate(st, cfgs, 300, SimOptions(method="ode", log_every=10))
    d = simulate(st, cfgs, 300, SimOptions(method="discrete", log_every=10))
    finite(o)
    for a, b in zip(o, d):
        assert rel(a.loss, b.loss) < 2e-3
        assert a.method == "ode"
    assert distinct_simulations(cfgs, "ode", st.n, st.lambda_max) == 1
    assert o[0].group == o[1].group


def test_ce_ode_solvers_agree():
    st, _ = make_state(seed=4)
    cfgs = [SimConfig(f * st.max_stable_lr(), 0.9, loss="ce") for f in (0.05, 0.5)]
    ref = simulate(st, cfgs, 100, SimOptions(method="ode"))  # BDF, sparse approximate Jacobian
    for solver in ("BDF", "LSODA", "RK45"):
        other = simulate(st, cfgs, 100, SimOptions(method="ode", ode_solver=solver))
        for a, b in zip(ref, other):
            assert rel(a.loss, b.loss) < 1e-4


# ------------------------------------------------------------------------------------------- SGD


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("ct,features", [(False, "eigen"), (False, "sketch"), (True, "eigen"), (True, "sketch")])
def test_minibatch_equals_direct_sgd(loss, ct, features):
    st, phi = make_state(class_trace=ct, seed=5)
    lr, m, B, T = 0.4 * st.max_stable_lr(), 0.5, 5, 30
    opts = SimOptions(method="minibatch", features=features, paths=2, seed=11)
    r = simulate(st, [SimConfig(lr, m, B, loss)], T, opts)[0]
    assert r.method == "minibatch" and r.momentum_mode == "heavy_ball" and r.paths == 2
    runs = [direct(st, phi, lr, m, T, loss, batch_schedule(st.n, B, T, seed=11 + p)) for p in range(2)]
    assert rel(r.loss, np.mean([L for L, _ in runs], 0)) < 1e-6
    assert np.allclose(r.error, np.mean([E for _, E in runs], 0))
    lo, hi = r.loss_spread
    assert np.all(lo <= r.loss + 1e-12) and np.all(r.loss <= hi + 1e-12)


@pytest.mark.parametrize("ct", [False, True])
def test_sde_noise_scale_first_step(ct):
    """For mse E[L_1] depends only on the mean and covariance of F_1: the SDE's (with the finite-
    population correction) must match the exact expectation over minibatches drawn without replacement,
    (1/2N) eta^2 (N-B)/(B(N-1)) (1/N) sum_i ||u_i - u_bar||^2 above GD (u_i: per-sample gradient in
    the eigen coordinates)."""
    st, _ = make_state(N=30, k=12, class_trace=ct, seed=6)
    N, C, B = st.n, st.num_classes, 5
    lr = 0.3 * st.max_stable_lr()
    gd = simulate(st, [SimConfig(lr)], 1, SimOptions(method="discrete"))[0]
    G0 = st.f0 - torch.nn.functional.one_hot(st.targets, C).double()
    if ct:
        u = (st.eigvecs.unsqueeze(-1) * G0.unsqueeze(1) * st.eigvals.view(1, -1, 1)).reshape(N, -1)
    else:
        u = (st.eigvecs.view(N, C, -1) * G0.unsqueeze(-1)).sum(1) * st.eigvals
    spread = float(((u - u.mean(0)) ** 2).sum() / N)
    exact = lr ** 2 * (N - B) / (B * (N - 1)) * spread / (2 * N)
    sde = simulate(st, [SimConfig(lr, 0.0, B)], 1, SimOptions(method="sde", paths=3000))[0]
    mb = simulate(st, [SimConfig(lr, 0.0, B)], 1, SimOptions(method="minibatch", paths=3000))[0]
    assert sde.loss[1] - gd.loss[1] == pytest.approx(exact, rel=0.08)
    assert mb.loss[1] - gd.loss[1] == pytest.approx(exact, rel=0.08)
    wr = simulate(st, [SimConfig(lr, 0.0, B)], 1, SimOptions(method="sde", paths=3000, fpc=False))[0]
    assert wr.loss[1] - gd.loss[1] == pytest.approx(exact * (N - 1) / (N - B), rel=0.08)


def test_sde_mean_near_minibatch_mean():
    st, _ = make_state(N=30, k=12, seed=0)
    c = SimConfig(0.2 * st.max_stable_lr(), 0.0, 5)
    sde = simulate(st, [c], 100, SimOptions(method="sde", paths=48, log_every=10))[0]
    mb = simulate(st, [c], 100, SimOptions(method="minibatch", paths=48, log_every=10))[0]
    finite([sde, mb])
    assert sde.method == "sde" and sde.loss_spread.shape == (2, len(sde.steps))
    assert np.max(np.abs(sde.loss - mb.loss) / mb.loss) < 0.2


def test_rescaled_noise_has_lower_asymptote_than_constant():
    st, _ = make_state(N=40, k=200, seed=0)  # over-parametrised: SGD drives the loss to 0
    c = SimConfig(0.2 * st.max_stable_lr(), 0.0, 5)
    res = simulate(st, [c], 150, SimOptions(method="sde", paths=8, log_every=50))[0]
    const = simulate(st, [c], 150, SimOptions(method="sde", paths=8, log_every=50, noise="constant"))[0]
    gd = simulate(st, [SimConfig(c.lr)], 150, SimOptions(log_every=50))[0]
    assert res.loss[-1] < 0.2 * const.loss[-1]
    assert gd.loss[-1] < res.loss[-1]


# ------------------------------------------------------------------------- divergence, collapse


def test_divergence_flags_and_no_nan():
    st, _ = make_state(N=30, k=12)
    ms = st.max_stable_lr()
    for loss in ("mse", "ce"):
        for method in ("discrete", "ode", "sde", "minibatch"):
            B = None if method in ("discrete", "ode") else 5
            cfgs = [SimConfig(f * ms, 0.0, B, loss) for f in (0.5, 1.01, 1.5, 10.0)]
            res = simulate(st, cfgs, 40, SimOptions(method=method, paths=3))
            finite(res)
            assert [r.diverged for r in res[1:]] == [True] * 3, (loss, method)
            if (loss, method) != ("mse", "minibatch"):  # small-batch SGD has a stricter limit
                assert not res[0].diverged
    # mse GD above the limit blows up numerically: the curve stops there
    r = simulate(st, [SimConfig(1.5 * ms)], 200, SimOptions(method="discrete"))[0]
    assert r.blew_up and r.diverged and 1 < len(r.steps) < 201 and f"blew up at step {len(r.steps)}" in r.note
    assert np.all(r.loss <= 1e3 * r.loss[0]) and r.loss[-1] > 10 * r.loss[0]
    # with momentum: 2 (1 + m) N / lambda_max
    assert simulate(st, [SimConfig(0.1, 0.5)], 1)[0].max_stable_lr == pytest.approx(3 * st.n / st.lambda_max)


def test_sgd_far_beyond_the_limit_is_reported_diverging_without_simulation():
    """The sde's substep count grows with lr; beyond SDE_SKIP_FACTOR x the limit nothing is simulated (no int64
    overflow at lr 1e6 and above), and configs inside the limit come out exactly as without those configs."""
    from ttp_ray.dynamics import SDE_SKIP_FACTOR

    st, _ = make_state(N=30, k=12)
    ms = st.max_stable_lr()
    far = [SimConfig(100 * ms, 0.0, 5, "mse"), SimConfig(100 * ms, 0.0, 5, "ce"), SimConfig(1e6, 0.0, 5),
           SimConfig(1e12, 0.0, 8, "ce"), SimConfig(1e300, 0.0, 5)]
    opts = SimOptions(method="sde", paths=3, log_every=5)
    res = simulate(st, far, 100000, opts)  # a budget an sde at these lrs could never step through
    finite(res)
    for r in res:
        assert r.diverged and not r.blew_up and list(r.steps) == [0] and r.seconds == 0.0 and r.group == -1
        assert f"beyond {SDE_SKIP_FACTOR:g} x max_stable_lr: reported diverging, not simulated" in r.note
    assert res[0].loss[0] == pytest.approx(float(loss_value(st.f0, st.targets, "mse")))
    inside = [SimConfig(f * ms, 0.0, 5, loss) for f in (0.3, 1.5) for loss in ("mse", "ce")]
    alone = simulate(st, inside, 40, opts)
    mixed = simulate(st, inside + far, 40, opts)[:len(inside)]
    for a, b in zip(alone, mixed):
        assert np.array_equal(a.steps, b.steps) and np.array_equal(a.loss, b.loss) and a.note == b.note
        assert np.array_equal(a.error, b.error) and np.array_equal(a.loss_spread, b.loss_spread)
    assert not alone[0].diverged and alone[2].diverged and not alone[2].note.endswith("not simulated")


def test_elr_fallback_to_heavy_ball():
    st, _ = make_state(N=30, k=12)
    c = SimConfig(1.0 * st.n / st.lambda_max, 0.9)  # eta_eff lambda/N = 10: ELR map unstable, heavy ball stable
    r = simulate(st, [c], 100, SimOptions(method="discrete"))[0]
    assert r.momentum_mode == "heavy_ball" and not r.diverged and "heavy ball" in r.note
    r2 = simulate(st, [c], 100, SimOptions(method="discrete", elr_fallback=False))[0]
    assert r2.momentum_mode == "elr" and r2.blew_up and r2.diverged
    finite([r, r2])
    # the sde switches to exact minibatch heavy ball (same batches as the minibatch method's paths)
    sgd = SimConfig(c.lr, 0.9, batch_size=8)
    opt = dict(paths=2, seed=3)
    r3 = simulate(st, [sgd], 60, SimOptions(method="sde", **opt))[0]
    r4 = simulate(st, [sgd], 60, SimOptions(method="minibatch", momentum_mode="heavy_ball", **opt))[0]
    assert (r3.method, r3.momentum_mode) == ("minibatch", "heavy_ball") and "sde -> exact minibatch" in r3.note
    assert np.array_equal(r3.loss, r4.loss) and not r3.diverged
    r5 = simulate(st, [sgd], 60, SimOptions(method="sde", elr_fallback=False, **opt))[0]
    assert r5.method == "sde" and r5.momentum_mode == "elr"
    finite([r3, r5])


def test_auto_simulates_sgd_exactly_unless_the_elr_is_asked_for():
    """METHOD.md §4: ``method='auto'`` steps SGD configs as exact minibatch heavy ball on the linear model (the
    same run as ``method='minibatch'``); with ``momentum_mode='elr'`` it is the paper's sde."""
    st, _ = make_state(N=30, k=12)
    sgd = SimConfig(0.3 * st.max_stable_lr(0.5), 0.5, batch_size=8, loss="ce")
    auto = simulate(st, [sgd], 40, SimOptions(paths=2, seed=1))[0]
    mb = simulate(st, [sgd], 40, SimOptions(method="minibatch", momentum_mode="heavy_ball", paths=2, seed=1))[0]
    assert (auto.method, auto.momentum_mode) == ("minibatch", "heavy_ball")
    assert np.array_equal(auto.loss, mb.loss) and np.array_equal(auto.error, mb.error)
    elr = simulate(st, [sgd], 40, SimOptions(momentum_mode="elr", paths=2, seed=1))[0]
    assert (elr.method, elr.momentum_mode) == ("sde", "elr")
    gd = simulate(st, [SimConfig(sgd.lr, 0.5, loss="ce")], 40, SimOptions())[0]
    assert gd.method == "discrete"
    finite([auto, elr, gd])


def test_collapse_equal_effective_lr():
    st, _ = make_state()
    a = 0.1 * st.max_stable_lr()
    cfgs = [SimConfig(a), SimConfig(a / 2, 0.5), SimConfig(a / 4, 0.75), SimConfig(2 * a)]
    res = simulate(st, cfgs, 30, SimOptions(method="discrete"))
    for r in res[1:3]:
        assert np.array_equal(r.loss, res[0].loss) and np.array_equal(r.error, res[0].error)
        assert r.group == res[0].group
    assert res[3].group != res[0].group
    opts = SimOptions(method="discrete")
    assert distinct_simulations(cfgs, opts, st.n, st.lambda_max) == 2
    assert simulation_groups(cfgs, opts, st.n, st.lambda_max) == [[0, 1, 2], [3]]
    assert distinct_simulations(cfgs, SimOptions(method="discrete", momentum_mode="heavy_ball"), st.n) == 4
    assert distinct_simulations(cfgs + [SimConfig(a, loss="ce")], "ode", st.n) == 2


def test_sde_time_rescaling_collapse():
    st, _ = make_state(N=30, k=12)
    a = 0.1 * st.max_stable_lr()
    cfgs = [SimConfig(a, 0.0, 4), SimConfig(2 * a, 0.0, 8), SimConfig(a, 0.5, 8)]  # eta_eff / B all a / 4
    opts = SimOptions(method="sde", fpc=False, paths=4)
    assert distinct_simulations(cfgs, opts, st.n, st.lambda_max) == 1
    r1, r2, r3 = simulate(st, cfgs, 40, opts)
    # the faster config reads the same path at tau = eta_eff t: its step t is the slower one's step 2t
    assert np.array_equal(r2.loss[:21], r1.loss[::2]) and np.array_equal(r3.loss, r2.loss)
    # with the finite-population correction the temperatures differ (B = 4 vs 8 of N = 30)
    assert distinct_simulations(cfgs[:2], SimOptions(method="sde"), st.n) == 2


# ------------------------------------------------------------------------- batching invariance


def test_vectorised_equals_one_at_a_time():
    st, _ = make_state(seed=7)
    ms = st.max_stable_lr()
    cfgs = [
        SimConfig(0.3 * ms), SimConfig(0.2 * ms, 0.6), SimConfig(0.5 * ms, loss="ce"), SimConfig(0.4 * ms, 0.3, loss="ce"),
        SimConfig(0.3 * ms, 0.0, 4), SimConfig(0.2 * ms, 0.5, 6, "ce"), SimConfig(1.5 * ms),
    ]
    for method in ("auto", "ode", "minibatch"):
        opts = SimOptions(method=method, paths=3, log_every=4)
        together = simulate(st, cfgs, 24, opts)
        finite(together)
        for c, r in zip(cfgs, together):
            alone = simulate(st, [c], 24, opts)[0]
            assert alone.method == r.method and alone.diverged == r.diverged
            assert np.allclose(alone.loss, r.loss, rtol=1e-9, atol=1e-12), (method, c)
            assert np.allclose(alone.error, r.error)


def test_lowrank_lifts_equal_exact(monkeypatch):
    import ttp_ray.dynamics as dyn

    st, _ = make_state(N=100, C=4, k=400, seed=8)
    cfgs = [SimConfig(f * st.max_stable_lr(), m) for f in (0.1, 0.4, 0.9) for m in (0.0, 0.5)]
    calls = []
    orig = dyn._compress_rows

    def spy(*a, **k):
        out = orig(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(dyn, "_compress_rows", spy)
    for method in ("discrete", "ode"):
        fast = simulate(st, cfgs, 150, SimOptions(method=method, lowrank_min_work=0))
        exact = simulate(st, cfgs, 150, SimOptions(method=method, lowrank_tol=0))
        for a, b in zip(fast, exact):
            assert np.array_equal(a.loss, b.loss) and np.array_equal(a.error, b.error)
    assert calls and all(calls)


def test_memory_cap_budget_zero_and_no_error():
    st, _ = make_state(seed=9)
    ms = st.max_stable_lr()
    cfgs = [SimConfig(0.3 * ms), SimConfig(0.2 * ms, 0.6), SimConfig(0.4 * ms, 0.3, loss="ce"), SimConfig(0.3 * ms, 0.0, 4),
            SimConfig(0.2 * ms, 0.5, 6, "ce")]
    for method in ("auto", "ode", "minibatch"):
        for mm in ("auto", "heavy_ball") if method != "ode" else ("auto",):
            base = SimOptions(method=method, momentum_mode=mm, paths=2, log_every=5)
            ref = simulate(st, cfgs, 25, base)
            tiny = simulate(st, cfgs, 25, SimOptions(method=method, momentum_mode=mm, paths=2, log_every=5, memory_mb=0.01))
            no_err = simulate(st, cfgs, 25, SimOptions(method=method, momentum_mode=mm, paths=2, log_every=5, compute_error=False))
            zero = simulate(st, cfgs, 0, base)
            for a, b, c, z in zip(ref, tiny, no_err, zero):
                assert np.allclose(a.loss, b.loss, rtol=1e-9, atol=1e-12) and np.array_equal(a.error, b.error)
                assert c.error is None and c.error_spread is None and np.allclose(a.loss, c.loss, rtol=1e-9, atol=1e-12)
                assert z.steps.tolist() == [0] and z.loss[0] == pytest.approx(a.loss[0])


# ------------------------------------------------------------------------------- moving modes, dtype


def test_modes_that_do_not_move_keep_their_start_and_batching_stays_invisible():
    """``mode_tol``: a mode with eta_eff lambda_k T / N below it keeps its coordinate at 0; each config keeps
    its own modes, so a config simulated alone or beside others (wider chunks) gives the same curve."""
    import ttp_ray.dynamics as dyn

    st, _ = make_state(N=40, C=3, k=30, class_trace=True, seed=12)
    lam = st.eigvals.clone()
    st.eigvals = lam * torch.logspace(0, -6, lam.numel(), dtype=torch.float64)  # a steep spectrum
    ms = st.max_stable_lr()
    cfgs = [SimConfig(f * ms, m, b, loss) for f in (0.01, 0.5) for m in (0.0, 0.5) for b in (None, 5)
            for loss in ("mse", "ce")]
    tol = 1e-3
    T = 30
    for method in ("auto", "minibatch", "sde"):
        kept = simulate(st, cfgs, T, SimOptions(method=method, paths=2, mode_tol=tol))
        every = simulate(st, cfgs, T, SimOptions(method=method, paths=2, mode_tol=0))
        finite(kept)
        for c, a, b in zip(cfgs, kept, every):
            alone = simulate(st, [c], T, SimOptions(method=method, paths=2, mode_tol=tol))[0]
            assert np.allclose(alone.loss, a.loss, rtol=1e-9, atol=1e-12), (method, c)
            drop = abs(b.loss[0] - b.loss[-1]) + 1e-12
            assert np.max(np.abs(a.loss - b.loss)) < 5 * tol * max(b.loss[0], drop), (method, c)
    # the small-lr configs move fewer modes than the state has
    small = dyn.resolve_plan(cfgs[0], SimOptions(), st.n, st.lambda_max).eta_eff
    ctx = dyn._Ctx(st, SimOptions(mode_tol=tol), logged_steps(T))
    assert 1 <= dyn._moving_modes(ctx, ctx.eig64.w, small, True) < st.eigvals.numel()
    ctx0 = dyn._Ctx(st, SimOptions(mode_tol=0), logged_steps(T))
    assert dyn._moving_modes(ctx0, ctx0.eig64.w, small, True) == st.eigvals.numel()
    with pytest.raises(ValueError, match="mode_tol"):
        SimOptions(mode_tol=-1)


def test_minibatch_far_beyond_the_limit_stops_once_every_path_blew_up(monkeypatch):
    """Minibatch SGD at 100x the limit is stepped (not skipped, as the sde is), but only until every path of the
    chunk has blown up, not through the whole budget: reported diverging at once. (mse: the loss grows
    geometrically there; ce's bounded gradient makes its loss grow about linearly, so it can take the budget,
    at the cost of any config of that budget: the sde's cost grew with lr, the minibatch's does not.)"""
    import ttp_ray.dynamics as dynamics

    st, _ = make_state(N=30, k=12)
    ms = st.max_stable_lr()
    steps_taken = []
    update = dynamics._sgd_update
    monkeypatch.setattr(dynamics, "_sgd_update", lambda *a: (steps_taken.append(1), update(*a))[1])
    cfgs = [SimConfig(100 * ms, m, 5, "mse") for m in (0.0, 0.9)]
    res = simulate(st, cfgs, 1_000_000, SimOptions(method="minibatch", paths=3, log_every=1))
    finite(res)
    for r in res:
        assert r.diverged and r.blew_up and len(r.steps) < 20 and "blew up at step" in r.note, r.note
    assert 0 < len(steps_taken) < 40  # (without the stop: 10^6 steps)
