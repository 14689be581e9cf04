"""SIGINT and SIGTERM as KeyboardInterrupt, in this process only (not in a forked copy).

By default SIGTERM kills pytest without any teardown. ``install()`` makes it raise
KeyboardInterrupt like Ctrl-C does, so pytest tears down and reports "interrupted".

In a forked copy of the process (fork without exec: pyroute2 forks a short-lived helper for
every namespace it opens, stops it with SIGTERM, and a terminal's Ctrl-C reaches it too) the
signal gets its default action and the copy exits. A KeyboardInterrupt there would run a
second copy of the session's teardown, next to the real one.

``guard_forks()`` keeps signals from being lost in a fork: CPython prints and drops an
exception that a signal handler raises while fork hooks run (logging has some), which would
lose a Ctrl-C, a SIGTERM or pytest-timeout's one alarm, and the lab's setup forks all the time.

Only handlers that are still the default are replaced (SIG_DFL for SIGTERM, Python's own for
SIGINT), only from the main thread, and ``restore`` puts the defaults back.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import threading
from collections.abc import Callable, Generator
from types import FrameType, TracebackType
from typing import Any

import pytest

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
DEFAULTS: dict[int, Handler] = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class InterruptThisProcess:
    """The handler: KeyboardInterrupt in the process that made it (see the module docstring)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self.pid:  # a forked copy: what the signal would do without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received; tearing down as on Ctrl-C")


def install() -> dict[int, InterruptThisProcess]:
    """Replace the default SIGINT and SIGTERM handlers; returns what was installed, for ``restore``."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set signal handlers
    installed: dict[int, InterruptThisProcess] = {}
    for signum, default in DEFAULTS.items():
        if signal.getsignal(signum) == default:
            installed[signum] = InterruptThisProcess()
            signal.signal(signum, installed[signum])
    return installed


def restore(installed: dict[int, InterruptThisProcess]) -> None:
    """Put the defaults back where our handlers are still in place."""
    for signum, handler in installed.items():
        if signal.getsignal(signum) is handler:
            signal.signal(signum, DEFAULTS[signum])


class _SigSet(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]  # glibc's sigset_t


_fork_hooks: tuple[Callable[[], object], Callable[[], object]] | None = None


def guard_forks(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)) -> None:
    """Keep ``signals`` pending while fork() runs its hooks, so their handlers run right after it.

    Once per process (fork hooks cannot be removed). Ours are C calls, libc's pthread_sigmask
    through ctypes, so no Python code (and no signal handler) runs inside them. ``before`` hooks
    run newest first and ``after`` hooks oldest first, so ours enclose the hooks registered
    earlier (logging's). Another thread that does not block the signals can still take one
    meanwhile; the shield covers that case during cleanup.
    """
    global _fork_hooks
    if _fork_hooks is not None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    blocked, saved = _SigSet(), _SigSet()
    libc.sigemptyset(ctypes.byref(blocked))
    for signum in signals:
        libc.sigaddset(ctypes.byref(blocked), int(signum))
    block = functools.partial(libc.pthread_sigmask, int(signal.SIG_BLOCK), ctypes.byref(blocked), ctypes.byref(saved))
    restore = functools.partial(libc.pthread_sigmask, int(signal.SIG_SETMASK), ctypes.byref(saved), None)
    os.register_at_fork(before=block, after_in_parent=restore, after_in_child=restore)
    _fork_hooks = (block, restore)


class InterruptReport:
    """A pytest plugin object: pytest formats an interrupt's traceback in its terminal reporter's
    ``pytest_keyboard_interrupt``. On Python 3.11 that raises TypeError when the interrupt hit an
    instruction without a line number (tb_lineno None; seen as pytest-dev/pytest-xdist#1196), and
    the run ends with exit 1 and a crash instead of "interrupted". SIGTERM and pytest-timeout
    interrupt at any instruction, so this hands the reporter the traceback without such entries."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(wrapper=True)
    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Generator[None, None, None]:
        try:
            return (yield)
        except TypeError:
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is None:
                raise
            reporter.pytest_keyboard_interrupt(with_line_numbers(excinfo))
            return None

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """The same hole in a test's report: pytest-timeout's alarm in a fixture's setup made the
        report itself crash (INTERNALERROR) instead of failing the test with "Timeout"."""
        if call.excinfo is not None and _has_hole(call.excinfo.tb):
            call.excinfo = with_line_numbers(call.excinfo)
        return (yield)


def _has_hole(tb: TracebackType | None) -> bool:
    while tb is not None:
        if tb.tb_lineno is None:
            return True
        tb = tb.tb_next
    return False


def with_line_numbers(excinfo: pytest.ExceptionInfo[BaseException]) -> pytest.ExceptionInfo[BaseException]:
    """The same exception, its traceback without the entries that have no line number."""
    entries = []
    tb: TracebackType | None = excinfo.tb
    while tb is not None:
        if tb.tb_lineno is not None:  # typed int, but None after some interrupts on 3.11
            entries.append(tb)
        tb = tb.tb_next
    kept: TracebackType | None = None
    for entry in reversed(entries):
        kept = TracebackType(kept, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    value = excinfo.value
    value.__context__ = value.__cause__ = None  # their tracebacks could have the same hole
    return pytest.ExceptionInfo.from_exc_info((type(value), value, kept))  # type: ignore[arg-type]
