"""``svctunnel agent`` as a local process inside a named network namespace.

Used by the lab (the pod namespace). The process records its pid in the run's
state directory, so a later command (``svctunnel lab down``) can stop it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import LabError
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
        self.run.write(self._pid_file, {"pid": self.proc.pid})
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
        data = self.run.read(self._pid_file)
        return int(data["pid"]) if data else None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        pid = self.pid
        return pid is not None and _alive(pid)

    def detach(self) -> None:
        """Forget the child without stopping it; ``stop`` still finds it by its recorded pid."""
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the agent and wait; SIGKILL if it does not stop in time. Gone already is fine."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        else:
            _wait_gone(pid, timeout)
        self.proc = None
        (self.run.dir / self._pid_file).unlink(missing_ok=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
