#!/usr/bin/env bash
# GPU check (issue 7): the kernel and a sweep on CUDA at N = 50,000 with a ResNet-18-sized backbone, and
# CPU/GPU agreement of predictions from one kernel state. Under 8 minutes on one H200 (install included).
#
#   bench/gpu_check.sh            # on a machine with a CUDA GPU, from the repository root (or anywhere)
#   bench/gpu_check.sh --smoke    # the same code path at a tiny size on the CPU (also: GPU_CHECK_SMOKE=1)
#
# Python: the first of .venv/bin/python, python3 that already imports torch, ray and ttp_ray; otherwise a
# virtualenv runs/gpu-venv is made (with the system's site packages, so a preinstalled CUDA torch is reused)
# and `pip install -e .` fills it from the package registry. Figures: $OUT/gpu_check.{json,md} when OUT is
# set; a full run also writes runs/bench/gpu_check.json and section "gpu" of docs/BENCHMARKS.md (fetch
# $OUT/gpu_check.json and run `python bench/gpu_check.py --from-json FILE` to put them into another checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export TTP_RAY_CACHE="${TTP_RAY_CACHE:-$PWD/runs/gpu-check-cache}"  # backbones and kernels, inside the copy

PY=""
for cand in .venv/bin/python python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch, ray, ttp_ray, psutil" >/dev/null 2>&1; then
    PY="$cand"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "[gpu_check] installing into runs/gpu-venv (pip install -e .)" >&2
  t0=$(date +%s)
  python3 -m venv --system-site-packages runs/gpu-venv
  runs/gpu-venv/bin/pip install -q -e . psutil
  PY=runs/gpu-venv/bin/python
  echo "[gpu_check] install took $(( $(date +%s) - t0 )) s" >&2
fi
"$PY" -c "import torch; print('[gpu_check] torch', torch.__version__, 'cuda available:', torch.cuda.is_available())" >&2
exec "$PY" bench/gpu_check.py "$@"
