"""Ctrl-C (SIGINT) and SIGTERM during long work as one exception, :class:`Interrupted`; no Ray, no click.

:func:`stop_on_signals` installs handlers that raise :class:`Interrupted` in the main thread at the next
Python instruction, or, within ``trap.deferred()`` (around calls into C code that block and poll for signals,
such as Ray's), at the next ``trap.check()`` (a loop waiting on Ray checks at least once a second); so the
``finally`` blocks of the work run: nothing half-written is left (parts are written atomically), Ray is shut down. A second signal while
that clean-up runs ends the process at once with the same line and exit code. The CLI prints
:data:`INTERRUPTED_MESSAGE` once and exits with :attr:`Interrupted.exit_code` (128 + the signal number: 130
for SIGINT, 143 for SIGTERM, as a shell reports a process killed by them).

``Interrupted`` derives from ``BaseException``, like ``KeyboardInterrupt``, so ``except Exception`` clauses
do not swallow it; unlike ``KeyboardInterrupt`` click does not turn it into its own ``Abort``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Dict, Iterator, Optional, Sequence

__all__ = ["INTERRUPTED_MESSAGE", "Interrupted", "stop_on_signals", "SIGNALS"]

INTERRUPTED_MESSAGE = "interrupted: results written so far are kept (re-run the same command to resume)"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The work was stopped by signal ``signum``; ``exit_code`` = 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class _Trap:
    """The installed handlers; :meth:`install` again after a library replaced them (``ray.init`` sets its
    own SIGTERM handler). Within :meth:`deferred` a signal is only recorded and :meth:`check` raises it: C
    extensions that poll for signals while they block (Ray's ``wait`` and ``get``) turn an exception raised by
    a handler into a ``SystemError``."""

    def __init__(self, signals: Sequence[int]):
        self.signals = tuple(signals)
        self.previous: Dict[int, object] = {}
        self.fired: Optional[int] = None  # the first signal received
        self.raised = False
        self.deferring = False
        self.active = threading.current_thread() is threading.main_thread()

    def handler(self, signum, _frame) -> None:
        if self.fired is not None:  # a second signal during the clean-up: end now
            sys.stderr.write(INTERRUPTED_MESSAGE + "\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.fired = int(signum)
        if not self.deferring:
            self.check()

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal was received (once)."""
        if self.fired is not None and not self.raised:
            self.raised = True
            raise Interrupted(self.fired)

    @contextlib.contextmanager
    def deferred(self) -> Iterator["_Trap"]:
        """Within the block signals are recorded, not raised (call :meth:`check` between blocking calls); on a
        normal exit a recorded one is raised."""
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False
        self.check()

    def install(self) -> None:
        if not self.active:
            return
        for s in self.signals:
            old = signal.signal(s, self.handler)
            self.previous.setdefault(s, old)

    def restore(self) -> None:
        if not self.active:
            return
        for s, old in self.previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = SIGNALS) -> Iterator[_Trap]:
    """Within the block, ``signals`` raise :class:`Interrupted` (main thread only; elsewhere nothing is
    installed). Yields the trap: call its ``install()`` again after code that replaces the handlers."""
    trap = _Trap(signals)
    trap.install()
    try:
        yield trap
    finally:
        trap.restore()
