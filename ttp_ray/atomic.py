"""Atomic file writes: the content goes to a temporary file beside the target, then ``os.replace`` puts it
in place, so a reader, a concurrent worker or a resumed run never sees a half-written file."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write"]


def atomic_write(path: Union[str, Path], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary path (``.NAME.PID.NS.tmp``), then rename it to ``path``.

    The temporary file is removed if ``write`` fails; parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
