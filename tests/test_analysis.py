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
}
RANK_KEYS = ["predicted_cost_s", "predicted_steps", "predicted_final_error"]


@pytest.fixture(scope="session")
def sweeps(tmp_path_factory):
    """The sweep, then (same Ray) a resume of a copy of its OUT stripped of the ``spectra`` table, as an OUT
    written before that table existed; Ray is shut down before any test runs."""
    import ray

    from ttp_ray.sweep.driver import run_sweep, start_local_ray
    from ttp_ray.sweep.spec import parse_spec

    assert not ray.is_initialized()
    root = tmp_path_factory.mktemp("analysis")
    out, old = root / "out", root / "old"
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
    finally:
        ray.shutdown()
    return {"out": out, "old": old, **resumed}


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
    code, out, err = run_cli(["rank", str(sweep_out), "--top", "3", "--dataset", "digits:subset=100",
                              "--criterion", "error", "--eps", "0.05", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    sel, ok = converging(pred[pred.dataset == "digits:subset=100"], "error", 0.05)
    assert [r["config_id"] for r in d["ranked"]] == ok.sort_values(["predicted_cost_s", "config_id"]).config_id.tolist()[:3]
    assert {r["dataset"] for r in d["ranked"] + d["flagged"]} == {"digits:subset=100"}
    assert {(r["criterion"], r["eps"]) for r in d["ranked"]} == {("error", 0.05)}
    assert len(d["flagged"]) == 4

    code, out, err = run_cli(["rank", str(sweep_out), "--top", "2"], capsys)  # the terminal table
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
    code, out, err = run_cli(["rank", str(sweep_out), "--top", "0", "--max-final-error", f"{cut}", "--json"], capsys)
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
    (["--eps", "0.3"], "eps"),
    (["--dataset", "cifar10"], "dataset"),
    (["--by", "speed"], "--by"),
])
def test_rank_bad_input_one_line_exit_2(sweep_out, capsys, args, field):
    code, out, err = run_cli(["rank", str(sweep_out)] + args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], err
    assert "allowed" in lines[0] or "not one of" in lines[0]


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
