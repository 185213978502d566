"""Sweep output: Parquet tables (pyarrow) written part by part, atomically, plus ``manifest.json``.

Layout under ``OUT``::

    manifest.json                                   spec, versions, plan layout, what is complete
    predictions/dataset=<label>/part-<shard>.parquet       one part per shard
    ground_truth/dataset=<label>/part-gt-<id>-s<seed>.parquet  one part per real fine-tune
    curves/dataset=<label>/part-<shard>.parquet            predicted curves of a shard (long table)
    curves/dataset=<label>/part-gt-<id>-s<seed>.parquet    the real curve of a fine-tune
    spectra/dataset=<label>/part-spectrum.parquet          the dataset state's Theta spectrum (one part)
    ground_truth/dataset=<label>/part-tune-<id>-s<seed>.parquet  a run of ``ttp-ray tune`` (ttp_ray.tune),
    curves/dataset=<label>/part-tune-<id>-s<seed>.parquet        its real curve; both outside the sweep's plan
    tune/<experiment>/...                                  Ray Tune's storage for those runs (results, checkpoints)

With a list of models (a grid axis) each (dataset, model) has its own parts under the same ``dataset=<label>``
partition, the model (percent-encoded) in the file name: ``part-<model>-<shard>.parquet``,
``part-<model>-spectrum.parquet`` (ground-truth parts are already distinct: their config_id includes the model).
Every row carries a ``model`` column, so the readers need no new partition level.

The ``spectra`` part is written when the dataset's actor has its kernel state (before any shard); a
resumed sweep whose OUT lacks it (an OUT written before this table existed) starts the actor to add it.

The partition value is the dataset label, percent-encoded (pyarrow decodes it: ``pd.read_parquet(OUT /
"predictions")`` and :func:`read_table` give a ``dataset`` column). The ``dataset`` column lives only in
the partition path, never inside a part, so the hive dataset has one consistent schema.

Every file is written to a temporary name in its final directory and ``os.replace``-d into place, so a
part either exists whole or not at all: the parts on disk are the record of what is complete (the
manifest mirrors them, and is reconciled with them on resume). A part counts as done only if it reads back:
on resume (:meth:`SweepOutput.drop_unreadable_parts`) a part whose Parquet footer cannot be read, or whose row
count or size differs from what the manifest recorded when it was written (``parts``), is removed with the other
tables' parts of its unit, and recomputed. Nothing here imports Ray.

Only what is ours is touched: ``--fresh`` (:meth:`SweepOutput.clear`) clears a directory only when its manifest
says it is a ttp-ray sweep's OUT (a new or empty directory has nothing to clear); temporary files are swept only
when the process that wrote them (the pid in their name) is gone. One sweep at a time per OUT
(:meth:`SweepOutput.acquire_lock`): ``OUT/.ttp-ray.lock`` holds the owner's pid and host under an ``flock`` that
the kernel drops when the owner dies, so a stale lock (its run killed) is taken over with a note, a live one is
one line, exit code 2.

The tables' schemas, :func:`as_table`, :func:`curve_table`, :func:`read_table` and the manifest's identity
live in the core module :mod:`ttp_ray.tables` (re-exported here); this module is the directory's
bookkeeping: writing parts, the manifest's contents, resume and ``--fresh``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_write
from ..tables import (CURVE_SCHEMA, GROUND_TRUTH_SCHEMA, MANIFEST, MANIFEST_FORMAT, PREDICTION_SCHEMA, SCHEMAS,
                      SPECTRUM_SCHEMA, TABLES, ManifestError, as_table, curve_table, read_manifest, read_table)

__all__ = [
    "PREDICTION_SCHEMA",
    "GROUND_TRUTH_SCHEMA",
    "CURVE_SCHEMA",
    "SPECTRUM_SCHEMA",
    "SCHEMAS",
    "SPECTRUM_PART",
    "DERIVED",
    "TUNE_DIR",
    "TABLES",
    "MANIFEST",
    "LOCK",
    "OutputError",
    "SweepOutput",
    "partition_dir",
    "as_table",
    "curve_table",
    "write_table_atomic",
    "write_json_atomic",
    "read_table",
    "versions",
]

MANIFEST_VERSION = 1
SPECTRUM_PART = "spectrum"  # the one part of ``spectra`` per dataset (per (dataset, model): prefixed by the model)
DERIVED = ("validation.parquet",)  # written from the tables by ``ttp-ray validate``; stale once they are cleared
LOCK = ".ttp-ray.lock"  # OUT/.ttp-ray.lock: pid and host of the sweep writing OUT (flock-ed while it runs)
_TEMP = re.compile(r"^\..+\.(\d+)\.\d+\.tmp$")  # ttp_ray.atomic's temporary names: .NAME.PID.NS.tmp
TUNE_DIR = "tune"  # OUT/tune: the Ray Tune experiments of ``ttp-ray tune`` (its storage path); cleared with them


class OutputError(ValueError):
    """The output directory cannot be used (holds another sweep, or is not a sweep directory)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> Dict[str, str]:
    """Versions of what produced the tables (ttp-ray, torch, ray, pyarrow, python)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "pyarrow": pa.__version__}
    for pkg in ("ttp-ray", "torch", "ray", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover - always installed
            out[pkg] = "absent"
    return out


def partition_dir(root: Union[str, Path], table: str, dataset: str) -> Path:
    """``root/table/dataset=<percent-encoded label>``."""
    return Path(root) / table / f"dataset={quote(dataset, safe='')}"


def write_table_atomic(table: pa.Table, path: Union[str, Path]) -> Path:
    """Write ``table`` as Parquet at ``path`` via a temporary file and ``os.replace``."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_json_atomic(obj: Any, path: Union[str, Path]) -> Path:
    path = Path(path)
    text = json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


class SweepOutput:
    """One sweep's output directory: parts, the manifest, and what is already complete."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.manifest: Dict[str, Any] = {}
        self._lock_fd: Optional[int] = None

    # ------------------------------------------------------------------------------ paths
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def part_path(self, table: str, dataset: str, part: str) -> Path:
        return partition_dir(self.root, table, dataset) / f"part-{part}.parquet"

    # ------------------------------------------------------------------------------ opening
    def read_manifest(self) -> Optional[Dict[str, Any]]:
        try:
            return read_manifest(self.root)
        except ManifestError as e:
            hint = "use another --out" if e.readable else "use --fresh or another --out"
            raise OutputError(f"output: {e}; {hint}") from None

    def check_compatible(self, spec_hash: str, layout_hash: str, spec_dict: Dict[str, Any],
                         relayout: Optional[Callable[[Dict[str, Any]], str]] = None) -> Optional[Dict]:
        """The existing manifest if ``OUT`` holds this very sweep (or nothing); else :class:`OutputError`. A spec
        that differs in ``ground_truth`` only is this sweep too when ``relayout(old ground_truth identity)`` (the
        layout hash of this plan under the old selection) is the manifest's: its predictions are the same, and
        a resume adds (or keeps) the fine-tunes."""
        old = self.read_manifest()
        if old is None:
            stray = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
            ours = [p for p in stray if p in TABLES]
            if ours:
                raise OutputError(f"output: {self.root} holds sweep tables but no {MANIFEST}, so it is not known to be "
                                  f"a ttp-ray sweep's OUT; allowed: another --out (or move those tables away)")
            return None
        if old.get("spec_hash") != spec_hash:
            changed = _changed_fields(old.get("identity", {}), spec_dict)
            only_gt = bool(changed) and all(f.split(".")[0] == "ground_truth" for f in changed)
            if only_gt and relayout is not None and relayout(old.get("identity", {}).get("ground_truth", {})) == \
                    old.get("layout_hash"):
                return old  # the same predictions, another ground-truth selection: resumed, its fine-tunes added
            raise OutputError(f"output: {self.root} holds a sweep of a different spec (changed: "
                              f"{', '.join(changed) or 'unknown'}); use --fresh to overwrite it or another --out")
        if old.get("layout_hash") != layout_hash:
            raise OutputError(f"output: {self.root} was cut into different shards (same spec, other code or "
                              f"dataset sizes); use --fresh to overwrite it or another --out")
        return old

    def check_clearable(self) -> bool:
        """Whether ``--fresh`` has something to clear here: False for a new or empty directory, True for a ttp-ray
        sweep's OUT (its manifest says so); :class:`OutputError` for anything else. Reads only."""
        if not self.root.is_dir() or not [p for p in self.root.iterdir() if p.name != LOCK]:
            return False
        try:
            ours = read_manifest(self.root)
        except ManifestError as e:
            raise OutputError(f"output: {e}, so {self.root} is not known to be a ttp-ray sweep's OUT; --fresh clears "
                              f"only those; allowed: another --out") from None
        if ours is None:
            raise OutputError(f"output: {self.root} is not a ttp-ray sweep's OUT (it holds files but no {MANIFEST} of a "
                              f"sweep); --fresh clears only those; allowed: a new or empty directory, or a sweep's OUT")
        return True

    def clear(self) -> None:
        """Remove this sweep's tables, what was derived from them (``validation.parquet``, the Ray Tune
        experiments of ``ttp-ray tune`` under ``OUT/tune``) and the manifest (``--fresh``); other files are left
        alone. Only in a directory whose manifest says it is a ttp-ray sweep's OUT (a new or empty one has nothing
        to clear): else :class:`OutputError` and nothing is touched (:meth:`check_clearable`)."""
        if not self.check_clearable():
            return
        for table in TABLES:
            shutil.rmtree(self.root / table, ignore_errors=True)
        shutil.rmtree(self.root / TUNE_DIR, ignore_errors=True)
        for name in DERIVED:
            (self.root / name).unlink(missing_ok=True)
        if self.manifest_path.exists():
            self.manifest_path.unlink()

    def completed(self, table: str) -> Dict[str, List[str]]:
        """Parts present on disk: dataset label -> part names (without ``part-`` and ``.parquet``)."""
        from urllib.parse import unquote

        out: Dict[str, List[str]] = {}
        base = self.root / table
        if not base.is_dir():
            return out
        for d in base.iterdir():
            if d.is_dir() and d.name.startswith("dataset="):
                label = unquote(d.name[len("dataset="):])
                parts = sorted(p.name[len("part-"):-len(".parquet")] for p in d.glob("part-*.parquet"))
                out[label] = parts
        return out

    def completed_keys(self, table: str) -> set:
        return {f"{label}/{part}" for label, parts in self.completed(table).items() for part in parts}

    def drop_unreadable_parts(self) -> List[str]:
        """Remove every part that does not read back (its Parquet footer unreadable, or a row count or size other
        than the manifest's record of it) with the other tables' parts of the same unit, so that a resumed run
        recomputes them; returns their keys (``<table>/<label>/<part>``)."""
        recorded = self.manifest.get("parts", {})
        bad = set()
        for table in TABLES:
            for label, parts in self.completed(table).items():
                for part in parts:
                    path = self.part_path(table, label, part)
                    key = f"{table}/{label}/{part}"
                    try:
                        rows = pq.read_metadata(path).num_rows
                        size = path.stat().st_size
                    except Exception:  # truncated or not Parquet at all
                        bad.add((label, part))
                        continue
                    want = recorded.get(key)
                    if want is not None and (want.get("rows") != rows or want.get("bytes") != size):
                        bad.add((label, part))
        dropped = []
        for label, part in sorted(bad):
            for table in TABLES:
                path = self.part_path(table, label, part)
                if path.exists():
                    path.unlink()
                    dropped.append(f"{table}/{label}/{part}")
                self.manifest.get("parts", {}).pop(f"{table}/{label}/{part}", None)
        return dropped

    # ------------------------------------------------------------------------------ one run at a time
    def acquire_lock(self) -> Optional[str]:
        """Hold ``OUT/.ttp-ray.lock`` (``flock``, released by the kernel when this process ends) with this process's
        pid and host. Another live sweep holding it: :class:`OutputError`, one line. A lock file whose owner is gone
        (its flock released; a killed run) is taken over: returns a note saying whose it was."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held = _read_lock(fd)
                os.close(fd)
                who = (f"pid {held.get('pid')} on {held.get('host')}, since {held.get('started')}" if held
                       else "another process")
                raise OutputError(f"output: {self.root} is being written by another sweep ({who}); one sweep at a "
                                  f"time per OUT; allowed: wait for it, or another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was replaced while we waited for it: lock the new one
        held = _read_lock(fd)
        if held and held.get("host") != socket.gethostname():
            os.close(fd)
            raise OutputError(f"output: {self.root} is locked by a sweep on another host (pid {held.get('pid')} on "
                              f"{held.get('host')}, since {held.get('started')}); its liveness cannot be checked from "
                              f"here; allowed: wait for it, or remove {path} once that run is gone")
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        self._lock_fd = fd
        if held:
            return (f"{self.root}: took over the lock of a sweep that is gone (pid {held.get('pid')} on "
                    f"{held.get('host')}, since {held.get('started')})")
        return None

    def release_lock(self) -> None:
        """Remove ``OUT/.ttp-ray.lock`` and release it (no-op when not held)."""
        fd = self._lock_fd
        if fd is None:
            return
        try:
            (self.root / LOCK).unlink(missing_ok=True)
        finally:
            os.close(fd)
            self._lock_fd = None

    # ------------------------------------------------------------------------------ writing
    def start(self, *, name: str, spec_dict: Dict[str, Any], identity: Dict[str, Any], spec_hash: str,
              layout_hash: str, plan_summary: Dict[str, Any], previous: Optional[Dict[str, Any]]) -> None:
        """Create (or reopen) the manifest for this run."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        parts = dict((previous or {}).get("parts", {}))
        runs = list((previous or {}).get("runs", []))
        runs.append({"started": _now(), "versions": versions()})
        self.manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": name,
            "spec": spec_dict, "identity": identity, "spec_hash": spec_hash, "layout_hash": layout_hash,
            "versions": versions(), "created": (previous or {}).get("created", _now()), "updated": _now(),
            "plan": plan_summary, "runs": runs,
            "datasets": dict((previous or {}).get("datasets", {})),
            "parts": parts,
            "complete": False,
        }
        self.sync()

    def _remove_stale_temps(self) -> None:
        """Temp files of writes cut short (a killed driver) are never read; sweep them away, but only those whose
        writer (the pid in their name) is no longer running here."""
        for table in TABLES:
            for tmp in (self.root / table).glob("dataset=*/.part-*.tmp"):
                m = _TEMP.match(tmp.name)
                if m and not _pid_alive(int(m[1])):
                    tmp.unlink(missing_ok=True)

    def record_dataset(self, label: str, info: Dict[str, Any]) -> None:
        self.manifest.setdefault("datasets", {})[label] = info
        self.sync()

    def write_parts(self, dataset: str, part: str, tables: Dict[str, pa.Table]) -> None:
        """Write the parts of one unit of work; the first table named decides completeness, so it is
        written last (``curves`` before ``predictions`` / ``ground_truth``)."""
        for table in sorted(tables, key=lambda t: t != "curves"):
            path = write_table_atomic(tables[table], self.part_path(table, dataset, part))
            self.manifest.setdefault("parts", {})[f"{table}/{dataset}/{part}"] = {
                "rows": tables[table].num_rows, "bytes": path.stat().st_size}

    def sync(self, complete: Optional[bool] = None) -> None:
        """Refresh the manifest's completion record from the parts on disk, and write it."""
        done = {t: sorted(self.completed_keys(t)) for t in ("predictions", "ground_truth", "spectra")}
        plan = self.manifest.get("plan", {})
        self.manifest["completed"] = {
            "prediction_shards": done["predictions"],
            "ground_truth_runs": done["ground_truth"],
            "prediction_shards_done": len(done["predictions"]),
            "prediction_shards_total": plan.get("shards"),
            "ground_truth_runs_done": len(done["ground_truth"]),
            "ground_truth_runs_total": plan.get("ground_truth_runs"),
            "spectra": done["spectra"],
        }
        if complete is not None:
            self.manifest["complete"] = bool(complete)
        self.manifest["updated"] = _now()
        write_json_atomic(self.manifest, self.manifest_path)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(fd: int) -> Optional[Dict[str, Any]]:
    """The owner recorded in an open lock file, or None when it is empty or not ours."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        held = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def _changed_fields(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out
