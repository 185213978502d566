"""Test environment: a private cache for backbones and kernels, Ray kept on loopback, no downloads."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TTP_RAY_CACHE", os.environ.get("TTP_RAY_TEST_CACHE", str(ROOT / ".pytest_cache" / "ttp-ray-cache")))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray's workers at the tests' priority, as a local sweep's are (start_local_ray), also those of ray.cluster_utils'
# clusters: at Ray's default nice 15 a loaded machine (make test-stress) starves them
os.environ.setdefault("RAY_worker_niceness", "0")
# torch hub and dataset roots point at empty places: a test that tried to download would fail loudly
os.environ["TORCH_HOME"] = str(ROOT / ".pytest_cache" / "torch-home-empty")
os.environ.setdefault("TTP_RAY_DATA", str(ROOT / ".pytest_cache" / "data-empty"))


TIME_SCALE = float(os.environ.get("TTP_RAY_TIMEOUT_SCALE", "1"))  # make test-stress: every wall-clock bound x this


def pytest_collection_modifyitems(config, items):
    """``TTP_RAY_TIMEOUT_SCALE=F`` (``make test-stress``) multiplies every test's own time limit by F: on an
    oversubscribed machine a test still has a limit, one that fits the machine."""
    scale = TIME_SCALE
    if scale == 1:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and marker.args:
            item.add_marker(pytest.mark.timeout(float(marker.args[0]) * scale), append=False)  # the closest one


@pytest.fixture(scope="session")
def digits_5to9():
    from ttp_ray.data import load_dataset

    return load_dataset("digits-5to9")


def run_cli(args, capsys):
    """Run ``ttp-ray ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from ttp_ray.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def left_running(processes):
    """Those of ``processes`` (pid -> (start time, name)) still running: same pid and start time, not a zombie."""
    import psutil

    left = []
    for pid, (started, name) in processes.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {name}")
        except psutil.Error:
            pass
    return left
