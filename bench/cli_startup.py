"""CLI start-up bench (issue 19): whole-process wall time of ``ttp-ray --help`` and of
``ttp-ray sweep sweeps/quickstart.yaml --dry-run``, medians of repeated runs, with the machine's load beside.

    .venv/bin/python bench/cli_startup.py              # 7 runs of each, alternated; writes section ``cli``
    .venv/bin/python bench/cli_startup.py --repeats 3 --no-write

Each run is a fresh ``python -m ttp_ray.cli ...`` process (what the ``ttp-ray`` entry point runs), timed from
spawn to exit with ``time.perf_counter``; CPU = the child's user + system seconds (``os.wait4``). The two
commands alternate, so that a change of load falls on both. The 1-minute load average (``os.getloadavg``) is
read before every run: on a shared 2-core machine the wall times follow it, the CPU seconds much less.
Targets (issue 19): ``--help`` < 2 s, ``--dry-run`` < 5 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import log, write_json  # noqa: E402
from _report import ROOT, md_table, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/cli_startup.py"
COMMANDS = {
    "ttp-ray --help": ["--help"],
    "ttp-ray sweep sweeps/quickstart.yaml --dry-run": ["sweep", "sweeps/quickstart.yaml", "--dry-run"],
}
TARGETS = {"ttp-ray --help": 2.0, "ttp-ray sweep sweeps/quickstart.yaml --dry-run": 5.0}


def run_once(args: Sequence[str]) -> Dict[str, float]:
    """One whole process: wall seconds, CPU seconds of the child, the load average before it."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ttp_ray.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"ttp-ray {' '.join(args)} exited {proc.returncode}: {err[-500:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "load": load}


def measure(repeats: int) -> Dict[str, List[Dict[str, float]]]:
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in COMMANDS}
    for i in range(repeats):
        for name, args in COMMANDS.items():
            r = run_once(args)
            runs[name].append(r)
            log(f"{name}: run {i + 1}/{repeats} {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, load {r['load']:.1f}")
    return runs


def table(runs: Dict[str, List[Dict[str, float]]]) -> str:
    body = []
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        loads = [r["load"] for r in rs]
        target = TARGETS[name]
        body.append([f"`{name}`", f"**{wall:.2f}**", f"{min(r['wall_s'] for r in rs):.2f}-{max(r['wall_s'] for r in rs):.2f}",
                     f"{statistics.median(r['cpu_s'] for r in rs):.2f}", f"{min(loads):.1f}-{max(loads):.1f}",
                     f"< {target:g}", "met" if wall < target else "**not met**"])
    return md_table(["command", "wall s (median)", "wall s (range)", "CPU s (median)", "1-min load during the runs",
                     "target s", ""], body)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    runs = measure(args.repeats)
    text = "\n".join([
        "## CLI start-up (bench/cli_startup.py)",
        "",
        f"Whole-process runs of `python -m ttp_ray.cli ...` (the `ttp-ray` entry point), {args.repeats} of each, the "
        "two commands alternated; wall from spawn to exit, CPU = the child's user + system seconds. The 1-minute "
        "load average read before each run is beside the figures: the machine has 2 cores shared with other "
        "work, and wall times follow its load.",
        "",
        table(runs),
    ])
    print(text)
    if not args.no_write:
        write_json("cli_startup.json", runs)
        write_section("cli", text, COMMAND + ("" if args.repeats == 7 else f" --repeats {args.repeats}"))


if __name__ == "__main__":
    main()
