"""Shared fixtures: the root rule, real labs, real CLI processes, and a leak check."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import device, keys, netns
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.runs import Run

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


def _ours() -> tuple[set[str], set[str], set[str]]:
    namespaces = set(netns.listing("svt-"))
    links = set(device.links_with_prefix(None, "svt"))
    procs = subprocess.run(["pgrep", "-f", "pytest_svctunnel (agent|connect)"], capture_output=True, text=True)
    return namespaces, links, set(procs.stdout.split())


@pytest.fixture(scope="session", autouse=True)
def _nothing_leaked() -> Iterator[None]:
    """After the whole suite: no namespace, link or agent/connect process that the suite made remains."""
    if not _can_use_netns():
        yield
        return
    before = _ours()
    yield
    after = _ours()
    leaked = [sorted(a - b) for a, b in zip(after, before, strict=False)]
    assert not any(leaked), f"left behind: namespaces {leaked[0]}, links {leaked[1]}, processes {leaked[2]}"


@pytest.fixture
def run() -> Iterator[Run]:
    """A fresh run id with its state directory, removed afterwards."""
    r = Run.new()
    yield r
    r.remove()


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
