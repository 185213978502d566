"""Piecewise re-linearisation (ttp_ray.relinearise): its two limits are exact and checkable.

* one-step segments move the weights by the true gradient (the vjp), so the curve *is* the trainer's;
* with only the linear head trained the linearisation is exact, so segments grow and the curve still
  matches the trainer at every step.
"""
import json

import numpy as np
import pytest

from conftest import run_cli
from ttp_ray.dynamics import SimConfig
from ttp_ray.finetune import FinetuneConfig, finetune
from ttp_ray.kernel import KernelOptions
from ttp_ray.models import build_finetune_model
from ttp_ray.predict import load_state
from ttp_ray.relinearise import RelinearisationOptions, relinearised_curves


@pytest.fixture(scope="module")
def small(digits_5to9):
    return digits_5to9.subset(100, seed=0)


def _real(ds, cfg, steps, trainable="all"):
    model = build_finetune_model("digits-cnn", ds.num_classes, 0)
    return finetune(model, ds, FinetuneConfig(lr=cfg.lr, momentum=cfg.momentum, loss=cfg.loss, steps=steps,
                                              trainable=trainable))


def test_one_step_segments_reproduce_the_trainer(small):
    """L = 1 everywhere: heavy ball with the exact gradient, momentum buffer carried in weight space."""
    lr = 0.3 * load_state("digits-cnn", small, KernelOptions(), cache=False).max_stable_lr(0.9)
    cfg = SimConfig(lr=lr, momentum=0.9, batch_size=None, loss="ce")
    opts = RelinearisationOptions(first_segment=1, tolerance=1e-12, max_kernels=100, kernel=KernelOptions(k=256))
    model = build_finetune_model("digits-cnn", small.num_classes, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = relinearised_curves(model, small, cfg, 12, opts)
    real = _real(small, cfg, 12)
    assert res.kernels == 12 and res.segment_ends == list(range(1, 13))
    np.testing.assert_array_equal(res.steps, real.steps)
    np.testing.assert_allclose(res.loss, real.loss, rtol=2e-4)
    np.testing.assert_allclose(res.error, real.error, atol=1e-12)
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the caller's model is untouched


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_head_only_segments_grow_and_stay_exact(small, momentum):
    """Head only: f is linear in the trained weights, the local error is ~0, segments double (8, 16, 32, ...),
    and with an exact projection (every head coordinate kept) the curve matches the trainer within 1 %."""
    exact_head = KernelOptions(class_trace=False, projection="subset", k=4096)
    lr = 0.4 * load_state("digits-cnn", small, KernelOptions(method="exact", class_trace=False),
                          trainable="head", cache=False).max_stable_lr(momentum)
    cfg = SimConfig(lr=lr, momentum=momentum, batch_size=None, loss="mse")
    res = relinearised_curves(build_finetune_model("digits-cnn", small.num_classes, 0), small, cfg, 60,
                              RelinearisationOptions(kernel=exact_head), trainable="head")
    real = _real(small, cfg, 60, trainable="head")
    assert res.segment_ends == [8, 24, 56, 60] and res.rejected == 0
    assert np.max(np.abs(res.loss - real.loss) / real.loss) < 0.01


@pytest.mark.parametrize("factor", [5.0, 20.0])
def test_divergence_follows_the_network_not_its_linearisation(small, factor):
    """Beyond the linearised limit the frozen-kernel predictor can only say 'diverged'. The re-linearised one
    takes exact GD steps where a segment of one step blows up, so it diverges when the real network does:
    here not at 5x the limit (real GD self-stabilises), and at 20x (real GD diverges at step 2). No NaN."""
    lr = factor * load_state("digits-cnn", small, KernelOptions(), cache=False).max_stable_lr(0.0)
    cfg = SimConfig(lr=lr, momentum=0.0, batch_size=None, loss="mse")
    res = relinearised_curves(build_finetune_model("digits-cnn", small.num_classes, 0), small, cfg, 40,
                              RelinearisationOptions(kernel=KernelOptions(k=256)))
    real = _real(small, cfg, 40)
    assert res.diverged == real.diverged == (factor > 10)
    assert np.all(np.isfinite(res.loss)) and len(res.loss) == len(res.steps)
    if res.diverged:
        assert res.note.startswith("diverged at step") and len(res.steps) < 41


@pytest.mark.parametrize("kw, field", [({"tolerance": 0}, "tolerance"), ({"first_segment": 0}, "first_segment"),
                                       ({"max_kernels": 0}, "max_kernels"), ({"max_segment": -1}, "max_segment"),
                                       ({"kernel": KernelOptions(method="exact")}, "kernel.method")])
def test_options_name_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        RelinearisationOptions(**kw)


def test_minibatches_are_refused(small):
    with pytest.raises(ValueError, match="^batch_size:"):
        relinearised_curves(build_finetune_model("digits-cnn", small.num_classes, 0), small,
                            SimConfig(lr=0.01, batch_size=10, loss="mse"), 5)


def test_cli_predict_relinearise(capsys):
    args = ["predict", "--dataset", "digits-5to9:subset=60", "--model", "digits-cnn", "--lr", "0.002", "--loss",
            "ce", "--momentum", "0.9", "--steps", "20", "--eps", "0.05", "--eps-mode", "relative", "--k", "256"]
    code, out, _ = run_cli(args + ["--relinearise", "--json", "--validate"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["method"] == "relinearised" and d["kernels"] >= 1 and d["kernel"]["class_trace"] is False
    assert d["curve"]["steps"][-1] == 20 and d["max_stable_lr"] > 0
    assert {r["criterion"] for r in d["validation"]["training_times"]} == {"loss", "error"}
    assert d["predictor"] == "relinearised" and d["extra_work"]["kernel_sketches"] >= d["kernels"]
    code, _, err = run_cli(args + ["--relinearise", "--relin-tolerance", "-1"], capsys)
    assert code == 2 and "tolerance:" in err


def test_flow_path_head_only_is_exact_and_shared_by_eta_eff(small):
    """Head only, the kernel never moves: the path keeps few sketches, a heavy-ball config simulated on it
    matches the trainer within 1 %, and two configs with the same lr/(1-m) read the same kernels."""
    from ttp_ray.relinearise import FLOW_METHOD, flow_path, simulate_on_flow_path

    exact_head = KernelOptions(class_trace=False, projection="subset", k=4096)
    limit = load_state("digits-cnn", small, KernelOptions(method="exact", class_trace=False), trainable="head",
                       cache=False)
    fast = SimConfig(lr=0.3 * limit.max_stable_lr(0.9), momentum=0.9, batch_size=None, loss="mse")
    same_tau = SimConfig(lr=fast.effective_lr * 0.2, momentum=0.8, batch_size=None, loss="mse")
    path = flow_path(build_finetune_model("digits-cnn", small.num_classes, 0), small, "mse", fast.effective_lr * 60,
                     0.5 * limit.max_stable_lr(0.0), RelinearisationOptions(kernel=exact_head), trainable="head")
    assert path.taus[0] == 0 and np.all(np.diff(path.taus) > 0) and len(path.sketches) <= 8
    assert path.index(0.0) == 0 and path.index(path.taus[-1] + 1.0) == len(path.taus) - 1
    res = simulate_on_flow_path(path, [fast, same_tau], 60)
    assert res[0].method == FLOW_METHOD and res[0].kernels == res[1].kernels
    real = _real(small, fast, 60, trainable="head")
    assert np.max(np.abs(res[0].loss - real.loss) / real.loss) < 0.01
    with pytest.raises(ValueError, match="^batch_size:"):
        simulate_on_flow_path(path, [SimConfig(lr=0.01, batch_size=10, loss="mse")], 5)
    with pytest.raises(ValueError, match="tau_max"):
        flow_path(build_finetune_model("digits-cnn", small.num_classes, 0), small, "mse", 0.0, 0.01)
