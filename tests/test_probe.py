"""The drift-aware default predictor (ttp_ray.probe, predictors.ProbedWarp; docs/METHOD.md §14)."""
import math

import numpy as np
import pytest
import torch

from ttp_ray.dynamics import SimConfig, SimOptions, simulate
from ttp_ray.kernel import KernelOptions
from ttp_ray.predict import PredictSettings
from ttp_ray.predictors import DEFAULT_PREDICTOR, PredictionInputs, get_predictor
import ttp_ray.probe as pb
from ttp_ray.probe import ProbedDrift, ProbeOptions, ProbeRun, batch_quadratic, probe_drift, run_probe, warp_result

KERNEL = KernelOptions(k=256)


@pytest.fixture(scope="module")
def small(digits_5to9):
    return digits_5to9.subset(128, seed=0)


@pytest.fixture(scope="module")
def frozen(small):
    return get_predictor("frozen").prepare(PredictionInputs("digits-cnn", small, KERNEL))


def _flat(scale, elrs=(1.0,)):
    return ProbedDrift(loss="mse", effective_lrs=np.array(elrs, dtype=float), levels=[np.array([0.01, 10.0])] * len(elrs),
                       scales=[np.array([s, s], dtype=float) for s in np.atleast_1d(scale)])


def test_default_is_the_probed_predictor_with_bounded_work():
    p = get_predictor()
    assert DEFAULT_PREDICTOR == "probed" and p.name == "probed" and p.fallback is None
    assert 0 < p.probe.work_epochs <= 10  # the bound: at most 10 N per-sample gradients per (dataset, loss)
    with pytest.raises(ValueError, match=r"^work_epochs: must be in \(0, 10\]"):
        ProbeOptions(work_epochs=12)
    with pytest.raises(ValueError, match=r"^probes: lr fraction"):
        ProbeOptions(probes=((0.9, 1.5),))
    with pytest.raises(ValueError, match=r"^edge_factor:"):
        get_predictor("probed", edge_factor=0.5)
    assert get_predictor("probed", probe={"work_epochs": 3}).probe.work_epochs == 3  # YAML mapping -> dataclass


def test_batch_quadratic_is_the_kernel_quadratic_form(frozen):
    state = frozen.state
    idx = torch.arange(0, 40, 3)
    G = torch.randn(len(idx), state.num_classes, dtype=torch.float64)
    theta = (state.eigvecs * state.eigvals.clamp_min(0)) @ state.eigvecs.T  # Θ_N from its eigenpairs
    want = float(sum(G[:, c] @ theta[idx][:, idx] @ G[:, c] for c in range(state.num_classes)))
    assert batch_quadratic(state)(idx, G) == pytest.approx(want, rel=1e-9)


def test_scale_interpolates_in_log_effective_lr_and_holds_outside():
    d = _flat([1.0, 4.0], elrs=(1.0, 4.0))
    assert float(d.scale_at(0.5, 2.0)) == pytest.approx(2.0)  # geometric midway in log eta
    assert float(d.scale_at(0.5, 0.1)) == pytest.approx(1.0) and float(d.scale_at(0.5, 100.0)) == pytest.approx(4.0)
    assert d.scale_at(np.array([0.5, 1.0]), 2.0).shape == (2,)


def _scale_one_level_at_a_time(d, L, elr):
    """scale_at as first written: one np.interp in log eta per loss level (the reference the fast one must equal)."""
    e, x = np.log(d.effective_lrs), math.log(max(elr, 1e-300))
    per_probe = np.stack([d._probe_scale(p, L) for p in range(len(e))])
    lows = np.array([lv.min() for lv in d.levels])
    reached = L[None, :] >= lows[:, None] * (1 - 1e-9)
    out = np.empty(len(L))
    for j in range(len(L)):
        idx = np.flatnonzero(reached[:, j]) if d.covering else np.arange(len(e))
        if len(idx) == 0:
            out[j] = per_probe[int(np.argmin(lows)), j]
            continue
        out[j] = math.exp(float(np.interp(x, e[idx], np.log(per_probe[idx, j]))))
    return out


@pytest.mark.parametrize("covering", [False, True])
def test_scale_at_reads_every_level_at_once_exactly_as_one_interp_per_level(covering):
    rng = np.random.default_rng(3)
    for trial in range(40):
        P = int(rng.integers(1, 4))
        elrs = np.sort(rng.choice([0.5, 1.0, 2.0, 5.7, 11.0], size=P, replace=False))
        levels = [np.sort(rng.uniform(0.01, 2.0, size=int(rng.integers(1, 30)))) for _ in range(P)]
        scales = [np.exp(rng.normal(0, 1.5, size=len(lv))) for lv in levels]
        d = ProbedDrift(loss="ce", effective_lrs=elrs, levels=levels, scales=scales, covering=covering)
        L = np.concatenate([rng.uniform(0.001, 3.0, 200), [lv.min() for lv in levels], levels[0][:3]])
        for elr in (0.1, *elrs, float(rng.uniform(0.5, 11.0)), 50.0):
            np.testing.assert_array_equal(d.scale_at(L, elr), _scale_one_level_at_a_time(d, L, elr))


def test_warp_with_scale_one_is_the_frozen_curve_and_scale_two_halves_time(frozen):
    cfg = SimConfig(lr=0.2 * frozen.max_stable_lr(0.0), loss="mse")
    (lin,) = simulate(frozen.state, [cfg], 200, SimOptions(method="discrete"))
    same = warp_result(lin, _flat(1.0), 100)
    np.testing.assert_allclose(same["loss"], lin.loss[:101], rtol=1e-9)
    fast = warp_result(lin, _flat(2.0), 100)
    np.testing.assert_allclose(fast["loss"][:51], lin.loss[:101:2], rtol=1e-9)
    capped = warp_result(lin, _flat(2.0), 100, cap=1.0)  # the stability cap bounds s
    np.testing.assert_allclose(capped["loss"], lin.loss[:101], rtol=1e-9)


def test_the_warp_is_the_euler_scheme_read_by_np_interp(frozen):
    """warp_result steps t' in plain floats, its bracket moving forward; it must be exactly the Euler scheme
    dt'/dt = min(s(L(t'), eta_eff), cap) with s read by np.interp (METHOD.md §14): grids logged every 4 steps and
    every step, caps, and a run that ends before the warp does (t' held at its end)."""
    limit = frozen.max_stable_lr(0.0)
    cfgs = [SimConfig(lr=f * limit, momentum=m, loss="ce") for f, m in ((0.05, 0.0), (0.3, 0.0), (0.2, 0.9), (0.6, 0.0))]
    long_ = simulate(frozen.state, cfgs[:3], 120, SimOptions(method="discrete", log_every=4))
    short = simulate(frozen.state, cfgs[3:], 30, SimOptions(method="discrete", log_every=1))
    # two probes at effective lrs limit and 10 x limit, s tabulated against ascending loss levels
    drift = ProbedDrift(loss="ce", effective_lrs=np.array([1.0 * limit, 10.0 * limit]),
                        levels=[np.geomspace(0.05, 3.0, 12), np.geomspace(0.2, 2.0, 9)],
                        scales=[np.linspace(3.0, 1.0, 12), np.linspace(1.6, 0.8, 9)])
    results, caps, T, sub = long_ + short, [math.inf, 1.5, 2.2, math.inf], 60, 7
    got = [warp_result(res, drift, T, sub, cap) for res, cap in zip(results, caps)]
    for res, cap, g in zip(results, caps, got):
        st = res.steps.astype(np.float64)
        s_curve = np.minimum(drift.scale_at(res.loss, res.config.effective_lr), cap)
        tp, h, want = 0.0, 1.0 / sub, np.zeros(T + 1)
        for t in range(1, T + 1):
            for _ in range(sub):
                tp += h * float(np.interp(tp, st, s_curve))
            want[t] = min(tp, st[-1])
        assert g["warped_steps"].tolist() == want.tolist()  # the same float operations in the same order
        assert g["loss"].tolist() == np.interp(want, st, res.loss).tolist()
    assert got[3]["warped_steps"][-1] == short[0].steps[-1]  # the 30-step run ends before the warp
    # many configs at once (a grid's worth: on one grid they step together as arrays): the very same floats
    many = [results[i % 4] for i in range(100)]
    many_caps = [caps[i % 4] * (1.0 + 0.01 * (i // 4)) for i in range(100)]
    assert sum(len(r.steps) == len(long_[0].steps) for r in many) >= pb.WARP_BATCH_MIN  # the array path runs
    together = pb.warp_results(many, drift, T, sub, many_caps)
    for res, cap, g in zip(many, many_caps, together):
        one = warp_result(res, drift, T, sub, cap)
        assert g["warped_steps"].tolist() == one["warped_steps"].tolist()
        assert g["loss"].tolist() == one["loss"].tolist() and g["error"].tolist() == one["error"].tolist()


def test_a_loss_whose_configs_are_all_beyond_the_edge_spends_no_probe(frozen):
    """Above edge_factor x the limit every config is flagged diverging (METHOD.md §14), so the drift probes of
    that loss would be wasted: none run, and the rows count no extra work; another loss still probes."""
    prep = get_predictor("probed").rebind(frozen)
    far = SimConfig(lr=50 * frozen.max_stable_lr(0.9), momentum=0.9, batch_size=32, loss="ce")
    (out,) = prep.predict([far], budget_steps=30, eps_list=[0.05])
    assert out.diverged and out.rows[0]["extra_gradients"] == 0
    assert prep.work.get("per_sample_gradients", 0) == 0 and ("probed", "ce", 30) not in prep.shared
    near = SimConfig(lr=0.3 * frozen.max_stable_lr(0.0), batch_size=32, loss="mse")
    out = prep.predict([far, near], budget_steps=30, eps_list=[0.05])
    assert out[0].diverged and not out[1].diverged and out[1].rows[0]["extra_gradients"] > 0
    assert ("probed", "mse", 30) in prep.shared and ("probed", "ce", 30) not in prep.shared


def test_a_probe_is_a_real_run_normalised_at_w0(frozen):
    state, n = frozen.state, frozen.n
    run = run_probe(frozen.model, frozen.dataset, state, "ce", 0.0, 1e-12, 6, 32, norm_batches=3)
    # a step of lr 1e-12 does not move the weights: s stays at the w0 quotient's spread around 1
    assert len(run.level) == 6 and not run.diverged and run.per_sample_gradients == 32 * 9
    assert np.all(np.abs(np.log(run.scale)) < 0.5) and run.quotient0 > 0
    fast = run_probe(frozen.model, frozen.dataset, state, "ce", 0.9, 0.3 * state.max_stable_lr(0.9), 20, 32)
    assert fast.level[-1] < fast.level[0]  # a real run: the loss falls
    d = probe_drift(frozen.model, frozen.dataset, state, "ce", 40, ProbeOptions(work_epochs=2, batch_size=32))
    assert d.per_sample_gradients <= 2 * n and list(d.effective_lrs) == sorted(d.effective_lrs)


def test_probed_predicts_every_config_type_with_drift_interval_and_counted_work(frozen):
    pred = get_predictor("probed", probe=ProbeOptions(work_epochs=2, batch_size=32)).rebind(frozen)
    before = [p.detach().clone() for p in frozen.model.parameters()]
    cfgs = [SimConfig(lr=f * frozen.max_stable_lr(m), momentum=m, batch_size=b, loss=loss)
            for f in (0.2, 0.6, 1.3, 2.5) for m in (0.0, 0.9) for b in (None, 32) for loss in ("mse", "ce")]
    settings = PredictSettings(sim=SimOptions(paths=2, log_every=5), eps_mode="relative")
    out = pred.predict(cfgs, budget_steps=40, eps_list=[0.05], settings=settings)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.model.parameters()))  # probes train copies
    for cfg, pc in zip(cfgs, out):
        f = cfg.lr / frozen.max_stable_lr(cfg.momentum)
        assert pc.result.config == cfg and pc.result.method.startswith("probed-")
        # beyond the limit: the catapult phase (m = 0, up to 2x) is predicted at the edge; with momentum up to 2x
        # the config's own real edge probe decides; above 2x it diverges
        if 1.0 < f <= 2.0 and cfg.momentum > 0:
            run = pred.shared[("edge", cfg.loss, 40)][cfg.momentum, cfg.lr]
            assert pc.diverged == run.diverged and "a real run" in pc.result.note, (cfg, pc.result.note)
        else:
            assert pc.diverged == (f > 2.0), (cfg, f)
        for r in pc.rows:
            assert r["limit_from"] == "class-trace kernel"
            assert r["extra_gradients"] > 0 and r["elr_over_gd_limit"] == pytest.approx(
                cfg.effective_lr * (1 + cfg.momentum) / frozen.max_stable_lr(cfg.momentum))
            if not pc.diverged:
                assert r["predicted_drift"] > 0
            if r["predicted_steps"] is not None and not pc.diverged:
                assert r["predicted_steps_low"] <= r["predicted_steps"] <= r["predicted_steps_high"] <= 40
    per_loss = {pc.result.config.loss: pc.rows[0]["extra_gradients"] for pc in out}
    edge = {loss: pred.predictor.edge_work(pred, loss, 40) for loss in per_loss}
    assert all(0 < edge[loss] <= pred.predictor.edge_epochs * frozen.n for loss in per_loss)  # the edge probes' own bound
    assert all(per_loss[loss] - edge[loss] <= 2 * frozen.n for loss in per_loss)  # the drift probes' bound
    assert all(v <= 10 * frozen.n for v in per_loss.values())  # the bound, all probes together
    assert pred.work["per_sample_gradients"] == sum(per_loss.values())  # counted, per loss
    again = pred.predict(cfgs[:2], budget_steps=40, eps_list=[0.05], settings=settings)  # the probes are shared
    assert pred.work["per_sample_gradients"] == sum(per_loss.values())
    assert again[0].rows[0]["extra_gradients"] == per_loss[cfgs[0].loss]


def test_a_config_whose_kernel_ends_at_the_edge_gets_a_wider_interval_and_a_note(frozen):
    """§14: where the predicted drift reaches the stability cap by the end of the run, the real run may catapult
    and settle late; its interval is widened by ``edge_interval`` (the point prediction is unchanged)."""
    pred = get_predictor("probed").rebind(frozen)
    cfg = SimConfig(lr=0.5 * frozen.max_stable_lr(0.0), loss="mse")  # cap = max_stable_lr / (lr h) = 2
    settings = PredictSettings(sim=SimOptions(method="discrete", log_every=1), eps_mode="relative")
    out = {}
    for s in (1.5, 3.0):  # below the cap, and capped at 2 over the whole run
        pred.shared[("probed", "mse", 60)] = _flat(s)
        (out[s],) = pred.predict([cfg], budget_steps=60, eps_list=[0.05], settings=settings)
    below, edge = out[1.5].result, out[3.0].result
    k = pred.predictor.interval_scale
    assert below.extras["interval_log_halfwidth"] == pytest.approx(k * (1 + math.log(1.5)))
    assert edge.extras["interval_log_halfwidth"] == pytest.approx(k * (1 + math.log(2.0)) + pred.predictor.edge_interval)
    assert "edge of stability" in edge.note and "edge of stability" not in below.note
    assert out[3.0].rows[0]["predicted_drift"] == pytest.approx(2.0)


def test_a_row_says_how_far_below_the_probes_lowest_level_its_curve_goes(frozen):
    """§14: below every probe's lowest loss level ``s`` is held, not measured; the row says by how many e-folds of
    loss its predicted curve goes there (0 when it stays within what the probes measured), and its interval widens
    by ``beyond_interval`` per e-fold."""
    pred = get_predictor("probed").rebind(frozen)
    cfg = SimConfig(lr=0.5 * frozen.max_stable_lr(0.0), loss="mse")
    settings = PredictSettings(sim=SimOptions(method="discrete", log_every=1), eps_mode="relative")

    def predicted(lowest):
        pred.shared[("probed", "mse", 60)] = ProbedDrift(loss="mse", effective_lrs=np.array([1.0]),
                                                         levels=[np.array([lowest, 1e9])], scales=[np.ones(2)])
        (out,) = pred.predict([cfg], budget_steps=60, eps_list=[0.05], settings=settings)
        return out

    within = predicted(1e-12)
    lowest_predicted = float(np.min(within.result.loss))
    assert within.rows[0]["drift_beyond_probes"] == 0.0 and 0 < lowest_predicted < within.result.loss[0]
    below = predicted(4 * lowest_predicted)  # s = 1 everywhere: the same curve, read 4x below the probes
    np.testing.assert_allclose(below.result.loss, within.result.loss)
    assert below.rows[0]["drift_beyond_probes"] == pytest.approx(math.log(4.0))
    assert below.rows[0]["predicted_steps"] == within.rows[0]["predicted_steps"]
    # and its interval is wider by beyond_interval per e-fold (the point prediction is unchanged)
    wider = below.result.extras["interval_log_halfwidth"] - within.result.extras["interval_log_halfwidth"]
    assert wider == pytest.approx(pred.predictor.beyond_interval * math.log(4.0)) and wider > 0


def _fake_edge_run(momentum, lr, diverged):
    return ProbeRun(momentum=momentum, lr=lr, batch_size=8, level=np.ones(3), scale=np.ones(3), quotient0=1.0,
                    diverged=diverged, per_sample_gradients=24, seconds=0.0)


def test_an_edge_probe_decides_beyond_the_limit_and_higher_lrs_follow_a_divergence(frozen):
    pred = get_predictor("probed", probe=ProbeOptions(work_epochs=2, batch_size=32)).rebind(frozen)
    lim = frozen.max_stable_lr(0.9)
    book = pred.shared.setdefault(("edge", "mse", 30), {})
    book[0.9, 1.2 * lim] = _fake_edge_run(0.9, 1.2 * lim, diverged=False)
    book[0.9, 1.6 * lim] = _fake_edge_run(0.9, 1.6 * lim, diverged=True)
    cfgs = [SimConfig(lr=f * lim, momentum=0.9, batch_size=None, loss="mse") for f in (1.1, 1.2, 1.7)]
    settings = PredictSettings(sim=SimOptions(log_every=5), eps_mode="relative")
    spent = dict(pred.work)
    out = pred.predict(cfgs, budget_steps=30, eps_list=[0.05], settings=settings)
    # 1.1x and 1.2x: a run at 1.2x trained, so they train too, simulated at the edge; 1.7x: a run at 1.6x diverged
    assert [pc.diverged for pc in out] == [False, False, True]
    assert "trained" in out[0].result.note and "edge of stability" in out[0].result.note
    # its interval spans the step between the edge's (0.9 x the limit) and its own
    assert out[0].result.extras["interval_log_halfwidth"] >= math.log(1.1 / 0.9) + pred.predictor.interval_scale
    assert "diverged" in out[2].result.note
    assert pred.work.get("edge_probes", 0) == spent.get("edge_probes", 0)  # decided without a new run
    # plain GD beyond the limit: a probe that diverged overrides the catapult rule (digits-resnet, MSE, 1.6x)
    lim0 = frozen.max_stable_lr(0.0)
    book[0.0, 1.5 * lim0] = _fake_edge_run(0.0, 1.5 * lim0, diverged=True)
    plain = pred.predict([SimConfig(lr=f * lim0, momentum=0.0, batch_size=None, loss="mse") for f in (1.6, 1.2)],
                         budget_steps=30, eps_list=[0.05], settings=settings)
    assert plain[0].diverged and "diverged" in plain[0].result.note
    assert not plain[1].diverged and "edge of stability" in plain[1].result.note  # probed for real, or the catapult rule
    # a run that does not fit the bound is not made: the config is flagged, and says why
    tight = get_predictor("probed", probe=ProbeOptions(work_epochs=2, batch_size=32), edge_work_epochs=0.01).rebind(frozen)
    pc = tight.predict([cfgs[0]], budget_steps=30, eps_list=[0.05], settings=settings)[0]
    assert pc.diverged and "not probed" in pc.result.note and not tight.shared[("edge", "mse", 30)]
    with pytest.raises(ValueError, match=r"^edge_work_epochs: must be in \[0, 8\]"):
        get_predictor("probed", probe={"work_epochs": 2}, edge_work_epochs=9)
