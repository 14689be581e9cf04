"""Processes by identity: a pid plus its start time, so a reused pid is never mistaken for it.

Linux only (``/proc``). Used for the owner of a run, the agent of a lab, and whatever still
runs inside a run's network namespaces. Every wait here has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from .waiting import Deadline

_PROC = Path("/proc")
_DEAD_STATES = frozenset({"Z", "X", "x"})  # zombie, dead: exited, only not yet waited for
_POLL_S = 0.02
KILL_GRACE_S = 2.0  # how long a SIGKILLed process may take to vanish


@dataclass(frozen=True)
class ProcStat:
    """The two fields of ``/proc/<pid>/stat`` that identify a process and tell if it runs."""

    state: str
    start_time: int  # field 22: clock ticks after boot


def proc_stat(pid: int) -> ProcStat | None:
    """The state and start time of ``pid``, or None if there is no such process."""
    try:
        text = (_PROC / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces and parentheses itself
    fields = text[text.rindex(")") + 2 :].split()
    return ProcStat(fields[0], int(fields[19]))  # fields[0] is field 3, fields[19] is field 22


@dataclass(frozen=True)
class ProcessRef:
    """A process as recorded at one time: its pid and, when known, its start time."""

    pid: int
    start_time: int | None  # None: recorded without one (an older version); the pid alone counts

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        """The process that has ``pid`` now, or None."""
        stat = proc_stat(pid)
        return cls(pid, stat.start_time) if stat else None

    @classmethod
    def current(cls) -> ProcessRef:
        ref = cls.of(os.getpid())
        return ref if ref is not None else cls(os.getpid(), None)

    def alive(self) -> bool:
        """True while this very process runs: the pid exists, is no zombie and started when recorded."""
        stat = proc_stat(self.pid)
        if stat is None or stat.state in _DEAD_STATES:
            return False
        return self.start_time is None or stat.start_time == self.start_time

    def describe(self) -> str:
        """Why the process counts as running or not, for messages."""
        stat = proc_stat(self.pid)
        if stat is None:
            return f"pid {self.pid} exited"
        if stat.state in _DEAD_STATES:
            return f"pid {self.pid} exited (a zombie not yet waited for)"
        if self.start_time is not None and stat.start_time != self.start_time:
            return f"pid {self.pid} exited (the pid now belongs to a process started later)"
        return f"pid {self.pid} is running"

    def signal(self, signum: int) -> None:
        """Send ``signum`` if this very process still runs; gone already is fine."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def netns_id(path: Path) -> tuple[int, int] | None:
    """The identity (device, inode) of a network namespace file, or None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def in_netns(namespaces: Collection[tuple[int, int]]) -> list[ProcessRef]:
    """Every process (but this one) whose network namespace is one of ``namespaces``."""
    if not namespaces:
        return []
    found: list[ProcessRef] = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if netns_id(entry / "ns" / "net") in namespaces and (ref := ProcessRef.of(int(entry.name))):
            found.append(ref)
    return found


def terminate(processes: Sequence[ProcessRef], deadline: Deadline, grace: float = 5.0) -> list[ProcessRef]:
    """SIGTERM each process, wait up to ``grace`` (within ``deadline``) for it to exit, then SIGKILL
    the rest and wait up to KILL_GRACE_S. Returns the processes that still run (normally none)."""
    for ref in processes:
        ref.signal(signal.SIGTERM)
    left = _wait_exit(processes, min(grace, deadline.remaining()))
    for ref in left:
        ref.signal(signal.SIGKILL)
    return _wait_exit(left, KILL_GRACE_S)


def _wait_exit(processes: Sequence[ProcessRef], seconds: float) -> list[ProcessRef]:
    end = time.monotonic() + seconds
    left = [p for p in processes if p.alive()]
    while left and time.monotonic() < end:
        time.sleep(_POLL_S)
        left = [p for p in left if p.alive()]
    return left
