"""``simulation_memory`` (the estimate behind ``--max-memory-gb`` and ``--dry-run``'s memory line) against the real
peak of the batched engines: for GD-MSE (closed form), GD-CE (discrete map), SDE and minibatch SGD, the estimate is
an upper bound of the peak and within 4x of it (docs/METHOD.md §15).

Each case runs in a fresh process with glibc's mmap threshold fixed at 64 kB (``MALLOC_MMAP_THRESHOLD_``), so that
every large tensor is its own mapping, returned when freed: the peak resident set above the one before
``simulate`` (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) is the peak of what the simulation
allocates. A first small ``simulate`` of the same configs loads the code paths. Linux only."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs: Linux")]

FACTOR = 4.0  # the estimate is at most this many times the measured peak

WORKER = r'''
import gc, json, sys
import torch
torch.set_num_threads(1)
from ttp_ray.dynamics import SimConfig, SimOptions, simulate, simulation_memory
from ttp_ray.state import KernelState

case = json.loads(sys.argv[1])
N, C, k, ct, T = case["n"], case["c"], case["k"], case["class_trace"], case["steps"]
g = torch.Generator().manual_seed(0)
rows = N if ct else N * C
V, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
eigvals = torch.logspace(0, -3, k, dtype=torch.float64) * rows
f0 = 0.3 * torch.randn(N, C, generator=g, dtype=torch.float64)
y = torch.randint(0, C, (N,), generator=g)
state = KernelState(f0, y, C, eigvals, V, ct)
ms = state.max_stable_lr()
B = case["batch"]
configs = [SimConfig(f * ms, m, B, case["loss"]) for f in case["fractions"] for m in case["momenta"]]
opts = SimOptions(method=case["method"], paths=case["paths"], log_every=case["log_every"])
simulate(state, configs, 3, opts)
gc.collect()


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
results = simulate(state, configs, T, opts)
peak = status("VmHWM") - before
est = simulation_memory(N, C, k, ct, T, len(configs), opts, B, (case["loss"],), B is None)
print(json.dumps({"peak": peak, "estimate": sum(est.values()), "parts": est,
                  "methods": sorted({r.method for r in results})}))
'''

BASE = {"n": 1500, "c": 10, "k": 200, "class_trace": True, "log_every": 10, "paths": 1, "batch": None}
CASES = {
    "gd-mse": dict(BASE, loss="mse", method="discrete", steps=2000, fractions=[0.1 * i for i in range(1, 9)],
                   momenta=[0.0, 0.5, 0.9], engine="discrete"),
    "gd-ce": dict(BASE, loss="ce", method="discrete", steps=200, fractions=[0.05 * i for i in range(1, 17)],
                  momenta=[0.0, 0.5, 0.9], engine="discrete"),
    "sde": dict(BASE, loss="ce", method="sde", steps=200, batch=32, paths=4, fractions=[0.05 * i for i in range(1, 17)],
                momenta=[0.0], engine="sde"),
    "minibatch": dict(BASE, loss="ce", method="minibatch", steps=200, batch=32, paths=4,
                      fractions=[0.1 * i for i in range(1, 9)], momenta=[0.0, 0.9], engine="minibatch"),
    "gd-mse full kernel": dict(BASE, class_trace=False, n=600, c=5, k=100, loss="mse", method="discrete", steps=300,
                               log_every=5, fractions=[0.1, 0.3, 0.5, 0.7], momenta=[0.0, 0.9], engine="discrete"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_simulation_memory_bounds_the_measured_peak(case):
    spec = CASES[case]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["methods"] == [spec["engine"]], r["methods"]
    ratio = r["estimate"] / r["peak"]
    print(f"{case}: peak {r['peak'] / 2 ** 20:.1f} MB, estimate {r['estimate'] / 2 ** 20:.1f} MB, x{ratio:.2f}; "
          f"{r['parts']}")
    assert r["peak"] > 5 * 2 ** 20  # the simulation dominates what is measured
    assert r["estimate"] >= r["peak"], r
    assert ratio <= FACTOR, r
