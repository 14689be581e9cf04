"""What the plugin keeps per pytest run, in pytest's config stash (in memory; a run's record on
disk is ``runs.Run``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from .config import TunnelConfig
from .errors import ConfigError
from .networks import Network, Plan
from .runs import Run

if TYPE_CHECKING:  # the session pulls in netlink; load it only when a fixture runs
    from .session import TunnelSession


@dataclass
class PluginStash:
    run_id: str
    role: str = "single"  # or, under pytest-xdist, "controller" or "worker" (see ``shared``)
    config: TunnelConfig | None = None
    error: ConfigError | None = None
    plan: Plan | None = None  # what the marks ask for; the session plans its addresses when it claims them
    networks: tuple[Network, ...] = field(default_factory=tuple)  # the plan as collection checked it
    session: TunnelSession | None = None
    shared_run: Run | None = None  # an xdist worker's: the run whose keeper holds the shared tunnel
    kept_note: str | None = None
    setup_note: str | None = None
    teardown_note: str | None = None
    attach_notes: list[str] = field(default_factory=list)
    late_notes: list[Callable[[], str | None]] = field(default_factory=list)  # rendered at the summary


STASH = pytest.StashKey[PluginStash]()
