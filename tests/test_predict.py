"""The predictor end to end, and the exactness checks that prove trainer and predictor share conventions:
with only the linear head trained, the linearisation is exact (METHOD.md §1, §2)."""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from ttp_ray.dynamics import SimConfig, SimOptions
from ttp_ray.finetune import FinetuneConfig, finetune
from ttp_ray.kernel import KernelOptions
from ttp_ray.models import build_finetune_model
from ttp_ray.predict import PredictSettings, load_state, predict_grid, predict_one
from ttp_ray.training_time import curve_training_times

EXACT = KernelOptions(method="exact", class_trace=False)
T = 60


@pytest.fixture(scope="module")
def head_state(digits_5to9):
    ds = digits_5to9.subset(150, seed=0)
    return load_state("digits-cnn", ds, EXACT, trainable="head", cache=False)


def _real(prep, lr, momentum=0.0, loss="mse", batch_size=None, steps=T):
    model = build_finetune_model("digits-cnn", prep.dataset.num_classes, 0)
    return finetune(model, prep.dataset, FinetuneConfig(lr=lr, momentum=momentum, loss=loss, batch_size=batch_size,
                                                        steps=steps, trainable="head"))


def _pred(prep, lr, momentum=0.0, loss="mse", batch_size=None, **sim):
    cfg = SimConfig(lr=lr, momentum=momentum, batch_size=batch_size, loss=loss)
    return predict_one(prep, cfg, budget_steps=T, eps_list=[0.01], settings=PredictSettings(sim=SimOptions(**sim)))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_head_only_gd_discrete_map_is_exact(head_state, loss):
    lr = 0.5 * head_state.max_stable_lr(0.0)
    real, pred = _real(head_state, lr, loss=loss), _pred(head_state, lr, loss=loss, method="discrete")
    assert not real.diverged and not pred.diverged
    rel = np.abs(pred.result.loss - real.loss) / real.loss
    assert rel.max() < 0.01, rel.max()
    assert np.array_equal(pred.result.error, real.error)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_head_only_heavy_ball_is_exact(head_state, loss):
    m = 0.9
    lr = 0.3 * head_state.max_stable_lr(m)
    real = _real(head_state, lr, momentum=m, loss=loss)
    pred = _pred(head_state, lr, momentum=m, loss=loss, method="discrete", momentum_mode="heavy_ball")
    rel = np.abs(pred.result.loss - real.loss) / real.loss
    assert rel.max() < 0.01, rel.max()


def test_head_only_ode_close_at_small_lr(head_state):
    lr = 0.02 * head_state.max_stable_lr(0.0)
    real, pred = _real(head_state, lr), _pred(head_state, lr, method="ode")
    rel = np.abs(pred.result.loss - real.loss) / real.loss
    assert rel.max() < 0.02, rel.max()  # stated bound: 2 % at lr = 0.02 x max_stable_lr


def test_head_only_minibatch_reproduces_the_trainer(head_state):
    lr = 0.3 * head_state.max_stable_lr(0.5)
    real = _real(head_state, lr, momentum=0.5, batch_size=32)
    pred = _pred(head_state, lr, momentum=0.5, batch_size=32, method="minibatch", paths=1, seed=0)
    rel = np.abs(pred.result.loss - real.loss) / real.loss
    assert rel.max() < 0.01, rel.max()


def test_predicted_training_time_equals_real_when_exact(head_state):
    lr = 0.4 * head_state.max_stable_lr(0.0)
    real, pred = _real(head_state, lr), _pred(head_state, lr, method="discrete")
    real_t = curve_training_times(real.steps, real.curves(), [0.01], budget=T)
    assert [r["steps"] for r in real_t] == [r["predicted_steps"] for r in pred.rows]


def test_grid_rows_divergence_and_no_nan(head_state):
    limit = head_state.max_stable_lr(0.0)
    cfgs = [SimConfig(lr=f * limit, loss=loss) for f in (0.1, 0.5, 1.5) for loss in ("mse", "ce")]
    out = predict_grid(head_state, cfgs, budget_steps=T, eps_list=[0.1, 0.01])
    assert len(out) == len(cfgs)
    for p in out:
        assert len(p.rows) == 4
        assert np.all(np.isfinite(p.result.loss))
        beyond = p.config.lr > limit
        assert p.diverged == beyond
        for r in p.rows:
            assert (r["predicted_steps"] is None) == beyond
            assert r["max_stable_lr"] == pytest.approx(limit)
    with pytest.raises(ValueError, match="batch_size"):
        predict_grid(head_state, [SimConfig(lr=0.1, batch_size=10_000)], budget_steps=5, eps_list=[0.1])


def test_kernel_state_is_cached_between_predictions(digits_5to9, tmp_path, monkeypatch):
    monkeypatch.setenv("TTP_RAY_CACHE", str(tmp_path))
    ds = digits_5to9.subset(60, seed=1)
    a = load_state("digits-cnn", ds, KernelOptions(k=128))
    b = load_state("digits-cnn", ds, KernelOptions(k=128))
    assert not a.cache_hit and b.cache_hit
    assert torch.equal(a.state.eigvals, b.state.eigvals)


def test_cli_predict_matches_finetune_fields(capsys):
    common = ["--dataset", "digits-5to9:subset=80", "--model", "digits-cnn", "--lr", "0.002", "--loss", "mse",
              "--steps", "20", "--eps", "0.05", "--json"]
    code, out, err = run_cli(["finetune"] + common, capsys)
    assert code == 0, err
    real = json.loads(out)
    code, out, err = run_cli(["predict"] + common + ["--k", "256", "--validate"], capsys)
    assert code == 0, err
    pred = json.loads(out)
    assert set(real) - {"train_seconds"} <= set(pred)
    assert pred["max_stable_lr"] > 0 and pred["kind"] == "predict"
    v = pred["validation"]["training_times"]
    assert [r["actual_steps"] for r in v] == [r["steps"] for r in real["training_times"]]
    assert all(r["relative_error"] is None or r["relative_error"] >= 0 for r in v)


@pytest.mark.parametrize("args,field", [(["--paths", "0"], "paths"), (["--k", "0"], "k"),
                                        (["--method", "euler"], "--method")])
def test_cli_predict_bad_options(capsys, args, field):
    code, _, err = run_cli(["predict", "--lr", "0.01", "--steps", "5"] + args, capsys)
    assert code == 2 and err.count("\n") == 1 and field in err


def test_float32_steps_give_the_training_times_of_float64(digits_5to9):
    """The stepped methods run in the state's float32 outputs by default: on an embedded state (default kernel)
    their T_eps equal float64's within 1 % (the same minibatches and the same noise draws), loss curves to 1e-4."""
    from ttp_ray.dynamics import simulate

    prep = load_state("digits-cnn", digits_5to9.subset(300, seed=0), KernelOptions())
    state = prep.state
    assert state.f0.dtype == torch.float32
    limit = state.max_stable_lr
    cfgs = [SimConfig(lr=f * limit(m), momentum=m, batch_size=b, loss=loss)
            for loss in ("mse", "ce") for m in (0.0, 0.9) for b in (None, 64) for f in (0.05, 0.6)]
    for method in ("auto", "minibatch", "sde"):
        got = {dt: simulate(state, cfgs, T, SimOptions(method=method, paths=3, log_every=3, dtype=dt))
               for dt in (torch.float32, torch.float64)}
        for c, a, b in zip(cfgs, got[torch.float32], got[torch.float64]):
            assert a.method == b.method and a.diverged == b.diverged
            assert np.max(np.abs(a.loss - b.loss) / np.abs(b.loss)) < 1e-4, (method, c)
            times = [curve_training_times(r.steps, {"loss": r.loss, "error": r.error}, [0.05, 0.01], budget=T,
                                          eps_mode="relative") for r in (a, b)]
            for x, y in zip(*times):
                assert abs(x["steps"] - y["steps"]) <= 0.01 * y["steps"], (method, c, x, y)
