"""The predictor seam (ttp_ray.predictors): one registry, prepare once, predict a batch, one fallback rule."""
import importlib

import numpy as np
import pytest

import ttp_ray
from ttp_ray.dynamics import SimConfig, SimOptions
from ttp_ray.kernel import KernelOptions
from ttp_ray.predict import PredictSettings, load_state, predict_grid
from ttp_ray.predictors import DEFAULT_PREDICTOR, PREDICTORS, PredictionInputs, get_predictor
from ttp_ray.stability import max_stable_lr

KERNEL = KernelOptions(k=256)


@pytest.fixture(scope="module")
def small(digits_5to9):
    return digits_5to9.subset(100, seed=0)


@pytest.fixture(scope="module")
def frozen(small):
    return get_predictor("frozen").prepare(PredictionInputs("digits-cnn", small, KERNEL))


def test_registry_and_bad_names():
    assert set(PREDICTORS) == {"frozen", "subset", "drift", "relinearised", "flow", "probed"} and DEFAULT_PREDICTOR in PREDICTORS
    assert get_predictor().name == DEFAULT_PREDICTOR
    with pytest.raises(ValueError, match=r"^predictor: 'nope' is not one of frozen, subset"):
        get_predictor("nope")
    with pytest.raises(ValueError, match=r"^predictor\.tolerance: not an option of 'drift'"):
        get_predictor("drift", tolerance=0.1)
    with pytest.raises(ValueError, match=r"^drift_reference:"):
        get_predictor("drift", reference_fraction=1.5)
    with pytest.raises(ValueError, match=r"^kernel_subset:"):
        get_predictor("subset")
    for name, cls in PREDICTORS.items():  # every predictor says what it costs and has stated defaults
        assert cls.name == name and cls.extra_work
        if name != "subset":
            assert get_predictor(name).describe()["name"] == name


def test_frozen_is_the_frozen_kernel_dynamics(small, frozen):
    state = load_state("digits-cnn", small, KERNEL)
    cfgs = [SimConfig(lr=f * state.max_stable_lr(m), momentum=m, batch_size=b, loss=loss)
            for f in (0.2, 0.6) for m in (0.0, 0.9) for b in (None, 32) for loss in ("mse", "ce")]
    settings = PredictSettings(sim=SimOptions(paths=2, log_every=5), eps_mode="relative")
    got = frozen.predict(cfgs, budget_steps=40, eps_list=[0.05], settings=settings)
    want = predict_grid(state, cfgs, budget_steps=40, eps_list=[0.05], settings=settings)
    for g, w in zip(got, want):
        assert all(r["limit_from"] == "class-trace kernel" for r in g.rows)  # the seam says which lambda_max
        assert [{k: v for k, v in r.items() if k not in ("simulate_seconds", "limit_from")} for r in g.rows] == \
               [{k: v for k, v in r.items() if k != "simulate_seconds"} for r in w.rows]
        np.testing.assert_array_equal(g.result.loss, w.result.loss)
    assert frozen.max_stable_lr(0.9) == state.max_stable_lr(0.9) == max_stable_lr(state.state.lambda_max, state.n, 0.9)
    assert frozen.work == {}


def test_drift_predicts_full_batch_and_falls_back_for_minibatch(frozen):
    drift = get_predictor("drift").rebind(frozen)
    limit = frozen.max_stable_lr(0.0)
    cfgs = [SimConfig(lr=0.3 * limit, loss="ce"), SimConfig(lr=0.3 * limit, batch_size=32, loss="ce"),
            SimConfig(lr=0.2 * limit, momentum=0.5, loss="ce")]
    out = drift.predict(cfgs, budget_steps=20, eps_list=[0.05], settings=PredictSettings(eps_mode="relative"))
    assert [p.result.method for p in out] == ["ode-drift", "minibatch", "ode-drift"]  # SGD: the default simulator
    assert "drift" in out[0].result.extras and "drift" not in out[1].result.extras
    # one reference run per (loss, budget), shared by both full-batch configs, counted
    assert drift.work == {"finetune_steps": 20.0, "per_sample_gradients": 20.0 * frozen.n}
    drift.predict(cfgs[:1], budget_steps=20, eps_list=[0.05], settings=PredictSettings(eps_mode="relative"))
    assert drift.work["finetune_steps"] == 20.0


def test_a_predictor_without_fallback_refuses_in_one_line(small, frozen):
    with pytest.raises(ValueError, match="cannot reuse"):
        get_predictor("subset", size=40).rebind(frozen)
    sub = get_predictor("subset", size=40).prepare(PredictionInputs("digits-cnn", small, KERNEL))
    assert sub.work == {"forward_samples": float(len(small))}
    assert sub.max_stable_lr(0.0) == sub.base.spectrum.max_stable_lr(0.0)
    with pytest.raises(ValueError, match=r"^loss: subset extrapolation"):
        sub.predict([SimConfig(lr=0.01, loss="ce")], budget_steps=10, eps_list=[0.01])
    with pytest.raises(ValueError, match=r"^batch_size: the subset predictor"):
        sub.predict([SimConfig(lr=0.01, batch_size=10)], budget_steps=10, eps_list=[0.01])
    (p,) = sub.predict([SimConfig(lr=0.5 * sub.max_stable_lr(0.0))], budget_steps=10, eps_list=[0.01])
    assert p.rows[0]["kernel_subset"] == 40 and p.rows[0]["method"] == "subset-extrapolated"


def test_public_api_resolves():
    for name in ttp_ray.__all__:
        assert getattr(ttp_ray, name) is not None, name
    assert ttp_ray.get_predictor is importlib.import_module("ttp_ray.predictors").get_predictor
    with pytest.raises(AttributeError):
        ttp_ray.no_such_name  # noqa: B018
