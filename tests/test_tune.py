"""ttp-ray inside Ray Tune (ttp_ray.tune): the ranked search, the predicted-budget stopper, the real fine-tune as
a trainable, `ttp-ray tune`. One local Ray on 127.0.0.1 for the module (shut down at its end), one small sweep on
300 digits predicted once; every Tune trial is a real fine-tune of at most 40 steps."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import run_cli
from ttp_ray.sweep.spec import parse_spec
from ttp_ray.tables import GROUND_TRUTH_SCHEMA, read_table

SMALL = {
    "name": "tunetest",
    "model": "digits-cnn",
    "datasets": ["digits-5to9:subset=300"],
    "losses": ["ce"],
    "lr": {"fraction_of_max_stable": [0.1, 0.3, 0.6, 1.3]},
    "momentum": [0.9, 0.0],
    "batch_size": [32, "full"],
    "eps": [0.01],
    "criteria": ["error", "loss"],
    "budget": {"steps": 40},
    "kernel": {"k": 128, "class_trace": True},
    "simulation": {"momentum_mode": "heavy_ball", "paths": 2, "log_every": 5},
}
TARGET = 0.3  # a common error target several configs of this short budget are predicted to reach


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from ttp_ray.sweep.driver import start_local_ray

    assert not ray.is_initialized()
    start_local_ray(num_cpus=2, object_store_mb=100)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def swept(local_ray, tmp_path_factory):
    """The small sweep predicted once (no ground truth): (spec, OUT)."""
    from ttp_ray.sweep.driver import run_sweep

    spec = parse_spec(SMALL)
    out = tmp_path_factory.mktemp("tune") / "sweep"
    assert run_sweep(spec, str(out), progress=False).complete
    return spec, out


def copy_of(swept, tmp_path, name):
    """A fresh OUT holding only the sweep's predictions (each test tunes into its own)."""
    spec, out = swept
    dst = tmp_path / name
    shutil.copytree(out, dst)
    return spec, dst


def tables(out):
    from ttp_ray.analysis import load_sweep

    return load_sweep(out, tables=("predictions", "ground_truth", "curves"))


# ------------------------------------------------------------------------------------------ no Ray needed

def test_stopper_stops_at_the_budget_or_the_target():
    from ttp_ray.tune import PredictedBudgetStopper, StopRule

    stop = PredictedBudgetStopper({"a": StopRule(20, "error", 0.1), "b": StopRule(15)})

    def result(cid, step, error):
        return {"config": {"config_id": cid}, "step": step, "error": error}

    assert not stop("t1", result("a", 15, 0.3))
    assert stop("t1", result("a", 15, 0.1))  # at the target
    assert stop("t1", result("a", 20, 0.3))  # at the budget
    assert not stop("t2", result("b", 10, 0.0))  # no target: the budget only
    assert stop("t2", result("b", 15, 0.9))
    assert not stop("t3", result("other", 10_000, 0.0))  # no rule: runs on
    assert not stop.stop_all()


@pytest.mark.parametrize("kw,field", [({"top": 0}, "top"), ({"by": "speed"}, "by"), ({"margin": 0.5}, "margin"),
                                      ({"max_final_error": 2.0}, "max_final_error"),
                                      ({"checkpoint_every": 0}, "checkpoint_every")])
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, kw, field):
    from ttp_ray.tune import TuneOptions

    with pytest.raises(ValueError, match=f"^{field}:"):
        TuneOptions(**kw)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nmodel: digits-cnn\ndatasets: [digits-5to9]\nlr: [0.01]\nbudget: {steps: 10}\n")
    flag, value = next(iter(kw.items()))
    code, out, err = run_cli(["tune", str(spec), f"--{flag.replace('_', '-')}", str(value), "--out",
                              str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith(f"error: {field}:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before any work


# ---------------------------------------------------------------------------------------------- the search

def expected_budgets(cands, margin, budget=40):
    """The stopper's budgets by cost to target, written out: steps to the target x e^w where the row has a T_hat
    interval T e^{+-w} not cut at the budget (e^w = its upper bound / T_hat), else margin x those steps."""
    out = []
    for r in cands.itertuples(index=False):
        high = getattr(r, "predicted_steps_high", None)
        if high is not None and high == high and high < budget and r.predicted_steps > 0:
            want = r.predicted_steps_to_target * (high / r.predicted_steps)
        else:
            want = margin * r.predicted_steps_to_target
        out.append(int(min(budget, max(1, math.ceil(round(want, 9))))))
    return out


@pytest.mark.timeout(240)
def test_candidates_follow_the_ranking_and_skip_what_cannot_pay(swept):
    from ttp_ray.analysis import rank
    from ttp_ray.tune import TuneOptions, candidates, param_space

    _, out = swept
    t = tables(out)
    ranked = rank(t.predictions, curves=t.curves, criterion="error", eps=0.01, target_error=TARGET)
    cands = candidates(t.predictions, t.curves, TuneOptions(top=4, margin=1.5, target_error=TARGET))
    assert len(cands) == 4 and list(cands["rank"]) == [1, 2, 3, 4]
    assert list(cands.config_id) == list(ranked.config_id[:4])
    assert not cands.diverged.any() and cands.predicted_steps_to_target.notna().all()
    assert cands.trial_budget_steps.tolist() == expected_budgets(cands, 1.5)
    assert (cands.trial_stop_value == cands.target).all() and (cands.trial_metric == "error").all()
    # without an interval: margin x the predicted steps to the target
    bare = candidates(t.predictions.drop(columns="predicted_steps_high"), t.curves,
                      TuneOptions(top=4, margin=1.5, target_error=TARGET))
    want = np.minimum(40, np.ceil(1.5 * bare.predicted_steps_to_target.astype(float)))
    assert bare.trial_budget_steps.tolist() == want.astype(int).tolist()
    assert set(bare.trial_budget_rule) == {"1.5 x predicted_steps_to_target"}
    # diverging and never-reaching configs are never tried, however many are asked for
    every = candidates(t.predictions, t.curves, TuneOptions(top=1000, target_error=TARGET))
    never = set(ranked.config_id[ranked["rank"].isna()])
    assert never and not never & set(every.config_id) and len(every) == ranked["rank"].notna().sum()
    # a final-error ceiling leaves out the configs predicted to end above it
    ceiling = float(np.median(every.predicted_final_error))
    capped = candidates(t.predictions, t.curves, TuneOptions(top=1000, max_final_error=ceiling, target_error=TARGET))
    assert (capped.predicted_final_error <= ceiling).all() and len(capped) < len(every)
    # a T_hat_eps interval T e^{+-w}, where the predictor gives one, is the budget instead of margin x the estimate:
    # its upper bound by T_hat_eps, steps to the target x e^w by cost to target (e^w from the band, uncut rows only)
    pred = t.predictions.copy()
    pred["predicted_steps_high"] = np.minimum(40, np.ceil(pred.predicted_steps * 1.25))
    banded = candidates(pred, t.curves, TuneOptions(top=6, target_error=TARGET))
    cut = banded.predicted_steps_high >= 40
    assert (~cut).any()
    assert banded.trial_budget_steps.tolist() == expected_budgets(banded, 1.2)
    assert set(banded.trial_budget_rule[~cut]) == {"interval (predicted_steps_high)"}
    by_t_banded = candidates(pred, t.curves, TuneOptions(top=2, by="predicted_cost_s", target_error=TARGET))
    assert by_t_banded.trial_budget_steps.tolist() == by_t_banded.predicted_steps_high.astype(int).tolist()
    # by T_hat_eps: the budget is margin x T_hat_eps, and no target stops the trial
    by_t = candidates(t.predictions.drop(columns="predicted_steps_high"), t.curves,
                      TuneOptions(top=2, by="predicted_cost_s"))
    assert by_t.trial_stop_value.isna().all()
    assert by_t.trial_budget_steps.tolist() == np.minimum(40, np.ceil(1.2 * by_t.predicted_steps)).astype(int).tolist()
    # the param_space: one grid over the config ids, in ranked order; the rest follows each config
    space = param_space(cands)
    assert space["config_id"]["grid_search"] == list(cands.config_id)
    assert set(space) == {"config_id", "dataset", "model", "loss", "lr", "lr_fraction", "momentum", "batch_size",
                          "budget_steps", "seed"}


# ---------------------------------------------------------------------------------------- Tune, for real

def stop_step(curve, rule, budget):
    """Where the stopper must end a run whose full curve is ``curve`` (steps, values of the rule's metric): the
    first logged step at or past its budget, or at or below its target, else the spec's budget."""
    steps, values = curve
    for s, v in zip(steps, values):
        if s >= rule.budget_steps or (rule.metric is not None and v <= rule.value):
            return s
    return budget


@pytest.mark.timeout(300)
def test_four_trials_stop_at_their_predicted_budget_and_land_in_ground_truth(swept, tmp_path):
    from ttp_ray.analysis import validation_table
    from ttp_ray.finetune import finetune
    from ttp_ray.models import build_finetune_model, load_dataset_for_model
    from ttp_ray.tune import TrialSetup, TuneOptions, run_tune, tune_text

    spec, out = copy_of(swept, tmp_path, "four")
    options = TuneOptions(top=4, margin=1.0, target_error=TARGET, verbose=0)
    outcome = run_tune(spec, str(out), options=options, progress=False, echo=lambda line: None)
    assert not outcome.failures and outcome.experiment and not outcome.restored
    assert outcome.experiment.startswith(str((out / "tune").resolve()))  # Tune's storage is under OUT
    assert [c.source for c in outcome.configs] == ["tuned"] * 4
    t = tables(out)
    gt = t.ground_truth
    assert sorted(gt.config_id.unique()) == sorted(c.row["config_id"] for c in outcome.configs)
    assert len(gt) == 4 * len(spec.criteria) * len(spec.eps)
    # the sweep's schema, nothing more, nothing less; every config column filled
    raw = read_table(out, "ground_truth")
    assert raw.schema.equals(GROUND_TRUTH_SCHEMA.append(pa.field("dataset", pa.string())))
    config_cols = ["config_id", "model", "loss", "lr", "momentum", "batch_size", "full_batch", "effective_lr",
                   "criterion", "eps", "eps_mode", "budget_steps", "n", "max_stable_lr", "seed", "step_time_s",
                   "train_seconds", "last_step", "actual_final_error"]
    assert gt[config_cols].notna().all().all()
    ds = load_dataset_for_model("digits-5to9:subset=300", "digits-cnn")
    setup = TrialSetup(spec)
    for c in outcome.configs:
        cid = c.row["config_id"]
        real = t.curves[(t.curves.config_id == cid) & (t.curves.source == "actual")].sort_values("step")
        # the run as it would go on without a stopper: the stopper must have ended it exactly where its rule says
        whole = finetune(build_finetune_model("digits-cnn", ds.num_classes), ds,
                         setup.finetune_config({**c.row, "batch_size": None if c.row["full_batch"] else
                                                int(c.row["batch_size"]), "seed": 0}))
        expected = stop_step((whole.steps, whole.error), c.rule, 40)
        assert real.step.max() == expected, (cid, c.rule)
        assert np.allclose(real.error.to_numpy(), whole.error[: len(real)])
        rows = gt[gt.config_id == cid]
        assert (rows.last_step == expected).all()
        if expected < 40:  # stopped early: no L_T, so no T_eps
            assert rows.actual_steps.isna().all()
    # validate reads them: cost to the target on both sides, T_eps only for whole runs
    val = validation_table(t.predictions, gt, t.curves, target_error=TARGET)
    err = val[val.criterion == "error"]
    reached = err.actual_steps_to_target.notna()
    assert reached.any()
    assert set(val.status[val.last_step < 40] if "last_step" in val else []) <= {"stopped early"}
    text = tune_text(outcome)
    assert "pick digits-5to9:subset=300" in text and "tuned" in text
    # resume: nothing left to train, no Tune experiment at all
    again = run_tune(spec, str(out), options=options, progress=False, echo=lambda line: None)
    assert again.experiment is None and [c.source for c in again.configs] == ["tune"] * 4
    assert len(tables(out).ground_truth) == len(gt)


@pytest.mark.timeout(300)
def test_a_failed_trial_resumes_from_its_checkpoint_with_tuner_restore(swept, tmp_path):
    from ttp_ray.finetune import finetune
    from ttp_ray.models import build_finetune_model, load_dataset_for_model
    from ttp_ray.tune import TrialSetup, TuneOptions, run_tune

    spec, out = copy_of(swept, tmp_path, "restore")
    options = TuneOptions(top=2, full_budget=True, checkpoint_every=2, max_concurrent_trials=1, target_error=TARGET,
                          verbose=0)
    marker = tmp_path / "failed-once"
    first = run_tune(spec, str(out), options=options, progress=False, echo=lambda line: None,
                     _fail_marker=str(marker))
    assert marker.exists() and len(first.failures) == 1
    failed = first.failures[0].split(":")[0]
    assert {c.source for c in first.configs} == {"tuned", "failed"}
    second = run_tune(spec, str(out), options=options, progress=False, echo=lambda line: None,
                      _fail_marker=str(marker))
    assert second.restored and second.experiment == first.experiment and not second.failures
    assert [c.source for c in second.configs if c.row["config_id"] == failed] == ["tuned"]
    t = tables(out)
    real = t.curves[(t.curves.config_id == failed) & (t.curves.source == "actual")].sort_values("step")
    row = next(c.row for c in second.configs if c.row["config_id"] == failed)
    ds = load_dataset_for_model("digits-5to9:subset=300", "digits-cnn")
    run = {**row, "batch_size": None if row["full_batch"] else int(row["batch_size"]), "seed": 0}
    whole = finetune(build_finetune_model("digits-cnn", ds.num_classes), ds, TrialSetup(spec).finetune_config(run))
    # resumed from its checkpoint (weights, momentum, minibatch order): the curve of a run that never failed
    assert real.step.tolist() == whole.steps.tolist()
    assert np.allclose(real.loss.to_numpy(), whole.loss, rtol=1e-6, atol=0)
    gt = t.ground_truth[t.ground_truth.config_id == failed]
    assert (gt.last_step == 40).all() and gt.actual_steps.notna().all()  # a whole run: T_eps measured
    # Tune's own record: after the restore the trial went on from a checkpointed step, not from step 0
    (trial_dir,) = [p for p in Path(second.experiment).iterdir() if p.name.startswith(failed)]
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    after = [r for r in reports if r["iterations_since_restore"] == 1 and r["training_iteration"] > 1]
    assert after and after[0]["step"] > 0


@pytest.mark.timeout(240)
def test_cli_tune_reuses_out_and_names_a_bad_criterion(swept, tmp_path, capsys):
    import yaml

    spec, out = copy_of(swept, tmp_path, "cli")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    code, stdout, err = run_cli(["tune", str(path), "--out", str(out), "--criterion", "accuracy", "--quiet"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: criterion:")
    code, stdout, err = run_cli(["tune", str(path), "--out", str(out), "--top", "1", "--target-error", str(TARGET),
                                 "--quiet"], capsys)
    assert code == 0, err
    assert "predicted against real cost to the target (error, eps 0.01)" in stdout
    assert len(tables(out).ground_truth.config_id.unique()) == 1


@pytest.mark.timeout(300)
def test_cli_tune_from_scratch_starts_ray_after_the_preflight_and_leaves_no_ray_process(tmp_path):
    """`ttp-ray tune` in a fresh process (no Ray yet): the sweep's preflight, then the sweep starts Ray and keeps it
    (``run_sweep(keep_ray=True)``), the trial runs on it, and no Ray process of it remains once it exits."""
    import subprocess
    import sys
    import time

    import yaml

    from conftest import ROOT, TIME_SCALE, left_running

    d = dict(SMALL, lr={"fraction_of_max_stable": [0.3, 0.6]}, momentum=[0.0], batch_size=["full"])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ttp_ray.cli", "tune", str(path), "--out", str(out), "--top", "1",
                             "--quiet", "--num-cpus", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = {}  # its Ray processes, recorded while it runs (the reaper's view)
    from ttp_ray.sweep.reaper import ray_descendants

    while proc.poll() is None:
        seen.update(ray_descendants(proc.pid))
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "predicted against real" in stdout and "Tune experiment:" in stdout
    assert len(tables(out).ground_truth.config_id.unique()) == 1
    assert any(v[1] == "raylet" for v in seen.values()), seen

    deadline = time.monotonic() + 20 * TIME_SCALE
    while left_running(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left_running(seen), left_running(seen)
