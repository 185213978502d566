"""The issue-7 bench scripts stay runnable: one tiny scaling point, the cost bench's sampling and
extrapolation, and the all_datasets projection on a made-up measurement (seconds, no Ray)."""
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_scaling_point_measures_every_step():
    import scaling

    r = scaling.measure_point({"n": 120, "k": 32, "classes": 5, "budget": 10, "configs": 1})
    assert r["eigen"]["rank"] == 32
    for step in scaling.STEPS:
        assert r[step]["seconds"] > 0, step
        assert r[step]["rss_mb"] is not None
    a, c = scaling.loglog_fit([1, 2, 4], [3, 12, 48])
    assert a == pytest.approx(2.0) and c == pytest.approx(3.0)


def quickstart_plan():
    from ttp_ray.sweep.plan import DatasetSize, build_plan
    from ttp_ray.sweep.spec import load_spec

    spec = load_spec(ROOT / "sweeps" / "quickstart.yaml")
    sizes = {"digits-5to9": DatasetSize(896, 5, "loaded"), "digits": DatasetSize(1797, 10, "loaded")}
    return spec, build_plan(spec, sizes)


def test_cost_sample_is_stratified_and_extrapolation_exact_when_complete():
    import cost

    spec, plan = quickstart_plan()
    configs = [c for d in plan.datasets for c in d.configs]
    sample = cost.stratified_sample(configs, 12, seed=0)
    assert len(sample) == 12
    classes = {(c.dataset, c.batch_size) for c in sample}
    assert len(classes) == 6  # 2 datasets x 3 batch sizes, two each
    assert cost.stratified_sample(configs, 12, seed=0) == sample
    rows = [{"dataset": c.dataset, "batch_size": c.batch_size, "wall_s": 2.0 if c.batch_size is None else 1.0,
             "cpu_s": 1.0, "train_s": 0.5, "diverged": False} for c in sample]
    ex = cost.extrapolate(plan, rows)
    assert not ex["measured_all"] and ex["sampled"] == 12
    assert ex["wall_s"] == pytest.approx(56 * 2.0 + 112 * 1.0)  # 168 configs: a third full batch
    full = [{**r, "dataset": c.dataset, "batch_size": c.batch_size} for c in configs
            for r in [{"wall_s": 1.0, "cpu_s": 1.0, "train_s": 1.0, "diverged": False}]]
    ex = cost.extrapolate(plan, full)
    assert ex["measured_all"] and ex["wall_s"] == pytest.approx(168.0) and ex["wall_se_s"] == 0.0


def test_projection_runs_on_a_made_up_measurement():
    import project
    import scaling

    classes = list(scaling.SIM_CLASSES)
    row = {"n": 4000, "eigen": {"seconds": 1.0}, **{c: {"per_config_s": 0.1, "budget": 100} for c in classes}}
    ones = {s: 1.0 for s in scaling.STEPS}
    sc = {"by_n": [row], "sim_classes": scaling.SIM_CLASSES, "fits": {"n": ones, "k": ones, "c": ones},
          "rates": {"fp32_lift": {"gflops": 33.5}, "fp64_gram": {"gflops": 33.5}},
          "arch": {"kernel": {"seconds": 2.0}, "epoch": {"seconds": 1.0}},
          "decode": {"cifar_32px": {"ms_per_image": 1.0}, "jpeg_500x375": {"ms_per_image": 5.0}}}
    p = project.project(sc, None)
    assert p["configs"] == 1680 and len(p["datasets"]) == 7
    assert project.speedups(sc)["fp32"] == pytest.approx(1000.0)
    c10 = next(d for d in p["datasets"] if d["label"] == "cifar10")
    assert sum(v["configs"] for v in c10["sims"].values()) == 240
    # SGD on cifar10 (method auto: exact minibatch, METHOD.md §4): 0.1 s x (50000/4000) x (10/10) x (2000/100) / 1000
    # per config-step unit
    assert not any(k.startswith("SDE") for k in c10["sims"])
    s = c10["sims"]["minibatch-CE"]
    assert s["gpu_s"] == pytest.approx(0.1 * 12.5 * 20 / 1000 * s["step_units"])
    assert all(math.isfinite(t["hours"]) for t in p["cluster"])
    assert "Within an hour" in project.report(p) or "No uniform" in project.report(p)


def test_relinearise_report_on_made_up_rows(monkeypatch):
    import pandas as pd

    import relinearise

    written = {}
    monkeypatch.setattr(relinearise, "write_section", lambda name, body, cmd: written.update({name: body}))
    base = {"dataset": "d", "backbone": "b", "loss": "mse", "batch_size": 100, "criterion": "loss", "eps": 0.05}
    acc, rel = [], []
    for regime, method, err in (("GD", "discrete-elr", 0.4), ("SGD", "sde-rescaled", 0.1)):
        for i, (m, f) in enumerate(((0.0, 0.05), (0.9, 0.2), (0.9, 0.6))):
            acc.append({**base, "regime": regime, "method": method, "momentum": m, "lr_fraction": f, "lr": f,
                        "real_steps": 10.0 + i, "pred_steps": (10.0 + i) * (1 + err), "rel_error": err})
    for i, (m, f) in enumerate(((0.0, 0.05), (0.9, 0.2), (0.9, 0.6))):
        rel.append({**base, "regime": "GD", "method": "relinearised", "momentum": m, "lr_fraction": f, "lr": f,
                    "real_steps": 10.0 + i, "pred_steps": (10.0 + i) * 1.2, "rel_error": 0.2, "kernels": 5 + i,
                    "seconds": 2.0})
    acc.append({**acc[0], "lr_fraction": 1.3, "real_steps": 12.0, "pred_steps": None, "rel_error": None,
                "pred_diverged": True, "real_diverged": False})
    rel.append({**rel[0], "lr_fraction": 1.3, "real_steps": 12.0, "pred_steps": 15.0, "rel_error": 0.25,
                "pred_diverged": False, "real_diverged": False})
    rel += [{**r, "method": "flow-relinearised", "rel_error": 0.1, "kernels": 3, "seconds": 1.0} for r in rel]
    acc = [{"pred_diverged": False, "real_diverged": False, **r} for r in acc]
    rel = [{"pred_diverged": False, "real_diverged": False, **r} for r in rel]
    relinearise.report(pd.DataFrame(acc), pd.DataFrame(rel),
                       {"tolerance": 0.3, "finetune_seconds": {"d/b": 4.0}, "total_seconds": 1.0, "workers": 1,
                        "flow_paths": {"d/b/mse": {"seconds": 8.0, "kernels": 4, "configs": 4}},
                        "command": "python bench/relinearise.py"})
    body = written["relinearise"]
    assert "| GD, frozen kernel (discrete-elr, default) | 3 | 40.0% |" in body
    assert "| GD, re-linearised per config | 3 | 20.0% |" in body
    assert "| GD, re-linearised flow path (shared per loss) | 3 | 10.0% |" in body
    assert "| whole grid: GD re-linearised per config + SGD sde-rescaled | 6 | 15.0% |" in body
    # kernels of all four configs 5, 6, 7, 5: median 5.5
    assert "| re-linearised per config | d / b | 6 (5-7) kernels per config | 2.0 | 4.0 | 0.50 |" in body
    # the path (8 s) amortised over its 4 configs, plus 1 s of simulation each
    assert "| re-linearised flow path (shared per loss) | d / b | 4 kernels for 4 configs | 3.0 | 4.0 | 0.75 |" in body
    assert "| frozen kernel (discrete-elr) | 1/1 | 0/1 |" in body
    assert "| re-linearised per config | 0/1 | 0/1 | 25.0% over 1 pairs |" in body


def test_accuracy_report_ranks_each_slice(monkeypatch):
    """bench/accuracy.py's report on made-up rows: per (dataset, backbone, loss, criterion, eps) slice of the
    default methods, Spearman rho, top-1 regret and top-3 hit of T̂ε x step time against the real runs."""
    import pandas as pd

    import accuracy

    written = {}
    monkeypatch.setattr(accuracy, "write_section", lambda name, body, cmd: written.update({name: body}))
    rows = []
    # four configs per regime; real steps 10, 20, 30, 40; predicted in the same order except the last GD config,
    # predicted diverging (ranked at the budget, 100 steps); every step costs 1 s
    for regime, method, b in (("GD", "discrete-elr", 100), ("SGD", "sde-rescaled", 10)):
        for i, (m, f) in enumerate(((0.0, 0.05), (0.0, 0.2), (0.9, 0.05), (0.9, 1.3))):
            div = regime == "GD" and f == 1.3
            real = 10.0 * (i + 1) + (5 if regime == "SGD" else 0)
            rows.append({"dataset": "d", "backbone": "b", "loss": "mse", "momentum": m, "regime": regime,
                         "batch_size": b, "lr_fraction": f, "lr": f, "method": method, "criterion": "loss",
                         "eps": 0.05, "real_steps": real, "pred_steps": None if div else real + 1,
                         "real_diverged": False, "pred_diverged": div,
                         "rel_error": None if div else 1 / real, "real_step_time_s": 1.0})
    accuracy.report(pd.DataFrame(rows), {"datasets": ["d"], "backbones": ["b"], "budget": 100, "paths": 1,
                                         "train_seconds": 1.0, "predict_seconds": 1.0, "total_seconds": 1.0,
                                         "command": "python bench/accuracy.py"})
    body = written["accuracy"]
    assert "### Ranking quality (frozen kernel, default methods)" in body and "cost in s (steps x the real step time)" in body
    # predicted ranks of the 8 configs: 1 3 5 8 | 2 4 6 7; real: 1 3 5 7 | 2 4 6 8 -> rho = 1 - 6 x 2 / (8 x 63)
    rho = 1 - 6 * 2 / (8 * 63)
    assert f"| d / b / mse / loss / 0.05 | 8 | 1/0 | {rho:.2f} | 1.00 | yes | GD m=0 0.05x | GD m=0 0.05x |" in body
    assert f"Over 1 slices: median ρ {rho:.2f}, min ρ {rho:.2f}; top-1 regret mean 1.00, max 1.00" in body


def test_profile_attributes_a_small_sweep(tmp_path, monkeypatch):
    import sweep_profile

    from ttp_ray.sweep.spec import parse_spec

    spec = parse_spec({"name": "p", "model": "digits-cnn", "datasets": ["digits-5to9:subset=60"], "losses": ["mse", "ce"],
                       "lr": {"fraction_of_max_stable": [0.1, 0.5]}, "batch_size": ["full", 16],
                       "budget": {"steps": 20}, "kernel": {"k": 64},
                       "simulation": {"momentum_mode": "heavy_ball", "paths": 2, "log_every": 5}})
    with sweep_profile.cold_step_times():
        fig = sweep_profile.profile_work(spec)
    assert fig["configs"] == 8
    phases, inside = fig["phases"], fig["inside shards"]
    assert all(v >= 0 for v in phases.values()) and phases["shards (predict_shard)"] > 0
    for part in ("simulator: discrete GD, mse (closed form)", "simulator: discrete GD, ce", "simulator: minibatch SGD",
                 "T̂ε rows", "step-time measurement"):
        assert inside[part] > 0, part
    assert sum(inside.values()) <= phases["shards (predict_shard)"] * 1.05


def test_roofline_counts_the_simulators_arithmetic(monkeypatch):
    """bench/roofline.py: the profiler's flop count of a prediction grows with the work simulated (a budget twice
    as long steps twice as often), and the GEMM rate it compares with is a positive rate."""
    import roofline
    import torch

    from ttp_ray.data import load_dataset
    from ttp_ray.dynamics import SimConfig, SimOptions
    from ttp_ray.kernel import KernelOptions
    from ttp_ray.predict import PredictSettings
    from ttp_ray.predictors import PredictionInputs, get_predictor

    prep = get_predictor("frozen").prepare(PredictionInputs("digits-cnn", load_dataset("digits-5to9:subset=60"),
                                                            kernel=KernelOptions(k=64)))
    cfgs = [SimConfig(lr=f * prep.max_stable_lr(0.0), batch_size=16, loss="ce") for f in (0.1, 0.5)]
    settings = PredictSettings(sim=SimOptions(method="minibatch", paths=2, log_every=5))
    flops = []
    for budget in (20, 40):
        monkeypatch.setattr(roofline, "BUDGET", budget)
        sec, flop = roofline.measure(prep, cfgs, settings, repeats=1)
        assert sec > 0 and flop > 0
        flops.append(flop)
    assert 1.7 < flops[1] / flops[0] < 2.2, flops  # 9 logged lifts against 5, 40 steps against 20
    assert roofline.gemm_rate(torch.float32, [(64, 32, 16)], repeats=1) > 0


def test_report_keeps_the_figures_whose_source_is_not_here(tmp_path, monkeypatch):
    """bench/report.py rebuilds the summary from runs/bench/; a source measured on another machine (absent here) keeps
    the summary's earlier rows for its section, and a section with no earlier row points at itself instead of
    claiming it was never measured; the GD-MSE marginal cost is held to its own target (1.1), the mixed grid to 1.5."""
    import report

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("<!-- summary:begin -->\n| figure | value | section | command |\n|---|---|---|---|\n"
                   "| kernel ratio | **3.80** (measured elsewhere) | kernel | `k` |\n"
                   "| CLI start-up | **0.10 s** | cli | `c` |\n<!-- summary:end -->\n<!-- tune:begin -->\nx\n<!-- tune:end -->\n")
    before = report.previous_rows(doc)
    assert before["kernel"] == [["kernel ratio", "**3.80** (measured elsewhere)", "kernel", "`k`"]]
    assert report.kept([report.missing("kernel cost", "kernel", "k")], before) == before["kernel"]
    fresh = [["kernel ratio", "**2.90**", "kernel", "`k`"]]
    assert report.kept(fresh, before) == fresh  # a source that is here always wins
    pointed = report.kept([report.missing("tuning", "tune", "t")], before, doc.read_text())
    assert pointed[0][1].startswith("in its section")
    assert report.kept([report.missing("scaling", "scaling", "s")], before, doc.read_text())[0][1] == report.NOT_MEASURED
    monkeypatch.setattr(report, "read_json", lambda *a: {"marginal": [
        {"configs": 500, "grid": "GD-MSE", "kernel": "cached (loaded)", "ratio": 1.29},
        {"configs": 500, "grid": "mixed GD + SGD", "kernel": "cached (loaded)", "ratio": 7.75}]})
    rows = report.sweep_rows()
    assert "(target <= 1.1)" in rows[0][1] and "(target <= 1.5)" in rows[1][1]
