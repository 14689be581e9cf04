"""Try the lab control plane by hand (not a pytest test); needs root, nftables and the built binaries.

    python -m tests.kubelab.try_controlplane [BIN_DIR]

Starts the control plane in a temporary directory, a Node and its kube-proxy in namespace svt-cptry-node, a
Deployment (whose Pod stays Pending: there is no kubelet) and a UDP NodePort Service, prints what kube-proxy
programmed and how long each phase took, then removes everything. The work directory (logs) is kept on failure.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from kubernetes import client

from pytest_svctunnel import netns
from pytest_svctunnel.waiting import Deadline, wait_for

from .controlplane import ControlPlane

T = TypeVar("T")

DEFAULT_BIN_DIR = Path.home() / ".cache/svctunnel/kube/v1.37.2-etcd-v3.7.0/bin"
NETNS = "svt-cptry-node"
NODE = "svt-cptry-node"
NODE_IP = "10.250.0.2"
CLUSTER_CIDR = "10.244.0.0/16"
POD_CIDR = "10.244.1.0/24"
NAMESPACE = "svt-cptry"
APP = "cptry"
IMAGE = "registry.k8s.io/pause:3.10"  # never pulled: no kubelet runs
UDP_PORT = 4789

timings: dict[str, float] = {}


@contextmanager
def timed(phase: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[phase] = time.monotonic() - started


def poll(check: Callable[[], T | None], phase: str, seconds: float, describe: Callable[[], str]) -> T:
    return wait_for(check, phase=phase, deadline=Deadline.after(seconds), describe=describe, interval=0.25)


def make_node_netns() -> None:
    netns.create(NETNS)
    netns.run(NETNS, ["ip", "link", "set", "lo", "up"])
    # the node's address on loopback: local to the namespace, as on a real node, without needing another link
    netns.run(NETNS, ["ip", "address", "add", f"{NODE_IP}/32", "dev", "lo"])


def deploy(api: client.ApiClient) -> None:
    """A namespace and a one-replica Deployment; returns once its ReplicaSet and Pod exist."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    labels = {"app": APP}
    pod = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(containers=[client.V1Container(name="main", image=IMAGE)]),
    )
    spec = client.V1DeploymentSpec(replicas=1, selector=client.V1LabelSelector(match_labels=labels), template=pod)
    apps.create_namespaced_deployment(NAMESPACE, client.V1Deployment(metadata=client.V1ObjectMeta(name=APP), spec=spec))

    def replica_sets() -> list[str]:
        return [name(rs.metadata) for rs in apps.list_namespaced_replica_set(NAMESPACE).items]

    def pods() -> list[str]:
        items = core.list_namespaced_pod(NAMESPACE).items
        return [f"{name(p.metadata)} ({p.status.phase if p.status else '?'})" for p in items]

    print("replicasets:", poll(lambda: replica_sets() or None, "ReplicaSet", 60, lambda: "none"))
    print("pods:", poll(lambda: pods() or None, "Pod", 60, lambda: f"none; events: {events(core)}"))


def name(meta: client.V1ObjectMeta | None) -> str:
    return (meta.name if meta else None) or "?"


def events(core: client.CoreV1Api) -> str:
    return "; ".join(f"{e.reason}: {e.message}" for e in core.list_namespaced_event(NAMESPACE).items[-5:]) or "none"


def expose(api: client.ApiClient) -> tuple[str, int]:
    """A UDP NodePort Service for the Deployment; returns its ClusterIP and NodePort."""
    core = client.CoreV1Api(api)
    port = client.V1ServicePort(name="vxlan", protocol="UDP", port=UDP_PORT, target_port=UDP_PORT)
    spec = client.V1ServiceSpec(type="NodePort", selector={"app": APP}, ports=[port])
    service = client.V1Service(metadata=client.V1ObjectMeta(name=APP), spec=spec)
    created = core.create_namespaced_service(NAMESPACE, service).spec
    assert created is not None and created.cluster_ip and created.ports and created.ports[0].node_port, created
    return created.cluster_ip, created.ports[0].node_port


def ruleset() -> str:
    return netns.run(NETNS, ["nft", "list", "ruleset"])


def programmed(cluster_ip: str, node_port: int) -> str | None:
    """The ruleset, once it names the Service's ClusterIP and NodePort."""
    text = ruleset()
    return text if cluster_ip in text and f"udp . {node_port} " in text else None


def main(bin_dir: Path) -> int:
    work_dir = Path(tempfile.mkdtemp(prefix="svt-cptry-"))
    plane = ControlPlane(bin_dir, work_dir)
    ok = False
    try:
        with timed("node netns"):
            make_node_netns()
        with timed("control plane"):
            plane.start(timeout=240)
        with timed("node object"):
            plane.create_node(NODE, NODE_IP, POD_CIDR)
        with timed("kube-proxy"):
            plane.start_kube_proxy(NETNS, NODE, CLUSTER_CIDR, timeout=90)
        with plane.api_client() as api:
            with timed("deployment to pod"):
                deploy(api)
            with timed("service to nftables"):
                cluster_ip, node_port = expose(api)
                print(f"service {NAMESPACE}/{APP}: {cluster_ip} udp {UDP_PORT}, nodePort {node_port}")
                text = poll(lambda: programmed(cluster_ip, node_port), "kube-proxy programs the Service", 60, ruleset)
        print(f"---- nft list ruleset in {NETNS} ----\n{text}---- end of ruleset ----")
        ok = True
    finally:
        with timed("stop"):
            try:
                plane.stop()
            finally:
                netns.remove(NETNS)
        print("control plane phases:", ", ".join(f"{k} {v:.2f} s" for k, v in plane.timings.items()))
        print("script phases:", ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        leftovers = subprocess.run(["pgrep", "-af", str(work_dir)], capture_output=True, text=True).stdout.strip()
        print("processes left:", leftovers or "none", "; netns left:", netns.exists(NETNS))
        if ok:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print(f"logs kept in {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_BIN_DIR))
