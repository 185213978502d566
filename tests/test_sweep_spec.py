"""Sweep spec, plan, output bookkeeping and the cluster config: everything of the sweep engine that needs
no Ray (tests/test_sweep_engine.py runs the engine itself)."""
import copy
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import ROOT, run_cli
from ttp_ray.sweep.output import OutputError, SweepOutput, as_table, read_table, write_table_atomic
from ttp_ray.sweep.plan import DatasetSize, build_plan, config_id
from ttp_ray.sweep.spec import SpecError, load_spec, parse_spec

BASE = {
    "name": "t",
    "model": "digits-cnn",
    "datasets": ["digits-5to9:subset=100"],
    "lr": [0.01, 0.1],
    "budget": {"steps": 20},
}


def spec_with(**changes):
    d = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is DELETE:
            d.pop(key, None)
        else:
            d[key] = value
    return d


DELETE = object()


# ------------------------------------------------------------------------------------------- spec

def test_defaults_are_stated():
    s = parse_spec(BASE)
    assert s.losses == ("ce",) and s.momentum == (0.0,) and s.batch_size == (None,)
    assert s.eps == (0.01,) and s.criteria == ("loss", "error")
    from ttp_ray.kernel import KernelOptions

    assert s.kernel.options() == KernelOptions() and s.kernel.cache is True and s.kernel.subset is None
    assert s.simulation.method == "auto" and s.simulation.paths == 8
    assert s.ground_truth.enabled is False and s.resources.actors == "auto"
    assert s.output_dir() == "runs/t" and s.grid_size == 2
    assert s.datasets[0].ref == "digits-5to9:subset=100" and s.datasets[0].subset == 100


def test_forms_of_fields():
    s = parse_spec(spec_with(
        datasets=["digits-5to9", {"name": "digits", "subset": 50, "label": "d50"}],
        lr={"fraction_of_max_stable": {"geomspace": [0.01, 1.0, 3]}},
        batch_size=["full", 16], momentum=[0, 0.9], losses="mse",
        ground_truth="on", output="somewhere", budget={"epochs": 2}))
    assert s.lr.relative and s.lr.values == (0.01, 0.1, 1.0)
    assert s.datasets[1].ref == "digits:subset=50" and s.datasets[1].label == "d50"
    assert s.batch_size == (None, 16) and s.losses == ("mse",)
    assert s.ground_truth.enabled and s.output.dir == "somewhere"
    assert s.budget.steps_for(100, 16) == 12 and s.budget.steps_for(100, None) == 2
    assert parse_spec(spec_with(ground_truth=False)).ground_truth.enabled is False
    assert parse_spec(spec_with(lr={"values": ["1e-3", 0.1]})).lr.values == (0.001, 0.1)


def test_shipped_specs_parse():
    q = load_spec(ROOT / "sweeps" / "quickstart.yaml")
    assert {d.name for d in q.datasets} == {"digits-5to9", "digits"}
    assert q.grid_size * len(q.datasets) >= 100 and q.ground_truth.enabled
    a = load_spec(ROOT / "sweeps" / "all_datasets.yaml")
    assert [d.name for d in a.datasets] == ["cifar10", "cifar100", "cub200", "fgvc-aircraft", "mit67", "minc2500",
                                            "stanford-cars"]
    assert a.model == "resnet18"


def _docstring_table():
    """``{field: value}`` of every optional field stated in the spec module's docstring table, values as YAML."""
    import re

    import ttp_ray.sweep.spec as spec_module

    lines = spec_module.__doc__.split("::", 1)[1].splitlines()[2:]
    lines = [re.sub(r"(^|\s)#.*$", "", line).rstrip() for line in lines[:lines.index("")]]
    entries, key = {}, None
    for line in lines:
        m = re.match(r"^    (\w+)(\*?):(.*)$", line)
        if m:
            key = None if m[2] else m[1]  # required fields (*) only show an example
            if key:
                entries[key] = m[3]
        elif key and line.strip():
            entries[key] += " " + line.strip()
    # ground_truth: 'off | on | {...}': the mapping form states the defaults
    return {k: yaml.safe_load(v[v.index("{"):] if "|" in v else v) for k, v in entries.items()}


def test_docstring_table_states_the_dataclass_defaults():
    """Every default in the module docstring's table is the dataclasses' default (a wrong one fails here)."""
    from dataclasses import fields

    table = _docstring_table()
    default = parse_spec(BASE)
    assert set(table) == {"losses", "momentum", "batch_size", "eps", "criteria", "kernel", "simulation", "cost",
                          "ground_truth", "resources", "output", "predictor"}
    for key, stated in table.items():
        given = parse_spec(spec_with(**{key: stated}))  # the docstring's value, read like a spec's
        if isinstance(stated, dict):
            section, want = getattr(given, key), getattr(default, key)
            assert set(stated) == {f.name for f in fields(want)}, f"{key}: the table lists other fields"
            wrong = {k: (v, getattr(want, k)) for k, v in stated.items() if getattr(section, k) != getattr(want, k)}
            assert not wrong, f"{key}: docstring states {wrong} (stated, dataclass default)"
        else:
            assert getattr(given, key) == getattr(default, key), f"{key}: docstring states {stated}"


def test_core_option_defaults_come_from_the_core_dataclasses():
    from dataclasses import fields

    from ttp_ray.dynamics import SimConfig, SimOptions
    from ttp_ray.finetune import FinetuneConfig
    from ttp_ray.kernel import KernelOptions
    from ttp_ray.predict import PredictSettings

    s = parse_spec(BASE)
    k, sim, settings = KernelOptions(), SimOptions(), PredictSettings()
    assert all(getattr(s.kernel, f.name) == getattr(k, f.name) for f in fields(s.kernel) if hasattr(k, f.name))
    assert all(getattr(s.simulation, f.name) == getattr(sim, f.name) for f in fields(s.simulation) if hasattr(sim, f.name))
    assert (s.simulation.eps_mode, s.simulation.definition, s.simulation.window) == (
        settings.eps_mode, settings.definition, settings.window)
    assert s.simulation.settings(s.criteria) == settings and s.criteria == settings.criteria
    assert s.kernel.trainable == next(f.default for f in fields(FinetuneConfig) if f.name == "trainable")
    assert s.momentum == (next(f.default for f in fields(SimConfig) if f.name == "momentum"),)


# sweeps/quickstart.yaml as it was when the spec's defaults and checks moved into the dataclasses (comments dropped)
_OLD_QUICKSTART = """
name: quickstart
model: digits-cnn
datasets:
  - digits-5to9
  - digits
losses: [mse, ce]
lr:
  fraction_of_max_stable: [0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.3]
momentum: [0.0, 0.9]
batch_size: [full, 16, 64]
eps: [0.01, 0.05]
criteria: [loss, error]
budget: {steps: 300}
kernel:
  method: sketch
  projection: countsketch
  k: 512
  class_trace: true
  seed: 0
  cache: true
simulation:
  method: auto
  momentum_mode: heavy_ball
  paths: 4
  seed: 0
  log_every: 5
  eps_mode: absolute
ground_truth:
  enabled: true
  seeds: [0]
  where: {batch_size: [64], momentum: [0.9], lr_fraction: [0.1, 0.4, 0.7]}
  max_configs: 3
resources:
  actors: auto
  cpus_per_actor: 1
  gpus_per_actor: auto
output:
  dir: runs/quickstart
"""


def test_spec_identity_is_stable():
    """The resume identity of a fixed spec, computed on the code before the spec's defaults and checks moved into
    the dataclasses and before the predictor field: a change here makes existing runs of every spec refuse to
    resume (change the identity only knowingly). The default predictor changed from the frozen kernel to the probed
    one (METHOD.md §14), which changes the results: a spec without ``predictor:`` now has a new identity (its old
    OUT is refused, not mixed), and ``predictor: frozen`` keeps the old one. The probed predictor's revision 2 (edge
    probes beyond the limit) changed its results again: a6bde01370c229c8 (revision 1) -> 2c354a9a262ab489; revision 3
    (a wider interval where the kernel ends at the edge of stability) -> 16ab0da93b1f0c4c; revision 4 (a wider
    interval where the predicted curve goes below every probe's lowest loss level) -> 55cec074647f2b92."""
    spec = yaml.safe_load(_OLD_QUICKSTART)
    assert parse_spec({**spec, "predictor": "frozen"}).identity_hash() == "782f830470fab29e"
    assert parse_spec(spec).identity_hash() == "55cec074647f2b92"
    assert parse_spec({**spec, "predictor": "probed"}).identity_hash() == "55cec074647f2b92"


def test_auto_sgd_marks_the_identity_only_where_its_resolution_changed():
    """``simulation.method: auto`` with ``momentum_mode: auto`` once simulated SGD configs with the sde and now with
    exact minibatch heavy ball (METHOD.md §4): such a spec with an SGD batch size gets a new identity (an OUT written
    the old way is refused, not mixed); full-batch grids and explicit momentum modes keep theirs."""
    spec = yaml.safe_load(_OLD_QUICKSTART)  # momentum_mode: heavy_ball, batch sizes full, 16, 64
    assert "auto_sgd" not in parse_spec(spec).identity()["simulation"]
    auto = {**spec, "simulation": {**spec["simulation"], "momentum_mode": "auto"}}
    assert parse_spec(auto).identity()["simulation"]["auto_sgd"] == "minibatch"
    assert "auto_sgd" not in parse_spec({**auto, "batch_size": ["full"]}).identity()["simulation"]
    elr = {**spec, "simulation": {**spec["simulation"], "momentum_mode": "elr"}}
    assert "auto_sgd" not in parse_spec(elr).identity()["simulation"]


BAD = [
    (dict(name="a b"), "name"),
    (dict(name=DELETE), "name"),
    (dict(model="nope"), "model"),
    (dict(model=3), "model"),
    (dict(datasets=[]), "datasets"),
    (dict(datasets=["nope"]), "datasets[0]"),
    (dict(datasets=["digits:subset=0"]), "datasets[0].subset"),
    (dict(datasets=["digits", "digits"]), "datasets"),
    (dict(datasets=[{"subset": 3}]), "datasets[0].name"),
    (dict(datasets=[{"name": "digits", "size": 3}]), "datasets[0].size"),
    (dict(lr=[0.1, -1]), "lr"),
    (dict(lr=[0.1, 0.1]), "lr"),
    (dict(lr={"fraction_of_max_stable": [0]}), "lr.fraction_of_max_stable"),
    (dict(lr={"relative": [0.1]}), "lr"),
    (dict(lr="fast"), "lr"),
    (dict(lr=DELETE), "lr"),
    (dict(losses=["hinge"]), "losses"),
    (dict(momentum=[1.0]), "momentum"),
    (dict(momentum=[-0.1]), "momentum"),
    (dict(batch_size=[0]), "batch_size"),
    (dict(batch_size=["half"]), "batch_size"),
    (dict(eps=[0]), "eps"),
    (dict(criteria=["accuracy"]), "criteria"),
    (dict(budget={"steps": 0}), "budget.steps"),
    (dict(budget={"steps": 10, "epochs": 1}), "budget"),
    (dict(budget={"minutes": 1}), "budget.minutes"),
    (dict(budget=DELETE), "budget"),
    (dict(kernel={"method": "magic"}), "kernel.method"),
    (dict(kernel={"k": 0}), "kernel.k"),
    (dict(kernel={"projection": "fft"}), "kernel.projection"),
    (dict(kernel={"class_trace": "yes"}), "kernel.class_trace"),
    (dict(kernel={"trainable": "some"}), "kernel.trainable"),
    (dict(kernel={"kk": 1}), "kernel.kk"),
    (dict(simulation={"method": "euler"}), "simulation.method"),
    (dict(simulation={"paths": 0}), "simulation.paths"),
    (dict(simulation={"noise": "white"}), "simulation.noise"),
    (dict(simulation={"eps_mode": "percent"}), "simulation.eps_mode"),
    (dict(simulation={"definition": "plateau"}), "simulation.window"),
    (dict(simulation={"method": "sde", "momentum_mode": "heavy_ball"}), "simulation.momentum_mode"),
    (dict(simulation={"drift_reference": 1.5}), "simulation.drift_reference"),
    (dict(simulation={"drift_reference": "half"}), "simulation.drift_reference"),
    (dict(cost={"step_time_steps": 0}), "cost.step_time_steps"),
    (dict(ground_truth={"seeds": [-1]}), "ground_truth.seeds"),
    (dict(ground_truth={"every": 0}), "ground_truth.every"),
    (dict(ground_truth={"where": {"color": ["red"]}}), "ground_truth.where.color"),
    (dict(ground_truth={"gpus": "many"}), "ground_truth.gpus"),
    (dict(ground_truth="maybe"), "ground_truth"),
    (dict(resources={"actors": 0}), "resources.actors"),
    (dict(resources={"gpus_per_actor": -1}), "resources.gpus_per_actor"),
    (dict(resources={"device": "tpu"}), "resources.device"),
    (dict(resources={"shard_size": "big"}), "resources.shard_size"),
    (dict(output={"dir": ""}), "output.dir"),
    (dict(extra=1), "extra"),
]


@pytest.mark.parametrize("changes,field", BAD, ids=[f for _, f in BAD])
def test_bad_field_one_line(changes, field):
    with pytest.raises(SpecError) as exc:
        parse_spec(spec_with(**changes))
    msg = str(exc.value)
    assert msg.startswith(f"{field}:"), msg
    assert "\n" not in msg
    assert "allowed" in msg or "required" in msg or "listed twice" in msg, msg


def test_batch_size_above_n_is_a_spec_error():
    s = parse_spec(spec_with(batch_size=[500]))
    with pytest.raises(SpecError, match=r"^batch_size: 500 exceeds .*allowed: 1\.\.100 or full"):
        build_plan(s, {s.datasets[0].label: DatasetSize(100, 5, "loaded")})


@pytest.mark.parametrize("changes,field", BAD, ids=[f for _, f in BAD])
def test_cli_bad_spec_exit_2_nothing_written(tmp_path, capsys, changes, field):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(spec_with(**changes)))
    out = tmp_path / "out"
    code, _, err = run_cli(["sweep", str(spec), "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), err
    assert not out.exists()


def test_cli_yaml_syntax_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    code, _, err = run_cli(["sweep", str(bad)], capsys)
    assert code == 2 and err.startswith("error: spec:") and "not valid YAML" in err
    code, _, err = run_cli(["sweep", str(tmp_path / "absent.yaml")], capsys)
    assert code == 2 and "error: spec: file" in err


# ------------------------------------------------------------------------------------------- plan

def _plan(**changes):
    s = parse_spec(spec_with(**changes))
    return build_plan(s, {d.label: DatasetSize(100, 5, "loaded") for d in s.datasets})


def test_plan_ids_stable_unique_and_sharded_once():
    kw = dict(losses=["mse", "ce"], lr=[0.01, 0.02, 0.05, 0.1], momentum=[0.0, 0.5, 0.9], batch_size=["full", 10],
              resources={"shard_size": 7})
    a, b = _plan(**kw), _plan(**kw)
    ids = [c.config_id for c in a.datasets[0].configs]
    assert ids == [c.config_id for c in b.datasets[0].configs]
    assert len(set(ids)) == len(ids) == 48
    sharded = [c.config_id for s in a.shards() for c in s.configs]
    assert sorted(sharded) == sorted(ids)
    assert all(len(s.configs) <= 7 for s in a.shards())
    assert a.layout_hash() == b.layout_hash()
    # the id is a function of the config alone
    c0 = a.datasets[0].configs[0]
    assert c0.config_id == config_id("digits-cnn", "digits-5to9:subset=100", c0.loss, c0.lr, None, c0.momentum,
                                     c0.batch_size, 20, 0, "all")


def test_plan_keeps_collapsed_groups_together():
    # lr/(1-m) equal for (0.1, 0) and (0.01, 0.9): one GD simulation (ELR), which a shard should not split
    p = _plan(lr=[0.01, 0.1], momentum=[0.0, 0.9], resources={"shard_size": 2}, simulation={"method": "discrete"})
    d = p.datasets[0]
    assert d.distinct_simulations == 3 and len(d.configs) == 4
    pairs = [{(c.lr, c.momentum) for c in s.configs} for s in d.shards]
    assert {(0.1, 0.0), (0.01, 0.9)} in pairs


def test_ground_truth_selection():
    kw = dict(losses=["mse", "ce"], lr=[0.01, 0.02, 0.05, 0.1], batch_size=["full", 10])
    p = _plan(ground_truth={"where": {"loss": ["ce"], "batch_size": [10]}, "seeds": [0, 1]}, **kw)
    runs = p.ground_truth_runs()
    assert len(runs) == 8 and all(g.config.loss == "ce" and g.config.batch_size == 10 for g in runs)
    # full batch does not depend on the seed (it only orders minibatches): one run per config
    runs = _plan(ground_truth={"where": {"loss": ["ce"]}, "seeds": [0, 1]}, **kw).ground_truth_runs()
    assert sorted((g.config.batch_size is None, g.seed) for g in runs) == [(False, 0)] * 4 + [(False, 1)] * 4 + [(True, 0)] * 4
    p = _plan(ground_truth={"max_configs": 3}, **kw)
    lrs = [g.config.lr for g in p.ground_truth_runs()]
    assert len(lrs) == 3
    p = _plan(ground_truth={"every": 4}, **kw)
    assert len(p.ground_truth_runs()) == 4


def test_dry_run_all_datasets_without_data(capsys):
    code, out, err = run_cli(["sweep", str(ROOT / "sweeps" / "all_datasets.yaml"), "--dry-run"], capsys)
    assert code == 0, err
    assert "cifar10" in out and "50000" in out and "stanford-cars" in out and "paper table" in out
    assert "shards" in out and "distinct simulations" in out and "actors" in out


def test_all_datasets_fails_fast_before_ray(tmp_path, capsys):
    import ray

    out = tmp_path / "all"
    code, _, err = run_cli(["sweep", str(ROOT / "sweeps" / "all_datasets.yaml"), "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: dataset cifar10: files not found") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not ray.is_initialized()


# ----------------------------------------------------------------------------------------- output

def test_atomic_parts_and_read_back(tmp_path):
    rows = [{"config_id": "a", "model": "m", "loss": "ce", "criterion": "loss", "eps": 0.01, "predicted_steps": None,
             "diverged": True}]
    t = as_table(rows, "predictions")
    assert t.schema.field("predicted_steps").type == pa.int64()
    o = SweepOutput(tmp_path)
    o.write_parts("digits:subset=5", "00000", {"predictions": t, "curves": as_table([], "curves")})
    assert not list(tmp_path.rglob(".*.tmp"))
    back = read_table(tmp_path, "predictions")
    assert back.column("dataset").to_pylist() == ["digits:subset=5"]
    assert o.completed_keys("predictions") == {"digits:subset=5/00000"}
    import pandas as pd

    assert list(pd.read_parquet(tmp_path / "predictions")["dataset"]) == ["digits:subset=5"]


def test_as_table_refuses_unknown_keys():
    with pytest.raises(ValueError, match="^predictions: row keys not in the table's schema: bogus, other$"):
        as_table([{"config_id": "a", "bogus": 1}, {"other": 2}], "predictions")
    t = as_table([{"config_id": "a"}], "predictions")  # missing keys stay null
    assert t.column("kernel_subset").to_pylist() == [None] and t.column("predicted_steps").to_pylist() == [None]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def boom(table, where, **kw):
        Path(where).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        write_table_atomic(as_table([], "curves"), tmp_path / "x" / "part-0.parquet")
    assert not list((tmp_path / "x").iterdir())


def test_changed_spec_refused_and_fresh_clears(tmp_path):
    s1 = parse_spec(BASE)
    p1 = build_plan(s1, {s1.datasets[0].label: DatasetSize(100, 5, "loaded")})
    o = SweepOutput(tmp_path)
    o.start(name="t", spec_dict=s1.to_dict(), identity=s1.identity(), spec_hash=s1.identity_hash(),
            layout_hash=p1.layout_hash(), plan_summary={}, previous=None)
    assert o.check_compatible(s1.identity_hash(), p1.layout_hash(), s1.identity())["name"] == "t"
    s2 = parse_spec(spec_with(lr=[0.5]))
    with pytest.raises(OutputError, match=r"different spec \(changed: lr.values\).*--fresh"):
        o.check_compatible(s2.identity_hash(), p1.layout_hash(), s2.identity())
    # resources do not change the identity: a resumed run may use other resources
    s3 = parse_spec(spec_with(resources={"actors": 3, "cpus_per_actor": 2}))
    assert s3.identity_hash() == s1.identity_hash()
    (tmp_path / "predictions").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    o.clear()
    assert not (tmp_path / "predictions").exists() and not (tmp_path / "manifest.json").exists()
    assert (tmp_path / "notes.txt").exists()


def test_tables_without_manifest_refused(tmp_path):
    (tmp_path / "predictions").mkdir()
    with pytest.raises(OutputError, match="no manifest.json"):
        SweepOutput(tmp_path).check_compatible("x", "y", {})


# ------------------------------------------------------------------------------------ cluster.yaml

def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any(w["resources"].get("GPU", 0) >= 1 and w["max_workers"] >= 1 for w in workers)
    assert any("pip install" in c and "ttp-ray" in c for c in cfg["setup_commands"])
    assert not any("0.0.0.0" in c for c in cfg["head_start_ray_commands"])


def test_infeasible_resources_refused_before_ray(tmp_path, capsys):
    import ray

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(spec_with(resources={"cpus_per_actor": 512})))
    out = tmp_path / "out"
    code, _, err = run_cli(["sweep", str(spec), "--out", str(out), "--num-cpus", "2"], capsys)
    assert code == 2 and err.startswith("error: resources.cpus_per_actor: 512 exceeds the 2 CPU(s)"), err
    assert not out.exists() and not ray.is_initialized()


def test_dry_run_quickstart(capsys):
    code, out, err = run_cli(["sweep", str(ROOT / "sweeps" / "quickstart.yaml"), "--dry-run"], capsys)
    assert code == 0, err
    assert "168 configs" in out and "digits-5to9" in out and "896" in out and "1797" in out
    assert "ground-truth run(s)" in out and "local Ray on 127.0.0.1" in out


def test_curve_table_is_long_and_typed():
    import numpy as np

    from ttp_ray.sweep.output import curve_table

    t = curve_table([
        {"config_id": "a", "source": "predicted", "seed": None, "steps": np.array([0, 5]),
         "loss": np.array([1.0, 0.5]), "error": None},
        {"config_id": "b", "source": "actual", "seed": 3, "steps": np.array([0, 5, 10]),
         "loss": np.array([1.0, 0.4, 0.3]), "error": np.array([0.5, 0.2, 0.1])},
    ]).to_pydict()
    assert t["config_id"] == ["a", "a", "b", "b", "b"] and t["seed"] == [None, None, 3, 3, 3]
    assert t["step"] == [0, 5, 0, 5, 10] and t["error"][:2] == [None, None] and t["error"][2] == 0.5


# --- kernel.subset (issue 5): spec validation and one shard predicted through the Ray-free work layer
_SUBSET_SPEC = """
name: t
model: digits-cnn
datasets: [digits-5to9]
losses: [mse]
lr: {fraction_of_max_stable: [0.1, 0.5]}
momentum: [0.0]
batch_size: [full]
criteria: [loss]
budget: {steps: 30}
kernel: {subset: 120, k: 128}
"""


@pytest.mark.parametrize("change,field", [("losses: [mse, ce]", "losses"), ("batch_size: [full, 64]", "batch_size"),
                                          ("criteria: [loss, error]", "criteria")])
def test_kernel_subset_requires_mse_full_batch_loss(change, field):
    import yaml
    from ttp_ray.sweep.spec import SpecError, parse_spec

    key = change.split(":")[0]
    text = "\n".join(change if line.startswith(key + ":") else line for line in _SUBSET_SPEC.splitlines())
    with pytest.raises(SpecError, match=f"^{field}:"):
        parse_spec(yaml.safe_load(text))


def test_kernel_subset_shard_is_predicted_by_extrapolation():
    import yaml
    from ttp_ray.sweep.driver import plan_sweep, preflight
    from ttp_ray.sweep.spec import parse_spec
    from ttp_ray.sweep.work import DatasetWork, WorkerJob

    spec = parse_spec(yaml.safe_load(_SUBSET_SPEC))
    assert spec.kernel.subset == 120
    plan = plan_sweep(spec, preflight(spec))
    work = DatasetWork(WorkerJob(spec, spec.datasets[0].label))
    assert work.info()["n"] == 896
    df = next(work.predict_shard(s) for s in plan.shards()).predictions.to_pandas()
    assert set(df.method) == {"subset-extrapolated"} and df.predicted_steps.notna().all()
    assert (df.kernel_subset == 120).all() and df.subset_alpha.notna().all() and set(df.dynamics) <= {"discrete", "ode"}


def test_drift_reference_refuses_kernel_subset():
    import yaml
    from ttp_ray.sweep.spec import SpecError, parse_spec

    d = yaml.safe_load(_SUBSET_SPEC)
    d["simulation"] = {"drift_reference": 0.6}
    with pytest.raises(SpecError, match="^simulation.drift_reference: .*allowed: null with kernel.subset"):
        parse_spec(d)


def test_drift_reference_warps_full_batch_configs_once_per_loss():
    """simulation.drift_reference: one real reference run per (loss, budget) in the dataset's work, shared by
    every full-batch config of that loss (method ode-drift); minibatch configs keep their simulator."""
    import yaml
    from ttp_ray.drift import DRIFT_METHOD
    from ttp_ray.sweep.driver import plan_sweep, preflight
    from ttp_ray.sweep.spec import parse_spec
    from ttp_ray.sweep.work import DatasetWork, WorkerJob

    spec = parse_spec(yaml.safe_load("""
name: t
model: digits-cnn
datasets: [digits-5to9:subset=100]
losses: [mse, ce]
lr: {fraction_of_max_stable: [0.1, 0.5, 1.2]}
momentum: [0.0, 0.9]
batch_size: [full, 20]
budget: {steps: 30}
kernel: {k: 64}
simulation: {paths: 2, drift_reference: 0.6}
resources: {shard_size: 8}
"""))
    assert spec.simulation.drift_reference == 0.6
    plan = plan_sweep(spec, preflight(spec))
    work = DatasetWork(WorkerJob(spec, spec.datasets[0].label))
    import pandas as pd
    df = pd.concat([work.predict_shard(s).predictions.to_pandas() for s in plan.shards()])
    shared = sorted(k for k in work.prepared.shared if k[0] == "drift")
    assert shared == [("drift", "ce", 30), ("drift", "mse", 30)]  # one reference run per loss, for all shards
    assert work.prepared.work["finetune_steps"] == 60  # counted: two references of 30 steps
    full = df[df.full_batch]
    assert set(full.method) == {DRIFT_METHOD} and DRIFT_METHOD not in set(df[~df.full_batch].method)
    assert full[full.lr_fraction > 1].diverged.all()  # beyond the limit: still flagged
    assert full[full.lr_fraction < 1].predicted_steps.notna().any()


def test_predictor_field_selects_through_the_registry():
    from ttp_ray.drift import DRIFT_METHOD  # noqa: F401  (the drift predictor's method name)

    default = parse_spec(BASE)
    assert default.chosen_predictor().name == "probed" and default.deprecations() == ()
    s = parse_spec(spec_with(predictor="drift"))
    assert s.chosen_predictor().name == "drift" and s.chosen_predictor().reference_fraction == 0.6
    assert s.identity_hash() != default.identity_hash()  # another predictor: other results
    s = parse_spec(spec_with(predictor={"name": "drift", "reference_fraction": 0.5, "options": {"substeps": 10}}))
    chosen = s.chosen_predictor()
    assert chosen.reference_fraction == 0.5 and chosen.options.substeps == 10
    s = parse_spec(spec_with(predictor={"name": "subset", "size": 40}, losses=["mse"], criteria=["loss"]))
    assert s.chosen_predictor().size == 40
    # the old spelling still works, with a deprecation line, and selects the same predictor
    old = parse_spec(spec_with(simulation={"drift_reference": 0.6}))
    assert old.chosen_predictor() == parse_spec(spec_with(predictor="drift")).chosen_predictor()
    assert old.deprecations() and "predictor: {name: drift" in old.deprecations()[0]


@pytest.mark.parametrize("changes, start", [
    (dict(predictor="nope"), "predictor: 'nope' is not allowed; allowed: frozen, subset, drift"),
    (dict(predictor={"reference_fraction": 0.5}), "predictor: must be a predictor name or a mapping with a name"),
    (dict(predictor={"name": "drift", "reference_fraction": 2}), "predictor: 2 is not allowed; allowed: a fraction"),
    (dict(predictor={"name": "drift", "tolerance": 2}), "predictor: not an option of 'drift'"),
    (dict(predictor="drift", simulation={"drift_reference": 0.6}), "predictor: cannot be combined with"),
    (dict(predictor={"name": "subset", "size": 40}, losses=["ce"], criteria=["loss"]), "losses: subset extrapolation"),
    (dict(predictor={"name": "subset", "size": 40}, losses=["mse"]), "criteria: the subset predictor"),
    (dict(predictor="relinearised"), "kernel.class_trace: the relinearised predictor"),
])
def test_predictor_field_bad_values_are_one_line(changes, start):
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(**changes))
    msg = str(info.value)
    assert msg.startswith(start) and "\n" not in msg, msg


# --- a list of models as a grid axis; user images' adaptation per dataset entry

def test_model_list_is_a_grid_axis_with_its_own_units_and_parts(capsys, tmp_path):
    single = parse_spec(BASE)
    assert parse_spec(spec_with(model=["digits-cnn"])).identity_hash() == single.identity_hash()  # one is that one
    assert single.models == ("digits-cnn",)
    s = parse_spec(spec_with(model=["digits-cnn", "digits-resnet"], ground_truth={"where": {"model": "digits-resnet"}}))
    assert s.models == ("digits-cnn", "digits-resnet") and s.identity_hash() != single.identity_hash()
    p = build_plan(s, {s.datasets[0].label: DatasetSize(100, 5, "loaded")})
    assert [(d.label, d.model, d.key) for d in p.datasets] == [
        ("digits-5to9:subset=100", m, f"digits-5to9:subset=100 @ {m}") for m in s.models]
    one = build_plan(single, {single.datasets[0].label: DatasetSize(100, 5, "loaded")})
    # the first model's configs are those of the single-model spec (same config_id), the second's differ
    assert [c.config_id for c in p.datasets[0].configs] == [c.config_id for c in one.datasets[0].configs]
    assert not {c.config_id for c in p.datasets[0].configs} & {c.config_id for c in p.datasets[1].configs}
    assert {c.model for c in p.datasets[1].configs} == {"digits-resnet"}
    assert [s_.shard_id for s_ in p.datasets[1].shards] == ["digits-resnet-00000"]
    assert [s_.shard_id for s_ in one.datasets[0].shards] == ["00000"]  # one model: parts named as before
    assert {g.config.model for g in p.ground_truth_runs()} == {"digits-resnet"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec_with(model=["digits-cnn", "digits-resnet"])))
    code, out, err = run_cli(["sweep", str(path), "--dry-run"], capsys)
    assert code == 0, err
    assert "models digits-cnn, digits-resnet" in out and "4 configs" in out
    assert "digits-5to9:subset=100 @ digits-cnn" in out and "digits-5to9:subset=100 @ digits-resnet" in out
    for bad, msg in ((["digits-cnn", "digits-cnn"], "model: value 'digits-cnn' is listed twice"),
                     ([], "model: must not be empty"), (["digits-cnn", "vgg"], "model[1]: unknown model 'vgg'")):
        with pytest.raises(SpecError) as info:
            parse_spec(spec_with(model=bad))
        assert str(info.value).startswith(msg), str(info.value)


def test_dataset_entry_adaptation_options():
    plain = parse_spec(BASE)
    s = parse_spec(spec_with(datasets=[{"name": "digits-5to9:subset=100", "input_size": 12, "input_channels": 3}]))
    e = s.datasets[0]
    assert (e.input.size, e.input.channels, e.input.adapt) == (12, 3, True) and e.ref == plain.datasets[0].ref
    assert e.key == "digits-5to9:subset=100|size=12,channels=3"
    assert s.identity_hash() != plain.identity_hash()
    assert parse_spec(spec_with(datasets=[{"name": "digits-5to9:subset=100", "adapt": True}])).identity_hash() == \
        plain.identity_hash()
    p = build_plan(s, {e.label: DatasetSize(100, 5, "loaded")})
    c0 = p.datasets[0].configs[0]
    assert c0.config_id == config_id("digits-cnn", e.key, c0.loss, c0.lr, None, c0.momentum, c0.batch_size, 20, 0, "all")
    for entry, msg in (({"input_size": 0}, "datasets[0].input_size"), ({"adapt": "no"}, "datasets[0].adapt"),
                       ({"adapt": False, "input_size": 8}, "datasets[0].input_size: sets what images are adapted to")):
        with pytest.raises(SpecError) as info:
            parse_spec(spec_with(datasets=[{"name": "digits-5to9", **entry}]))
        assert str(info.value).startswith(msg) and "\n" not in str(info.value), str(info.value)


def test_sweep_refuses_a_dataset_the_model_cannot_take_before_ray(tmp_path, capsys):
    import ray

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec_with(datasets=["synthetic:n=50,classes=5,channels=3"])))
    out = tmp_path / "out"
    code, _, err = run_cli(["sweep", str(path), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: dataset synthetic:n=50,classes=5,channels=3 gives 3 x 8 x 8 images; "
                          "model digits-cnn expects 1 channel"), err
    assert not out.exists() and not ray.is_initialized()
