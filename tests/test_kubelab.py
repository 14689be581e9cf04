"""The test cluster's own promises that the e2e tests do not show: a node of a test run that crashed
(SIGKILL, nothing ran its cleanup) keeps running, and the next cluster's start reaps it by its run id;
a machine that cannot run containers is told so at a node's start, with what is missing."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_svctunnel import names, netns
from pytest_svctunnel.runs import Run
from pytest_svctunnel.waiting import Deadline

from .kubelab.cgroups import NodeCgroup, parent_dirs
from .kubelab.cluster import build, reap_crashed_clusters
from .kubelab.node import Node, NodeError
from .kubelab.topology import ClusterNetwork

pytestmark = pytest.mark.root

ROOT = Path(__file__).parent.parent

CRASHING_NODE = """
import sys
import time
from pathlib import Path

from pytest_svctunnel.runs import Run
from pytest_svctunnel.waiting import Deadline
from tests.kubelab.node import PAUSE_IMAGE, Node
from tests.kubelab.topology import ClusterNetwork

run = Run.new()
network = ClusterNetwork(run)
network.up()
node = Node(network.plan.nodes[0], None, Path(sys.argv[1]), [Path(sys.argv[2])])
node.start_runtime(Deadline.after(120))
node.ctr("run", "--detach", "--cgroup", f"{node.cgroup.path}/crash", PAUSE_IMAGE, "svt-crash")
print(run.id, flush=True)
time.sleep(600)
"""


def _first_line(proc: subprocess.Popen[str], seconds: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    return proc.stdout.readline().strip() if ready else ""


def _commands(pids: set[int]) -> list[str]:
    found = []
    for pid in pids:
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            continue
    return found


def test_a_crashed_runs_node_is_reaped_by_its_run_id(tmp_path: Path) -> None:
    pause = build("build-pause-image")
    parents = {path: path.exists() for path in parent_dirs()}
    work = tmp_path / "node"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_NODE, str(work), str(pause)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        run_id = _first_line(proc, 120)
        assert run_id, f"the node did not start: {proc.stderr.read() if proc.poll() is not None else 'no answer'}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the crash: no cleanup of any kind runs
        proc.wait(30)
    cgroup = NodeCgroup(names.netns_name(run_id, "node"))
    survivors = _commands(cgroup.pids())
    assert any(c.startswith("containerd --config") for c in survivors), survivors
    assert any("containerd-shim" in c for c in survivors) and "/pause" in survivors, survivors
    started = time.monotonic()
    reaped = reap_crashed_clusters()
    print(f"reaped in {time.monotonic() - started:.2f} s: {reaped}")
    assert any(path.endswith(f"/svt-{run_id}-node") for path in reaped), reaped
    assert cgroup.pids() == set() and [d for d in cgroup.dirs() if d.exists()] == []
    assert {path: path.exists() for path in parents} == parents, "a parent cgroup made for the node is left"
    assert netns.listing(names.netns_prefix(run_id)) == []
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(work) in line] == []
    assert not Run.existing(run_id).dir.exists()


def test_a_machine_that_cannot_run_containers_is_told_what_is_missing(tmp_path: Path) -> None:
    """The precondition check at a node's start (one 'ctr run' of the pause image): a containerd that
    finds no runc fails the start with what went wrong and what the node needs, and leaves nothing."""
    tools = tmp_path / "bin"  # everything containerd needs on its PATH but runc
    tools.mkdir()
    for tool in ("sh", "nsenter", "containerd", "containerd-shim-runc-v2"):
        found = shutil.which(tool, path=f"{os.environ['PATH']}:/usr/sbin:/sbin")
        assert found is not None, f"{tool} is missing; run 'bash .ci/install'"
        (tools / tool).symlink_to(found)
    run = Run.new()
    network = ClusterNetwork(run)
    try:
        network.up()
        node = Node(network.plan.nodes[0], None, tmp_path / "node", [build("build-pause-image")], str(tools))
        with pytest.raises(NodeError) as caught:
            try:
                node.start_runtime(Deadline.after(60))
            finally:
                node.stop()
        message = str(caught.value)
        assert "this machine cannot run containers: 'ctr run' of the pause image failed" in message, message
        assert "runc" in message and "bash .ci/install" in message and "overlayfs (present" in message, message
        assert node.cgroup.pids() == set() and [d for d in node.cgroup.dirs() if d.exists()] == []
    finally:
        network.down(Deadline.after(30))
        run.remove()
