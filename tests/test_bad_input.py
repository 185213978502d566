"""Hostile input: every case ends in exit code 2 and exactly one line on stderr naming the field (no traceback),
before Ray starts, and leaves an existing sweep OUT byte for byte as it was.

The CLI runs in-process (``ttp_ray.cli.main``, as ``conftest.run_cli``); one case runs it as a subprocess, to time
the refusal of a 10^7-config grid from a cold start."""
import copy
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, run_cli

pytestmark = pytest.mark.timeout(120)
CASE_RECORD = "bad-input case: "  # a printed line: the case as bench/bad_input_cases.py reads it

TINY = {"name": "tiny", "model": "digits-cnn", "datasets": ["digits-5to9:subset=100"], "losses": ["mse"],
        "lr": {"fraction_of_max_stable": [0.2, 0.8]}, "budget": {"steps": 10}, "kernel": {"k": 64},
        "simulation": {"paths": 2, "log_every": 5}}


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture
def existing_out(tmp_path):
    """A sweep OUT as the engine leaves it (manifest, parts of every table, a validation file), written without Ray."""
    from ttp_ray.sweep.output import SweepOutput, as_table
    from ttp_ray.sweep.plan import DatasetSize, build_plan
    from ttp_ray.sweep.spec import parse_spec

    spec = parse_spec(TINY)
    plan = build_plan(spec, {spec.datasets[0].label: DatasetSize(100, 5, "loaded")})
    out = tmp_path / "existing-out"
    o = SweepOutput(out)
    o.start(name=spec.name, spec_dict=spec.to_dict(), identity=spec.identity(), spec_hash=spec.identity_hash(),
            layout_hash=plan.layout_hash(), plan_summary={}, previous=None)
    shard = plan.shards()[0]
    rows = [{"config_id": c.config_id, "model": "digits-cnn", "loss": "mse", "criterion": "loss", "eps": 0.01,
             "predicted_steps": 3, "diverged": False} for c in shard.configs]
    o.write_parts(shard.dataset, shard.shard_id, {"curves": as_table([], "curves"),
                                                  "predictions": as_table(rows, "predictions")})
    o.sync()
    (out / "validation.parquet").write_bytes(b"derived")
    return out


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    import ray

    started = ray.is_initialized()
    if started:
        ray.shutdown()
    assert not started, "a bad-input case started Ray"


def write_spec(tmp_path: Path, **changes) -> str:
    d = copy.deepcopy(TINY)
    d.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def npz(tmp_path: Path, name: str, x: np.ndarray, y: np.ndarray) -> str:
    path = tmp_path / name
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def digits_like(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).random((n, 8, 8), dtype=np.float64)


def broken_folder(tmp_path: Path) -> str:
    from PIL import Image

    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "9.png").write_text("not an image")
    return f"folder:{root}"


# -------------------------------------------------------------------------------------------------- cases
# each: id -> (build(tmp_path, out) -> argv, what the one line must contain)

FT = ["finetune", "--dataset", "digits-5to9:subset=100", "--steps", "3"]
PR = ["predict", "--dataset", "digits-5to9:subset=100", "--steps", "3", "--k", "64"]


def _sweep(spec_changes=None, extra=(), out=None, command="sweep"):
    def build(tmp, existing):
        return [command, write_spec(tmp, **(spec_changes or {})), "--out", str(out(tmp, existing) if out else existing),
                *extra]
    return build


def _tune(spec_changes=None, extra=(), out=None):
    """``ttp-ray tune``: the sweep's preflight (and its own options) before Ray starts."""
    return _sweep(spec_changes, ["--quiet", *extra], out, command="tune")


def _foreign_dir(tmp, existing):
    d = tmp / "foreign"
    (d / "predictions").mkdir(parents=True)
    (d / "predictions" / "keep.txt").write_text("someone else's")
    (d / "notes.md").write_text("mine")
    return d


def _foreign_manifest(tmp, existing):
    d = tmp / "foreign-manifest"
    d.mkdir()
    (d / "manifest.json").write_text('{"format": "something-else", "rows": 3}')
    (d / "curves").mkdir()
    return d


def _a_file(tmp, existing):
    f = tmp / "a-file"
    f.write_text("x")
    return f


def _locked(tmp, existing):
    from ttp_ray.sweep.output import SweepOutput

    holder = SweepOutput(existing)
    holder.acquire_lock()  # held by this process through another open file: a live sweep
    _locked.holders.append(holder)
    return existing


_locked.holders = []

NAN = np.full((40, 8, 8), 0.5)
NAN[3, 2, 2] = np.nan
INF = np.full((40, 8, 8), 0.5)
INF[0, 0, 0] = np.inf

CASES = {
    # --- learning rates, device
    "finetune lr 1e300": (lambda t, o: FT + ["--lr", "1e300"], "lr:"),
    "predict lr 1e7": (lambda t, o: PR + ["--lr", "1e7"], "lr:"),
    "finetune lr-fraction 1e9": (lambda t, o: FT + ["--lr-fraction", "1e9"], "lr_fraction:"),
    "predict lr nan": (lambda t, o: PR + ["--lr", "nan"], "lr:"),
    "device tpu9": (lambda t, o: FT + ["--lr", "0.1", "--device", "tpu9"], "device:"),
    "device cpu:1": (lambda t, o: PR + ["--lr", "0.1", "--device", "cpu:1"], "device:"),
    "device cuda:99": (lambda t, o: FT + ["--lr", "0.1", "--device", "cuda:99"], "device:"),
    # --- data
    "npz with NaN": (lambda t, o: ["finetune", "--dataset", npz(t, "nan.npz", NAN, np.arange(40) % 5), "--lr", "0.1",
                                   "--steps", "2"], "non-finite"),
    "npz with inf": (lambda t, o: ["predict", "--dataset", npz(t, "inf.npz", INF, np.arange(40) % 5), "--lr", "0.1",
                                   "--steps", "2"], "non-finite"),
    "npz labels imply 10^7 classes": (lambda t, o: ["finetune", "--dataset", npz(
        t, "classes.npz", digits_like(), np.r_[np.arange(39) % 5, 10 ** 7 - 1]), "--lr", "0.1", "--steps", "2"],
        "--max-classes"),
    "npz negative labels": (lambda t, o: ["finetune", "--dataset", npz(
        t, "neg.npz", digits_like(), np.r_[np.arange(39) % 5, -1]), "--lr", "0.1", "--steps", "2"], "non-negative"),
    "npz complex values": (lambda t, o: ["finetune", "--dataset", npz(
        t, "cplx.npz", digits_like().astype(np.complex64), np.arange(40) % 5), "--lr", "0.1", "--steps", "2"],
        "real numbers"),
    "folder with an unreadable image": (lambda t, o: ["finetune", "--dataset", broken_folder(t), "--model",
                                                      "tests.helpers:tiny_factory", "--input-size", "8",
                                                      "--input-channels", "1", "--lr", "0.1", "--steps", "2"],
                                        "cannot be read"),
    "synthetic 10^7 classes": (lambda t, o: FT[:1] + ["--dataset", "synthetic:n=20000000,classes=10000000", "--lr",
                                                      "0.1", "--steps", "2"], "--max-classes"),
    "synthetic 10^9 images": (lambda t, o: FT[:1] + ["--dataset", "synthetic:n=1000000000", "--lr", "0.1", "--steps",
                                                     "2"], "--max-memory-gb"),
    "more classes than --max-classes": (lambda t, o: FT + ["--lr", "0.1", "--max-classes", "3"], "--max-classes"),
    # --- the backbone
    "factory raises": (lambda t, o: FT + ["--lr", "0.1", "--model", "tests.helpers:raising_factory"],
                       "model tests.helpers:raising_factory: the factory raised"),
    "factory needs an argument": (lambda t, o: PR + ["--lr", "0.1", "--model", "tests.helpers:needs_argument"],
                                  "model tests.helpers:needs_argument"),
    "factory without a head": (lambda t, o: FT + ["--lr", "0.1", "--model", "tests.helpers:headless_factory"],
                               "linear classifier"),
    "factory whose forward fails": (lambda t, o: FT + ["--lr", "0.1", "--model", "tests.helpers:bad_forward_factory"],
                                    "forward pass"),
    "factory is not callable": (lambda t, o: FT + ["--lr", "0.1", "--model", "tests.helpers:NOT_CALLABLE"],
                                "not a function"),
    "factory returns no module": (lambda t, o: FT + ["--lr", "0.1", "--model", "tests.helpers:not_a_module"],
                                  "not an nn.Module"),
    "factory module missing": (lambda t, o: FT + ["--lr", "0.1", "--model", "no_such_pkg.mod:fn"], "cannot import"),
    # --- resources of predict / finetune
    "predict 10^9 steps": (lambda t, o: PR[:-4] + ["--lr", "0.1", "--steps", "1000000000"], "steps:"),
    "predict 10^6 paths": (lambda t, o: PR + ["--lr", "0.1", "--batch-size", "16", "--paths", "1000000"], "paths:"),
    "predict k 10^8": (lambda t, o: PR[:-2] + ["--lr", "0.1", "--k", "100000000"], "k:"),
    "finetune 10^9 steps": (lambda t, o: FT[:-2] + ["--lr", "0.1", "--batch-size", "32", "--steps", "1000000000"],
                            "steps:"),
    "a lowered memory limit": (lambda t, o: PR + ["--lr", "0.1", "--max-memory-gb", "0.001"], "--max-memory-gb"),
    # --- sweep specs
    "sweep 10^7 configs": (_sweep({"losses": ["mse", "ce"], "lr": {"geomspace": [1e-4, 1, 5000000]}}),
                           "--max-configs"),
    "sweep 10^7 configs from four axes": (_sweep({"lr": {"linspace": [0.01, 1, 100]}, "momentum": {"linspace": [
        0, 0.9, 100]}, "batch_size": list(range(1, 101)), "losses": ["mse"], "datasets": [
        "digits-5to9:subset=100", "digits:subset=100", "digits-0to4:subset=100", "digits:subset=200",
        "digits:subset=300", "digits:subset=400", "digits:subset=500", "digits:subset=600", "digits:subset=700",
        "digits:subset=800"]}), "--max-configs"),
    "sweep kernel.k 1e8": (_sweep({"kernel": {"k": 100000000}}), "kernel.k:"),
    "sweep budget 1e9 steps": (_sweep({"budget": {"steps": 1000000000}}), "budget:"),
    "sweep 10^6 paths": (_sweep({"batch_size": [16], "simulation": {"paths": 1000000}}), "simulation.paths:"),
    "sweep absolute lr 1e300": (_sweep({"lr": [0.1, 1e300]}), "lr"),
    "sweep lr fraction 1e9": (_sweep({"lr": {"fraction_of_max_stable": [0.5, 1e9]}}), "lr.fraction_of_max_stable"),
    "sweep label of 300 characters": (_sweep({"datasets": [{"name": "digits-5to9:subset=100", "label": "x" * 300}]}),
                                      "datasets[0].label:"),
    "sweep label with a newline": (_sweep({"datasets": [{"name": "digits-5to9:subset=100", "label": "a\nb"}]}),
                                   "datasets[0].label:"),
    "sweep model path too long for part names": (_sweep({"model": ["digits-cnn", "digits-resnet:/" + "p/" * 100
                                                                   + "w.pt"]}), "model[1]:"),
    "sweep code without --allow-code": (_sweep({"model": "os:getcwd"}), "--allow-code"),
    "sweep factory raises": (_sweep({"model": "tests.helpers:raising_factory"}, ["--allow-code"]),
                             "the factory raised"),
    "sweep factory without a head": (_sweep({"model": "tests.helpers:headless_factory"}, ["--allow-code"]),
                                     "linear classifier"),
    "sweep npz with NaN": (lambda t, o: ["sweep", write_spec(t, datasets=[npz(t, "nan.npz", NAN, np.arange(40) % 5)]),
                                         "--out", str(o)], "non-finite"),
    "sweep npz with 10^7 classes": (lambda t, o: ["sweep", write_spec(t, datasets=[npz(
        t, "c.npz", digits_like(), np.r_[np.arange(39) % 5, 10 ** 7 - 1])]), "--out", str(o)], "--max-classes"),
    "sweep folder with an unreadable image": (lambda t, o: ["sweep", write_spec(
        t, model="tests.helpers:tiny_factory", datasets=[{"name": broken_folder(t), "input_size": 8,
                                                          "input_channels": 1}]),
        "--out", str(o), "--allow-code"], "cannot be read"),
    "sweep device cuda without a GPU": (_sweep({"resources": {"device": "cuda"}}), "resources.device:"),
    # --- the output directory
    "sweep --out is a file": (_sweep(out=_a_file), "output:"),
    "sweep --out under a file": (_sweep(out=lambda t, o: _a_file(t, o) / "sub"), "output:"),
    "sweep --out component too long": (_sweep(out=lambda t, o: t / ("d" * 300)), "output:"),
    "sweep --fresh on a foreign directory": (_sweep(extra=["--fresh"], out=_foreign_dir), "output:"),
    "sweep --fresh on a foreign manifest": (_sweep(extra=["--fresh"], out=_foreign_manifest), "output:"),
    "sweep into an OUT a live sweep holds": (_sweep(out=_locked), "another sweep"),
    "sweep of another spec into the OUT": (_sweep({"lr": {"fraction_of_max_stable": [0.3]}}), "different spec"),
    # --- tune: the same preflight as sweep, before Ray starts
    "tune bad spec field": (_tune({"losses": ["hinge"]}), "losses"),
    "tune unknown spec key": (_tune({"budgett": {"steps": 10}}), "budgett"),
    "tune --top 0": (_tune(extra=["--top", "0"]), "top:"),
    "tune --top negative": (_tune(extra=["--top", "-2"]), "top:"),
    "tune --margin below 1": (_tune(extra=["--margin", "0.5"]), "margin:"),
    "tune criterion not in the spec": (_tune(extra=["--criterion", "accuracy"]), "criterion:"),
    "tune eps not in the spec": (_tune(extra=["--eps", "0.5"]), "eps:"),
    "tune dataset not in the spec": (_tune(extra=["--dataset", "cifar10"]), "dataset:"),
    "tune --out is a file": (_tune(out=_a_file), "output:"),
    "tune 10^7 configs": (_tune({"losses": ["mse", "ce"], "lr": {"geomspace": [1e-4, 1, 5000000]}}), "--max-configs"),
    "tune code without --allow-code": (_tune({"model": "os:getcwd"}), "--allow-code"),
    "tune factory raises": (_tune({"model": "tests.helpers:raising_factory"}, ["--allow-code"]), "the factory raised"),
    "tune kernel.k 1e8": (_tune({"kernel": {"k": 100000000}}), "kernel.k:"),
    "tune npz with NaN": (lambda t, o: ["tune", write_spec(t, datasets=[npz(t, "nan.npz", NAN, np.arange(40) % 5)]),
                                        "--out", str(o), "--quiet"], "non-finite"),
    "tune --fresh on a foreign directory": (_tune(extra=["--fresh"], out=_foreign_dir), "output:"),
    "tune into an OUT a live sweep holds": (_tune(out=_locked), "another sweep"),
    "tune of another spec into the OUT": (_tune({"lr": {"fraction_of_max_stable": [0.3]}}), "different spec"),
}

GPU_ONLY_PASSES = {"sweep device cuda without a GPU"}  # refused only where torch sees no GPU


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, existing_out, capsys, monkeypatch):
    if case in GPU_ONLY_PASSES and not _no_gpu():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show in the tree
    build, expected = CASES[case]
    argv = build(tmp_path, existing_out)
    before_out = tree_hash(existing_out)
    foreign = {p: tree_hash(p) for p in tmp_path.iterdir() if p.is_dir() and p != existing_out}
    t0 = time.perf_counter()
    try:
        code, out, err = run_cli(argv, capsys)
        after_out = tree_hash(existing_out)  # (a lock held by the case is still there)
    finally:
        for holder in _locked.holders:
            holder.release_lock()
        _locked.holders.clear()
    seconds = time.perf_counter() - t0
    lines = err.strip().splitlines()
    assert code == 2, (case, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert expected in lines[0], lines[0]
    assert after_out == before_out, "the existing OUT changed"
    for p, h in foreign.items():
        assert tree_hash(p) == h, f"{p} changed"
    assert not (tmp_path / "runs").exists()
    shown = [a.replace(str(tmp_path), "TMP") for a in argv]  # the record docs/BAD_INPUT_CASES.md is made of
    print(CASE_RECORD + json.dumps({"case": case, "argv": shown, "exit": code, "seconds": round(seconds, 2),
                                    "line": lines[0].replace(str(tmp_path), "TMP")}))


def test_case_count():
    assert len(CASES) >= 30


def test_every_case_is_in_the_generated_table():
    """docs/BAD_INPUT_CASES.md (written by bench/bad_input_cases.py from a pytest run) lists every case."""
    text = (ROOT / "docs" / "BAD_INPUT_CASES.md").read_text()
    missing = [case for case in CASES if f"| `{case}` |" not in text]
    assert not missing, f"re-run bench/bad_input_cases.py: {missing}"


def test_dry_run_of_a_huge_grid_reports_its_size(tmp_path, capsys):
    spec = write_spec(tmp_path, losses=["mse", "ce"], lr={"geomspace": [1e-4, 1, 5000000]})
    code, out, err = run_cli(["sweep", spec, "--dry-run"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--max-configs" in err
    assert out.startswith("grid: 10000000 configs = ") and "lr 5000000" in out


def test_huge_grid_refused_within_5_s_from_a_cold_start(tmp_path):
    """The refusal reads the YAML only: no torch, no expansion."""
    spec = write_spec(tmp_path, losses=["mse", "ce"], lr={"geomspace": [1e-4, 1, 5000000]})
    for command, extra in (("sweep", []), ("sweep", ["--dry-run"]), ("tune", [])):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ttp_ray.cli", command, spec, *extra], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)
        seconds = time.perf_counter() - t0
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "10000000 configs" in proc.stderr + proc.stdout
        assert seconds < 5, seconds
