"""Owning only what is ours, without Ray: one sweep at a time per OUT (a lock that a killed owner leaves stale),
parts that do not read back, temporary files of live writers, --fresh only on a sweep's OUT, a ground-truth-only
change resumed, and failures inside a worker that a re-run cannot fix."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from ttp_ray.sweep.output import LOCK, OutputError, SweepOutput, as_table
from ttp_ray.sweep.plan import DatasetSize, build_plan
from ttp_ray.sweep.spec import ground_truth_from_identity, parse_spec

pytestmark = pytest.mark.timeout(120)

SPEC = {"name": "own", "model": "digits-cnn", "datasets": ["digits-5to9:subset=100"], "losses": ["mse"],
        "lr": {"fraction_of_max_stable": [0.2, 0.8]}, "budget": {"steps": 10}, "resources": {"shard_size": 1}}
SIZES = {"digits-5to9:subset=100": DatasetSize(100, 5, "loaded")}


def started(root, spec=None, previous=None):
    spec = spec or parse_spec(SPEC)
    plan = build_plan(spec, SIZES)
    o = SweepOutput(root)
    o.start(name=spec.name, spec_dict=spec.to_dict(), identity=spec.identity(), spec_hash=spec.identity_hash(),
            layout_hash=plan.layout_hash(), plan_summary={}, previous=previous)
    return o, plan


def write_shard(o, shard, n_rows=None):
    rows = [{"config_id": c.config_id, "model": "digits-cnn", "loss": "mse", "criterion": "loss", "eps": 0.01}
            for c in shard.configs][:n_rows]
    o.write_parts(shard.dataset, shard.shard_id, {"curves": as_table([], "curves"),
                                                  "predictions": as_table(rows, "predictions")})
    o.sync()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ the lock

HOLD = """
import sys
from ttp_ray.sweep.output import SweepOutput
o = SweepOutput(sys.argv[1])
o.acquire_lock()
print("locked", flush=True)
sys.stdin.readline()
"""


def test_lock_refuses_a_live_sweep_and_takes_over_from_a_killed_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"  # waits on the event, not on time
        with pytest.raises(OutputError, match=rf"being written by another sweep \(pid {holder.pid} on "):
            SweepOutput(tmp_path).acquire_lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == holder.pid  # a killed owner leaves its lock file
    o = SweepOutput(tmp_path)
    note = o.acquire_lock()
    assert note and f"pid {holder.pid}" in note and "gone" in note
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(OutputError, match="another sweep"):  # held: a second opener in this process is refused too
        SweepOutput(tmp_path).acquire_lock()
    o.release_lock()
    assert not (tmp_path / LOCK).exists()
    assert SweepOutput(tmp_path).acquire_lock() is None  # a released lock is not stale


def test_stale_lock_file_of_a_dead_pid_is_taken_over_with_a_note(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    o = SweepOutput(tmp_path)
    note = o.acquire_lock()
    assert f"pid {pid}" in note
    o.release_lock()


def test_lock_of_another_host_is_not_stolen(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "then"}))
    with pytest.raises(OutputError, match="another host .*remove"):
        SweepOutput(tmp_path).acquire_lock()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "elsewhere.example"


# ---------------------------------------------------------------------------------- parts that do not read back

def test_truncated_and_mismatched_parts_are_dropped_on_resume(tmp_path):
    o, plan = started(tmp_path)
    shards = plan.shards()
    assert len(shards) == 2
    for s in shards:
        write_shard(o, s)
    first = o.part_path("predictions", shards[0].dataset, shards[0].shard_id)
    blob = first.read_bytes()
    first.write_bytes(blob[: len(blob) // 2])  # truncated: no Parquet footer
    previous = json.loads((tmp_path / "manifest.json").read_text())
    o2, _ = started(tmp_path, previous=previous)
    dropped = o2.drop_unreadable_parts()
    assert sorted(dropped) == sorted(f"{t}/{shards[0].key}" for t in ("curves", "predictions"))
    assert o2.completed_keys("predictions") == {shards[1].key}

    # a readable part whose rows are not what the manifest recorded (an older or foreign file) counts as not done
    second = o2.part_path("predictions", shards[1].dataset, shards[1].shard_id)
    pq.write_table(as_table([], "predictions"), second)
    o3, _ = started(tmp_path, previous=json.loads((tmp_path / "manifest.json").read_text()))
    assert f"predictions/{shards[1].key}" in o3.drop_unreadable_parts()
    assert o3.completed_keys("predictions") == set()


def test_stale_temps_swept_only_when_their_writer_is_gone(tmp_path):
    part_dir = tmp_path / "predictions" / "dataset=x"
    part_dir.mkdir(parents=True)
    gone = part_dir / f".part-00000.parquet.{dead_pid()}.123.tmp"
    live = part_dir / f".part-00001.parquet.{os.getpid()}.456.tmp"  # a writer that still runs
    foreign = part_dir / ".part-00002.parquet.tmp"  # not our naming: not ours to judge
    for p in (gone, live, foreign):
        p.write_bytes(b"partial")
    started(tmp_path)
    assert not gone.exists() and live.exists() and foreign.exists()


# ------------------------------------------------------------------------------------------------- --fresh

def test_fresh_clears_only_a_sweeps_out(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "curves").mkdir(parents=True)
    (foreign / "manifest.json").write_text("{}")
    with pytest.raises(OutputError, match="not a ttp-ray sweep manifest"):
        SweepOutput(foreign).clear()
    assert (foreign / "curves").is_dir() and (foreign / "manifest.json").exists()
    SweepOutput(tmp_path / "new").clear()  # nothing there: nothing to do
    assert not (tmp_path / "new").exists()
    o, plan = started(tmp_path / "ours")
    write_shard(o, plan.shards()[0])
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    o.clear()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------ ground truth changed alone

def test_ground_truth_enabled_later_is_the_same_sweep(tmp_path):
    without = parse_spec(SPEC)
    with_gt = parse_spec({**SPEC, "ground_truth": {"where": {"lr_fraction": [0.2]}}})
    o, _ = started(tmp_path, without)
    plan = build_plan(with_gt, SIZES)
    assert with_gt.identity_hash() != without.identity_hash()

    def relayout(old_gt):
        return build_plan(dataclasses.replace(with_gt, ground_truth=ground_truth_from_identity(old_gt)),
                          SIZES).layout_hash()

    old = o.check_compatible(with_gt.identity_hash(), plan.layout_hash(), with_gt.identity(), relayout)
    assert old["spec_hash"] == without.identity_hash()
    with pytest.raises(OutputError, match="different spec"):  # without the re-layout it is refused, as before
        o.check_compatible(with_gt.identity_hash(), plan.layout_hash(), with_gt.identity())
    other = parse_spec({**SPEC, "lr": {"fraction_of_max_stable": [0.3]}, "ground_truth": True})
    with pytest.raises(OutputError, match=r"changed: .*lr"):  # anything beyond ground_truth: still another sweep
        o.check_compatible(other.identity_hash(), build_plan(other, SIZES).layout_hash(), other.identity(),
                           relayout)


# ----------------------------------------------------------------------------------------- worker failures

def test_failure_inside_a_worker_says_whether_a_rerun_can_fix_it():
    from ttp_ray.data import DatasetError
    from ttp_ray.sweep.driver import failure_text

    class Wrapped(Exception):  # as Ray's RayTaskError carries the worker's exception
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    text, bad = failure_text("shard", "d", "d/00001", Wrapped(DatasetError("dataset npz: x.npz: x holds 3 NaN")),
                             dataset="npz:x.npz", model="digits-cnn")
    assert bad and "a re-run cannot fix" in text and "npz:x.npz" in text and "digits-cnn" in text
    text, bad = failure_text("prepare", "d", "", Wrapped(RuntimeError("actor died")), dataset="d", model="m")
    assert not bad and text == "d: kernel state failed: RuntimeError: actor died"
