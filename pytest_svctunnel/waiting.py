"""Deadlines and polling: every wait in the package goes through here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import WaitTimeout

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    """A point in monotonic time that a phase must finish by."""

    seconds: float
    expires_at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at


def wait_for(
    check: Callable[[], T | None],
    *,
    phase: str,
    deadline: Deadline,
    describe: Callable[[], str] | None = None,
    hint: str = "",
    interval: float = 0.05,
) -> T:
    """Call ``check`` until it returns something other than None, or raise WaitTimeout.

    ``describe`` reports the last state seen, for the error message.
    """
    while True:
        result = check()
        if result is not None:
            return result
        if deadline.expired():
            raise WaitTimeout(phase, deadline.seconds, _last_state(describe), hint)
        time.sleep(min(interval, max(deadline.remaining(), 0.001)))


def _last_state(describe: Callable[[], str] | None) -> str:
    """What ``describe`` says, or why it could not say it: never an error that hides the timeout."""
    if describe is None:
        return "condition never held"
    try:
        return describe()
    except Exception as exc:  # e.g. the API server that kept the condition from holding
        return f"(could not be read: {exc})"


class Stopwatch:
    """Times consecutive phases of a setup, for the report and the benchmarks."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._started = self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        """End ``phase`` now; a phase that comes again (one per pod) adds up."""
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self._started

    def render(self) -> str:
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases.items())
        return f"{self.total:.2f} s ({parts})"
