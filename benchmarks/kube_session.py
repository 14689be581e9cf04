"""Setup, teardown and throughput of Kubernetes sessions on the test cluster (run as root).

    python benchmarks/kube_session.py [ROUNDS] [SECONDS]        # default: 5 rounds, 5 s of iperf3

Starts the test cluster of ``tests/kubelab`` (real etcd, kube-apiserver, scheduler, controller manager, two
kubelets on containerd and kube-proxy), then for each way in: a LoadBalancer Service in the load balancer's
routed mode (MetalLB's way), one in its proxy mode (cloud-provider-kind's way: a userspace UDP proxy per
Service, here a Python one), and a NodePort Service:

- runs the example suite as a separate pytest process ROUNDS times with the plugin's defaults and prints each
  round's own summary lines (setup by phase, teardown) and the whole pytest run's wall time, then the median
  and range (the first round is a warm-up: printed, not counted);
- builds one session in this process and measures iperf3 TCP throughput over the tunnel for SECONDS, from
  this host into the agent's pod and back.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iperf import tcp_gbits  # noqa: E402  (benchmarks/, the script's own directory)

from pytest_svctunnel.backends.kubernetes.backend import KubernetesBackend  # noqa: E402
from pytest_svctunnel.config import resolve  # noqa: E402
from pytest_svctunnel.names import new_run_id  # noqa: E402
from pytest_svctunnel.networks import session_plan  # noqa: E402
from pytest_svctunnel.session import TunnelSession  # noqa: E402
from pytest_svctunnel.waiting import Deadline  # noqa: E402
from tests.kubelab.cluster import TestCluster, running_cluster  # noqa: E402  (the test cluster lives with the tests)

EXAMPLE = ROOT / "examples" / "test_multinet.py"
READY = re.compile(r"^svctunnel: tunnel ready in (?P<setup>[0-9.]+) s \((?P<phases>[^)]*)\)", re.MULTILINE)
REMOVED = re.compile(r"tunnel removed in (?P<teardown>[0-9.]+) s")
WAYS = (("LoadBalancer", "routed"), ("LoadBalancer", "proxy"), ("NodePort", "routed"))


@dataclass(frozen=True)
class Round:
    setup_s: float
    phases: str
    teardown_s: float
    wall_s: float


def one_round(suite: Path, kubeconfig: Path, service_type: str) -> Round:
    env = {**os.environ, "SVCTUNNEL_KUBECONFIG": str(kubeconfig), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-q"]
    command += [str(suite), "--svctunnel-service-type", service_type]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - started
    ready, removed = READY.search(done.stdout), REMOVED.search(done.stdout)
    if done.returncode != 0 or ready is None or removed is None:
        raise SystemExit(f"the example suite failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return Round(float(ready["setup"]), ready["phases"], float(removed["teardown"]), wall)


def summary(name: str, values: list[float]) -> str:
    return f"{name} median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"


def throughput(cluster: TestCluster, service_type: str, seconds: int) -> tuple[float, ...]:
    """iperf3 TCP over one session's tunnel, in Gbit/s: into the agent's pod, and out of it."""
    config = resolve(
        {"backend": "kubernetes", "kubeconfig": str(cluster.kubeconfig), "service_type": service_type}, {}, {}
    )
    run_id = new_run_id()
    session = TunnelSession(config, session_plan(config, run_id), run_id)
    tunnel = session.start()
    try:
        backend = session.backend
        assert isinstance(backend, KubernetesBackend) and tunnel.remote_ipv4 is not None
        (pod,) = [p for p in backend.pods(Deadline.after(30)) if p.metadata.deletion_timestamp is None]
        (node,) = [n for n in cluster.nodes if n.spec.name == pod.spec.node_name]
        pid = node.pod_pid(pod.metadata.namespace, pod.metadata.name)
        target, enter = str(tunnel.remote_ipv4.ip), ["nsenter", "-t", str(pid), "-n"]
        return tuple(tcp_gbits(enter, target, target, seconds, reverse) for reverse in (False, True))
    finally:
        session.stop(failed=False)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory(prefix="svctunnel-bench-") as tmp:
        suite = Path(tmp) / "test_multinet.py"
        suite.write_text(EXAMPLE.read_text())
        with running_cluster(Path(tmp) / "cluster") as cluster:
            for service_type, mode in WAYS:
                name = f"{service_type} ({mode})" if service_type == "LoadBalancer" else service_type
                results = []
                with cluster.balancer.use(mode):
                    for index in range(rounds + 1):
                        result = one_round(suite, cluster.kubeconfig, service_type)
                        label = "warm-up" if index == 0 else f"round {index}"
                        print(
                            f"{name} {label}: setup {result.setup_s:.2f} s ({result.phases});"
                            f" teardown {result.teardown_s:.2f} s; pytest ran {result.wall_s:.2f} s",
                            flush=True,
                        )
                        if index:
                            results.append(result)
                    into, out = throughput(cluster, service_type, seconds)
                print(
                    f"{name}: {summary('setup', [r.setup_s for r in results])};"
                    f" {summary('teardown', [r.teardown_s for r in results])};"
                    f" {summary('pytest', [r.wall_s for r in results])};"
                    f" iperf3 TCP over the tunnel {into * 1000:.0f} Mbit/s into the pod, {out * 1000:.0f} Mbit/s out",
                    flush=True,
                )


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: the test cluster needs network namespaces")
    main()
