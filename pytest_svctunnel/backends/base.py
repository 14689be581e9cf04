"""The seam every backend implements: where the pod end runs.

A backend is built with explicit arguments (what it needs, never the plugin's whole
configuration), so the plugin, the CLI and other programs can deploy with it alike.
"""

from __future__ import annotations

from typing import Protocol

from ..protocol import Endpoint
from ..waiting import Deadline, Stopwatch


class Backend(Protocol):
    """Deploys the pod end and says where to send the hello; removes it again."""

    def deploy(self, key: bytes, deadline: Deadline, stopwatch: Stopwatch) -> Endpoint:
        """Run the pod end with the session key; return the Service address and port to send the hello to."""
        ...

    def teardown(self, deadline: Deadline) -> None:
        """Remove everything ``deploy`` made and wait until it is gone; safe to call twice."""
        ...

    def check(self) -> None:
        """Raise if the pod end can no longer answer (it exited, or keeps crashing)."""
        ...

    def diagnostics(self) -> list[tuple[str, str]]:
        """Titled, bounded texts for a failing test's report: logs, states, events."""
        ...

    def describe_kept(self) -> str:
        """What stays after a kept session, and how to remove it."""
        ...
