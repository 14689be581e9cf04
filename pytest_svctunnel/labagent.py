"""The lab's agent: ``svctunnel agent`` as a local process inside the lab's pod namespace.

Its settings reach it as flags only (``agentsettings.to_argv``), with the key in a file in
the run's state directory; every ``SVCTUNNEL_*`` variable is removed from its environment,
so the external end's settings never leak into it. The process records its pid and start
time in the run's state directory, so a later command (``svctunnel lab down``, ``svctunnel
reap``) can stop it too, and never a process that got the same pid later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from . import keys
from .agentsettings import AgentSettings, clean_environment, to_argv
from .errors import LabError
from .pids import ProcessRef, terminate
from .runs import Run
from .waiting import Deadline, wait_for

LISTENING = "listening on UDP port"


KEY_FILE = "key"  # in the run's state directory, readable by its owner only


class LabAgent:
    """Starts, watches and stops one agent; its output goes to ``<run dir>/agent.log``."""

    def __init__(self, run: Run, netns: str) -> None:
        self.run = run
        self.netns = netns
        self.log_path = run.dir / "agent.log"
        self.key_file = run.dir / KEY_FILE
        self._pid_file = "agent.json"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, settings: AgentSettings, timeout: float = 30.0) -> None:
        """Start the agent and return once it listens; a crash or a deadline raises with its log."""
        keys.write_key_file(self.key_file, settings.key)
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "pytest_svctunnel", "agent"]
        argv += to_argv(settings, self.key_file)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=clean_environment(os.environ),
            )
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
