"""Shared fixtures: the root rule, real labs, real CLI processes, and a leak check."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import device, keys, netns
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.runs import STATE_ENV, Run, journaled_ids

from .helpers import Connect

pytest_plugins = ["pytester"]


def _can_use_netns() -> bool:
    return os.geteuid() == 0 and Path("/proc/self/ns/net").exists()


@pytest.fixture(autouse=True)
def _root_rule(request: pytest.FixtureRequest) -> None:
    """Tests marked ``root`` skip without root locally, and fail in CI (where CI is set)."""
    if request.node.get_closest_marker("root") is None or _can_use_netns():
        return
    message = "needs root and network namespaces"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, but CI runs without them: run .ci/run as root", pytrace=False)
    pytest.skip(message)


def _leftovers(state_dir: Path) -> list[str]:
    """Namespaces, links and processes of the runs journaled under ``state_dir`` that still exist."""
    found: list[str] = []
    for run_id in journaled_ids():
        found += netns.listing(f"svt-{run_id}-")
        found += device.links_with_prefix(None, f"svt{run_id}-")
    procs = subprocess.run(["pgrep", "-af", str(state_dir)], capture_output=True, text=True).stdout
    found += [line for line in procs.splitlines() if "pgrep" not in line]
    return found


@pytest.fixture(scope="session", autouse=True)
def _nothing_leaked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite's runs get their own state directory (inherited by pytester subprocesses);
    at the end, no namespace, link or process of any of those runs may remain."""
    state_dir = tmp_path_factory.mktemp("svctunnel-state")
    os.environ[STATE_ENV] = str(state_dir)
    yield
    if _can_use_netns():
        leaked = _leftovers(state_dir)
        assert not leaked, f"left behind by this test session: {leaked}"


@pytest.fixture
def run() -> Iterator[Run]:
    """A fresh run id with its state directory, removed afterwards."""
    r = Run.new()
    yield r
    r.remove()


@pytest.fixture
def dev(run: Run) -> str:
    """A tunnel device name unique to this test's run."""
    return run.link_prefix + "t0"


@pytest.fixture
def key_file(run: Run) -> Path:
    path = run.dir / "key"
    keys.write_key_file(path, keys.generate_key())
    return path


@pytest.fixture
def lab(run: Run) -> Iterator[Lab]:
    """A built lab (port-rewriting home NAT) without an agent; removed afterwards."""
    built = Lab(run)
    built.up()
    yield built
    built.down()


@pytest.fixture
def connect() -> Iterator[type[Connect]]:
    """Factory for ``svctunnel connect`` processes; all are stopped afterwards."""
    started: list[Connect] = []

    class Tracked(Connect):
        def __init__(self, args: list[str], ns: str | None = None) -> None:
            super().__init__(args, ns)
            started.append(self)

    yield Tracked
    for c in started:
        c.stop()
