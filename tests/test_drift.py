"""Kernel drift calibrated by a real reference run, applied as a time warp (ttp_ray.drift).

* with only the linear head trained the linearisation is exact: the calibrated scale is 1 at every loss
  level (this is what proves ``N^2 ||grad L||^2 = G^T Θ G``, the trainer's and the predictor's conventions);
* the warp is exact for a kernel that is a loss-dependent multiple of Θ0: a constant s = 2 halves the time;
* the real backbone's drift under cross-entropy is large (> 2x), and the warped prediction of a config other
  than the reference is closer to its real curve than the frozen one.
"""
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from ttp_ray.drift import (DRIFT_METHOD, DriftOptions, KernelDrift, calibrate_drift, kernel_quadratic,
                           simulate_with_drift, warp_curves)
from ttp_ray.dynamics import SimConfig, SimOptions, simulate
from ttp_ray.finetune import FinetuneConfig, finetune
from ttp_ray.kernel import KernelOptions
from ttp_ray.models import build_finetune_model
from ttp_ray.objectives import output_gradient
from ttp_ray.predict import load_state
from ttp_ray.training_time import curve_training_times


@pytest.fixture(scope="module")
def small(digits_5to9):
    return digits_5to9.subset(120, seed=0)


def _real(ds, cfg, steps, trainable="all", record=True):
    model = build_finetune_model("digits-cnn", ds.num_classes, 0)
    return finetune(model, ds, FinetuneConfig(lr=cfg.lr, momentum=cfg.momentum, loss=cfg.loss, steps=steps,
                                              trainable=trainable), record_outputs=record)


def test_finetune_records_gradient_norms_and_outputs(small):
    cfg = SimConfig(lr=0.01, momentum=0.0, batch_size=None, loss="ce")
    res = _real(small, cfg, 5)
    assert res.grad_norm_sq.shape == (5,) and res.outputs.shape == (6, len(small), small.num_classes)
    model = build_finetune_model("digits-cnn", small.num_classes, 0).eval()
    out = model(small.x)
    torch.nn.functional.cross_entropy(out, small.targets).backward()
    expect = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
    assert res.grad_norm_sq[0] == pytest.approx(expect, rel=1e-5)
    np.testing.assert_allclose(res.outputs[0], out.detach().numpy(), rtol=1e-6, atol=1e-6)
    mini = finetune(build_finetune_model("digits-cnn", small.num_classes, 0), small,
                    FinetuneConfig(lr=0.01, batch_size=32, steps=3), record_outputs=True)
    assert mini.grad_norm_sq is None and mini.outputs is None  # full batch only


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_head_only_drift_is_one(small, loss):
    """Head only, exact kernel: the real rate equals the frozen one at every step, so s(L) = 1."""
    prep = load_state("digits-cnn", small, KernelOptions(method="exact", class_trace=False), trainable="head",
                      cache=False)
    cfg = SimConfig(lr=0.6 * prep.max_stable_lr(0.0), momentum=0.0, batch_size=None, loss=loss)
    real = _real(small, cfg, 40, trainable="head")
    drift = calibrate_drift(prep.state, cfg, real.loss, real.grad_norm_sq, real.outputs)
    assert len(drift.levels) == 40 and np.all(np.diff(drift.levels) >= 0)
    np.testing.assert_allclose(drift.scale, 1.0, atol=1e-6)
    # unnormalised, the quotient itself is 1: N^2 ||grad L||^2 = G^T Θ G (the conventions agree)
    G = output_gradient(torch.as_tensor(real.outputs[7], dtype=torch.float64), prep.state.targets, loss)
    assert len(small) ** 2 * real.grad_norm_sq[7] == pytest.approx(kernel_quadratic(prep.state)(G), rel=1e-6)


def test_warp_with_constant_scale_rescales_time(small):
    prep = load_state("digits-cnn", small, KernelOptions(), cache=False)
    cfg = SimConfig(lr=0.3 * prep.max_stable_lr(0.0), momentum=0.0, batch_size=None, loss="mse")
    lin = simulate(prep.state, [cfg], 200, SimOptions(method="ode", momentum_mode="elr"))[0]
    flat = lambda s: KernelDrift(loss="mse", levels=np.array([1e-9, 1e9]), scale=np.array([s, s]))  # noqa: E731
    one = warp_curves(lin, flat(1.0), 100)
    np.testing.assert_allclose(one["loss"], lin.loss[:101], rtol=1e-12)
    two = warp_curves(lin, flat(2.0), 100)
    np.testing.assert_allclose(two["loss"], lin.loss[:201:2], rtol=1e-9)
    np.testing.assert_allclose(two["error"], lin.error[:201:2])


def test_scale_lookup_is_log_interpolated_and_clamped():
    d = KernelDrift(loss="ce", levels=np.array([0.01, 0.1, 1.0]), scale=np.array([9.0, 3.0, 1.0]))
    assert d.scale_at(1.0) == pytest.approx(1.0) and d.scale_at(5.0) == pytest.approx(1.0)
    assert d.scale_at(1e-6) == pytest.approx(9.0)
    assert d.scale_at(math.sqrt(0.1)) == pytest.approx(2.0)  # halfway in log L
    assert d.max_scale == 9.0


def test_cross_entropy_drift_is_measured_and_improves_another_config(small):
    """The real backbone under CE speeds up as the logits grow: s rises well above 1 at low loss, and the
    warped ODE predicts a faster config (heavy ball, m = 0.9) closer to its real T_eps than the frozen ODE."""
    prep = load_state("digits-resnet", small, KernelOptions(), cache=False)
    ref = SimConfig(lr=0.6 * prep.max_stable_lr(0.0), momentum=0.0, batch_size=None, loss="ce")
    real_ref = finetune(build_finetune_model("digits-resnet", small.num_classes, 0), small,
                        FinetuneConfig(lr=ref.lr, loss="ce", steps=100), record_outputs=True)
    drift = calibrate_drift(prep.state, ref, real_ref.loss, real_ref.grad_norm_sq, real_ref.outputs)
    assert drift.scale[-1] == pytest.approx(1.0, abs=0.05)  # the highest loss level is t = 0
    assert drift.max_scale > 2.0
    cfg = SimConfig(lr=0.2 * prep.max_stable_lr(0.9), momentum=0.9, batch_size=None, loss="ce")
    real = finetune(build_finetune_model("digits-resnet", small.num_classes, 0), small,
                    FinetuneConfig(lr=cfg.lr, momentum=0.9, loss="ce", steps=100))
    (warped,) = simulate_with_drift(prep.state, [cfg], 100, drift)
    frozen = simulate(prep.state, [cfg], 100, SimOptions(method="ode", momentum_mode="elr"))[0]
    assert warped.method == DRIFT_METHOD and not warped.diverged and len(warped.steps) == 101

    def t_eps(steps, loss, err):
        return [r["steps"] for r in curve_training_times(steps, {"loss": loss, "error": err}, [0.05], budget=100,
                                                         eps_mode="relative")]
    want = np.array(t_eps(real.steps, real.loss, real.error), dtype=float)
    e_warp = np.abs(np.array(t_eps(warped.steps, warped.loss, warped.error)) - want) / want
    e_frozen = np.abs(np.array(t_eps(frozen.steps, frozen.loss, frozen.error)) - want) / want
    assert e_warp.mean() < e_frozen.mean(), (e_warp, e_frozen)


def test_bad_inputs_name_their_field(small):
    prep = load_state("digits-cnn", small, KernelOptions(), cache=False)
    d = KernelDrift(loss="ce", levels=np.array([0.1, 1.0]), scale=np.array([2.0, 1.0]))
    gd = SimConfig(lr=0.1 * prep.max_stable_lr(0.0), momentum=0.0, batch_size=None, loss="mse")
    with pytest.raises(ValueError, match="^loss: "):
        simulate_with_drift(prep.state, [gd], 10, d)
    with pytest.raises(ValueError, match="^batch_size: "):
        simulate_with_drift(prep.state, [SimConfig(lr=0.01, momentum=0.0, batch_size=16, loss="ce")], 10, d)
    with pytest.raises(ValueError, match="^reference: "):
        calibrate_drift(prep.state, gd, np.ones(3), None, None)
    with pytest.raises(ValueError, match="^substeps: "):
        DriftOptions(substeps=0)
    beyond = SimConfig(lr=1.5 * prep.max_stable_lr(0.0), momentum=0.0, batch_size=None, loss="ce")
    (res,) = simulate_with_drift(prep.state, [beyond], 10, d)
    assert res.diverged  # the warp does not move the stability limit


def test_predict_cli_with_drift_reference(capsys):
    args = ["predict", "--dataset", "digits-5to9:subset=100", "--model", "digits-cnn", "--lr", "0.02",
            "--momentum", "0.9", "--loss", "ce", "--steps", "30", "--eps", "0.05", "--eps-mode", "relative"]
    code, out, _ = run_cli(args + ["--drift-reference", "0.6", "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["method"] == DRIFT_METHOD and d["curve"]["steps"][-1] == 30 and d["max_stable_lr"] > 0
    assert d["drift"]["reference_fraction"] == 0.6 and d["drift"]["scale_min"] > 0
    assert d["drift"]["reference_lr"] == pytest.approx(0.6 * d["max_stable_lr"] / 1.9)  # max_stable_lr(0) = limit(m) / (1 + m)
    assert {r["criterion"] for r in d["training_times"]} == {"loss", "error"}
    assert d["predictor"] == "drift" and d["extra_work"]["finetune_steps"] == 30
    # one rule for predict and sweeps: a config the drift predictor does not simulate goes to its fallback
    code, out, err = run_cli(args + ["--predictor", "drift", "--batch-size", "16", "--json"], capsys)
    assert code == 0 and "Traceback" not in err
    d = json.loads(out)
    assert d["method"] in ("sde", "minibatch") and "drift" not in d and d["extra_work"] == {}
    code, _, err = run_cli(args + ["--drift-reference", "0.6", "--relinearise"], capsys)
    assert code == 2 and err.strip().startswith("error: predictor:")
    code, _, err = run_cli(args + ["--drift-reference", "1.5"], capsys)
    assert code == 2 and err.strip().startswith("error: drift_reference:")
