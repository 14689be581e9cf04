"""Shared fixtures: the root rule, real labs, real CLI processes, and a leak check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import keys, names
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.runs import STATE_ENV, Run
from pytest_svctunnel.values import FALSE

from .dirwatch import DirectoryWatch
from .helpers import Connect, leftovers

pytest_plugins = ["pytester"]
ROOT_RULE = "needs root and network namespaces"


def in_ci() -> bool:
    """CI is set (to anything but a false value, as values.parse_bool spells them)."""
    return os.environ.get("CI", "").strip().lower() not in ("", *FALSE)


def can_use_netns() -> bool:
    return os.geteuid() == 0 and Path("/proc/self/ns/net").exists()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The root rule, before any fixture of the test (module- and session-scoped ones too): a test
    marked ``root`` skips without root locally, and fails where CI is set."""
    if item.get_closest_marker("root") is None or can_use_netns():
        return
    if in_ci():
        pytest.fail(f"{ROOT_RULE}, but CI runs without them: run .ci/run as root", pytrace=False)
    pytest.skip(ROOT_RULE)


@pytest.fixture(scope="session", autouse=True)
def _nothing_leaked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite's runs get their own state directory (inherited by pytester subprocesses);
    at the end, no namespace, link, agent or state directory of any run made in it may remain.
    Which runs those were comes from the kernel (inotify on the state directory), and what is
    left from listing the kernel's objects by name: neither from the code under test."""
    state_dir = tmp_path_factory.mktemp("svctunnel-state")
    os.environ[STATE_ENV] = str(state_dir)
    watch = DirectoryWatch(state_dir)
    yield
    try:
        run_ids = sorted(name for name in watch.created() if names.RUN_ID.fullmatch(name))
    finally:
        watch.close()
    if can_use_netns():
        leaked = {run_id: left for run_id in run_ids if any((left := leftovers(run_id, state_dir)).values())}
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
    return names.link_name(run.id, "t0")


@pytest.fixture
def key() -> bytes:
    """A fresh session key."""
    return keys.new_key()


@pytest.fixture
def key_file(run: Run, key: bytes) -> Path:
    """``key`` in a file, for ``svctunnel connect`` (the lab writes its agent's copy itself)."""
    path = run.dir / "connect.key"
    keys.write_key_file(path, key)
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
