"""pytest-xdist on real labs: one tunnel set per run, shared by every worker, torn down once after the
last worker, also after Ctrl-C or SIGKILL of the controller, or a worker's crash; bad marks are a
usage error. Each test of the inner suites proves where its traffic goes: unbound connections to
the pod end's addresses reach the run's own pod (``test_side_by_side``'s probe)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_svctunnel.runs import state_root

from .helpers import leftovers, remove_by_hand, svctunnel_cmd, wait_until
from .test_side_by_side import PROBE

pytestmark = pytest.mark.root

SUITE = (
    PROBE
    + """

import os
import subprocess
from pathlib import Path

import pytest



def one_set_of_devices(svctunnel):
    out = subprocess.run(["ip", "-o", "link", "show", "type", "vxlan"], capture_output=True, text=True).stdout
    mine = sorted(line.split(": ")[1].split("@")[0] for line in out.splitlines() if f"svt{svctunnel.run_id}-" in line)
    assert mine == sorted(n.dev for n in svctunnel.networks.all), mine
    pods = sorted(p.name for p in Path("/run/netns").glob(f"svt-{svctunnel.run_id}-pod*"))
    assert pods == [f"svt-{svctunnel.run_id}-pod"], pods


def note_worker():
    Path(f"worker-{os.environ.get('PYTEST_XDIST_WORKER', 'none')}").touch()


@pytest.mark.parametrize("i", range(3))
def test_default(svctunnel, i):
    note_worker()
    one_set_of_devices(svctunnel)
    reaches_its_own_pod(svctunnel, svctunnel.default)


@pytest.mark.parametrize("i", range(3))
@pytest.mark.svctunnel_network("media")
def test_media(svctunnel, svctunnel_network, i):
    note_worker()
    reaches_its_own_pod(svctunnel, svctunnel_network)


@pytest.mark.parametrize("i", range(3))
@pytest.mark.svctunnel_network("signalling")
def test_signalling(svctunnel, svctunnel_network, i):
    note_worker()
    reaches_its_own_pod(svctunnel, svctunnel_network)
"""
)
HEADER = re.compile(r"^svctunnel: run (?P<run>[0-9a-f]{6});", re.MULTILINE)
INNER_TIMEOUT_S = 300


def inner(path: Path, *args: str) -> subprocess.Popen[str]:
    """An inner pytest in a process group of its own, as a terminal's foreground job is."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    argv += ["--svctunnel-backend", "lab", "--timeout", "120", "-rA", *args]
    return subprocess.Popen(
        argv, cwd=path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def run_id_of(out: str) -> str:
    found = HEADER.findall(out)
    assert len(found) == 1, f"expected one run id in the header:\n{out}"
    return str(found[0])


def nothing_left(run_id: str) -> None:
    left = leftovers(run_id, state_root())
    remove_by_hand(run_id, state_root())
    assert not any(left.values()), f"run {run_id} left behind: {left}"


@pytest.mark.parametrize(
    "args", [("-n", "2"), ("-n", "4"), ("-n", "2", "--dist", "loadgroup")], ids=["n2", "n4", "loadgroup"]
)
def test_workers_share_one_tunnel_set(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    pytester.makepyfile(test_inner=SUITE)
    session = inner(pytester.path, *args)
    out = session.communicate(timeout=INNER_TIMEOUT_S)[0]
    run_id = run_id_of(out)
    try:
        assert session.returncode == 0, out
        assert re.search(r"\b9 passed\b", out), out
        assert len(list(pytester.path.glob("worker-gw*"))) >= 2, "the tests ran in more than one worker"
        assert len(re.findall(r"^svctunnel: tunnel ready in ", out, re.MULTILINE)) == 1, out
        assert "shared by every xdist worker" in out
        assert "INTERNALERROR" not in out
    finally:
        nothing_left(run_id)


def test_a_bad_mark_is_a_usage_error_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.svctunnel_network("a", ipv4="nonsense")
        def test_one(svctunnel_network):
            pass
        """
    )
    session = inner(pytester.path, "-n", "2")
    out = session.communicate(timeout=INNER_TIMEOUT_S)[0]
    assert session.returncode == pytest.ExitCode.USAGE_ERROR, out
    errors = [line for line in out.splitlines() if line.startswith("ERROR: svctunnel: svctunnel_network mark on")]
    assert len(errors) == 1 and "ipv4='nonsense' is not a network" in errors[0], out
    assert "INTERNALERROR" not in out and "Traceback" not in out, out
    nothing_left(run_id_of(out))


SLOW_SUITE = """
import os
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize("i", range(4))
def test_slow(svctunnel, i):
    Path("run-id").write_text(svctunnel.run_id)
    Path(f"started-{i}").touch()
    time.sleep(60)
"""

CRASH_SUITE = """
import os
import subprocess

import pytest


@pytest.mark.parametrize("i", range(6))
def test_uses_it(svctunnel, i):
    done = subprocess.run(["ping", "-c1", "-W2", "-I", svctunnel.dev, str(svctunnel.remote_ipv4.ip)])
    assert done.returncode == 0
    if i == 2:
        os._exit(3)  # this worker dies; xdist starts another, which finds the same tunnel
"""


def started(path: Path) -> int:
    return len(list(path.glob("started-*")))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_stopping_the_controller_leaves_nothing(pytester: pytest.Pytester, signum: int) -> None:
    """Ctrl-C: the controller stops the keeper, which tears down. SIGKILL of the controller alone:
    the keeper sees it gone and tears down; 'svctunnel reap' then finds nothing of the run."""
    pytester.makepyfile(test_slow=SLOW_SUITE)
    session = inner(pytester.path, "-n", "2")
    try:
        wait_until(lambda: started(pytester.path) >= 2 or session.poll() is not None, "two tests running", 120)
        assert session.poll() is None, session.communicate()[0]
        run_id = (pytester.path / "run-id").read_text()
        if signum == signal.SIGINT:
            os.killpg(session.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the controller and its workers
            out = session.communicate(timeout=INNER_TIMEOUT_S)[0]
            assert "KeyboardInterrupt" in out or "interrupted" in out.lower(), out
        else:
            session.send_signal(signal.SIGKILL)  # the controller alone; its workers sleep on
            session.wait(10)
        wait_until(lambda: not any(leftovers(run_id, state_root()).values()), "the run's objects removed", 60)
        if signum == signal.SIGKILL:
            reaped = subprocess.run(svctunnel_cmd("reap", "--dry-run"), capture_output=True, text=True, timeout=120)
            assert reaped.returncode == 0 and run_id not in reaped.stdout, reaped.stdout + reaped.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session.pid, signal.SIGKILL)
        session.communicate(timeout=60)
    nothing_left(run_id)


def test_a_crashed_worker_leaves_the_tunnel_to_the_others(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_crash=CRASH_SUITE)
    session = inner(pytester.path, "-n", "2")
    out = session.communicate(timeout=INNER_TIMEOUT_S)[0]
    run_id = run_id_of(out)
    try:
        assert re.search(r"\b5 passed\b", out) and re.search(r"\b1 failed\b", out), out
        assert "crashed" in out
        assert len(re.findall(r"^svctunnel: tunnel ready in ", out, re.MULTILINE)) == 1, out
    finally:
        nothing_left(run_id)
