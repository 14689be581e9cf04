"""Shield cleanup from interruption: SIGINT, SIGTERM and SIGALRM wait until it is done.

``with shield(): cleanup()`` runs ``cleanup`` to the end even if the user presses Ctrl-C,
the process gets SIGTERM, or pytest-timeout's alarm (its ``signal`` method) fires meanwhile;
each such signal then takes effect right after the block, with the handler it had before.

Two layers, because a process-directed signal goes to any thread that does not block it
(the tunnel's keepalive thread, say) and Python then runs the handler in the main thread:

- this thread's signal mask blocks the three signals, so the kernel keeps them pending;
- their Python-level handlers are swapped for one that only records the signal.

On exit the handlers come back, recorded signals are made pending again, and the mask comes
back: pending signals fire now, as they would have without the shield (KeyboardInterrupt,
pytest-timeout's failure, or the default action). A signal whose handler was already due
when the shield went up waits the same way. Only the main thread runs signal handlers, so
elsewhere the shield does nothing; nested shields are one shield. Every cleanup step keeps
its own deadline, so a shielded cleanup ends; SIGKILL is never blocked (``svctunnel reap``
removes what a SIGKILL leaves behind).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from functools import partial
from types import FrameType, TracebackType
from typing import Any, TypeVar

SHIELDED = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
T = TypeVar("T")
_RETRIES = 10  # a handler can be due only once per signal, so a call fails only a few times

_depth = 0  # shields open in the main thread; only the outermost one acts


class Shield:
    """The context manager behind ``shield()``."""

    def __init__(self) -> None:
        self._acting: list[bool] = []  # per open ``with``: did it put the shield up
        self._mask: set[int | signal.Signals] = set()
        self._handlers: dict[int, Any] = {}
        self._recorded: list[int] = []
        self._early: BaseException | None = None

    def __enter__(self) -> Shield:
        global _depth
        acting = threading.current_thread() is threading.main_thread() and not _depth
        self._acting.append(acting)
        if not acting:
            return self
        _depth += 1
        self._recorded = []
        self._early = None
        self._handlers = {}
        # a handler that was already due runs inside these calls; its exception waits until __exit__
        self._mask = self._defer(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, ()))
        self._defer(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED))
        for signum in SHIELDED:
            handler = signal.getsignal(signum)
            if handler is None or handler == signal.SIG_IGN:
                continue  # not installed from Python (cannot be put back), or ignored anyway
            self._defer(partial(signal.signal, signum, self._record))
            self._handlers[signum] = handler
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _depth
        if not self._acting.pop():
            return
        _depth -= 1
        try:
            for signum, handler in self._handlers.items():
                self._defer(partial(signal.signal, signum, handler))
            # signals another thread took: pending again in this (still masked) thread
            main = threading.main_thread().ident
            assert main is not None
            for signum in sorted(set(self._recorded)):
                self._defer(partial(signal.pthread_kill, main, signum))
            self._recorded = []
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)  # pending signals fire here
        if self._early is not None:
            early, self._early = self._early, None
            raise early

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self._recorded.append(signum)

    def _defer(self, action: Callable[[], T]) -> T:
        """Run a signal call; if a handler that was already due raises in it, keep that exception
        for ``__exit__`` and run the call again (each of these calls is idempotent)."""
        for attempt in range(_RETRIES):
            try:
                return action()
            except BaseException as exc:  # a KeyboardInterrupt or timeout that must wait
                if attempt == _RETRIES - 1:
                    raise
                if self._early is None:
                    self._early = exc
        raise AssertionError("unreachable")


def shield() -> Shield:
    """``with shield(): ...`` - see the module docstring."""
    return Shield()
