import numpy as np
import pytest
import torch

from ttp_ray.finetune import FinetuneConfig, finetune
from ttp_ray.models import build_finetune_model
from ttp_ray.objectives import error_rate, loss_value, output_gradient


def test_mse_convention_by_hand():
    out = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2, 1])
    # sample 0: 1/2 (0.25 + 1 + 1) = 1.125; sample 1: 1/2 * 1 = 0.5; mean = 0.8125
    assert float(loss_value(out, y, "mse")) == pytest.approx(0.8125)
    assert torch.allclose(output_gradient(out, y, "mse"), torch.tensor([[0.5, -1.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64))
    assert float(error_rate(out, y)) == 0.5
    ce = torch.nn.functional.cross_entropy(out, y)
    assert float(loss_value(out, y, "ce")) == pytest.approx(float(ce))


def test_trainer_mse_step_matches_hand_computation(digits_5to9):
    """One full-batch GD step on the head: W1 = W0 - eta (1/N) sum_i (f_i - y_i) phi_i^T (METHOD.md §1)."""
    ds = digits_5to9.subset(60, seed=0)
    model = build_finetune_model("digits-cnn", ds.num_classes, head_seed=1)
    with torch.no_grad():
        phi = model.features(ds.x).double()
    w0, b0 = model.head.weight.detach().double().clone(), model.head.bias.detach().double().clone()
    y = torch.nn.functional.one_hot(ds.targets, 5).double()
    resid = phi @ w0.T + b0 - y
    eta = 0.3
    w1 = w0 - eta * resid.T @ phi / len(ds)
    b1 = b0 - eta * resid.mean(0)
    res = finetune(model, ds, FinetuneConfig(lr=eta, loss="mse", steps=1, trainable="head"))
    assert torch.allclose(model.head.weight.double(), w1, atol=1e-5)
    assert torch.allclose(model.head.bias.double(), b1, atol=1e-5)
    assert res.loss[0] == pytest.approx(float(0.5 * (resid ** 2).sum(1).mean()), rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_finetuning_reduces_loss(digits_5to9, loss):
    model = build_finetune_model("digits-cnn", 5)
    res = finetune(model, digits_5to9, FinetuneConfig(lr=0.02, momentum=0.9, batch_size=64, loss=loss,
                                                      steps=60, log_every=20))
    assert not res.diverged
    assert res.steps.tolist() == [0, 20, 40, 60]
    assert res.loss[-1] < 0.5 * res.loss[0]
    assert res.error[-1] < res.error[0]
    assert res.step_time_s > 0


def test_full_batch_gd_is_deterministic(digits_5to9):
    ds = digits_5to9.subset(200, seed=0)
    cfg = FinetuneConfig(lr=0.01, momentum=0.5, loss="ce", steps=15, trainable="all")
    a = finetune(build_finetune_model("digits-resnet", 5, head_seed=2), ds, cfg)
    b = finetune(build_finetune_model("digits-resnet", 5, head_seed=2), ds, cfg)
    assert np.array_equal(a.loss, b.loss) and np.array_equal(a.error, b.error)


def test_divergence_is_flagged_not_raised(digits_5to9):
    res = finetune(build_finetune_model("digits-cnn", 5), digits_5to9.subset(100), FinetuneConfig(lr=1e4, loss="mse", steps=20))
    assert res.diverged
    assert np.all(np.isfinite(res.loss))


@pytest.mark.parametrize("kw,field", [
    ({"lr": 0.0}, "lr"), ({"lr": 0.1, "momentum": 1.0}, "momentum"), ({"lr": 0.1, "momentum": -0.1}, "momentum"),
    ({"lr": 0.1, "batch_size": 0}, "batch_size"), ({"lr": 0.1, "steps": 0}, "steps"), ({"lr": 0.1, "loss": "l1"}, "loss"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        FinetuneConfig(**kw).validate(100)
    with pytest.raises(ValueError, match="batch_size: must be in 1..100"):
        FinetuneConfig(lr=0.1, batch_size=101).validate(100)


def test_step_time_timed_on_a_capped_batch_scaled_and_cached(digits_5to9, tmp_path, monkeypatch):
    import ttp_ray.step_time as st

    monkeypatch.setenv("TTP_RAY_CACHE", str(tmp_path))
    calls = []

    def fake(model, dataset, batch_size, loss, *, device, steps, trainable):
        calls.append((batch_size, loss, steps))
        return 0.01

    monkeypatch.setattr(st, "measure_step_time", fake)
    model = build_finetune_model("digits-cnn", 5)
    n = len(digits_5to9)
    assert st.step_time(model, digits_5to9, None, "ce") == pytest.approx(0.01 * n / st.STEP_TIME_MAX_BATCH)
    assert calls == [(st.STEP_TIME_MAX_BATCH, "ce", st.STEP_TIME_STEPS)]
    assert st.step_time(model, digits_5to9, None, "ce") == pytest.approx(0.01 * n / st.STEP_TIME_MAX_BATCH)
    assert st.step_time(model, digits_5to9, 600, "ce") == pytest.approx(0.01 * 600 / st.STEP_TIME_MAX_BATCH)
    assert len(calls) == 1  # the same timed batch: read from the disk cache
    assert st.step_time(model, digits_5to9, 64, "ce") == pytest.approx(0.01)
    assert calls[-1] == (64, "ce", st.STEP_TIME_STEPS) and len(calls) == 2
    files = sorted((tmp_path / "kernels" / "step-times").glob("*.json"))
    assert len(files) == 2
    for f in files:
        f.write_text("{not json")  # a file that cannot be read is measured again
    st.step_time(model, digits_5to9, 64, "ce")
    assert len(calls) == 3
    st.step_time(model, digits_5to9, 64, "ce", cache=False)
    assert len(calls) == 4
    other = build_finetune_model("digits-cnn", 5, head_seed=1)  # other weights: another key
    st.step_time(other, digits_5to9, 64, "ce")
    assert len(calls) == 5


def test_step_time_measures_for_real(digits_5to9, tmp_path, monkeypatch):
    from ttp_ray.step_time import step_time

    monkeypatch.setenv("TTP_RAY_CACHE", str(tmp_path))
    model = build_finetune_model("digits-cnn", 5)
    t = step_time(model, digits_5to9, 32, "mse", max_batch=16, steps=1)
    assert t > 0 and step_time(model, digits_5to9, 32, "mse", max_batch=16, steps=1) == t


@pytest.mark.parametrize("batch_size", [32, None])
def test_resume_from_a_snapshot_continues_the_same_run(digits_5to9, tmp_path, batch_size):
    """A snapshot taken at a logged step, saved with torch.save and read back with weights_only=True, resumes the
    run exactly: same weights, momentum buffers, minibatch order and curve as the run that never stopped."""
    ds = digits_5to9.subset(200, seed=0)
    cfg = FinetuneConfig(lr=0.02, momentum=0.9, batch_size=batch_size, loss="ce", steps=24, log_every=4, seed=3)
    seen = []
    whole = finetune(build_finetune_model("digits-cnn", 5), ds, cfg,
                     on_log=lambda p: seen.append(p.step) or (p.step == 12 and torch.save(p.snapshot(),
                                                                                          tmp_path / "s.pt")))
    assert seen == list(range(0, 25, 4))
    snap = torch.load(tmp_path / "s.pt", weights_only=True)
    assert snap["step"] == 12 and snap["steps"] == [0, 4, 8, 12]
    later = []
    resumed = finetune(build_finetune_model("digits-cnn", 5, head_seed=7), ds, cfg, resume=snap,
                       on_log=lambda p: later.append(p.step))
    assert later == [16, 20, 24]  # the snapshot's own step is not logged twice
    assert resumed.steps.tolist() == whole.steps.tolist()
    assert np.array_equal(resumed.loss, whole.loss) and np.array_equal(resumed.error, whole.error)
    if batch_size is None:
        assert np.array_equal(resumed.grad_norm_sq, whole.grad_norm_sq)
    with pytest.raises(ValueError, match="^resume: the snapshot is of another fine-tuning config .*lr"):
        finetune(build_finetune_model("digits-cnn", 5), ds, FinetuneConfig(**{**cfg.__dict__, "lr": 0.01}),
                 resume=snap)
