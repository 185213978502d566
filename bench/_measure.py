"""Measurement helpers shared by the bench scripts: peak memory of a block, CPU seconds of a process tree,
one subprocess per measured point, and log-log fits.

* :class:`PeakRSS` -- peak resident set size of this process while a block runs, sampled every 5 ms
  (psutil), above the RSS at entry (``ru_maxrss`` is useless for that: a child keeps its parent's
  high-water mark, and it never goes down);
* :class:`TreeCPU` -- user + system CPU seconds of this process and of every descendant it starts while
  the block runs (Ray's GCS, raylet, workers, actors), sampled every ``interval`` s: a descendant's last
  < ``interval`` s before it exits are missed; the sampler thread's own CPU time is subtracted;
* :func:`run_worker` -- run ``python SCRIPT ARGS`` in a fresh process and return the JSON object its last
  stdout line holds (one process per measured point: no allocator or cache state carried over);
* :func:`run_workers` -- :func:`run_worker` over a list of points, in order, within a time budget;
* :func:`log` -- a timestamped progress line on stderr;
* :func:`loglog_fit` -- least-squares exponent ``a`` and prefactor ``c`` of ``y = c x^a``.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    """A timestamped progress line on stderr (the benches' tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Sampler:
    """Calls ``sample()`` every ``interval`` s in a daemon thread until ``stop()`` (which samples once more);
    ``thread_cpu`` is the thread's own CPU time, for callers that must not count it."""

    def __init__(self, sample, interval: float) -> None:
        self._sample, self._stop, self.thread_cpu = sample, threading.Event(), 0.0

        def loop() -> None:
            t0 = time.thread_time()
            while not self._stop.wait(interval):
                sample()
            self.thread_cpu = time.thread_time() - t0

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class PeakRSS:
    """Peak RSS of this process while the block runs (sampled every 5 ms), above the RSS at entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._sampler = _Sampler(self._sample, self.interval)
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._sampler.stop()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


class TreeCPU:
    """CPU seconds (user + system) of this process and its descendants over the block; see the module doc."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.own_seconds = 0.0  # this process alone
        self.processes = 0  # descendants seen

    def _sample(self) -> None:
        import psutil

        try:
            procs = self._root.children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                self._seen[key] = max(self._seen.get(key, 0.0), t.user + t.system)
            except psutil.Error:
                continue

    def __enter__(self) -> "TreeCPU":
        import psutil

        self._root = psutil.Process()
        self._seen: Dict[Tuple[int, float], float] = {}
        self._sample()
        self._base = dict(self._seen)  # descendants already running: only their increase counts
        t = self._root.cpu_times()
        self._own0 = t.user + t.system
        self._sampler = _Sampler(self._sample, self.interval)
        return self

    def __exit__(self, *exc) -> None:
        self._sampler.stop()
        t = self._root.cpu_times()
        self.own_seconds = max(0.0, t.user + t.system - self._own0 - self._sampler.thread_cpu)
        children = sum(v - self._base.get(k, 0.0) for k, v in self._seen.items())
        self.processes = len(set(self._seen) - set(self._base))
        self.seconds = self.own_seconds + children


def run_worker(script: Path, args: Sequence[str], *, timeout: Optional[float] = None) -> dict:
    """``python SCRIPT ARGS`` in a fresh process (cwd: the repository root); its last stdout line as JSON."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(map(str, args))} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_workers(script: Path, arg_lists: Sequence[Sequence[str]], budget_s: float, label: str,
                describe=None) -> List[dict]:
    """:func:`run_worker` for each argument list in order, until ``budget_s`` is spent (the rest are skipped,
    and the log says which); ``describe(row)``, if given, is logged after each point."""
    rows: List[dict] = []
    t0 = time.perf_counter()
    for i, args in enumerate(arg_lists):
        if time.perf_counter() - t0 > budget_s:
            log(f"  {label}: budget {budget_s:.0f}s spent, skipping {[' '.join(map(str, a)) for a in arg_lists[i:]]}")
            break
        rows.append(run_worker(script, args))
        if describe is not None:
            log(f"  {label} {' '.join(map(str, args))}: {describe(rows[-1])}")
    return rows


def loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """Least squares on ``log y = log c + a log x``: returns ``(a, c)`` (NaN with fewer than 2 usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return float("nan"), float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return float("nan"), float("nan")
    a = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return a, math.exp(my - a * mx)


def write_json(name: str, payload: dict) -> Path:
    """``runs/bench/NAME`` (atomically): the machine-readable figures a bench leaves for bench/report.py."""
    import os

    out = ROOT / "runs" / "bench" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, out)
    return out


def read_json(name: str, *fallbacks: Path) -> Optional[dict]:
    """``runs/bench/NAME`` or the first existing fallback path; None when none exists."""
    for p in (ROOT / "runs" / "bench" / name, *fallbacks):
        if p.exists():
            return json.loads(p.read_text())
    return None


def fmt_list(xs: List[float], f: str = "{:.3g}") -> str:
    return ", ".join(f.format(x) for x in xs)
