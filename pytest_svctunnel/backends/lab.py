"""The lab backend: the pod end in the built-in lab, network namespaces on this host."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from .. import diagnostics
from ..errors import LabError, WaitTimeout
from ..lab import Lab
from ..protocol import Endpoint
from ..runs import Run
from ..values import IPAddress
from ..waiting import Deadline, Stopwatch, wait_for

STATUS_WAIT_S = 1.0


class LabBackend:
    """A lab of ``run`` whose agent listens on ``port`` and, with ``peer``, hears only that address."""

    def __init__(self, run: Run, port: int, peer: IPAddress | None = None) -> None:
        self.lab = Lab(run, port=port)
        self.peer = peer

    def deploy(self, key: bytes, deadline: Deadline, stopwatch: Stopwatch) -> Endpoint:
        self.lab.up(timeout=deadline.remaining())
        stopwatch.lap("lab up")
        self.lab.start_agent(key, peer=self.peer, timeout=deadline.remaining())
        stopwatch.lap("agent listening")
        return self.lab.plan.service(4)

    def teardown(self, deadline: Deadline) -> None:
        self.lab.down(timeout=max(deadline.remaining(), 1.0))

    def check(self) -> None:
        if not self.lab.agent.alive():
            raise LabError(f"the agent in the lab's pod exited; its log ends:\n{self.lab.log_tail(20)}")

    def diagnostics(self) -> list[tuple[str, str]]:
        ask_for_status(self.lab.agent.pid, self.lab.log_text)
        return [
            diagnostics.safely("agent log (pod end)", lambda: self.lab.log_tail(40)),
            diagnostics.safely("pod end links", lambda: self.lab.link_report("pod")),
        ]

    def describe_kept(self) -> str:
        run_id = self.lab.run.id
        return (
            f"lab kept: inspect with 'svctunnel lab status --run {run_id}',"
            f" remove with 'svctunnel lab down --run {run_id}'"
        )


def ask_for_status(pid: int | None, log_text: Callable[[], str]) -> None:
    """SIGUSR1 makes the agent log its state and counters; wait briefly for the line (without it,
    the diagnostics go on)."""
    if pid is None:
        return
    before = log_text().count("status: ")
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return
    with contextlib.suppress(WaitTimeout):
        wait_for(
            lambda: True if log_text().count("status: ") > before else None,
            phase="agent status line",
            deadline=Deadline.after(STATUS_WAIT_S),
            interval=0.02,
        )
