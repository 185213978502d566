"""The README's examples, run so that they cannot drift from the code.

Every fenced code block of README.md is preceded by a marker line (a block without one fails here):

* ``<!-- readme-test: run -->`` -- bash: every command is run with ``bash`` in a scratch directory laid out as a
  checkout (``sweeps/``, ``notebooks/``, ``runs/``), ``ttp-ray`` being this checkout's CLI; python: the block is
  run as a script there. Each must exit 0 without a traceback;
* ``<!-- readme-test: make-dry-run -->`` -- each ``make TARGET`` line is run as ``make -n TARGET`` in the
  repository: the targets and their commands exist (installing is the slow part, and ``make test`` is this suite);
* ``<!-- readme-test: skip (REASON) -->`` -- not run, for the reason given (reported as a skip).

The scratch directory makes the examples cheap and offline, and nothing else: ``sweeps/quickstart.yaml`` is the
real quickstart with a smaller grid, sketch and budget (:func:`tiny_quickstart`; same datasets and labels, so
``--dataset digits`` means the same); ``~/photos`` (HOME points into the scratch directory) is a small ImageFolder
tree and ``my.npz`` a small npz of images, as the README describes them; torch's hub cache holds a
``resnet18`` checkpoint of random weights where the README says the downloaded file goes; ``$TTP_RAY_CACHE``
starts empty, as on a fresh machine; and :data:`REWRITES` shortens the real fine-tunes' ``--steps`` (each
rewrite must apply, so a stale one fails).
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import yaml

from conftest import TIME_SCALE

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme-test: (run|make-dry-run|skip \((?P<reason>.+)\)) -->$")
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\s*$")
REWRITES = [  # (pattern, replacement, why): applied to every command of a `run` block; each must apply somewhere
    (r"--steps \d+", "--steps 20", "real fine-tuning is the slow part of finetune / predict --validate / drift"),
]
COMMAND_TIMEOUT_S = 280 * TIME_SCALE  # (make test-stress scales it with the time limits)


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    mode: str  # run | make-dry-run | skip
    reason: Optional[str]
    code: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}-{self.mode}"


def readme_blocks() -> List[Block]:
    lines = README.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARKER.match(prev.strip())
        assert mark, f"README.md:{i + 1}: a ```{m.group('lang')} block without a <!-- readme-test: ... --> marker"
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mode = mark.group(1).split(" ")[0]
        out.append(Block(i + 1, m.group("lang"), mode, mark.group("reason"), "\n".join(lines[i + 1:end])))
        i = end + 1
    return out


BLOCKS = readme_blocks()


def commands(code: str) -> List[str]:
    """The shell commands of a bash block: continuation lines joined, blank lines dropped."""
    out, cur = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def rewrite(cmd: str, used: set) -> str:
    for k, (pattern, replacement, _why) in enumerate(REWRITES):
        if cmd.startswith("ttp-ray") and re.search(pattern, cmd):
            used.add(k)
            cmd = re.sub(pattern, replacement, cmd)
    return cmd


def tiny_quickstart() -> dict:
    """sweeps/quickstart.yaml with a 12-config grid per dataset, k = 64, a 40-step budget, 2 fine-tunes each."""
    d = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    d["lr"] = {"fraction_of_max_stable": [0.1, 0.4, 1.3]}
    d["momentum"] = [0.9]
    d["batch_size"] = [64, "full"]
    d["budget"] = {"steps": 40}
    d["kernel"]["k"] = 64
    d["simulation"]["paths"] = 2
    d["ground_truth"].update({"where": {"lr_fraction": [0.4]}, "every": None, "max_configs": 2})
    return d


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The scratch directory (see the module docstring) and the environment to run the examples in."""
    import torch
    import torchvision
    from PIL import Image

    work = tmp_path_factory.mktemp("readme")
    (work / "sweeps").mkdir()
    (work / "sweeps" / "quickstart.yaml").write_text(yaml.safe_dump(tiny_quickstart(), sort_keys=False))
    shutil.copy(ROOT / "sweeps" / "all_datasets.yaml", work / "sweeps")
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs", "owls"):  # ~/photos: ImageFolder, ROOT/<class>/<image>
        (work / "home" / "photos" / cls).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                work / "home" / "photos" / cls / f"{k}.png")
    np.savez(work / "my.npz", x=rng.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8), y=np.arange(12) % 3)  # N C H W
    hub = work / "torch" / "hub" / "checkpoints"  # where the README says resnet18's download goes
    hub.mkdir(parents=True)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), hub / os.path.basename(weights.url))
    shim = work / "bin"
    shim.mkdir()
    (shim / "ttp-ray").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ttp_ray.cli "$@"\n')
    (shim / "ttp-ray").chmod(0o755)
    env = dict(os.environ, HOME=str(work / "home"), TORCH_HOME=str(work / "torch"), TTP_RAY_CACHE=str(work / "cache"),
               PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MPLBACKEND="Agg",
               PATH=os.pathsep.join([str(shim), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("TTP_RAY_OUT", None)
    main = next(b for b in BLOCKS if "ttp-ray sweep sweeps/quickstart.yaml --out runs/quickstart" in b.code)
    first = next(c for c in commands(main.code) if "--out runs/quickstart" in c)
    done = run(first, work, env)  # the README's own sweep line, once: the reading examples need its output
    assert "sweep quickstart: prediction shards: started" in done.stderr, done.stderr[-2000:]  # plain: a pipe
    return work, env


def run(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0 and "Traceback" not in done.stderr, \
        f"$ {cmd}\nexit {done.returncode}\n{done.stderr[-3000:]}\n{done.stdout[-1000:]}"
    return done


def test_every_block_is_marked_and_every_kind_is_there():
    modes = {b.mode for b in BLOCKS}
    assert modes == {"run", "make-dry-run", "skip"}, modes
    assert all(b.reason for b in BLOCKS if b.mode == "skip")
    ran = [b for b in BLOCKS if b.mode == "run"]
    assert {b.lang for b in ran} == {"bash", "python"} and len(ran) >= 6


MAKE_RUNS = {"quickstart": "ttp-ray sweep sweeps/quickstart.yaml", "test": "pytest",
             "test-stress": "TTP_RAY_TIMEOUT_SCALE=4"}  # what each target runs


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode != "run"],
                         ids=[b.id for b in BLOCKS if b.mode != "run"])
def test_readme_block_not_run(block):
    if block.mode == "skip":
        pytest.skip(f"README.md:{block.line}: {block.reason}")
    assert block.mode == "make-dry-run"
    for cmd in commands(block.code):
        target = re.match(r"make (\S+)", cmd)
        assert target and target.group(1) in MAKE_RUNS, cmd
        done = subprocess.run(["make", "-n", target.group(1)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and MAKE_RUNS[target.group(1)] in done.stdout, done.stdout + done.stderr
        assert "pip install -q" not in done.stdout, "the install should show what it installs"


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "run"], ids=[b.id for b in BLOCKS if b.mode == "run"])
def test_readme_block_runs(block, checkout):
    work, env = checkout
    if block.lang == "python":
        done = subprocess.run([sys.executable, "-c", block.code], cwd=work, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        check_python_block(block, done.stdout, work, env)
        return
    assert block.lang == "bash", block.lang
    for cmd in commands(block.code):
        run(rewrite(cmd, set()), work, env)


def check_python_block(block: Block, stdout: str, work: Path, env: dict) -> None:
    """The pandas example ranks as ``ttp-ray rank`` does: the same first configs, ranked (no flagged or 0-step row)."""
    if "analysis.rank(" not in block.code:
        return
    shown = re.findall(r"\b[0-9a-f]{16}\b", stdout)
    assert len(shown) == 5, stdout
    answer = json.loads(run("ttp-ray rank runs/quickstart --top 5 --json", work, env).stdout)
    ranked = answer["ranked"]
    assert answer["by"] == "predicted_cost_to_target_s" and [r["config_id"] for r in ranked] == shown
    assert all(r["rank"] == k + 1 and not r["flag"] and r["predicted_steps_to_target"] > 0
               for k, r in enumerate(ranked)), ranked


def test_every_rewrite_applies():
    """Each REWRITES entry matches some README command (a stale rewrite fails here)."""
    used = set()
    for b in BLOCKS:
        if b.mode == "run" and b.lang == "bash":
            for cmd in commands(b.code):
                rewrite(cmd, used)
    assert used == set(range(len(REWRITES)))
