"""pytest-xdist: which role this process has, and the controller's hooks (see ``shared``).

The controller makes the run and hands its id to every worker (``workerinput``); a worker whose
marks are wrong sends the error back (``workeroutput``) instead of crashing, and the controller
reports it once as a usage error. Loaded only when xdist runs the session.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from .errors import SvcTunnelError
from .runs import Run
from .stash import PluginStash

RUN_KEY = "svctunnel_run_id"
ERROR_KEY = "svctunnel_error"


def worker_run_id(config: pytest.Config) -> str | None:
    """The controller's run id, in an xdist worker; None elsewhere."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    value = workerinput.get(RUN_KEY) if workerinput is not None else None
    return value if isinstance(value, str) else None


def is_controller(config: pytest.Config) -> bool:
    """Whether this process is an xdist controller that hands the tests to workers."""
    if getattr(config, "workerinput", None) is not None:
        return False
    return getattr(config.option, "dist", "no") != "no" and bool(getattr(config.option, "tx", None))


def report_to_controller(config: pytest.Config, message: str) -> None:
    """From a worker: a usage error for the controller to report (its tests are left out)."""
    output: dict[str, Any] | None = getattr(config, "workeroutput", None)
    if output is not None:
        output[ERROR_KEY] = message


class Controller:
    """The controller's hooks."""

    def __init__(self, state: PluginStash) -> None:
        self.state = state
        self.errors: list[str] = []
        self._made = False

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """Before each worker starts: the run (made once, owned by the controller) and its id."""
        if not self._made:
            self._made = True
            with contextlib.suppress(SvcTunnelError):  # a state root this user cannot use: the workers say so
                Run.create(self.state.run_id)
        node.workerinput[RUN_KEY] = self.state.run_id

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        message = getattr(node, "workeroutput", {}).get(ERROR_KEY)
        if isinstance(message, str) and message not in self.errors:
            self.errors.append(message)
