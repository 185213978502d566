"""The sweep engine with Ray: a real (small) sweep end to end through the CLI, a 2-node cluster on
loopback, an actor killed mid-sweep, an interrupted-then-resumed sweep. Tiny datasets (100 images),
small sketches, short budgets; every Ray instance started here is shut down here."""
import copy
import json
import os

import pytest
import yaml

from conftest import ROOT, TIME_SCALE, left_running, run_cli
from ttp_ray.sweep.output import read_table
from ttp_ray.sweep.spec import parse_spec

PREDICTION_COLUMNS = {
    "config_id", "dataset", "model", "loss", "lr", "momentum", "batch_size", "effective_lr", "criterion", "eps",
    "budget_steps", "predicted_steps", "predicted_fraction", "diverged", "predicted_final_loss",
    "predicted_final_error", "step_time_s", "predicted_cost_s", "method", "kernel_seconds", "simulate_seconds",
    "max_stable_lr", "lr_fraction",
}
GROUND_TRUTH_COLUMNS = {
    "config_id", "dataset", "model", "loss", "lr", "momentum", "batch_size", "effective_lr", "criterion", "eps",
    "budget_steps", "actual_steps", "actual_final_loss", "actual_final_error", "train_seconds", "seed",
}

TINY = {
    "name": "tiny",
    "model": "digits-cnn",
    "datasets": ["digits-5to9:subset=100"],
    "losses": ["mse", "ce"],
    "lr": {"fraction_of_max_stable": [0.1, 0.5, 1.2]},
    "momentum": [0.0, 0.9],
    "batch_size": ["full", 20],
    "eps": [0.01],
    "budget": {"steps": 30},
    "kernel": {"k": 64, "class_trace": True},
    "simulation": {"momentum_mode": "heavy_ball", "paths": 2, "log_every": 5},
    "resources": {"shard_size": 6},
}


def reduced_quickstart():
    """sweeps/quickstart.yaml with 100-image subsets, a smaller grid, sketch and budget."""
    d = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    d["datasets"] = [f"{x}:subset=100" for x in d["datasets"]]
    d["lr"] = {"fraction_of_max_stable": [0.1, 0.4, 1.3]}
    d["batch_size"] = ["full", 20]
    d["budget"] = {"steps": 40}
    d["kernel"]["k"] = 64
    d["simulation"]["paths"] = 2
    d["ground_truth"]["where"] = {"batch_size": [20], "momentum": [0.9], "lr_fraction": [0.4]}
    d["ground_truth"]["max_configs"] = 1
    d["ground_truth"]["top"] = 0  # the predicted best: test_ground_truth_top_fine_tunes_the_predicted_best
    return d


def assert_every_config_once(out, spec):
    pred = read_table(out, "predictions").to_pandas()
    per_config = len(spec.criteria) * len(spec.eps)
    counts = pred.groupby("config_id").size()
    assert (counts == per_config).all(), counts[counts != per_config]
    assert len(counts) == spec.grid_size * len(spec.datasets)
    return pred


# ------------------------------------------------------------------------------ 2 nodes (first: own Ray)

@pytest.mark.timeout(180)
def test_two_node_cluster_runs_actors_on_both_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from ttp_ray.sweep.driver import run_sweep

    assert not ray.is_initialized()
    node = dict(node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=80 * 1024 * 1024)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        cluster.add_node(**node)
        d = copy.deepcopy(TINY)
        d["datasets"] = ["digits-5to9:subset=100", "digits:subset=100"]
        d["lr"] = {"fraction_of_max_stable": [0.2, 0.8]}
        d["losses"] = ["mse"]
        spec = parse_spec(d)
        res = run_sweep(spec, str(tmp_path / "out"), address=cluster.address, progress=False)
        assert res.complete and not res.failures
        assert len(set(res.actor_nodes.values())) == 2, res.actor_nodes
        assert_every_config_once(res.out, spec)
        assert not ray.is_initialized()  # the driver disconnects from what it attached to
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------------- local Ray

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


@pytest.mark.timeout(240)
def test_quickstart_reduced_end_to_end(local_ray, tmp_path, capsys):
    spec_path = tmp_path / "quick.yaml"
    spec_path.write_text(yaml.safe_dump(reduced_quickstart()))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["sweep", str(spec_path), "--out", str(out)], capsys)
    assert code == 0, err
    assert "top " in stdout and "predicted_cost_s" in stdout and f"tables: {out}/predictions" in stdout
    spec = parse_spec(reduced_quickstart())

    pred = assert_every_config_once(out, spec)
    assert PREDICTION_COLUMNS <= set(pred.columns)
    assert set(pred.dataset.astype(str)) == {"digits-5to9:subset=100", "digits:subset=100"}
    reached = pred[pred.predicted_steps.notna()]
    assert len(reached) and (reached.predicted_cost_s - reached.predicted_steps * reached.step_time_s).abs().max() < 1e-9
    # above the stability limit one real edge probe per (dataset, loss, momentum, lr) decides, for GD and SGD alike;
    # unprobed (the work bound), momentum diverges and plain GD/SGD is the catapult phase (§14)
    beyond = pred[pred.lr_fraction > 1]
    assert len(beyond) and (beyond.groupby(["dataset", "loss", "momentum", "lr"]).diverged.nunique() == 1).all()
    trains = beyond[~beyond.diverged]
    assert trains.empty or trains.predicted_steps_high.notna().any()
    assert (beyond.extra_gradients >= pred[pred.lr_fraction < 1].groupby("dataset").extra_gradients.min().min()).all()
    assert (pred.method.str.startswith("probed-")).all() and (pred.extra_gradients > 0).all()
    assert pred[pred.diverged].predicted_steps.isna().all()
    assert ((pred.lr - pred.lr_fraction * pred.max_stable_lr).abs() < 1e-9 * pred.lr).all()

    gt = read_table(out, "ground_truth").to_pandas()
    assert GROUND_TRUTH_COLUMNS <= set(gt.columns)
    assert gt.config_id.nunique() == 2 and set(gt.config_id) <= set(pred.config_id)
    joined = gt.merge(pred, on=["config_id", "criterion", "eps"], suffixes=("", "_pred"))
    assert len(joined) == len(gt) and (joined.lr == joined.lr_pred).all()

    curves = read_table(out, "curves").to_pandas()
    assert set(curves.source) == {"predicted", "actual"}
    assert set(curves[curves.source == "actual"].config_id) == set(gt.config_id)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["spec"]["name"] == "quickstart"
    assert {"ray", "torch", "pyarrow", "ttp-ray"} <= set(manifest["versions"])
    assert set(manifest["datasets"]) == {"digits-5to9:subset=100", "digits:subset=100"}
    assert manifest["completed"]["prediction_shards_done"] == manifest["plan"]["shards"]

    # the same spec again: everything skipped, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    code, stdout, err = run_cli(["sweep", str(spec_path), "--out", str(out)], capsys)
    assert code == 0, err
    assert "0 shard(s) and 0 ground-truth run(s) written" in stdout
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}

    # a changed spec into the same OUT: refused, one line, exit 2
    changed = reduced_quickstart()
    changed["momentum"] = [0.5]
    changed["ground_truth"] = False
    spec_path.write_text(yaml.safe_dump(changed))
    code, _, err = run_cli(["sweep", str(spec_path), "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error: output:") and "momentum" in err and "--fresh" in err
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}

    # ... unless --fresh: the old tables go, the new sweep's take their place
    code, stdout, err = run_cli(["sweep", str(spec_path), "--out", str(out), "--fresh", "--quiet"], capsys)
    assert code == 0, err
    fresh = assert_every_config_once(out, parse_spec(changed))
    assert set(fresh.momentum) == {0.5} and not set(fresh.config_id) & set(pred.config_id)


@pytest.mark.timeout(180)
def test_actor_killed_mid_sweep_is_restarted(local_ray, tmp_path):
    from ttp_ray.sweep.driver import run_sweep

    spec = parse_spec(TINY)
    marker = tmp_path / "crashed"
    res = run_sweep(spec, str(tmp_path / "out"), progress=False, _crash_marker=str(marker))
    assert marker.exists(), "the test hook did not fire"
    assert res.complete and not res.failures
    assert res.written["predictions"] == res.plan.n_shards >= 3
    assert_every_config_once(res.out, spec)


@pytest.mark.timeout(180)
def test_interrupted_sweep_resumes_without_loss_or_duplicates(local_ray, tmp_path):
    from ttp_ray.sweep.driver import run_sweep

    spec = parse_spec(TINY)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, str(out), progress=False, _stop_after_shards=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["completed"]["prediction_shards_done"] == 2
    first = read_table(out, "predictions").to_pandas()
    assert first.config_id.nunique() == 12

    res = run_sweep(spec, str(out), progress=False)
    assert res.complete and res.skipped["predictions"] == 2
    assert res.written["predictions"] == res.plan.n_shards - 2
    pred = assert_every_config_once(out, spec)
    kept = pred[pred.config_id.isin(first.config_id)].sort_values(["config_id", "criterion", "eps"])
    assert list(kept.predicted_steps.fillna(-1)) == list(
        first.sort_values(["config_id", "criterion", "eps"]).predicted_steps.fillna(-1))


@pytest.mark.timeout(180)
def test_killed_driver_loses_nothing_and_resumes(local_ray, tmp_path):
    """SIGKILL the CLI once its first part is on disk; the parts survive, the re-run completes the rest."""
    import signal
    import subprocess
    import sys
    import time

    from ttp_ray.sweep.driver import run_sweep
    from ttp_ray.sweep.reaper import ray_descendants

    d = copy.deepcopy(TINY)
    d["resources"] = {"shard_size": 2}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ttp_ray.cli", "sweep", str(spec_path), "--out", str(out),
                             "--num-cpus", "1", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    ray_processes = {}
    try:  # waits for the first part on disk (the event), however long a loaded machine takes to get there
        while not list(out.glob("predictions/*/part-*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
        ray_processes = ray_descendants(proc.pid)  # its Ray: head processes, agents, workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    survived = {p.name: p.read_bytes() for p in out.glob("predictions/*/part-*.parquet")}
    assert 1 <= len(survived) <= 12, proc.returncode  # (a fast machine may finish before the kill lands)
    # none of its Ray processes outlives it: each ends within a bound (Ray's agents alone linger 60 s on a dead GCS)
    names = {v[1] for v in ray_processes.values()}
    assert proc.returncode != -signal.SIGKILL or {"raylet", "ray::DashboardAgent"} <= names, names
    deadline = time.monotonic() + 20 * TIME_SCALE
    while left_running(ray_processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left_running(ray_processes), left_running(ray_processes)

    spec = parse_spec(d)
    res = run_sweep(spec, str(out), progress=False)  # resumed on this process's Ray
    assert res.complete and res.skipped["predictions"] >= len(survived)
    assert_every_config_once(out, spec)
    for name, blob in survived.items():  # what was written before the kill is kept as it was
        assert next(out.glob(f"predictions/*/{name}")).read_bytes() == blob
    assert not list(out.rglob(".*.tmp"))  # temp files of writes cut short are swept on resume
    if proc.returncode == -signal.SIGKILL:  # the killed driver's lock is stale: taken over, and said so
        assert any("took over the lock" in n and f"pid {proc.pid}" in n for n in res.notes), res.notes
    assert not (out / ".ttp-ray.lock").exists()


@pytest.mark.timeout(240)
def test_two_models_as_a_grid_axis(local_ray, tmp_path):
    """model: [digits-cnn, digits-resnet]: one kernel state per (dataset, model), rows carrying their model, parts
    under the same dataset partition (the model in the file name), ground truth per model."""
    from ttp_ray.sweep.driver import run_sweep

    d = {"name": "two-models", "model": ["digits-cnn", "digits-resnet"], "datasets": ["digits-5to9:subset=100"],
         "losses": ["mse"], "lr": {"fraction_of_max_stable": [0.2, 0.8]}, "budget": {"steps": 10},
         "kernel": {"k": 64}, "simulation": {"paths": 2, "log_every": 5},
         "ground_truth": {"where": {"lr_fraction": [0.2]}}}
    spec = parse_spec(d)
    out = tmp_path / "out"
    res = run_sweep(spec, str(out), progress=False)
    assert res.complete and not res.failures
    label = "digits-5to9:subset=100"
    assert set(res.datasets) == {f"{label} @ digits-cnn", f"{label} @ digits-resnet"}
    lams = {k: v["lambda_max"] for k, v in res.datasets.items()}
    assert len(set(lams.values())) == 2  # two kernel states

    pred = read_table(out, "predictions").to_pandas()
    assert set(pred.dataset.astype(str)) == {label} and set(pred.model) == {"digits-cnn", "digits-resnet"}
    counts = pred.groupby("config_id").size()
    assert len(counts) == spec.grid_size * len(spec.models) and (counts == len(spec.criteria)).all()
    for model, rows in pred.groupby("model"):  # each model's lr is its own kernel's fraction
        assert rows.max_stable_lr.nunique() == 1
        assert rows.max_stable_lr.iloc[0] == pytest.approx(
            2 * 100 / lams[f"{label} @ {model}"], rel=1e-9)
    parts = sorted(p.name for p in out.glob("predictions/dataset=*/*.parquet"))
    assert parts == ["part-digits-cnn-00000.parquet", "part-digits-resnet-00000.parquet"]

    gt = read_table(out, "ground_truth").to_pandas()
    assert set(gt.model) == {"digits-cnn", "digits-resnet"} and set(gt.config_id) <= set(pred.config_id)
    joined = gt.merge(pred, on=["config_id", "criterion", "eps"], suffixes=("", "_pred"))
    assert len(joined) == len(gt) and (joined.model == joined.model_pred).all()
    spectra = read_table(out, "spectra").to_pandas()
    assert set(spectra.model) == {"digits-cnn", "digits-resnet"}

    again = run_sweep(spec, str(out), progress=False)  # resumed: everything found on disk
    assert again.complete and again.written == {"predictions": 0, "ground_truth": 0}


@pytest.mark.timeout(240)
def test_ground_truth_enabled_on_an_existing_out_resumes(local_ray, tmp_path, capsys):
    """`validate` advises enabling ground truth and re-running: the resume keeps every prediction and adds the
    fine-tunes (a ground-truth-only change is the same sweep)."""
    from ttp_ray.sweep.driver import run_sweep

    d = copy.deepcopy(TINY)
    d["losses"], d["batch_size"] = ["mse"], [20]
    out = tmp_path / "out"
    first = run_sweep(parse_spec(d), str(out), progress=False)
    assert first.complete and first.plan.n_ground_truth == 0
    code, _, err = run_cli(["validate", str(out)], capsys)
    assert code == 2 and "resuming adds the fine-tunes" in err
    parts = {p: p.stat().st_mtime_ns for p in out.glob("predictions/*/*.parquet")}

    d["ground_truth"] = {"where": {"lr_fraction": [0.1], "momentum": [0.9]}}
    spec = parse_spec(d)
    again = run_sweep(spec, str(out), progress=False)
    assert again.complete and again.written == {"predictions": 0, "ground_truth": 1}
    assert again.skipped["predictions"] == first.plan.n_shards
    assert parts == {p: p.stat().st_mtime_ns for p in out.glob("predictions/*/*.parquet")}
    assert json.loads((out / "manifest.json").read_text())["spec_hash"] == spec.identity_hash()
    code, stdout, err = run_cli(["validate", str(out)], capsys)
    assert code == 0, err
    assert_every_config_once(out, spec)


@pytest.mark.timeout(300)
def test_ground_truth_top_fine_tunes_the_predicted_best(local_ray, tmp_path):
    """``ground_truth.top``: once the predictions are written, the configs the default ranking puts first per
    (dataset, loss) are fine-tuned too; the choice reads the written predictions only, so a resume makes the same
    one, skips what is on disk, recomputes a lost run, and the manifest is complete only with all of them."""
    from ttp_ray import analysis
    from ttp_ray.sweep.driver import run_sweep

    d = copy.deepcopy(TINY)
    d["batch_size"] = [20]
    d["ground_truth"] = {"where": {"lr_fraction": [0.1], "momentum": [0.0]}, "top": 1}
    spec = parse_spec(d)
    out = tmp_path / "out"
    first = run_sweep(spec, str(out), progress=False)
    assert first.complete, first.failures
    pred = read_table(out, "predictions").to_pandas()
    ranked = analysis.rank(pred, curves=read_table(out, "curves").to_pandas(), criterion=spec.criteria[0],
                           eps=spec.eps[0])
    best = {loss: g.sort_values("rank").config_id.iloc[0] for loss, g in ranked[ranked["rank"].notna()].groupby("loss")}
    assert set(best) == {"mse", "ce"}
    gt = read_table(out, "ground_truth").to_pandas()
    planned = {g.config.config_id for g in first.plan.ground_truth_runs()}
    assert set(gt.config_id) == planned | set(best.values())  # the planned selection and the predicted best
    assert first.written["ground_truth"] == len(set(gt.config_id))
    assert gt.groupby(["config_id", "seed"]).size().eq(len(spec.criteria) * len(spec.eps)).all()  # each once

    again = run_sweep(spec, str(out), progress=False)  # the same choice, all on disk
    assert again.complete and again.written == {"predictions": 0, "ground_truth": 0}

    lost = next(out.glob(f"ground_truth/*/part-gt-{best['ce']}-s0.parquet"))
    lost.unlink()
    third = run_sweep(spec, str(out), progress=False)
    assert third.complete and third.written == {"predictions": 0, "ground_truth": 1}
    assert lost.exists()
    assert json.loads((out / "manifest.json").read_text())["complete"]


@pytest.mark.timeout(240)
def test_truncated_part_is_recomputed_on_resume(local_ray, tmp_path):
    from ttp_ray.sweep.driver import run_sweep

    spec = parse_spec(TINY)
    out = tmp_path / "out"
    assert run_sweep(spec, str(out), progress=False).complete
    before = read_table(out, "predictions").to_pandas().sort_values(["config_id", "criterion", "eps"])
    victim = sorted(out.glob("predictions/*/part-*.parquet"))[1]
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 3])  # cut short, as a full disk or a copy gone wrong leaves it

    res = run_sweep(spec, str(out), progress=False)
    assert res.complete and res.written["predictions"] == 1 and res.skipped["predictions"] == res.plan.n_shards - 1
    assert any("did not read back" in n for n in res.notes), res.notes
    after = assert_every_config_once(out, spec).sort_values(["config_id", "criterion", "eps"])
    assert list(after.predicted_steps.fillna(-1)) == list(before.predicted_steps.fillna(-1))
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


@pytest.mark.timeout(240)
def test_bad_input_found_inside_a_worker_is_not_worth_a_rerun(local_ray, tmp_path, monkeypatch):
    """A factory that works where the preflight runs and fails in the actor (tests.helpers:fails_in_workers): the
    failure names the input and says a re-run cannot fix it."""
    from ttp_ray.sweep.driver import run_sweep

    monkeypatch.setenv("TTP_HELPERS_DRIVER_PID", str(os.getpid()))
    d = copy.deepcopy(TINY)
    d["model"] = "tests.helpers:fails_in_workers"
    res = run_sweep(parse_spec(d), str(tmp_path / "out"), progress=False)
    assert not res.complete and res.failures and not res.retryable
    assert "a re-run cannot fix" in res.failures[0] and "model tests.helpers:fails_in_workers" in res.failures[0]
    assert "digits-5to9:subset=100" in res.failures[0]
