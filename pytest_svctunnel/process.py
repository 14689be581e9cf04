"""``svctunnel agent`` as a local process inside a named network namespace.

Used by the lab (the pod namespace). The process records its pid and start time in
the run's state directory, so a later command (``svctunnel lab down``, ``svctunnel
reap``) can stop it too, and never a process that got the same pid later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import LabError
from .pids import ProcessRef, terminate
from .protocol import IPAddress
from .runs import Run
from .waiting import Deadline, wait_for

LISTENING = "listening on UDP port"


class AgentProcess:
    """Starts, watches and stops one agent; its output goes to ``<run dir>/<name>.log``."""

    def __init__(self, run: Run, netns: str, name: str = "agent") -> None:
        self.run = run
        self.netns = netns
        self.name = name
        self.log_path = run.dir / f"{name}.log"
        self._pid_file = f"{name}.json"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self, key_file: Path, port: int, peer: IPAddress | None = None, timeout: float = 30.0, extra: Sequence[str] = ()
    ) -> None:
        """Start the agent and return once it listens; a crash or a deadline raises with its log."""
        argv = [
            "ip",
            "netns",
            "exec",
            self.netns,
            sys.executable,
            "-m",
            "pytest_svctunnel",
            "agent",
            "--key-file",
            str(key_file),
            "--port",
            str(port),
            *extra,
        ]
        if peer is not None:
            argv += ["--peer", str(peer)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        started = ProcessRef.of(self.proc.pid)
        self.run.write(self._pid_file, {"pid": self.proc.pid, "start_time": started.start_time if started else None})
        wait_for(
            self._listening,
            phase="agent start",
            deadline=Deadline.after(timeout),
            describe=lambda: self.log_tail(5) or "no output",
            hint="see the agent log in the diagnostics",
        )

    def _listening(self) -> bool | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise LabError(f"the agent exited with {self.proc.returncode}:\n{self.log_tail(20)}")
        return True if LISTENING in self.log_text() else None

    @property
    def pid(self) -> int | None:
        """The running agent's pid: ours, or the one a previous command recorded."""
        if self.proc is not None:
            return self.proc.pid
        recorded = self._recorded()
        return recorded.pid if recorded else None

    def _recorded(self) -> ProcessRef | None:
        data = self.run.read(self._pid_file)
        if not data or not isinstance(data.get("pid"), int):
            return None
        start = data.get("start_time")
        return ProcessRef(data["pid"], start if isinstance(start, int) else None)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        recorded = self._recorded()
        return recorded is not None and recorded.alive()

    def detach(self) -> None:
        """Forget the child without stopping it; ``stop`` still finds it by its recorded pid."""
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the agent and wait; SIGKILL if it does not stop in time. Gone already is fine.

        Without the child at hand, only the recorded process is signalled (same pid and start time)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        elif (recorded := self._recorded()) is not None:
            left = terminate([recorded], Deadline.after(timeout), grace=timeout)
            if left:
                raise LabError(f"agent pid {recorded.pid} did not exit after SIGKILL; it may be stuck in the kernel")
        self.proc = None
        (self.run.dir / self._pid_file).unlink(missing_ok=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
