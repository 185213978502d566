"""``ttp-ray rank | validate | plot`` and notebooks/analysis.ipynb on the output of one small real sweep (two
100-image datasets, 12 configs each, 40-step budget, 6 real fine-tunes: GD, and SGD with two seeds), run once per
session with its own local Ray (shut down before the tests). Every expectation is recomputed here from the
Parquet tables with plain pandas / numpy."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, run_cli
from ttp_ray.sweep.output import read_table

SPEC = {
    "name": "analysis",
    "model": "digits-cnn",
    "datasets": ["digits-5to9:subset=100", "digits:subset=100"],
    "losses": ["mse", "ce"],
    "lr": {"fraction_of_max_stable": [0.2, 0.6, 1.3]},  # 1.3: beyond the stability limit, diverges
    "momentum": [0.0],
    "batch_size": ["full", 20],
    "eps": [0.01, 0.05],
    "criteria": ["loss", "error"],
    "budget": {"steps": 40},
    "kernel": {"k": 64, "class_trace": True},
    "simulation": {"momentum_mode": "heavy_ball", "paths": 2, "log_every": 5},
    # per dataset: (mse, 0.2, full batch) with seed 0 (full batch ignores the seed), (ce, 0.6, B=20) with 0 and 1
    "ground_truth": {"enabled": True, "seeds": [0, 1], "where": {"lr_fraction": [0.2, 0.6]}, "max_configs": 2},
    "resources": {"shard_size": 6},
    # the analysis commands are tested on the frozen kernel's rows, whose flags are the plain limit rule (§13);
    # the default predictor's own rows and flags: tests/test_probe.py and the sweep engine's tests
    "predictor": "frozen",
}
RANK_KEYS = ["predicted_cost_s", "predicted_steps", "predicted_final_error"]
NEW_EPS = [0.03, 0.2]  # not in SPEC: re-timed from the stored curves, and swept fresh to compare


def fresh_eps_spec():
    """SPEC with other eps and relative eps mode, no fine-tunes: what `rank --eps ... --eps-mode relative` on
    SPEC's output must reproduce."""
    d = copy.deepcopy(SPEC)
    d["name"] = "analysis-fresh-eps"
    d["eps"] = list(NEW_EPS)
    d["simulation"]["eps_mode"] = "relative"
    d["ground_truth"] = {"enabled": False}
    return d


@pytest.fixture(scope="session")
def sweeps(tmp_path_factory):
    """The sweep, then (same Ray) a resume of a copy of its OUT stripped of the ``spectra`` table, as an OUT
    written before that table existed; Ray is shut down before any test runs."""
    import ray

    from ttp_ray.sweep.driver import run_sweep, start_local_ray
    from ttp_ray.sweep.spec import parse_spec

    assert not ray.is_initialized()
    root = tmp_path_factory.mktemp("analysis")
    out, old, fresh = root / "out", root / "old", root / "fresh_eps"
    resumed = {}
    start_local_ray(num_cpus=2, object_store_mb=100)
    try:
        res = run_sweep(parse_spec(copy.deepcopy(SPEC)), str(out), progress=False)
        assert res.complete and not res.failures, res.failures
        shutil.copytree(out, old, ignore=shutil.ignore_patterns("spectra"))
        m = json.loads((old / "manifest.json").read_text())
        m["completed"].pop("spectra")
        (old / "manifest.json").write_text(json.dumps(m))
        resumed["mtimes"] = {p: p.stat().st_mtime_ns for p in old.rglob("*.parquet")}
        try:
            resumed["result"] = run_sweep(parse_spec(copy.deepcopy(SPEC)), str(old), progress=False)
        except Exception as exc:  # reported by the resume test only
            resumed["error"] = exc
        assert run_sweep(parse_spec(fresh_eps_spec()), str(fresh), progress=False).complete
    finally:
        ray.shutdown()
    return {"out": out, "old": old, "fresh_eps": fresh, **resumed}


@pytest.fixture(scope="session")
def sweep_out(sweeps):
    return sweeps["out"]


def tables(out):
    return {t: read_table(out, t).to_pandas() for t in ("predictions", "ground_truth", "curves", "spectra")}


# ------------------------------------------------------------------------------------------------- rank

def converging(pred, criterion="loss", eps=0.01):
    sel = pred[(pred.criterion == criterion) & np.isclose(pred.eps, eps)]
    return sel, sel[~sel.diverged & sel.predicted_steps.notna()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("by", RANK_KEYS)
def test_rank_orders_by_each_key_and_flags_diverging(sweep_out, capsys, by):
    pred = tables(sweep_out)["predictions"]
    sel, ok = converging(pred)  # the spec's first criterion and eps are the default
    expected = ok.sort_values([by, "config_id"], kind="stable").config_id.tolist()
    code, out, err = run_cli(["rank", str(sweep_out), "--by", by, "--top", "0", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert (d["criterion"], d["eps"], d["by"]) == ("loss", 0.01, by)
    assert [r["config_id"] for r in d["ranked"]] == expected
    assert [r["rank"] for r in d["ranked"]] == list(range(1, len(expected) + 1))
    values = [r[by] for r in d["ranked"]]
    assert values == sorted(values)
    diverging = set(sel[sel.diverged].config_id)
    assert len(diverging) == 8  # lr fraction 1.3: 2 datasets x 2 losses x 2 batch sizes
    assert {r["config_id"] for r in d["flagged"]} == diverging
    assert all(r["flag"] == "diverges" and r["rank"] is None for r in d["flagged"])
    assert d["counts"] == {"ranked": len(expected), "diverges": len(diverging)}
    # how far to trust a row: lr/(1-m) over the plain-GD limit 2N/lambda_max = max_stable_lr(m) / (1+m)
    for r in d["ranked"]:
        gd_limit = r["max_stable_lr"] / (1 + r["momentum"])
        assert r["elr_over_gd_limit"] == pytest.approx(r["lr"] / (1 - r["momentum"]) / gd_limit)


@pytest.mark.timeout(240)
def test_rank_top_dataset_criterion_eps_and_table(sweep_out, capsys):
    pred = tables(sweep_out)["predictions"]
    code, out, err = run_cli(["rank", str(sweep_out), "--by", "predicted_cost_s", "--top", "3", "--dataset",
                              "digits:subset=100", "--criterion", "error", "--eps", "0.05", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    sel, ok = converging(pred[pred.dataset == "digits:subset=100"], "error", 0.05)
    assert [r["config_id"] for r in d["ranked"]] == ok.sort_values(["predicted_cost_s", "config_id"]).config_id.tolist()[:3]
    assert {r["dataset"] for r in d["ranked"] + d["flagged"]} == {"digits:subset=100"}
    assert {(r["criterion"], r["eps"]) for r in d["ranked"]} == {("error", 0.05)}
    assert len(d["flagged"]) == 4

    code, out, err = run_cli(["rank", str(sweep_out), "--by", "predicted_cost_s", "--top", "2"], capsys)  # the table
    assert code == 0, err
    assert "ranked by predicted_cost_s" in out and "diverges" in out and "cost (s)" in out
    sel, ok = converging(pred)
    best = ok.sort_values(["predicted_cost_s", "config_id"]).config_id.iloc[0]
    first_flagged = min(out.index(c) for c in sel[sel.diverged].config_id if c in out)
    assert out.index(best) < first_flagged  # ranked rows first, flagged ones after


@pytest.mark.timeout(240)
def test_rank_max_final_error_unranks_bad_models(sweep_out, capsys):
    pred = tables(sweep_out)["predictions"]
    sel, ok = converging(pred)
    cut = float(ok.predicted_final_error.median())
    code, out, err = run_cli(["rank", str(sweep_out), "--by", "predicted_cost_s", "--top", "0", "--max-final-error",
                              f"{cut}", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    good = ok[ok.predicted_final_error <= cut].sort_values(["predicted_cost_s", "config_id"])
    assert [r["config_id"] for r in d["ranked"]] == good.config_id.tolist()
    too_bad = {r["config_id"] for r in d["flagged"] if r["flag"].startswith("final error >")}
    assert too_bad == set(ok[ok.predicted_final_error > cut].config_id) and too_bad
    assert {r["config_id"] for r in d["flagged"] if r["flag"] == "diverges"} == set(sel[sel.diverged].config_id)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("args,field", [
    (["--max-final-error", "2"], "max_final_error"),
    (["--criterion", "accuracy"], "criterion"),
    (["--eps", "0"], "eps"),  # a new eps > 0 is re-timed from the stored curves (test_rank_new_eps_...)
    (["--dataset", "cifar10"], "dataset"),
    (["--by", "speed"], "--by"),
    (["--target-error", "2"], "target_error"),
])
def test_rank_bad_input_one_line_exit_2(sweep_out, capsys, args, field):
    code, out, err = run_cli(["rank", str(sweep_out)] + args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], err
    assert "allowed" in lines[0] or "not one of" in lines[0]


def own_cost_to_target(pred, curves, criterion="loss", eps=0.01):
    """Per prediction row of (criterion, eps): the target of its (dataset, loss), min + 0.25 (median - min) of
    the non-diverging configs' predicted final values, and the first predicted-curve step at or below it."""
    sel = pred[(pred.criterion == criterion) & np.isclose(pred.eps, eps)].copy()
    final = "predicted_final_loss" if criterion == "loss" else "predicted_final_error"
    targets = {}
    for key, g in sel[~sel.diverged].groupby(["dataset", "loss"]):
        v = g[final].to_numpy(float)
        targets[key] = v.min() + 0.25 * (np.median(v) - v.min())
    sel["target"] = [targets[(d, l)] for d, l in zip(sel.dataset, sel.loss)]
    steps = []
    for r in sel.itertuples():
        c = curves[(curves.source == "predicted") & (curves.dataset == r.dataset) & (curves.config_id == r.config_id)]
        c = c.sort_values("step")
        hit = c.step[c[criterion] <= r.target]
        steps.append(np.nan if r.diverged or hit.empty else float(hit.iloc[0]))
    sel["steps_to_target"] = steps
    sel["cost_to_target"] = sel.steps_to_target * sel.step_time_s
    return sel


@pytest.mark.timeout(240)
def test_rank_default_is_cost_to_a_common_target(sweep_out, capsys):
    t = tables(sweep_out)
    pred, curves = t["predictions"], t["curves"]
    for df in (pred, curves):
        df["dataset"] = df["dataset"].astype(str)
    own = own_cost_to_target(pred, curves)
    reached = own[own.steps_to_target.notna()]
    assert 0 < len(reached) < len(own[~own.diverged])  # some configs plateau above their target
    expected = reached.sort_values(["cost_to_target", "predicted_final_loss", "config_id"]).config_id.tolist()
    code, out, err = run_cli(["rank", str(sweep_out), "--top", "0", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["by"] == "predicted_cost_to_target_s" and (d["criterion"], d["eps"]) == ("loss", 0.01)
    assert [r["config_id"] for r in d["ranked"]] == expected
    got = {r["config_id"]: r for r in d["ranked"] + d["flagged"]}
    for r in own.itertuples():
        g = got[r.config_id]
        assert g["target"] == pytest.approx(r.target) and g["target_rule"] == "derived"
        if np.isnan(r.steps_to_target):
            assert g["predicted_steps_to_target"] is None and g["rank"] is None
            assert g["flag"] == ("diverges" if r.diverged else "plateaus above target")
        else:
            assert g["predicted_steps_to_target"] == r.steps_to_target
            assert g["predicted_cost_to_target_s"] == pytest.approx(r.cost_to_target)
    flags = [r["flag"] for r in d["flagged"]]
    assert flags == sorted(flags, key=lambda f: f == "diverges")  # plateaus first, diverging last

    code, out, err = run_cli(["rank", str(sweep_out), "--top", "3"], capsys)  # the terminal table
    assert code == 0, err
    assert "ranked by predicted_cost_to_target_s" in out and "cost to target (s)" in out and "final err" in out
    assert "regime" in out and "target loss:" in out and "plateaus above target" in out
    assert out.index(expected[0]) < out.index("plateaus above target   ")  # a table row, not the title

    # a given target: every row aims at it
    code, out, err = run_cli(["rank", str(sweep_out), "--criterion", "error", "--target-error", "0.5", "--json",
                              "--top", "0"], capsys)
    assert code == 0, err
    d = json.loads(out)
    rows = d["ranked"] + d["flagged"]
    assert {(r["target"], r["target_rule"]) for r in rows} == {(0.5, "given")}


@pytest.mark.timeout(240)
def test_rank_pareto_front_is_not_dominated(sweep_out, capsys):
    code, out, err = run_cli(["rank", str(sweep_out), "--pareto", "--json"], capsys)
    assert code == 0, err
    front = json.loads(out)["front"]
    code, out, err = run_cli(["rank", str(sweep_out), "--top", "0", "--json"], capsys)
    d = json.loads(out)
    rows = [r for r in d["ranked"] + d["flagged"] if not r["diverged"]]

    def cost(r):
        for k in ("predicted_cost_to_target_s", "predicted_cost_s"):
            if r[k] is not None:
                return r[k]
        return r["budget_steps"] * r["step_time_s"]

    def dominates(a, b):
        ca, cb, ea, eb = cost(a), cost(b), a["predicted_final_error"], b["predicted_final_error"]
        return ca <= cb and ea <= eb and (ca < cb or ea < eb)

    ids = {(r["dataset"], r["config_id"]) for r in front}
    assert front and len(ids) < len(rows)
    for r in rows:
        same = [o for o in rows if (o["dataset"], o["loss"]) == (r["dataset"], r["loss"])]
        on_front = (r["dataset"], r["config_id"]) in ids
        assert on_front == (not any(dominates(o, r) for o in same)), r["config_id"]
    for r in front:
        assert r["pareto_cost_s"] == pytest.approx(cost(r))
    code, out, err = run_cli(["rank", str(sweep_out), "--pareto"], capsys)
    assert code == 0 and "Pareto front" in out and front[0]["config_id"] in out, err


# --------------------------------------------------------------------------------------------- validate

def own_metrics(rows):
    p, t = rows.predicted_steps.to_numpy(float), rows.actual_steps.to_numpy(float)
    rel = np.abs(p - t) / t
    r = np.corrcoef(p, t)[0, 1] if len(rows) > 1 and p.std() > 0 and t.std() > 0 else None
    return rel.mean(), np.median(rel), r


@pytest.mark.timeout(240)
def test_validate_matches_own_join(sweep_out, capsys):
    pred = pd.read_parquet(sweep_out / "predictions")
    gt = pd.read_parquet(sweep_out / "ground_truth")
    for df in (pred, gt):
        df["dataset"] = df["dataset"].astype(str)
    joined = gt.merge(pred[["dataset", "config_id", "criterion", "eps", "predicted_steps", "diverged"]],
                      on=["dataset", "config_id", "criterion", "eps"], suffixes=("", "_pred"))
    assert len(joined) == len(gt) == 2 * (1 + 2) * 2 * 2  # datasets x (GD: 1 seed, SGD: 2 seeds) x criteria x eps
    both = joined.dropna(subset=["predicted_steps", "actual_steps"])
    both = both[both.actual_steps > 0]
    assert len(both) >= 8
    mean, median, r = own_metrics(both)

    code, out, err = run_cli(["validate", str(sweep_out), "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    o = d["overall"]
    assert o["compared"] == len(both) and o["rows"] == len(gt) and o["configs"] == 4
    assert o["mean_relative_error"] == pytest.approx(mean, rel=1e-12)
    assert o["median_relative_error"] == pytest.approx(median, rel=1e-12)
    assert o["pearson"] == pytest.approx(r, rel=1e-9)

    both = both.assign(regime=np.where(both.full_batch, "GD", "SGD"))
    got = {(s["dataset"], s["loss"], s["regime"]): s for s in d["slices"]}
    assert set(got) == set(map(tuple, both[["dataset", "loss", "regime"]].drop_duplicates().to_numpy()))
    assert {k[2] for k in got} == {"GD", "SGD"}
    for key, rows in both.groupby(["dataset", "loss", "regime"]):
        m, med, rr = own_metrics(rows)
        s = got[key]
        assert s["compared"] == len(rows)
        assert s["mean_relative_error"] == pytest.approx(m) and s["median_relative_error"] == pytest.approx(med)
        assert (s["pearson"] is None) == (rr is None) and (rr is None or s["pearson"] == pytest.approx(rr))

    val = pd.read_parquet(sweep_out / "validation.parquet")
    assert len(val) == len(gt)
    cmp = val[val.status == "compared"]
    assert len(cmp) == len(both)
    assert cmp.relative_error.mean() == pytest.approx(mean, rel=1e-12)
    mine = both.assign(rel=(both.predicted_steps - both.actual_steps).abs() / both.actual_steps)
    merged = cmp.merge(mine, on=["dataset", "config_id", "criterion", "eps", "seed"])
    assert len(merged) == len(both) and np.allclose(merged.relative_error, merged.rel)
    assert not list(sweep_out.glob(".*.tmp"))

    code, out, err = run_cli(["validate", str(sweep_out)], capsys)  # the printed table
    assert code == 0, err
    assert "overall" in out and f"{median:.3f}" in out and f"{r:.3f}" in out and "/ GD" in out and "/ SGD" in out


def own_ranking(rows, p_steps, a_steps):
    """(configs, flagged predicted rows, flagged real rows, Spearman rho or None, top-1 regret) of one group
    of validation rows: flagged rows cost the budget x their side's step time; real cost: mean over seeds."""
    p_flag = rows.predicted_diverged.astype(bool) | rows[p_steps].isna()
    a_flag = rows.actual_diverged.astype(bool) | rows[a_steps].isna()
    pc = np.where(p_flag, rows.budget_steps, rows[p_steps].astype(float)) * rows.predicted_step_time_s
    ac = np.where(a_flag, rows.budget_steps, rows[a_steps].astype(float)) * rows.actual_step_time_s
    per = pd.DataFrame({"c": rows.config_id, "p": pc, "a": ac}).groupby("c").agg(p=("p", "first"), a=("a", "mean"))
    rho = None
    if len(per) >= 3 and per.p.nunique() > 1 and per.a.nunique() > 1:
        rho = float(np.corrcoef(per.p.rank(), per.a.rank())[0, 1])
    best = per.reset_index().sort_values(["p", "c"]).iloc[0]
    reached = (~p_flag).any(), (~a_flag).any()
    if not all(reached):
        return len(per), int(p_flag.sum()), int(a_flag.sum()), None, None
    return len(per), int(p_flag.sum()), int(a_flag.sum()), rho, best.a / per.a.min()


@pytest.mark.timeout(240)
def test_validate_ranking_metrics_match_own_computation(sweep_out, capsys):
    code, out, err = run_cli(["validate", str(sweep_out), "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    groups = d["ranking"]["groups"]
    assert {g["objective"] for g in groups} == {"cost_to_target", "cost"}
    val = pd.read_parquet(sweep_out / "validation.parquet")
    val["dataset"] = val["dataset"].astype(str)
    # the real cost to target, off the real curves, against the predictions' target
    t = tables(sweep_out)
    curves = t["curves"]
    curves["dataset"] = curves["dataset"].astype(str)
    for r in val[~val.actual_diverged].itertuples():
        c = curves[(curves.source == "actual") & (curves.dataset == r.dataset) & (curves.config_id == r.config_id)
                   & (curves.seed == r.seed)].sort_values("step")
        hit = c.step[c[r.criterion] <= r.target]
        assert (pd.isna(r.actual_steps_to_target) if hit.empty else r.actual_steps_to_target == hit.iloc[0])
    checked = 0
    for g in groups:
        steps = {"cost": ("predicted_steps", "actual_steps"),
                 "cost_to_target": ("predicted_steps_to_target", "actual_steps_to_target")}[g["objective"]]
        rows = val[(val.dataset == g["dataset"]) & (val.model == g["model"]) & (val.loss == g["loss"])
                   & (val.criterion == g["criterion"])]
        if g["objective"] == "cost":
            rows = rows[np.isclose(rows.eps, g["eps"])]
        else:
            assert g["eps"] is None
            rows = rows.drop_duplicates(["config_id", "seed"])
        n, pf, af, rho, regret = own_ranking(rows, *steps)
        assert (g["configs"], g["flagged_predicted"], g["flagged_actual"]) == (n, pf, af)
        assert (g["spearman"] is None) == (rho is None) and (rho is None or g["spearman"] == pytest.approx(rho))
        assert (g["top1_regret"] is None) == (regret is None)
        assert regret is None or g["top1_regret"] == pytest.approx(regret)
        checked += 1
    assert checked == len(groups) > 0
    s = d["ranking"]["summary"]
    assert set(s) == {"cost_to_target", "cost"}

    code, out, err = run_cli(["validate", str(sweep_out)], capsys)
    assert code == 0, err
    assert "cost_to_target" in out and "top-1 regret" in out and "median rho" in out


@pytest.mark.timeout(240)
def test_validate_without_ground_truth_or_sweep_is_one_line_exit_2(sweep_out, tmp_path, capsys):
    bare = tmp_path / "no-gt"
    shutil.copytree(sweep_out, bare, ignore=shutil.ignore_patterns("ground_truth", "validation.parquet"))
    code, out, err = run_cli(["validate", str(bare)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ground_truth:"), err
    assert not (bare / "validation.parquet").exists() and "Traceback" not in err
    # plot still draws what needs no ground truth, and says what it skipped
    code, out, err = run_cli(["plot", str(bare), "--out", str(tmp_path / "png")], capsys)
    assert code == 0, err
    assert "skipped curves" in err and (tmp_path / "png" / "spectrum.png").is_file()
    for cmd in (["validate", str(tmp_path / "png")], ["rank", str(tmp_path / "absent")]):
        code, out, err = run_cli(cmd, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: OUT:"), err


# ------------------------------------------------------------------------------------------------- plot

def assert_real_image(path, min_side=200):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side, (path, img.shape)
    flat = img[..., :3].reshape(-1, 3)
    assert flat.std(axis=0).max() > 0.05, f"{path}: (nearly) one colour"
    assert len(np.unique(np.round(flat[:: max(1, len(flat) // 20000)], 2), axis=0)) > 20, f"{path}: too few colours"


@pytest.mark.timeout(240)
def test_plot_writes_real_pngs(sweep_out, tmp_path, capsys):
    out = tmp_path / "png"
    code, stdout, err = run_cli(["plot", str(sweep_out), "--out", str(out)], capsys)
    assert code == 0, err
    names = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert names == {Path(line).relative_to(out).as_posix() for line in stdout.splitlines()}
    expected = {"curves.png", "t_eps_scatter.png", "spectrum.png", "cost_heatmap_digits-5to9_subset_100.png",
                "cost_heatmap_digits_subset_100.png"}
    assert expected <= names
    gt = tables(sweep_out)["ground_truth"]
    per_config = {n for n in names if n.startswith("curves/")}
    assert len(per_config) == gt[["dataset", "config_id"]].drop_duplicates().shape[0] == 4
    for n in names:
        assert_real_image(out / n)
    assert not list(out.rglob(".*.tmp"))

    code, stdout, err = run_cli(["plot", str(sweep_out), "--out", str(tmp_path / "one"), "--only", "scatter"], capsys)
    assert code == 0 and [p.name for p in (tmp_path / "one").iterdir()] == ["t_eps_scatter.png"], err


@pytest.mark.timeout(240)
def test_spectra_table_is_the_kernel_spectrum(sweep_out):
    from ttp_ray.analysis import fit_spectrum

    spectra = tables(sweep_out)["spectra"]
    manifest = json.loads((sweep_out / "manifest.json").read_text())
    assert set(spectra.dataset) == set(manifest["datasets"])
    assert sorted(manifest["completed"]["spectra"]) == sorted(f"{d}/spectrum" for d in manifest["datasets"])
    for ds, s in spectra.groupby("dataset"):
        s = s.sort_values("k")
        assert set(s.kind) == {"kernel"} and (s.n == 100).all() and s.class_trace.all()
        assert s.k.tolist() == list(range(1, len(s) + 1)) == list(range(1, manifest["datasets"][ds]["rank"] + 1))
        lam = s.eigenvalue.to_numpy()
        assert (np.diff(lam) <= 1e-9 * lam[0]).all() and (lam >= 0).all() and (s.projection >= 0).all()
        assert lam[0] == pytest.approx(manifest["datasets"][ds]["lambda_max"], rel=1e-9)
        fit = fit_spectrum(s)
        assert fit.s > 0 and fit.c > 0 and fit.k_lo < fit.k_hi


@pytest.mark.timeout(240)
def test_resume_adds_a_missing_spectra_table_and_rewrites_nothing(sweeps):
    """An OUT written before the spectra table existed: resuming the same spec adds only that table."""
    if "error" in sweeps:
        raise sweeps["error"]
    res, old, before = sweeps["result"], sweeps["old"], sweeps["mtimes"]
    assert res.complete and not res.failures and res.written == {"predictions": 0, "ground_truth": 0}
    assert json.loads((old / "manifest.json").read_text())["complete"] is True
    assert before == {p: p.stat().st_mtime_ns for p in before}  # no other part rewritten
    a = read_table(old, "spectra").to_pandas().sort_values(["dataset", "k"]).reset_index(drop=True)
    b = tables(sweeps["out"])["spectra"].sort_values(["dataset", "k"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


# --------------------------------------------------------------------------------------------- notebook

@pytest.mark.timeout(240)
def test_notebook_executes_headless(sweep_out, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "analysis.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TTP_RAY_OUT", str(sweep_out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(nb, timeout=150, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 5  # curves, scatter, spectrum, one heat map per dataset
    text = "".join(o.get("text", "") for o in outputs)
    assert "analysis: 24 configs on 2 dataset(s), 4 fine-tuned for real" in text
    assert "targets:" in text and "cost_to_target:" in text and "cost:" in text  # ranking and its quality


# --------------------------------------------------------------------- hand-made tables, known answers

STEPS = [0, 5, 10, 15, 20]


def hand_predictions():
    """One dataset, loss mse, criterion error, eps 0.01, budget 20: the predicted curves (error at STEPS),
    T̂ε, step time and divergence of seven configs. ``b`` converges fast (small T̂ε) to a bad plateau."""
    specs = {  # config: (error curve, predicted T̂ε steps or None, step time s, diverged)
        "a": ([0.9, 0.5, 0.2, 0.12, 0.10], 15, 1.0, False),   # reaches the target at 15: cost 15
        "g": ([0.9, 0.12, 0.11, 0.11, 0.11], 10, 4.0, False),  # at 5 x 4 s = 20, final 0.11
        "f": ([0.9, 0.3, 0.12, 0.12, 0.12], 10, 2.0, False),   # at 10 x 2 s = 20, final 0.12: after g
        "b": ([0.9, 0.3, 0.3, 0.3, 0.3], 5, 1.0, False),       # the cheapest T̂ε, a 30 % plateau
        "c": ([0.9, 0.6, 0.5, 0.5, 0.5], 10, 1.0, False),
        "h": ([0.9, 0.8, 0.7, 0.6, 0.5], None, 1.0, False),    # still descending at the budget
        "e": ([0.9, 5.0], None, 1.0, True),                    # diverges
    }
    pred, curves = [], []
    for cid, (err, t, st, div) in specs.items():
        final = float("nan") if div else err[-1]
        pred.append({"dataset": "d", "config_id": cid, "model": "m", "loss": "mse", "lr": 0.1, "lr_fraction": 0.5,
                     "momentum": 0.0, "batch_size": 10, "full_batch": True, "effective_lr": 0.1, "criterion": "error",
                     "eps": 0.01, "budget_steps": 20, "n": 10, "max_stable_lr": 1.0, "predicted_steps": t,
                     "predicted_fraction": None if t is None else t / 20, "diverged": div,
                     "predicted_final_loss": final, "predicted_final_error": final, "step_time_s": st,
                     "predicted_cost_s": None if t is None else t * st})
        for step, e in zip(STEPS, err):
            curves.append({"dataset": "d", "config_id": cid, "source": "predicted", "seed": None, "step": step,
                           "loss": e, "error": e})
    return pd.DataFrame(pred).astype({"predicted_steps": "Int64"}), pd.DataFrame(curves)


def test_cost_to_target_ranks_against_a_common_target_on_a_hand_made_grid():
    from ttp_ray import analysis as A

    pred, curves = hand_predictions()
    # non-diverging finals 0.10, 0.11, 0.12, 0.30, 0.50, 0.50: min 0.10, median 0.21
    target = 0.10 + 0.25 * (0.21 - 0.10)
    t = A.derive_targets(pred)
    assert t.target.tolist() == [pytest.approx(target)] and t.target_rule.tolist() == ["derived"]
    assert t.target_configs.tolist() == [6]

    ranked = A.rank(pred, curves=curves)  # the default objective: predicted cost to the common target
    assert ranked.config_id.tolist() == ["a", "g", "f", "b", "c", "h", "e"]
    assert ranked["rank"].tolist()[:3] == [1, 2, 3] and ranked["rank"].isna().tolist()[3:] == [True] * 4
    assert ranked.flag.tolist() == ["", "", ""] + [A.PLATEAUS] * 3 + ["diverges"]
    by_id = ranked.set_index("config_id")
    assert by_id.predicted_steps_to_target[["a", "g", "f"]].tolist() == [15, 5, 10]
    assert by_id.predicted_cost_to_target_s[["a", "g", "f"]].tolist() == [15.0, 20.0, 20.0]
    assert by_id.predicted_steps_to_target[["b", "c", "h", "e"]].isna().all()
    assert by_id.target.tolist() == pytest.approx([target] * 7)

    # the old objective, T̂ε x step time, puts the 30 % plateau first
    old = A.rank(pred, "predicted_cost_s")
    assert old.config_id.tolist()[:1] == ["b"] and old.set_index("config_id").flag["h"] == "not reached"

    # a given target: a reaches 0.115 at 20 (cost 20), g at 10 x 4 s (cost 40), f never
    given = A.rank(pred, curves=curves, target_error=0.115)
    assert given.config_id.tolist()[:2] == ["a", "g"] and given.predicted_cost_to_target_s.tolist()[:2] == [20.0, 40.0]
    assert given.set_index("config_id").flag["f"] == A.PLATEAUS and (given.target_rule == "given").all()

    with pytest.raises(A.AnalysisError, match="curves"):
        A.rank(pred)  # the default objective needs the curves table
    with pytest.raises(A.AnalysisError, match="target_error"):
        A.rank(pred, curves=curves, target_error=1.5)


def test_targets_are_per_dataset_and_loss():
    from ttp_ray import analysis as A

    pred, curves = hand_predictions()
    other = pred.assign(loss="ce", predicted_final_error=pred.predicted_final_error * 2,
                        predicted_final_loss=pred.predicted_final_loss * 2)
    t = A.derive_targets(pd.concat([pred, other]))
    got = dict(zip(t.loss, t.target))
    assert got["mse"] == pytest.approx(0.1275) and got["ce"] == pytest.approx(2 * 0.1275)


def test_pareto_front_on_a_hand_made_grid():
    from ttp_ray import analysis as A

    pred, curves = hand_predictions()
    front = A.pareto_front(A.rank(pred, curves=curves))
    # (cost, final error): a (15, 0.10) to target; b (5, 0.30) and c (10, 0.50) to their plateau (T̂ε x step
    # time); h never reaches eps: the whole budget (20, 0.50); g, f (20, 0.11 / 0.12) are dominated by a; e diverges
    assert front.config_id.tolist() == ["b", "a"]
    assert front.pareto_cost_s.tolist() == [5.0, 15.0]
    with pytest.raises(A.AnalysisError, match="pareto_front"):
        A.pareto_front(A.rank(pred, "predicted_cost_s"))


def hand_validation():
    """Validation rows (the columns of validation_table that ranking_metrics reads) with known answers."""
    rows = []

    def add(group, cid, p_steps, a_steps, p_st=1.0, a_st=2.0, p_div=False, a_div=False, seed=0, eps=0.01, budget=100):
        ds, loss = group
        rows.append({"dataset": ds, "model": "m", "loss": loss, "criterion": "loss", "eps": eps, "config_id": cid,
                     "seed": seed, "budget_steps": budget, "predicted_steps": p_steps, "actual_steps": a_steps,
                     "predicted_diverged": p_div, "actual_diverged": a_div, "predicted_step_time_s": p_st,
                     "actual_step_time_s": a_st, "predicted_steps_to_target": p_steps,
                     "actual_steps_to_target": a_steps, "status": "compared"})

    # group 1: predicted costs 10, 20, 30, 100 (diverges: budget x 1 s), 40; real 24, 16, 4 (0.1 s steps), 100,
    # 200 (never reaches: budget x 2 s)
    add(("d1", "mse"), "p1", 10, 12)
    add(("d1", "mse"), "p2", 20, 8)
    add(("d1", "mse"), "p3", 30, 40, a_st=0.1)
    add(("d1", "mse"), "p4", None, 50, p_div=True)
    add(("d1", "mse"), "p5", 40, None)
    # group 2: two configs only
    add(("d2", "mse"), "q1", 10, 10)
    add(("d2", "mse"), "q2", 20, 30)
    # group 3: the truly cheapest (q6, real 2 x 1 s... mean over its two seeds) is predicted last: a top-3 miss
    add(("d2", "ce"), "r1", 1, 10, a_st=1.0)
    add(("d2", "ce"), "r2", 2, 20, a_st=1.0)
    add(("d2", "ce"), "r3", 3, 30, a_st=1.0)
    add(("d2", "ce"), "r4", 4, 1, a_st=1.0, seed=0)
    add(("d2", "ce"), "r4", 4, 3, a_st=1.0, seed=1)
    # group 4: no config reaches on the predicted side: every predicted cost is the budget, nothing to compare
    for i, cid in enumerate(("s1", "s2", "s3")):
        add(("d3", "mse"), cid, None, 10 * (i + 1), p_st=1.0 + i)
    return pd.DataFrame(rows).astype({"predicted_steps": "Int64", "actual_steps": "Int64",
                                      "predicted_steps_to_target": "Int64", "actual_steps_to_target": "Int64"})


def test_ranking_metrics_on_a_hand_made_table():
    from ttp_ray import analysis as A

    rk = A.ranking_metrics(hand_validation(), objectives=["cost"]).set_index(["dataset", "loss"])
    g1 = rk.loc[("d1", "mse")]
    # predicted ranks p1..p5: 1 2 3 5 4; real: 3 2 1 4 5 -> d = -2 0 2 1 -1, rho = 1 - 6 x 10 / (5 x 24)
    assert g1.configs == 5 and g1.rows == 5 and g1.spearman == pytest.approx(0.5)
    assert g1.flagged_predicted == 1 and g1.flagged_actual == 1 and g1.unranked_rows == 0
    assert g1.top1_regret == pytest.approx(24 / 4) and bool(g1.top3_hit)
    assert (g1.predicted_best, g1.actual_best) == ("p1", "p3")
    g2 = rk.loc[("d2", "mse")]
    assert g2.configs == 2 and np.isnan(g2.spearman) and g2.top1_regret == pytest.approx(1.0)
    g3 = rk.loc[("d2", "ce")]
    # r4's real cost is the mean of its seeds, 2: the cheapest, predicted 4th
    assert g3.configs == 4 and g3.rows == 5 and g3.top3_hit is not None and not g3.top3_hit
    assert g3.top1_regret == pytest.approx(10 / 2) and g3.spearman == pytest.approx(-0.2)
    assert (g3.reached_predicted, g3.reached_actual, g1.reached_predicted, g1.reached_actual) == (4, 4, 4, 4)
    g4 = rk.loc[("d3", "mse")]
    assert (g4.configs, g4.reached_predicted, g4.reached_actual, g4.flagged_predicted) == (3, 0, 3, 3)
    assert np.isnan(g4.spearman) and np.isnan(g4.top1_regret) and g4.top3_hit is None

    s = A.ranking_summary(A.ranking_metrics(hand_validation(), objectives=["cost"]))["cost"]
    assert s["groups"] == 2 and s["groups_nothing_reached"] == 1  # the 2-config group is left out
    assert s["median_spearman"] == pytest.approx(0.15) and s["min_spearman"] == pytest.approx(-0.2)
    assert s["mean_top1_regret"] == pytest.approx(5.5) and s["max_top1_regret"] == pytest.approx(6.0)
    assert s["top3_hit_rate"] == pytest.approx(0.5) and s["flagged_predicted"] == 1 + 3 and s["flagged_actual"] == 1


def test_pooled_step_time_prices_a_batch_size_at_its_median_run():
    """A step's time depends on (dataset, model, B), not on lr or momentum: the real cost uses the median over
    those runs, so one run timed on a loaded machine (40x slower here) does not reorder its group."""
    from ttp_ray import analysis as A

    rows = []
    for i, (steps, st) in enumerate([(50, 0.2), (120, 0.005), (130, 0.006), (140, 0.0056)]):  # run 0: timed under load
        rows.append({"dataset": "d", "model": "m", "full_batch": False, "batch_size": 64, "config_id": f"c{i}",
                     "step_time_s": st, "actual_steps": steps, "actual_cost_s": steps * st})
    rows.append({"dataset": "d", "model": "m", "full_batch": True, "batch_size": 900, "config_id": "g",
                 "step_time_s": 0.3, "actual_steps": 10, "actual_cost_s": 3.0})  # a group of one keeps its own
    gt = A.pooled_step_time(pd.DataFrame(rows))
    med = float(np.median([0.2, 0.005, 0.006, 0.0056]))
    assert np.allclose(gt.step_time_s[:4], med) and gt.step_time_s[4] == pytest.approx(0.3)
    assert np.allclose(gt.run_step_time_s, [0.2, 0.005, 0.006, 0.0056, 0.3])
    assert np.allclose(gt.actual_cost_s, gt.actual_steps * gt.step_time_s)
    # the fastest run in steps is now the cheapest, as it is on an unloaded machine
    assert gt.iloc[:4].sort_values("actual_cost_s").config_id.iloc[0] == "c0"


def test_ranking_metrics_cost_to_target_does_not_depend_on_eps():
    from ttp_ray import analysis as A

    val = hand_validation()
    both = pd.concat([val, val.assign(eps=0.05)], ignore_index=True)
    rk = A.ranking_metrics(both)
    assert set(rk.objective) == {"cost_to_target", "cost"}
    cost = rk[rk.objective == "cost"]
    to_target = rk[rk.objective == "cost_to_target"].set_index(["dataset", "loss"])
    assert len(cost) == 8 and len(to_target) == 4 and to_target.eps.isna().all()
    assert to_target.loc[("d1", "mse")].rows == 5 and to_target.loc[("d1", "mse")].spearman == pytest.approx(0.5)
    with pytest.raises(A.AnalysisError, match="objective"):
        A.ranking_metrics(val.drop(columns=["actual_steps_to_target"]), objectives=["cost_to_target"])


# ------------------------------------------------------------------- a new eps from the stored curves

def own_t_eps(steps, values, eps, mode):
    """T_eps by hand (Algorithm 1): the first logged step with |L_t - L_T| < eps (relative: eps (L_0 - L_T))."""
    v = np.asarray(values, dtype=float)
    thr = eps if mode == "absolute" else eps * abs(v[0] - v[-1])
    return int(np.asarray(steps)[np.argmax(np.abs(v - v[-1]) < thr)])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("criterion", ["loss", "error"])
def test_rank_new_eps_from_stored_curves_equals_a_fresh_sweep(sweeps, capsys, criterion):
    """`rank --eps 0.03 --eps 0.2 --eps-mode relative` on SPEC's output (eps 0.01, 0.05, absolute): without
    --fresh, the T̂ε of every config equal what a fresh sweep with those eps and mode wrote."""
    out, fresh = sweeps["out"], sweeps["fresh_eps"]
    code, text, err = run_cli(["rank", str(out), "--eps", "0.03", "--eps", "0.2", "--eps-mode", "relative",
                               "--criterion", criterion, "--by", "predicted_steps", "--top", "0", "--json"], capsys)
    assert code == 0, err
    answers = [json.loads(line) for line in text.strip().splitlines()]
    assert [a["eps"] for a in answers] == NEW_EPS and all(a["retimed"] and a["eps_mode"] == "relative"
                                                          for a in answers)
    swept = read_table(fresh, "predictions").to_pandas()
    own = read_table(out, "predictions").to_pandas().drop_duplicates("config_id").set_index("config_id")
    for a in answers:
        rows = pd.DataFrame(a["ranked"] + a["flagged"]).set_index("config_id").sort_index()
        want = swept[(swept.criterion == criterion) & np.isclose(swept.eps, a["eps"])].set_index("config_id")
        want = want.sort_index()
        assert list(rows.index) == list(want.index) and len(rows) == 24
        assert rows.predicted_steps.fillna(-1).astype(int).tolist() == want.predicted_steps.fillna(-1).astype(int).tolist()
        assert np.allclose(rows.predicted_fraction.astype(float), want.predicted_fraction.astype(float), equal_nan=True)
        steps = rows.predicted_steps.astype(float)  # the cost: T̂ε x this sweep's own measured step time
        assert np.allclose(rows.predicted_cost_s.astype(float), steps * own.step_time_s.loc[rows.index], equal_nan=True)
        assert rows.predicted_steps.notna().sum() >= 10  # not a vacuous comparison
        ranked = pd.DataFrame(a["ranked"])
        assert list(ranked.predicted_steps) == sorted(ranked.predicted_steps)
    # the table form says it re-timed, from where
    code, text, _ = run_cli(["rank", str(out), "--eps", "0.03", "--criterion", criterion], capsys)
    assert code == 0 and "re-timed from the stored curves" in text and str(out / "curves") in text


def test_retime_with_the_sweeps_own_settings_reproduces_its_rows(sweep_out):
    from ttp_ray import analysis as A

    t = A.load_sweep(sweep_out)
    settings = A.timing_settings(t.manifest)
    assert settings == ("absolute", "threshold", 0)
    pred = A.retime_predictions(t.predictions, t.curves, SPEC["eps"], criteria=SPEC["criteria"], settings=settings)
    key = ["dataset", "config_id", "criterion", "eps"]
    got = pred.sort_values(key).reset_index(drop=True)
    want = t.predictions.sort_values(key).reset_index(drop=True)
    assert len(got) == len(want) == 24 * 4
    assert got.predicted_steps.fillna(-1).tolist() == want.predicted_steps.fillna(-1).tolist()
    assert np.allclose(got.predicted_cost_s.astype(float), want.predicted_cost_s.astype(float), equal_nan=True)
    gt = A.retime_ground_truth(t.ground_truth, t.curves, SPEC["eps"], criteria=SPEC["criteria"], settings=settings)
    key = key + ["seed"]
    got, want = gt.sort_values(key).reset_index(drop=True), t.ground_truth.sort_values(key).reset_index(drop=True)
    assert len(got) == len(want) > 0
    assert got.actual_steps.fillna(-1).tolist() == want.actual_steps.fillna(-1).tolist()
    stored = A.with_timing(t.predictions, t.ground_truth, None, t.manifest, criteria=["loss"], eps=[0.05])
    assert stored[2] is False and set(stored[0].eps) == {0.05} and set(stored[1].criterion) == {"loss"}


@pytest.mark.timeout(240)
def test_validate_new_eps_retimes_both_sides(sweep_out, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sweep_out, out)
    code, text, err = run_cli(["validate", str(out), "--eps", "0.03", "--eps-mode", "relative", "--json"], capsys)
    assert code == 0, err
    assert json.loads(text)["retimed"] is True
    val = pd.read_parquet(out / "validation.parquet")
    assert set(val.eps) == {0.03} and set(val.eps_mode) == {"relative"} and set(val.criterion) == {"loss", "error"}
    curves = read_table(out, "curves").to_pandas()
    checked = 0
    for r in val.itertuples():
        for source, col, seed in (("actual", "actual_steps", r.seed), ("predicted", "predicted_steps", None)):
            c = curves[(curves.config_id == r.config_id) & (curves.source == source)]
            c = (c[c.seed == seed] if seed is not None else c).sort_values("step")
            diverged = r.actual_diverged if source == "actual" else r.predicted_diverged
            if diverged:
                assert pd.isna(getattr(r, col))
                continue
            assert getattr(r, col) == own_t_eps(c.step, c[r.criterion], 0.03, "relative"), (r.config_id, source)
            checked += 1
    assert checked >= 8
    code, _, err = run_cli(["validate", str(out), "--eps", "-1"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: eps:"), err
