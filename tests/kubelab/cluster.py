"""A whole test cluster, started and stopped as one: the lab network, the control plane, two real nodes with
kube-proxy each, and the load-balancer controller; plus the checks that it left nothing on the host.

``running_cluster(work_dir)`` is a context manager; it first reaps what an earlier run that crashed left (its
nodes' processes and cgroups by the run id in their names, then its namespaces), and after the cluster is
stopped it checks the host: no cgroup, process, mount or directory of the nodes is left, and the kernel
settings the kubelet cares about are what they were.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_svctunnel import names
from pytest_svctunnel.errors import LabError
from pytest_svctunnel.hostobjects import remove_run_objects
from pytest_svctunnel.runs import Run
from pytest_svctunnel.waiting import Deadline

from . import cgroups
from .controlplane import ControlPlane
from .loadbalancer import LoadBalancerController
from .node import KERNEL_SETTINGS, Node, NodeSpec
from .topology import ClusterNetwork

log = logging.getLogger(__name__)

ROOT = Path(__file__).parent.parent.parent
START_TIMEOUT_S = 240.0
# what containerd and the kubelet would make on the host, were they not kept in their mount namespace
HOST_PATHS = (
    "/run/containerd",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/opt/containerd",
)
HOST_SETTINGS = (*KERNEL_SETTINGS, "net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")


class ClusterError(LabError):
    """The test cluster could not start, or left something behind."""


@dataclass
class TestCluster:
    """A running cluster: its admin kubeconfig and API client, network, control plane and nodes."""

    __test__ = False
    kubeconfig: Path
    api: Any
    network: ClusterNetwork
    plane: ControlPlane
    nodes: list[Node]
    balancer: LoadBalancerController
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def node_names(self) -> list[str]:
        return [node.spec.name for node in self.nodes]

    @property
    def node_name(self) -> str:
        """The first node (the one node mode pins its pod to in the tests)."""
        return self.nodes[0].spec.name


def build(script: str) -> Path:
    """Run one of the project's build scripts (cached: it builds only what is missing); its last line is the
    path of what it built."""
    done = subprocess.run(["bash", str(ROOT / ".ci" / script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ClusterError(f".ci/{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def running_cluster(work_dir: Path) -> Iterator[TestCluster]:
    reap_crashed_clusters()
    before = host_state()
    with ExitStack() as stack:
        timings: dict[str, float] = {}
        started = time.monotonic()
        run = Run.new()
        stack.callback(run.remove)
        network = ClusterNetwork(run)
        stack.callback(network.down, Deadline.after(60))
        network.up()
        bin_dir = build("build-kube")
        images = [build("build-pause-image"), build("build-agent-image")]
        specs = network.plan.nodes
        plane = ControlPlane(bin_dir, work_dir / "control-plane", [spec.name for spec in specs])
        stack.callback(plane.stop)
        plane.start(timeout=120)
        timings["control plane"] = time.monotonic() - started
        nodes = [Node(spec, plane, work_dir / spec.name, images) for spec in specs]
        for node in nodes:
            stack.callback(node.stop)
        _start_nodes(nodes, Deadline.after(START_TIMEOUT_S))
        timings["nodes Ready"] = time.monotonic() - started
        for spec in specs:
            plane.start_kube_proxy(spec.netns, spec.name, str(network.plan.cluster_cidr), timeout=60)
        api = plane.api_client()
        stack.callback(api.close)
        balancer = LoadBalancerController(
            api,
            {"routed": network.plan.lb_pool, "proxy": network.plan.lb_proxy_pool},
            network.plan.lab.ns("wan"),
            {spec.name: spec.address for spec in specs},
            run.id,
            work_dir,
        )
        balancer.start()
        stack.callback(balancer.stop, 10)
        timings["cluster"] = time.monotonic() - started
        for node in nodes:
            for phase, seconds in node.timings.items():
                timings[f"{node.spec.name} {phase}"] = seconds
        log.info("test cluster up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        yield TestCluster(plane.kubeconfig, api, network, plane, nodes, balancer, timings)
    check_host(before, [node.spec for node in nodes], work_dir)


def _start_nodes(nodes: list[Node], deadline: Deadline) -> None:
    """Start the nodes side by side (their image imports take most of the time); the first error wins."""
    with ThreadPoolExecutor(len(nodes), thread_name_prefix="node-start") as pool:
        futures = [pool.submit(node.start, deadline) for node in nodes]
        errors = [exc for future in futures if (exc := future.exception()) is not None]
    if errors:
        raise errors[0]


def reap_crashed_clusters(timeout: float = 60.0) -> list[str]:
    """Kill and remove what test clusters of runs that are gone left: their nodes' cgroups (every process in
    them: containerd, shims, containers, kubelets), then the runs' namespaces and state."""
    deadline = Deadline.after(timeout)
    reaped = cgroups.reap_crashed(_alive, deadline)
    for run_id in sorted({names.run_of_netns(Path(path).name) or "" for path in reaped} - {""}):
        run = Run.existing(run_id)
        remove_run_objects(run, deadline)
        run.remove()
        log.info("reaped the test cluster of crashed run %s", run_id)
    return reaped


def _alive(run_id: str) -> bool:
    run = Run.existing(run_id)
    return run.dir.is_dir() and not run.liveness().gone


def host_state() -> dict[str, str]:
    """What the nodes must not change: the kernel settings, which of the host paths exist, and which of the
    cgroups a node's cgroup sits in."""
    state = {f"sysctl {key}": Path(f"/proc/sys/{key}").read_text().strip() for key in HOST_SETTINGS}
    state.update({f"path {path}": str(Path(path).exists()) for path in HOST_PATHS})
    state.update({f"cgroup {path}": str(path.exists()) for path in cgroups.parent_dirs()})
    return state


def check_host(before: dict[str, str], specs: list[NodeSpec], work_dir: Path) -> None:
    """Raise ClusterError naming whatever the cluster left: changed settings, new host paths, cgroups or
    processes of its nodes, mounts under its work directory."""
    after = host_state()
    problems = [f"{key}: {before[key]} before, {after[key]} after" for key in before if before[key] != after[key]]
    for spec in specs:
        cgroup = cgroups.NodeCgroup(spec.name)
        problems += [f"cgroup {d} is left" for d in cgroup.dirs() if d.exists()]
        if pids := cgroup.pids():
            problems.append(f"processes {sorted(pids)} of node {spec.name} still run")
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(work_dir) in line]
    problems += [f"mount left: {line}" for line in mounts]
    if problems:
        raise ClusterError("the test cluster left something on the host:\n" + "\n".join(problems))
