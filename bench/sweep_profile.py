"""Where a sweep's time goes -> docs/BENCHMARKS.md, section ``profile``.

The quickstart spec (sweeps/quickstart.yaml, predictions only: no ground truth) run the way an actor runs it, in
one process with one torch thread (an actor's one CPU), under :mod:`cProfile`: the kernel state (from the disk
cache), every shard (the simulators, the T̂ε rows, the step-time measurement, the curve tables) and the Parquet
parts. Beside it, whole-process wall times of ``ttp-ray --help`` and ``ttp-ray sweep SPEC --dry-run``, and a
local Ray's start-up to a first actor's answer. Each simulator's time is the profiler's cumulative time of its
engine function in ``ttp_ray.dynamics``.

The same script measures any checkout (``PYTHONPATH`` decides which ``ttp_ray`` it imports), so the section shows
the code before a change beside the code after it::

    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/sweep_profile.py --label before   # stored, not written
    .venv/bin/python bench/sweep_profile.py                                                    # after; writes the section

The step-time measurement runs cold (a fresh step-time cache; the kernel states are read from the real cache).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _report import ROOT, md_table, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/sweep_profile.py"
SPEC = ROOT / "sweeps" / "quickstart.yaml"
OUT = ROOT / "runs" / "bench"
# what the profile attributes, by function: (label, module path suffix, function names)
PARTS = [
    ("simulator: discrete GD, mse (closed form)", "ttp_ray/dynamics.py", ("_run_mse_closed",)),
    ("simulator: discrete GD, ce", "ttp_ray/dynamics.py", ("_run_ce_discrete",)),
    ("simulator: ce ODE", "ttp_ray/dynamics.py", ("_run_ce_ode",)),
    ("simulator: SDE", "ttp_ray/dynamics.py", ("_run_sde",)),
    ("simulator: minibatch SGD", "ttp_ray/dynamics.py", ("_run_minibatch",)),
    ("T̂ε rows", "ttp_ray/tables.py", ("prediction_rows",)),
    ("step-time measurement", "ttp_ray/finetune.py", ("measure_step_time",)),
    ("curve and prediction tables", "ttp_ray/tables.py", ("curve_table", "as_table")),
]


def _whole_process(args, repeats: int, cwd: Path) -> float:
    """Median CPU seconds (user + system) of ``python ARGS``, a fresh interpreter each time, run in ``cwd`` (the
    checkout measured: ``-m`` puts it first on the path)."""
    times = []
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, *args], cwd=cwd, check=True, capture_output=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return statistics.median(times)


def _ray_start_seconds() -> float:
    """A local Ray (as the sweep starts it) until one actor answers, then shut down."""
    import ray

    from ttp_ray.sweep.driver import start_local_ray

    @ray.remote(num_cpus=1)
    class Ping:
        def ping(self):
            return os.getpid()

    t0 = time.perf_counter()
    start_local_ray(num_cpus=os.cpu_count())
    try:
        ray.get(Ping.remote().ping.remote())
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


@contextlib.contextmanager
def cold_step_times():
    """``$TTP_RAY_CACHE`` pointed, for the block, at a root whose entries are the real cache's but with no step
    times: kernel states are read, step times measured."""
    from ttp_ray.paths import cache_dir

    real = Path(cache_dir())
    tmp = Path(tempfile.mkdtemp(prefix="ttp-ray-profile-cache-"))
    for entry in real.iterdir() if real.is_dir() else []:
        if entry.name != "kernels":
            (tmp / entry.name).symlink_to(entry)
    (tmp / "kernels").mkdir()
    for f in (real / "kernels").glob("*.pt") if (real / "kernels").is_dir() else []:
        (tmp / "kernels" / f.name).symlink_to(f)
    old = os.environ.get("TTP_RAY_CACHE")
    os.environ["TTP_RAY_CACHE"] = str(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is None:
            os.environ.pop("TTP_RAY_CACHE")
        else:
            os.environ["TTP_RAY_CACHE"] = old


def _attributed(stats: pstats.Stats) -> dict:
    out = {label: 0.0 for label, _, _ in PARTS}
    for (path, _, name), (_, _, _, cum, _) in stats.stats.items():
        for label, suffix, names in PARTS:
            if name in names and path.replace(os.sep, "/").endswith(suffix):
                out[label] += cum
    return out


def profile_work(spec) -> dict:
    """Kernel, shards and Parquet parts of every dataset of ``spec``, in this process, under cProfile."""
    import torch

    from ttp_ray.sweep.driver import plan_sweep
    from ttp_ray.sweep.output import SweepOutput
    from ttp_ray.sweep.preflight import preflight
    from ttp_ray.sweep.work import DatasetWork, WorkerJob

    torch.set_num_threads(1)
    clock = time.process_time  # CPU seconds: a shared machine's load moves wall times far more
    phases = {"first-use imports (torch.optim: torch._dynamo; pyarrow: pandas)": 0.0, "preflight and plan": 0.0, "kernel state (disk cache)": 0.0, "shards (predict_shard)": 0.0,
              "Parquet parts": 0.0}
    prof = cProfile.Profile(clock)
    out_dir = Path(tempfile.mkdtemp(prefix="ttp-ray-profile-out-"))
    try:
        # modules imported on first use, by whichever part comes first (the step-time measurement's optimizer,
        # the first table): counted here, once, in every checkout
        t0 = clock()
        import pyarrow as pa

        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        pa.array([1.0, None]), pa.array(["a"])
        phases["first-use imports (torch.optim: torch._dynamo; pyarrow: pandas)"] = clock() - t0
        t0 = clock()
        plan = plan_sweep(spec, preflight(spec))
        phases["preflight and plan"] = clock() - t0
        output = SweepOutput(out_dir)
        configs = 0
        for unit in plan.datasets:
            work = DatasetWork(WorkerJob(spec, unit.label, model=unit.model))
            t0 = clock()
            work.info()
            phases["kernel state (disk cache)"] += clock() - t0
            for shard in unit.shards:
                t0 = clock()
                prof.enable()
                res = work.predict_shard(shard)
                prof.disable()
                phases["shards (predict_shard)"] += clock() - t0
                configs += res.configs
                t0 = clock()
                output.write_parts(res.dataset, res.shard_id, {"curves": res.curves, "predictions": res.predictions})
                phases["Parquet parts"] += clock() - t0
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"phases": phases, "inside shards": _attributed(pstats.Stats(prof)), "configs": configs}


def _median_run(runs: list) -> dict:
    """Entry-wise median of stored runs (numbers; nested dicts entry by entry)."""
    def med(values):
        if isinstance(values[0], dict):
            return {k: med([v[k] for v in values if k in v]) for k in values[0]}
        if isinstance(values[0], (int, float)):
            return statistics.median(values)
        return values[0]

    if isinstance(runs, dict):  # a single stored run
        return runs
    return {**med(runs), "runs": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="'before': store the figures only; 'after': also write the "
                                                     "section, beside the stored 'before' figures when there are")
    ap.add_argument("--repeats", type=int, default=3, help="whole-process runs of --help and --dry-run")
    ap.add_argument("--append", action="store_true", help="add this run to the stored ones of --label (the section "
                                                         "shows medians over them; alternate before and after runs)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import yaml

    import ttp_ray
    from ttp_ray.sweep.spec import parse_spec

    d = yaml.safe_load(SPEC.read_text())
    d["ground_truth"] = {"enabled": False}
    spec = parse_spec(d)
    checkout = Path(ttp_ray.__file__).resolve().parent.parent
    fig = {"ttp_ray": str(checkout),
           "cli --help s": _whole_process(["-m", "ttp_ray.cli", "--help"], args.repeats, checkout),
           "sweep --dry-run s": _whole_process(["-m", "ttp_ray.cli", "sweep", str(SPEC), "--dry-run"], args.repeats,
                                               checkout),
           "Ray start-up to a first actor s": _ray_start_seconds()}
    with cold_step_times():
        fig.update(profile_work(spec))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"profile-{args.label}.json"
    runs = json.loads(path.read_text()) if args.append and path.exists() else []
    runs = [runs] if isinstance(runs, dict) else runs
    runs.append(fig)
    path.write_text(json.dumps(runs, indent=1))
    print(json.dumps(fig, indent=1))
    if args.label != "after" or args.no_write:
        return
    before_path = OUT / "profile-before.json"
    figs = [("before", _median_run(json.loads(before_path.read_text())))] if before_path.exists() else []
    figs.append(("after", _median_run(runs)))
    fig = figs[-1][1]
    rows = []
    for key in ("cli --help s", "sweep --dry-run s", "Ray start-up to a first actor s"):
        rows.append([key[:-2]] + [f"{f[key]:.2f}" for _, f in figs])
    for key in fig["phases"]:
        rows.append([key] + [f"{f['phases'].get(key, 0.0):.2f}" for _, f in figs])
    for key in fig["inside shards"]:
        rows.append([f"&nbsp;&nbsp;of which {key}"] + [f"{f['inside shards'].get(key, 0.0):.2f}" for _, f in figs])
    body = "\n".join([
        "## Profile: where a sweep's time goes (bench/sweep_profile.py)",
        "",
        f"`sweeps/quickstart.yaml` without its ground truth ({fig['configs']} configs on 2 datasets, digits-cnn, "
        "class-trace countsketch k = 512, 300 steps logged every 5, heavy-ball momentum, 4 paths), run as an actor "
        "runs it, in one process with one torch thread, under cProfile timing CPU seconds (the machine is shared: "
        "wall times move with its load); step times measured cold (an empty step-time cache), kernel states read "
        "from the disk cache. *Inside shards*: the profiler's cumulative time of each simulator engine and of the "
        "other parts of `predict_shard`. Start-up rows: CPU seconds of the whole process, medians of "
        + str(args.repeats) + " runs (`python -m ttp_ray.cli ...`); Ray: wall seconds of a local Ray started as "
        "the sweep starts it, until one actor answers. Medians over " + str(fig.get("runs", 1)) + " run(s) of "
        "each, *before* and *after* alternated. "
        + ("*before* is the code before issue 19's changes (the same script on that checkout)."
           if len(figs) == 2 else "no *before* figures stored."),
        "",
        md_table(["part", *[name + " s" for name, _ in figs]], rows),
    ])
    write_section("profile", body, COMMAND)
    print("wrote docs/BENCHMARKS.md section 'profile'")


if __name__ == "__main__":
    main()
