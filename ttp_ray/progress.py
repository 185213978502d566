"""Progress with an ETA for long work, on stderr: one small facade over rich, with no Ray and no click.

* :class:`Progress` -- ``task(description, total, unit)`` returns a :class:`Task` (a context manager) that
  is advanced as the work goes; ``note(text)`` prints a line beside the tasks. On a terminal a rich bar per
  task (done / total, elapsed, ETA); on anything else (a log file, a pipe, CI) plain lines: one when a task
  starts, at most one every ``interval_s`` seconds while it runs (done / total, elapsed, ETA), one when it
  ends, so a log is never silent for long and never flooded. ``enabled=False`` prints nothing (``--quiet``).
* :data:`NULL_PROGRESS` -- the no-op progress, the default of every core function that takes one.
* :func:`current` / :func:`using` -- the ambient progress: the CLI sets one for a command (``using``); core
  functions given no progress use :func:`current` (``NULL_PROGRESS`` unless a caller set one), so a library
  user sees nothing and a Ray worker prints nothing.

The ETA is the remaining units at the mean rate so far, ``(total - done) × elapsed / done``, with elapsed time and
units counted from the first unit on once a second one is done (a set-up phase does not slow the rate).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, TextIO, Tuple

__all__ = ["Progress", "Task", "NULL_PROGRESS", "current", "using", "resolve", "format_seconds",
           "DEFAULT_INTERVAL_S"]

DEFAULT_INTERVAL_S = 5.0  # plain lines: at most one per task this often, plus its start and end lines


def format_seconds(seconds: Optional[float]) -> str:
    """``'2.5 s'``, ``'12 s'``, ``'3 min 05 s'``, ``'1 h 02 min'``; ``'?'`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class Task:
    """One piece of long work: ``advance(n)``, ``update(...)``, ``tick()`` (a plain line if one is due),
    ``close()``; a context manager that closes on exit. A task of :data:`NULL_PROGRESS` does nothing."""

    def __init__(self, owner: Optional["Progress"], description: str, total: Optional[float], unit: str,
                 completed: float = 0.0):
        self._owner = owner
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = float(completed)
        self.initial = float(completed)  # done before this task started (a resumed sweep): not in the rate
        self.started = time.monotonic()
        self.closed = False
        self._last_line = self.started
        self._first: Optional[Tuple[float, float]] = None  # (time, completed) of the first advance
        self._rich_id: Any = None

    # ---- reading
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def eta_s(self) -> Optional[float]:
        """Seconds left at the mean rate so far; None without a total or before the first unit done here. The rate
        is taken from the first advance on once there are later ones (a set-up phase before the first unit,
        such as a sweep's kernel, does not slow it), else from the start."""
        if not self.total or self.completed <= self.initial:
            return None
        left = self.total - self.completed
        if self._first is not None and self.completed > self._first[1]:
            return max(0.0, left * (time.monotonic() - self._first[0]) / (self.completed - self._first[1]))
        return max(0.0, left * self.elapsed / (self.completed - self.initial))

    def status(self) -> str:
        """``'45/120 samples (38%), 12 s, ETA 20 s'`` (``'3 units, 12 s'`` without a total)."""
        unit = f" {self.unit}" if self.unit else ""
        done = f"{self.completed:g}"
        if self.total:
            pct = 100.0 * self.completed / self.total
            return (f"{done}/{self.total:g}{unit} ({pct:.0f}%), {format_seconds(self.elapsed)}, "
                    f"ETA {format_seconds(self.eta_s)}")
        return f"{done}{unit}, {format_seconds(self.elapsed)}" if self.completed else format_seconds(self.elapsed)

    # ---- writing
    def advance(self, amount: float = 1.0) -> None:
        self.update(completed=self.completed + amount)

    def update(self, *, completed: Optional[float] = None, total: Optional[float] = None,
               description: Optional[str] = None) -> None:
        if self._owner is None or self.closed:
            return
        if completed is not None:
            if self._first is None and completed > self.completed:
                self._first = (time.monotonic(), float(completed))
            self.completed = float(completed)
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        self._owner._changed(self)

    def tick(self) -> None:
        """Nothing advanced, but time passed: a plain line if one is due (rich redraws by itself)."""
        if self._owner is not None and not self.closed:
            self._owner._changed(self)

    def close(self, outcome: str = "done") -> None:
        """End the task; plain: one line ``'<description>: <outcome>, <units> in <time>'``."""
        if self._owner is None or self.closed:
            return
        self.closed = True
        self._owner._closed(self, outcome)

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Progress:
    """Tasks with ETA on ``stream`` (default: ``sys.stderr`` at the time of use).

    ``enabled``: False prints nothing. ``live``: None picks a rich bar when the stream is a terminal, plain
    lines otherwise; True / False force one. ``interval_s``: the least time between two plain lines of a
    task (its start and end lines are always printed)."""

    enabled: bool = True
    stream: Optional[TextIO] = None
    live: Optional[bool] = None
    interval_s: float = DEFAULT_INTERVAL_S

    def __post_init__(self) -> None:
        self._open: List[Task] = []
        self._rich: Any = None

    # ---- public
    def task(self, description: str, total: Optional[float] = None, unit: str = "",
             completed: float = 0.0) -> Task:
        """A new task (plain: its start line now); use it as a context manager or ``close()`` it.
        ``completed``: units already done (a resumed sweep), left out of the ETA's rate."""
        if not self.enabled:
            return Task(None, description, total, unit, completed)
        t = Task(self, description, total, unit, completed)
        self._open.append(t)
        if self._is_live():
            bar = self._bar()
            t._rich_id = bar.add_task(description, total=total, completed=completed)
        else:
            what = f"{total:g} {unit}".rstrip() if total else ""
            if completed:
                what += f", {completed:g} already done"
            self._line(f"{description}: started" + (f" ({what})" if what else ""))
        return t

    def note(self, text: str) -> None:
        """One line beside the tasks (through the live display when there is one)."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self._line(text)

    def close(self) -> None:
        """Close every open task and stop the live display."""
        for t in list(self._open):
            t.close()
        self._stop()

    # ---- internals
    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _is_live(self) -> bool:
        if self.live is not None:
            return self.live
        isatty: Callable[[], bool] = getattr(self._out, "isatty", lambda: False)
        try:
            return bool(isatty())
        except ValueError:  # a closed stream
            return False

    def _bar(self):
        if self._rich is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            console = Console(file=self._out, force_terminal=self.live or None, highlight=False)
            # stdout is left alone (results go there); other stderr writes are printed above the bars
            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      console=console, redirect_stdout=False, redirect_stderr=True)
            self._rich.start()
        return self._rich

    def _stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def _line(self, text: str) -> None:
        out = self._out
        out.write(text + "\n")
        out.flush()

    def _changed(self, t: Task) -> None:
        if self._rich is not None and t._rich_id is not None:
            self._rich.update(t._rich_id, completed=t.completed, total=t.total, description=t.description)
            return
        now = time.monotonic()
        finished = t.total is not None and t.completed >= t.total  # its end line will say so
        if not finished and now - t._last_line >= self.interval_s:
            t._last_line = now
            self._line(f"{t.description}: {t.status()}")

    def _closed(self, t: Task, outcome: str) -> None:
        if t in self._open:
            self._open.remove(t)
        if self._rich is not None and t._rich_id is not None:
            if t.total is None:  # an open-ended phase leaves the display when it ends
                self._rich.remove_task(t._rich_id)
            if not self._open:
                self._stop()
            return
        unit = f" {t.unit}" if t.unit and (t.completed or t.total) else ""
        done = f"{t.completed:g}{unit} in " if t.completed else ""
        if t.total and t.completed < t.total:
            done = f"{t.completed:g}/{t.total:g}{unit} in "
        self._line(f"{t.description}: {outcome}, {done}{format_seconds(t.elapsed)}")


NULL_PROGRESS = Progress(enabled=False)
_ACTIVE: List[Progress] = [NULL_PROGRESS]


def current() -> Progress:
    """The ambient progress (:data:`NULL_PROGRESS` unless :func:`using` set one)."""
    return _ACTIVE[-1]


def resolve(progress: Optional[Progress]) -> Progress:
    """``progress``, or the ambient one when None (what a core function given ``progress=None`` uses)."""
    return progress if progress is not None else current()


@contextlib.contextmanager
def using(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the ambient one for the block; closes its tasks and live display on exit."""
    _ACTIVE.append(progress)
    try:
        yield progress
    finally:
        _ACTIVE.remove(progress)
        progress.close()
