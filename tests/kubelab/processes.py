"""The test cluster's long-running programs: started, awaited, paused and stopped by name, one log each.

Every program runs in a session of its own, so a Ctrl-C of the test run reaches only the test runner, whose
cleanup then stops them; a stop signals the whole session, so helpers a program runs (kube-proxy runs nft) go
too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from pytest_svctunnel.errors import LabError, WaitTimeout
from pytest_svctunnel.waiting import Deadline, wait_for

STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL
KILL_GRACE_S = 2.0  # SIGKILL to giving up
_POLL_S = 0.25
_LOG_TAIL_BYTES = 64 * 1024

Probe = Callable[[], tuple[bool, str]]


class ProcessError(LabError):
    """A program of the test cluster could not be started, reached or stopped."""


class Supervisor:
    """The programs of one test cluster, by name, each logging to ``<log_dir>/<name>.log``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # in start order

    def __contains__(self, name: str) -> bool:
        return name in self._procs

    @property
    def names(self) -> list[str]:
        return list(self._procs)

    def pid(self, name: str) -> int:
        return self._procs[name].pid

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if name in self._procs:
            raise ProcessError(f"{name} is already running; stop it first")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            self._procs[name] = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else dict(env),
            )

    def await_ready(self, name: str, probe: Probe, deadline: Deadline, hint: str) -> None:
        """Poll ``probe`` until it passes; the program exiting or the deadline passing raises, with its log."""
        last = "not probed yet"

        def check() -> bool | None:
            nonlocal last
            proc = self._procs[name]
            if proc.poll() is not None:
                raise ProcessError(
                    f"{name} exited with {proc.returncode} while starting; "
                    f"the end of {self.log_path(name)}:\n{self.log_tail(name)}"
                )
            passed, last = probe()
            return True if passed else None

        try:
            wait_for(
                check, phase=f"{name} start", deadline=deadline, describe=lambda: last, hint=hint, interval=_POLL_S
            )
        except WaitTimeout as exc:
            raise ProcessError(f"{exc}\nthe end of {self.log_path(name)}:\n{self.log_tail(name)}") from None

    def running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def terminate(self, names: Sequence[str], deadline: Deadline) -> list[str]:
        """SIGTERM the programs' sessions, SIGKILL what is left after STOP_GRACE_S, reap them all; returns what
        would not stop."""
        procs = {name: self._procs[name] for name in names if name in self._procs}
        for proc in procs.values():
            _signal_session(proc, signal.SIGTERM)
        _wait_all(procs.values(), min(STOP_GRACE_S, deadline.remaining()))
        for proc in procs.values():
            _signal_session(proc, signal.SIGKILL)
        _wait_all(procs.values(), KILL_GRACE_S)
        problems = []
        for name, proc in procs.items():
            if proc.poll() is None:
                problems.append(f"{name} (pid {proc.pid}) still runs after SIGKILL; it may be stuck in the kernel")
            else:
                del self._procs[name]
        return problems

    @contextlib.contextmanager
    def paused(self, name: str) -> Iterator[None]:
        """``name`` stopped with SIGSTOP (it keeps its sockets but answers nothing) until the block ends."""
        proc = self._procs[name]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last ``lines`` lines of a program's log, for error messages."""
        try:
            with self.log_path(name).open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path(name)})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _signal_session(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the process's whole session (its pgid is its pid), only while it is not yet reaped: a reaped pid may
    belong to someone else already."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)


def _wait_all(procs: Iterable[subprocess.Popen[bytes]], seconds: float) -> None:
    end = time.monotonic() + seconds
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, end - time.monotonic()))
