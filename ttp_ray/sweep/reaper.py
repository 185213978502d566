"""A local Ray ends with the process that started it, even a SIGKILLed one.

Ray fate-shares its head processes with the driver that started them (``gcs_server``, ``raylet``, the monitors:
they die with it), and its agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) watch the raylet and exit
when it is gone -- but only after publishing the raylet's death to the (dead) GCS, a call with a 60 s timeout
(``ray._private.process_watcher.report_raylet_error_logs``): measured here, both agents outlive a SIGKILLed
driver by 61.6 s. :func:`watch` starts a small process beside the driver that ends them at once.

The watcher holds the read end of a pipe whose write end only the driver holds (not inheritable), so the end of
the driver, however it ends, is an end of file there. Meanwhile it records, once every :data:`POLL_S` for its
first :data:`RECORD_S`, the processes of the driver's Ray (:func:`ray_descendants`: the head processes, the
agents, the workers), with their start times. At the end of file -- or once the ``raylet`` and ``gcs_server``
it recorded have ended (``ray.shutdown``; the watcher is then no longer needed) -- it sends SIGKILL to every
recorded process still running with the same start time (never a reused pid), and exits. Processes that
are not Ray's are never touched. Linux and macOS (psutil, a dependency of the project); Ray-free.

    python -m ttp_ray.sweep.reaper DRIVER_PID   (stdin: the pipe)
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from typing import Dict, Optional, Tuple

__all__ = ["POLL_S", "RECORD_S", "watch", "ray_descendants", "reap"]

POLL_S = 1.0  # how often the watcher looks (agents start ~1 s after the raylet)
RECORD_S = 30.0  # it records the driver's Ray processes for this long: the head and the agents, which start with it
# (later ones are workers, which end within seconds of the raylet); after that only the head's liveness is checked,
# a few microseconds per poll instead of a scan of every process
_RAY_PROCESS = re.compile(r"^ray::|[/\\]ray[/\\]")  # a process title set by Ray, or a program in Ray's package
_HEAD = ("raylet", "gcs_server")  # their end (the driver's ray.shutdown, or its death) ends the watch
_write_ends = []  # the driver's ends of the pipes (kept open for the driver's lifetime; never inherited)


def watch(pid: Optional[int] = None) -> int:
    """Start the watcher of process ``pid`` (default: this one), which must have started a local Ray; returns the
    watcher's pid. Call it right after ``ray.init`` started the head processes."""
    pid = os.getpid() if pid is None else int(pid)
    read_end, write_end = os.pipe()  # both non-inheritable (PEP 446): Ray's processes do not hold them
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ttp_ray.sweep.reaper", str(pid)], stdin=read_end,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True)
    finally:
        os.close(read_end)
    _write_ends.append(write_end)
    return proc.pid


def ray_descendants(pid: int) -> Dict[int, Tuple[float, str]]:
    """The processes of the Ray that ``pid`` started: its children that are Ray's (the head processes: a process
    title ``ray::...`` or a program in Ray's package) and all their descendants (the raylet's agents and workers),
    pid -> (start time, name). Other children of ``pid`` and theirs (another driver it runs, with its own Ray) are
    not included."""
    import psutil

    found: Dict[int, Tuple[float, str]] = {}
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return found
    for child in children:
        try:
            with child.oneshot():
                name, cmdline = child.name(), " ".join(child.cmdline())
            if not (_RAY_PROCESS.search(cmdline) or name.startswith("ray::") or name in _HEAD):
                continue
            tree = [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                found[p.pid] = (p.create_time(), p.name())
            except psutil.Error:
                pass
    return found


def _running(pid: int, started: float):
    """The process ``pid`` if it still runs and is the one that started at ``started`` (not a reused pid)."""
    import psutil

    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except psutil.Error:
        pass
    return None


def reap(recorded: Dict[int, Tuple[float, str]]) -> int:
    """SIGKILL every recorded process still running (same start time); returns how many were signalled."""
    import psutil

    killed = 0
    for pid, (started, _) in recorded.items():
        p = _running(pid, started)
        if p is None or pid == os.getpid():
            continue
        try:
            p.kill()
            killed += 1
        except psutil.Error:
            pass
    return killed


def _main(pid: int) -> None:
    recorded: Dict[int, Tuple[float, str]] = {}
    record_until = time.monotonic() + RECORD_S
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):  # end of file: the driver has ended
            break
        if time.monotonic() < record_until or not recorded:
            recorded.update(ray_descendants(pid))
        head = {p: v for p, v in recorded.items() if v[1] in _HEAD}
        if head and not any(_running(p, started) for p, (started, _) in head.items()):
            break  # its Ray was shut down (or died): what is left of it goes now
    reap(recorded)


if __name__ == "__main__":
    _main(int(sys.argv[1]))
