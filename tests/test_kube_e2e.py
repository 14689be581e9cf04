"""The kubernetes backend end to end, on a real cluster.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and the kubelet
are the real programs, built from the Go module proxy by ``.ci/build-kube`` at a pinned
release; the two nodes run containerd and runc, and the agent runs from the image built
from the project's Dockerfile (``.ci/build-agent-image``). Each node sits in a lab node
namespace behind the WAN router, so the tunnel crosses the rules kube-proxy itself programs.
The test harness plays only a cloud's role: the load-balancer controller, which routes a
Service's address to the nodes that pass its health check (``tests/kubelab``).

The example suite runs through pytester as a separate pytest process with the plugin's
defaults (the kubernetes backend), in LoadBalancer and NodePort mode; another inner suite
deletes the agent pod and waits for the tunnel to heal. After each inner session, nothing
of its run may remain: no object with its label, no namespace, link or process.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from pytest_svctunnel import device, keys, names, netns
from pytest_svctunnel.backends.kubernetes.backend import KubernetesBackend
from pytest_svctunnel.backends.kubernetes.options import ClusterTarget, PodEndOptions
from pytest_svctunnel.errors import KubeError
from pytest_svctunnel.names import RUN_LABEL
from pytest_svctunnel.runs import Run
from pytest_svctunnel.waiting import Deadline, Stopwatch

from .kubelab.cluster import TestCluster, running_cluster
from .kubelab.lbproxy import ServiceProxy

pytestmark = pytest.mark.root

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "test_multinet.py"
INNER_TIMEOUT_S = 240.0
_HEADER = re.compile(r"^svctunnel: run (?P<run>[0-9a-f]{6});", re.MULTILINE)
_READY = re.compile(r"^svctunnel: tunnel ready in .*$", re.MULTILINE)

# what the inner suites that watch their agent pod share: its client, and one ping over a tunnel device
POD_SUITE_HEAD = """
import os
import subprocess
import time

from kubernetes import client, config

from pytest_svctunnel import names


def ping(address, dev):
    done = subprocess.run(["ping", "-c", "1", "-W", "1", "-I", dev, str(address)], capture_output=True)
    return done.returncode == 0

"""

RESTART_SUITE = (
    POD_SUITE_HEAD
    + """
def test_agent_pod_restart_heals_the_tunnel(svctunnel):
    core = client.CoreV1Api(config.new_client_from_config(config_file=os.environ["SVCTUNNEL_KUBECONFIG"]))
    selector = names.label_selector(svctunnel.run_id)
    (old,) = core.list_pod_for_all_namespaces(label_selector=selector).items
    assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
    core.delete_namespaced_pod(old.metadata.name, old.metadata.namespace)
    started = time.monotonic()
    while time.monotonic() < started + 120:
        pods = core.list_pod_for_all_namespaces(label_selector=selector).items
        replaced = [p for p in pods if p.metadata.uid != old.metadata.uid and p.status.pod_ip]
        if replaced and all(p.metadata.uid != old.metadata.uid for p in pods):
            if ping(svctunnel.remote_ipv4.ip, svctunnel.dev) and ping(svctunnel.remote_ipv6.ip, svctunnel.dev):
                print(f"healed {time.monotonic() - started:.2f} s after the pod was deleted;"
                      f" new pod {replaced[0].metadata.name} at {replaced[0].status.pod_ip}")
                return
        time.sleep(0.2)
    raise AssertionError("the tunnel did not heal within 120 s of the pod's deletion")
"""
)


NODE_SUITE = """
import os
import subprocess


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout


def test_networks_land_on_the_nodes_bridge(svctunnel):
    node, bridge = os.environ["E2E_NODE_NETNS"], os.environ["E2E_BRIDGE"]
    for address in (svctunnel.remote_ipv4.ip, svctunnel.remote_ipv6.ip):
        assert subprocess.run(["ping", "-c", "1", "-W", "2", "-I", svctunnel.dev, str(address)]).returncode == 0
    ports = run("ip", "-n", node, "-d", "-o", "link", "show", "master", bridge)
    assert f"vxlan id {svctunnel.vni} " in ports, ports
    addresses = run("ip", "-n", node, "-o", "addr", "show", "dev", bridge)
    assert str(svctunnel.remote_ipv4.ip) in addresses and str(svctunnel.remote_ipv6.ip) in addresses, addresses
"""

FAILING_SUITE = """
def test_fails_with_the_tunnel_up(svctunnel):
    assert svctunnel.peer is None, "fails on purpose: the report must carry the pod end's diagnostics"
"""

HOLD_SUITE = """
import time
from pathlib import Path


def test_hold(svctunnel):
    Path("tunnel-up").write_text(svctunnel.run_id)
    time.sleep(300)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def run_inner(pytester: pytest.Pytester, cluster: TestCluster, *args: str) -> tuple[pytest.RunResult, str]:
    """An inner pytest session with the plugin's defaults against the cluster; returns its run id."""
    os.environ["SVCTUNNEL_KUBECONFIG"] = str(cluster.kubeconfig)
    try:
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rA", "-s",
            "--svctunnel-keepalive", "1", *args,
            timeout=INNER_TIMEOUT_S,
        )  # fmt: skip
    finally:
        del os.environ["SVCTUNNEL_KUBECONFIG"]
    output = result.stdout.str()
    match = _HEADER.search(output)
    assert match is not None, output
    return result, match["run"]


def labelled(api: Any, run_id: str, staying: bool = False) -> list[str]:
    """Every object of the run's label that the API server still has; with ``staying``, those of
    them that are not on their way out (no deletion timestamp, and not inside a namespace that has
    one)."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    selector = f"{RUN_LABEL}={run_id}"
    namespaces = core.list_namespace(label_selector=selector).items
    leaving = {n.metadata.name for n in namespaces if n.metadata.deletion_timestamp is not None}
    found = [f"namespace {n.metadata.name}" for n in namespaces if not (staying and n.metadata.name in leaving)]
    for kind, lister in (
        ("deployment", apps.list_deployment_for_all_namespaces),
        ("replicaset", apps.list_replica_set_for_all_namespaces),
        ("pod", core.list_pod_for_all_namespaces),
        ("service", core.list_service_for_all_namespaces),
        ("secret", core.list_secret_for_all_namespaces),
    ):
        for o in lister(label_selector=selector).items:
            owned = [r.kind for r in o.metadata.owner_references or ()]
            going = o.metadata.deletion_timestamp is not None or o.metadata.namespace in leaving
            if staying and (going or (kind in ("replicaset", "pod") and owned)):  # their owners go first
                continue
            found.append(f"{kind} {o.metadata.namespace}/{o.metadata.name}")
    return found


def assert_gone(api: Any, run_id: str, seconds: float = 60.0, output: str = "") -> None:
    """Within ``seconds`` the API server has no object of the run any more."""
    deadline = time.monotonic() + seconds
    while (left := labelled(api, run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"still there after {seconds:g} s: {left}\n{output}"


def assert_run_left_nothing(cluster: TestCluster, run_id: str, output: str, seconds: float = 60.0) -> None:
    """Right after the session every object of the run is on its way out; then, within ``seconds``,
    gone: the API server's objects, the nodes' pod sandboxes, and this host's namespaces and links."""
    assert labelled(cluster.api, run_id, staying=True) == [], output
    assert netns.listing(names.netns_prefix(run_id)) == [], output
    assert device.links_with_prefix(None, names.link_prefix(run_id)) == [], output
    deadline = time.monotonic() + seconds
    assert_gone(cluster.api, run_id, seconds, output)
    for node in cluster.nodes:
        while node.running_sandboxes(run_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node.running_sandboxes(run_id) == [], f"node {node.spec.name} still runs a pod of the run"
    # the container runs the image's bin/svctunnel (the lab runs 'python -m pytest_svctunnel')
    agents = subprocess.run(["pgrep", "-af", "bin/svctunnel agent"], capture_output=True, text=True).stdout
    assert agents == "", f"an agent process outlived its pod: {agents}"


def run_example(pytester: pytest.Pytester, cluster: TestCluster, *args: str) -> tuple[str, str, str]:
    """The example suite in an inner session, all five tests passed: its ready line, its output, its run id."""
    pytester.makepyfile(test_multinet=EXAMPLE.read_text())
    result, run_id = run_inner(pytester, cluster, *args)
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output
    result.assert_outcomes(passed=5)
    ready = _READY.search(output)
    assert ready is not None, output
    return ready[0], output, run_id


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_example_suite_through_kube_proxy(pytester: pytest.Pytester, cluster: TestCluster, service_type: str) -> None:
    ready, output, run_id = run_example(pytester, cluster, "--svctunnel-service-type", service_type)
    print(f"{service_type}: {ready}")
    for phase in ("objects created", "pod placed", "handshake", "first ping"):
        assert phase in ready
    assert_run_left_nothing(cluster, run_id, output)


def test_agent_pod_restart_heals(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    pytester.makepyfile(test_restart=RESTART_SUITE)
    result, run_id = run_inner(pytester, cluster)
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output
    result.stdout.fnmatch_lines(["*healed * s after the pod was deleted*"])
    assert_run_left_nothing(cluster, run_id, output)


def test_missing_kubeconfig_names_the_remedy(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_multinet=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--svctunnel-kubeconfig", str(tmp_path / "missing"), "-x",
        timeout=INNER_TIMEOUT_S,
    )  # fmt: skip
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    assert "--svctunnel-kubeconfig" in output and "--svctunnel-backend lab" in output, output
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_node_mode_lands_the_networks_on_the_nodes_bridge(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    node_ns = cluster.nodes[0].spec.netns
    bridge = "svtbr-e2e"
    subprocess.run(["ip", "-n", node_ns, "link", "add", bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "-n", node_ns, "link", "set", bridge, "up"], check=True)
        pytester.makepyfile(test_node=NODE_SUITE)
        os.environ.update(E2E_NODE_NETNS=node_ns, E2E_BRIDGE=bridge)
        try:
            result, run_id = run_inner(
                pytester, cluster, "--svctunnel-node", cluster.node_name, "--svctunnel-bridge", bridge
            )
        finally:
            del os.environ["E2E_NODE_NETNS"], os.environ["E2E_BRIDGE"]
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.OK, output
        assert_run_left_nothing(cluster, run_id, output)
        left = subprocess.run(["ip", "-n", node_ns, "-o", "link", "show", "master", bridge], capture_output=True)
        assert left.stdout == b"", "a tunnel device outlived the session on the node"
        addresses = subprocess.run(["ip", "-n", node_ns, "-o", "addr", "show", "dev", bridge], capture_output=True)
        assert b" inet" not in addresses.stdout.replace(b"inet6 fe80", b""), addresses.stdout
    finally:
        subprocess.run(["ip", "-n", node_ns, "link", "del", bridge], check=False)


FAIL_EARLY = {
    # the session's args -> what its error must say (the cause, and the remedy)
    "unknown-image": (("--svctunnel-image", "registry.invalid/none:1"), ("its image cannot be pulled", "kind load")),
    "no-such-node": (("--svctunnel-node", "no-such-node"), ("cannot be scheduled", "--svctunnel-node")),
}


@pytest.mark.parametrize("case", list(FAIL_EARLY))
def test_a_pod_that_cannot_run_fails_early_and_leaves_nothing(
    pytester: pytest.Pytester, cluster: TestCluster, case: str
) -> None:
    args, phrases = FAIL_EARLY[case]
    pytester.makepyfile(test_multinet=EXAMPLE.read_text())
    result, run_id = run_inner(pytester, cluster, *args, "-x")
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    for phrase in phrases:
        assert phrase in output, output
    for section in ("svctunnel diagnostics", "--- pod end log", "--- pod end pods", "--- pod end Service"):
        assert section in output, output  # the report section of a failed setup
    assert "--- recent events" in output and "ScalingReplicaSet" in output, output
    assert "not done after" not in output, "a pod that cannot run must fail on its state, not at the deadline"
    assert_run_left_nothing(cluster, run_id, output)


def test_given_namespace_keeps_only_what_it_had(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    core = client.CoreV1Api(cluster.api)
    namespace = f"svt-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        pytester.makepyfile(test_multinet=EXAMPLE.read_text())
        result, run_id = run_inner(pytester, cluster, "--svctunnel-namespace", namespace)
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.OK, output
        assert core.read_namespace(namespace).status.phase == "Active"
        assert_run_left_nothing(cluster, run_id, output)
    finally:
        core.delete_namespace(namespace)


class HeldSession:
    """An inner session whose test holds the tunnel up, as a process group of its own."""

    def __init__(self, pytester: pytest.Pytester, cluster: TestCluster, *args: str) -> None:
        pytester.makepyfile(test_hold=HOLD_SUITE)
        self.path = pytester.path
        self.out = pytester.path / "held.out"
        env = {**os.environ, "SVCTUNNEL_KUBECONFIG": str(cluster.kubeconfig)}
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-s", *args],
                cwd=pytester.path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_for(self, what: str, check: Any, seconds: float = 90.0) -> None:
        end = time.monotonic() + seconds
        while not check():
            assert self.proc.poll() is None, f"the inner session ended before {what}:\n{self.out.read_text()}"
            assert time.monotonic() < end, f"not within {seconds:g} s: {what}\n{self.out.read_text()}"
            time.sleep(0.05)

    @property
    def run_id(self) -> str:
        self.wait_for("its report header", lambda: _HEADER.search(self.out.read_text()))
        match = _HEADER.search(self.out.read_text())
        assert match is not None
        return match["run"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def held(pytester: pytest.Pytester, cluster: TestCluster) -> Iterator[HeldSession]:
    session = HeldSession(pytester, cluster)
    yield session
    session.kill()


def test_sigterm_while_objects_exist_leaves_nothing(held: HeldSession, cluster: TestCluster) -> None:
    """SIGTERM once the session's namespace exists, before the tunnel is up: all of it goes."""
    core = client.CoreV1Api(cluster.api)
    run_id = held.run_id
    held.wait_for("the namespace", lambda: core.list_namespace(label_selector=f"{RUN_LABEL}={run_id}").items)
    held.proc.send_signal(signal.SIGTERM)
    assert held.proc.wait(90) == pytest.ExitCode.INTERRUPTED, held.out.read_text()
    assert_run_left_nothing(cluster, run_id, held.out.read_text())


def test_sigkilled_session_is_reaped(held: HeldSession, cluster: TestCluster) -> None:
    """SIGKILL leaves the cluster objects and local devices; 'svctunnel reap' removes exactly those."""
    run_id = held.run_id
    held.wait_for("the tunnel", lambda: (held.path / "tunnel-up").exists())
    held.kill()
    assert labelled(cluster.api, run_id), "SIGKILL should have left the run's objects"
    assert device.links_with_prefix(None, names.link_prefix(run_id)), "SIGKILL should have left the run's devices"
    done = subprocess.run(
        [sys.executable, "-m", "pytest_svctunnel", "reap"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"reaped run {run_id}" in done.stdout and f"Kubernetes namespace svctunnel-{run_id}" in done.stdout, (
        done.stdout
    )
    assert_run_left_nothing(cluster, run_id, done.stdout)


def test_kept_session_stays_until_reaped(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    """--svctunnel-keep always leaves the pod end (and this end) for inspection, says how to remove
    it, and 'svctunnel reap --include-detached' removes it once the session has ended."""
    pytester.makepyfile(test_multinet=EXAMPLE.read_text())
    result, run_id = run_inner(pytester, cluster, "--svctunnel-keep", "always", "-k", "default_network_ipv4")
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output
    assert f"pod end kept: namespace svctunnel-{run_id}" in output, output
    assert f"kubectl delete namespace svctunnel-{run_id}" in output, output
    assert labelled(cluster.api, run_id), "the kept objects are gone"
    plain = subprocess.run([sys.executable, "-m", "pytest_svctunnel", "reap"], capture_output=True, text=True)
    assert f"left alone: run {run_id}" in plain.stdout, plain.stdout
    done = subprocess.run(
        [sys.executable, "-m", "pytest_svctunnel", "reap", "--include-detached"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"reaped run {run_id}" in done.stdout, done.stdout + done.stderr
    assert_run_left_nothing(cluster, run_id, done.stdout)


def test_a_failing_test_reports_the_pod_end(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    """The report section of a failed test has the agent's log (through the API server's pods/log),
    the pod's and the Service's status and recent events."""
    pytester.makepyfile(test_fails=FAILING_SUITE)
    result, run_id = run_inner(pytester, cluster)
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    log = output.split("--- pod end log", 1)[-1].split("--- pod end pods", 1)[0]
    assert "svctunnel.agent: up: tunnel up with" in log, output
    assert re.search(r"pod svctunnel-\w+-\w+-\w+: Running on svt-\w+-node2? ip 198\.18\.", output), output
    assert f"LoadBalancer svctunnel-{run_id}/svctunnel-{run_id}: ports 5533/UDP" in output, output
    assert "--- recent events" in output and "ScalingReplicaSet" in output, output
    assert_run_left_nothing(cluster, run_id, output)


# how long a teardown against an API server that answers nothing may take past its deadline:
# one last request after the deadline (MIN_REQUEST_S) and the time to raise
TEARDOWN_SLACK_S = 5.0


@pytest.mark.parametrize("given_namespace", [False, True], ids=["own-namespace", "given-namespace"])
def test_teardown_against_a_paused_api_server_ends_by_its_deadline(cluster: TestCluster, given_namespace: bool) -> None:
    """Every request carries a timeout from the deadline: an API server that stops answering in the
    middle of a teardown (SIGSTOP: it keeps its connections but says nothing) makes the teardown
    end by its deadline with a KubeError that names the API server and what to do, not hang."""
    core = client.CoreV1Api(cluster.api)
    namespace = f"svt-e2e-{uuid.uuid4().hex[:6]}" if given_namespace else None
    if namespace is not None:
        core.create_namespace({"metadata": {"name": namespace}})
    run = Run.new()
    backend = KubernetesBackend(run, ClusterTarget(str(cluster.kubeconfig)), PodEndOptions(namespace=namespace))
    try:
        backend.deploy(keys.new_key(), Deadline.after(60), Stopwatch())
        outcome: list[BaseException | None] = []

        def teardown() -> None:
            try:
                backend.teardown(Deadline.after(3))
                outcome.append(None)
            except BaseException as exc:  # the thread hands whatever it got to the test
                outcome.append(exc)

        with cluster.plane.paused("kube-apiserver"):
            worker = threading.Thread(target=teardown, daemon=True)
            worker.start()
            worker.join(3 + TEARDOWN_SLACK_S)
            assert not worker.is_alive(), "the teardown still waits for an API server that does not answer"
        (error,) = outcome
        assert isinstance(error, KubeError), error
        assert "no answer from the API server" in str(error) and "svctunnel reap" in str(error), error
    finally:
        backend.teardown(Deadline.after(60))  # the API server answers again: now it all goes
        if namespace is not None:
            core.delete_namespace(namespace)
        run.remove()
    assert labelled(cluster.api, run.id, staying=True) == []
    assert_gone(cluster.api, run.id)


def test_the_nodes_are_real_kubelets_on_containerd(cluster: TestCluster) -> None:
    """Both nodes registered themselves (the real kubelet of the pinned release on containerd), are Ready
    and schedulable; the start-up times are printed for the record."""
    core = client.CoreV1Api(cluster.api)
    release = cluster.plane.bin_dir.parent.name.split("-")[0]  # the cache directory is named after it
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert sorted(nodes) == sorted(cluster.node_names)
    for node in nodes.values():
        info = node.status.node_info
        assert info.kubelet_version == release, info
        assert info.container_runtime_version.startswith("containerd://"), info
        ready = {c.type: c.status for c in node.status.conditions}
        assert ready["Ready"] == "True" and not node.spec.unschedulable and not node.spec.taints, node.status
    print(", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in cluster.timings.items()))


MOVE_SUITE = (
    POD_SUITE_HEAD
    + """
def test_the_tunnel_follows_its_pod_to_the_other_node(svctunnel):
    core = client.CoreV1Api(config.new_client_from_config(config_file=os.environ["SVCTUNNEL_KUBECONFIG"]))
    selector = names.label_selector(svctunnel.run_id)
    (old,) = core.list_pod_for_all_namespaces(label_selector=selector).items
    source = old.spec.node_name
    assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
    core.patch_node(source, {"spec": {"unschedulable": True}})
    core.delete_namespaced_pod(old.metadata.name, old.metadata.namespace)
    started = time.monotonic()
    while time.monotonic() < started + 120:
        pods = core.list_pod_for_all_namespaces(label_selector=selector).items
        moved = [p for p in pods if p.metadata.uid != old.metadata.uid and p.status.pod_ip]
        if moved and all(p.metadata.uid != old.metadata.uid for p in pods):
            target = moved[0].spec.node_name
            assert target != source, f"the new pod runs on the cordoned node {source}"
            if ping(svctunnel.remote_ipv4.ip, svctunnel.dev) and ping(svctunnel.remote_ipv6.ip, svctunnel.dev):
                print(f"moved from {source} to {target}; healed {time.monotonic() - started:.2f} s after"
                      " the pod was deleted")
                return
        time.sleep(0.2)
    raise AssertionError("the tunnel did not follow its pod within 120 s of the pod's deletion")
"""
)


def test_the_tunnel_follows_its_pod_to_the_other_node(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    """externalTrafficPolicy Local as it matters on real clusters: the cloud's load balancer sends the
    Service's traffic only to the node with the pod. Cordon that node and delete the pod: the Deployment's
    new pod lands on the other node, the health checks move the route, and the tunnel heals."""
    pytester.makepyfile(test_move=MOVE_SUITE)
    try:
        result, run_id = run_inner(pytester, cluster)
    finally:
        core = client.CoreV1Api(cluster.api)
        for name in cluster.node_names:
            core.patch_node(name, {"spec": {"unschedulable": False}})
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output
    moved = re.search(r"moved from (svt-\w+-node2?) to (svt-\w+-node2?); healed", output)
    assert moved is not None and moved[1] != moved[2], output
    assert_run_left_nothing(cluster, run_id, output)


def test_a_crashing_agent_fails_early_with_its_own_words(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    """An agent that exits at once (node mode with a bridge the node does not have) goes into the real
    kubelet's CrashLoopBackOff; the session fails on that state, with the agent's one-line error from its
    log (through the API server and the kubelet), and leaves nothing."""
    pytester.makepyfile(test_multinet=EXAMPLE.read_text())
    bridge = "svtbr-missing"
    result, run_id = run_inner(pytester, cluster, "--svctunnel-node", cluster.node_name, "--svctunnel-bridge", bridge)
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    assert "it keeps exiting (CrashLoopBackOff" in output and "last exit code 1" in output, output
    log = output.split("--- pod end log", 1)[-1].split("--- pod end pods", 1)[0]
    assert bridge in log and "Traceback" not in log, output
    assert "not done after" not in output, "a crashing agent must fail on its state, not at the deadline"
    assert_run_left_nothing(cluster, run_id, output)


# An inner session's conftest that breaks the pod end the way a cluster's policy or a mistake would:
# the rendered Deployment's one container is changed before it is created.
BREAKING_CONFTEST = """
from pytest_svctunnel.backends.kubernetes import manifests

render = manifests.pod_end


def broken(end):
    rendered = render(end)
    (container,) = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    {change}
    return rendered


manifests.pod_end = broken
"""

BROKEN_POD_ENDS = {
    # the change to the agent's container -> what the session's error says, what the agent's log says
    "without-net-admin": (
        'container["securityContext"]["capabilities"]["add"] = ["NET_RAW"]',
        ("it keeps exiting (CrashLoopBackOff", "last exit code 1"),
        ("needs CAP_NET_ADMIN", "securityContext.capabilities.add [NET_ADMIN, NET_RAW]"),
    ),
    "image-never-pulled": (
        'container["image"], container["imagePullPolicy"] = "svctunnel-agent:not-loaded", "Never"',
        ("its image is not on the node and may not be pulled (ErrImageNeverPull", "kind load"),
        (),
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_POD_ENDS))
def test_a_broken_pod_end_fails_the_way_the_kubelet_reports_it(
    pytester: pytest.Pytester, cluster: TestCluster, case: str
) -> None:
    """What runc and the kubelet enforce, the session reports: an agent without NET_ADMIN (runc does not
    give it the capability) exits with our one-line error and its remedy, not a traceback, and the session
    fails on the real crash loop; an image that is not on the node and may not be pulled fails on
    ErrImageNeverPull. Both early, and leaving nothing."""
    change, error_says, log_says = BROKEN_POD_ENDS[case]
    pytester.makeconftest(BREAKING_CONFTEST.format(change=change))
    pytester.makepyfile(test_multinet=EXAMPLE.read_text())
    result, run_id = run_inner(pytester, cluster, "-x")
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    for phrase in error_says:
        assert phrase in output, output
    log = output.split("--- pod end log", 1)[-1].split("--- pod end pods", 1)[0]
    for phrase in log_says:
        assert phrase in log, output
    assert "Traceback" not in log, output
    assert "not done after" not in output, "a pod end that cannot run must fail on its state, not at the deadline"
    assert_run_left_nothing(cluster, run_id, output)


def test_injection_preconditions_are_asked_of_the_api_server(cluster: TestCluster, tmp_path: Path) -> None:
    """Before anything is injected, the real API server is asked: its version, the namespace's Pod
    Security level, and the user's permissions (SelfSubjectAccessReviews). An admin in a namespace
    without Pod Security labels may inject; a baseline namespace and a user without the
    permissions each get one line naming the fix; a namespace that does not exist is named."""
    from pytest_svctunnel.backends.kubernetes import client as kube
    from pytest_svctunnel.backends.kubernetes.preconditions import PSA_ENFORCE, check_injection

    from .kubelab import certs

    core = client.CoreV1Api(cluster.api)
    open_ns, baseline_ns = (f"svt-e2e-{uuid.uuid4().hex[:6]}" for _ in range(2))
    core.create_namespace({"metadata": {"name": open_ns}})
    core.create_namespace({"metadata": {"name": baseline_ns, "labels": {PSA_ENFORCE: "baseline"}}})
    unprivileged = tmp_path / "kube-proxy.kubeconfig"  # a real user without those permissions
    plane = cluster.plane
    plane.write_kubeconfig(unprivileged, plane.server, plane.pki.kube_proxy, certs.KUBE_PROXY_USER)
    admin, stranger = kube.connect(str(cluster.kubeconfig), None), kube.connect(str(unprivileged), None)
    try:
        check_injection(admin, open_ns, Deadline.after(30))
        with pytest.raises(KubeError) as baseline:
            check_injection(admin, baseline_ns, Deadline.after(30))
        assert f"enforces Pod Security level 'baseline' ({PSA_ENFORCE})" in str(baseline.value), baseline.value
        assert "may not" not in str(baseline.value), baseline.value
        with pytest.raises(KubeError) as denied:
            check_injection(stranger, open_ns, Deadline.after(30))
        message = str(denied.value)
        assert "may not get pods, list pods, patch pods, patch pods/ephemeralcontainers" in message, message
        assert f"in namespace {open_ns}" in message and "Pod Security" not in message, message
        with pytest.raises(KubeError) as missing:
            check_injection(admin, "svt-e2e-missing", Deadline.after(30))
        assert "namespace svt-e2e-missing does not exist" in str(missing.value), missing.value
    finally:
        admin.close()
        stranger.close()
        for namespace in (open_ns, baseline_ns):
            core.delete_namespace(namespace)


# -- networks into the user's own pods ---------------------------------------------------------

APP_IMAGE = "svctunnel-agent:0.1.0"  # on the nodes already; the application uses its Python and nft
# the application: its own link (with addresses and a route) and its own nft table, then it runs on
APP_SCRIPT = """
import pathlib, subprocess, time
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.link("add", ifname="app0", kind="veth", peer="app1")
    ipr.link("set", index=ipr.link_lookup(ifname="app1")[0], state="up")
    index = ipr.link_lookup(ifname="app0")[0]
    ipr.addr("add", index=index, address="192.0.2.1", prefixlen=24)
    ipr.addr("add", index=index, address="2001:db8:a::1", prefixlen=64)
    ipr.link("set", index=index, state="up")
    for _ in range(100):  # ready once duplicate address detection is over: the state stays as it is then
        if not any(a.get("flags", 0) & 0x40 or a.get_attr("IFA_FLAGS", 0) & 0x40 for a in ipr.get_addr()):
            break
        time.sleep(0.1)
rules = "table inet app { chain input { type filter hook input priority 0; policy accept; udp dport 9999 drop; }; }"
subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
pathlib.Path("/tmp/app-ready").touch()
print("app ready", flush=True)
while True:
    time.sleep(3600)
"""

INJECT_SUITE = (
    POD_SUITE_HEAD
    + """
import json

import pytest


def in_pod(*argv):
    return subprocess.run(["nsenter", "-t", os.environ["E2E_POD_PID"], "-n", *argv], capture_output=True, text=True)


@pytest.mark.svctunnel_network("media", pod_dev="net2", ipv4="10.40.0.0/30")
def test_the_application_pod_has_the_networks(svctunnel, svctunnel_network):
    default = svctunnel.default
    assert (default.pod, default.pod_dev) == (os.environ["E2E_POD"], "net1")
    assert (svctunnel_network.pod, svctunnel_network.pod_dev) == (os.environ["E2E_POD"], "net2")
    for net in (default, svctunnel_network):
        addresses = in_pod("ip", "-o", "addr", "show", "dev", net.pod_dev).stdout
        for remote, local in ((net.remote_ipv4, net.local_ipv4), (net.remote_ipv6, net.local_ipv6)):
            assert str(remote) in addresses, addresses
            assert ping(remote.ip, net.dev), f"no answer from {remote.ip} over {net.dev}"
            back = in_pod("ping", "-c", "1", "-W", "2", "-I", net.pod_dev, str(local.ip))
            assert back.returncode == 0, f"the pod got no answer from {local.ip}: {back.stdout}{back.stderr}"


def test_a_hello_flood_stops_at_the_pods_door(svctunnel):
    import socket

    from pytest_svctunnel import nft
    from pytest_svctunnel.protocol import DEFAULT_PORT

    service, sent = svctunnel.service, 0
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
        flood.connect((str(service.address), service.port))
        while time.monotonic() < started + 1.0:
            for _ in range(200):
                flood.send(b"SVTN" + bytes(60))
            sent += 200
    elapsed = time.monotonic() - started
    table = in_pod("nft", "-j", "list", "table", "netdev", nft.limit_table(DEFAULT_PORT))  # the pod's port
    rules = [item["rule"]["expr"] for item in json.loads(table.stdout)["nftables"] if "rule" in item]
    counted = [(any("drop" in e for e in r), e["counter"]["packets"]) for r in rules for e in r if "counter" in e]
    dropped, passed = sum(n for drop, n in counted if drop), sum(n for drop, n in counted if not drop)
    print(f"hello flood into the application pod: {sent} sent in {elapsed:.2f} s;"
          f" its kernel dropped {dropped}, {passed} reached the agent")
    assert dropped > sent // 2, (sent, dropped)
    # what may pass: a burst, the rate, and the session's own handshake datagrams (hello, confirm, retransmits)
    assert passed <= nft.HELLO_BURST + nft.HELLO_RATE * (elapsed + 1) + 6, (sent, dropped, passed)
    assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
"""
)


def create_app_namespace(cluster: TestCluster, labels: dict[str, str] | None = None) -> str:
    name = f"svt-e2e-app-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(cluster.api).create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    return name


def app_pod_manifest(name: str) -> dict[str, Any]:
    """The application: a pod-level non-root user (which an injected agent must not inherit), its own root
    container with NET_ADMIN for its own link and table, a readiness probe of its own."""
    return {
        "metadata": {"name": name, "labels": {"app": "e2e-app"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
            "containers": [
                {
                    "name": "app",
                    "image": APP_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", APP_SCRIPT],
                    "readinessProbe": {"exec": {"command": ["test", "-e", "/tmp/app-ready"]}, "periodSeconds": 1},
                    "securityContext": {
                        "runAsUser": 0,
                        "runAsNonRoot": False,
                        "capabilities": {"add": ["NET_ADMIN"]},
                    },
                }
            ],
        },
    }


def wait_pods_ready(core: Any, namespace: str, selector: str, count: int, seconds: float = 60.0) -> list[Any]:
    end = time.monotonic() + seconds
    pods: list[Any] = []
    while time.monotonic() < end:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        ready = [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        if len(ready) == count and len(pods) == count:
            return sorted(ready, key=lambda p: p.metadata.name)
        time.sleep(0.3)
    logs = [core.read_namespaced_pod_log(p.metadata.name, namespace, tail_lines=20) for p in pods]
    raise AssertionError(f"pods -l {selector} in {namespace} not ready: {[p.status for p in pods]}; logs: {logs}")


def pause_container() -> dict[str, Any]:
    """An application container that only runs: the nodes' own pause image."""
    from .kubelab.node import PAUSE_IMAGE

    return {"name": "app", "image": PAUSE_IMAGE, "imagePullPolicy": "Never", "command": ["/pause"]}


def start_pause_deployment(cluster: TestCluster, namespace: str, name: str, replicas: int) -> list[Any]:
    """A Deployment of ``replicas`` pause pods labelled ``app=e2e-<name>``; its pods once they are ready."""
    labels = {"app": f"e2e-{name}"}
    template = {
        "metadata": {"labels": labels},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [pause_container()]},
    }
    spec = {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template}
    client.AppsV1Api(cluster.api).create_namespaced_deployment(namespace, {"metadata": {"name": name}, "spec": spec})
    return wait_pods_ready(client.CoreV1Api(cluster.api), namespace, f"app=e2e-{name}", replicas)


def pod_network_state(pid: int) -> str:
    """Everything of a pod's network namespace that the agent could change: links, addresses, routes, rules."""
    views = (
        ["ip", "-d", "-o", "link", "show"],
        ["ip", "-o", "addr", "show"],
        ["ip", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
        ["nft", "list", "ruleset"],
    )
    out = []
    for argv in views:
        done = subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True, check=True)
        out.append(f"$ {' '.join(argv)}\n{done.stdout}")
    return "\n".join(out)


def start_app(cluster: TestCluster, namespace: str) -> tuple[Any, int, str]:
    """The application pod once it is ready, the pid whose network namespace is its, and that namespace's state."""
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_pod(namespace, app_pod_manifest("app"))
    (pod,) = wait_pods_ready(core, namespace, "app=e2e-app", 1)
    pid = node_of(cluster, pod).pod_pid(namespace, "app")
    return pod, pid, pod_network_state(pid)


def node_of(cluster: TestCluster, pod: Any) -> Any:
    (node,) = [n for n in cluster.nodes if n.spec.name == pod.spec.node_name]
    return node


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_a_network_goes_into_a_running_application_pod(
    pytester: pytest.Pytester, cluster: TestCluster, service_type: str
) -> None:
    """--svctunnel-target puts the default network (as net1) and a marked one (as net2) into a running
    application pod: pings pass both ways on both families, and a hello flood stops at the pod's door. After
    the session the pod's links, addresses, routes and nft ruleset are what they were, its labels too, the
    application never restarted, and the injected agent has exited."""
    core = client.CoreV1Api(cluster.api)
    namespace = create_app_namespace(cluster)
    try:
        pod, pid, before = start_app(cluster, namespace)
        assert "app0" in before and "table inet app" in before, before
        os.environ.update(E2E_POD="app", E2E_POD_PID=str(pid))
        try:
            pytester.makepyfile(test_inject=INJECT_SUITE)
            result, run_id = run_inner(
                pytester, cluster, "--svctunnel-target", f"{namespace}/app", "--svctunnel-pod-dev", "net1",
                "--svctunnel-service-type", service_type,
            )  # fmt: skip
        finally:
            del os.environ["E2E_POD"], os.environ["E2E_POD_PID"]
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.OK, output
        ready = _READY.search(output)
        assert ready is not None, output
        print(ready[0])
        for phase in ("pods chosen", "objects created", "agent injected", "handshake", "first ping"):
            assert phase in ready[0], ready[0]
        assert_app_as_it_was(core, namespace, pod, pid, before)
        after = core.read_namespaced_pod("app", namespace)
        assert after.metadata.uid == pod.metadata.uid
        assert [a.name for a in after.status.ephemeral_container_statuses] == [names.object_name(run_id)]
        assert_run_left_nothing(cluster, run_id, output)
    finally:
        core.delete_namespace(namespace)


ATTACH_SUITE = (
    POD_SUITE_HEAD
    + """
def test_each_pod_of_the_deployment_gets_its_own_network(svctunnel_attach):
    with svctunnel_attach(os.environ["E2E_TARGET"], ["net1"]) as attached:
        nets = attached.networks.pods("net1")
        assert sorted(nets) == sorted(os.environ["E2E_PODS"].split()), nets
        for field in ("dev", "vni", "local_ipv4", "local_ipv6"):
            assert len({getattr(n, field) for n in nets.values()}) == 3, (field, nets)
        for pod, net in nets.items():
            assert net.pod_dev == "net1"
            assert ping(net.remote_ipv4.ip, net.dev) and ping(net.remote_ipv6.ip, net.dev), pod
        devices = [n.dev for n in nets.values()]
    left = [d for d in devices if subprocess.run(["ip", "link", "show", "dev", d], capture_output=True).returncode == 0]
    assert left == [], left
    print("attached to", len(nets), "pods, and detached")
"""
)


def test_each_pod_of_a_deployment_gets_its_own_network(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    """svctunnel_attach into a 3-replica Deployment: three pods, three tunnels with their own devices, VNIs
    and addresses, all pinging; leaving the with block removes them, and the run leaves nothing."""
    core = client.CoreV1Api(cluster.api)
    namespace = create_app_namespace(cluster)
    try:
        pods = start_pause_deployment(cluster, namespace, "tri", 3)
        os.environ.update(E2E_TARGET=f"{namespace}/app=e2e-tri", E2E_PODS=" ".join(p.metadata.name for p in pods))
        try:
            pytester.makepyfile(test_attach=ATTACH_SUITE)
            result, run_id = run_inner(pytester, cluster)
        finally:
            del os.environ["E2E_TARGET"], os.environ["E2E_PODS"]
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.OK, output
        result.stdout.fnmatch_lines(["*attached to 3 pods, and detached*", "svctunnel: attached to * in *"])
        before = {p.metadata.uid: p.metadata.labels for p in pods}
        after = core.list_namespaced_pod(namespace, label_selector="app=e2e-tri").items
        assert {p.metadata.uid: p.metadata.labels for p in after} == before
        for pod in after:
            assert [s.restart_count for s in pod.status.container_statuses] == [0]
            (agent,) = pod.status.ephemeral_container_statuses
            assert agent.state.terminated is not None and agent.state.terminated.exit_code == 0, agent.state
        assert_run_left_nothing(cluster, run_id, output)
    finally:
        core.delete_namespace(namespace)


def reap() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_svctunnel", "reap"], capture_output=True, text=True, timeout=120
    )


def test_a_sigkilled_injection_is_reaped_and_the_pod_is_as_it_was(
    pytester: pytest.Pytester, cluster: TestCluster
) -> None:
    """SIGKILL of a session with a network in an application pod leaves the agent's device there;
    'svctunnel reap' says goodbye to the agent (it removes its device and filter and exits) and removes the
    Service, the Secret and the pod's run label: the pod is as it was, the application never restarted."""
    core = client.CoreV1Api(cluster.api)
    namespace = create_app_namespace(cluster)
    try:
        pod, pid, before = start_app(cluster, namespace)
        held = HeldSession(pytester, cluster, "--svctunnel-target", f"{namespace}/app", "--svctunnel-pod-dev", "net1")
        try:
            run_id = held.run_id
            held.wait_for("the tunnel", lambda: (held.path / "tunnel-up").exists())
        finally:
            held.kill()
        assert "net1" in pod_network_state(pid), "SIGKILL should have left the agent's device in the pod"
        assert labelled(cluster.api, run_id), "SIGKILL should have left the run's Service and Secret"
        done = reap()
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"reaped run {run_id}" in done.stdout and f"agent in pod {namespace}/app" in done.stdout, done.stdout
        assert_app_as_it_was(core, namespace, pod, pid, before)
        assert_run_left_nothing(cluster, run_id, done.stdout)
    finally:
        core.delete_namespace(namespace)


def assert_app_as_it_was(core: Any, namespace: str, pod: Any, pid: int, before: str) -> None:
    """The application pod after its agent is gone: same network state and labels, never restarted."""
    assert pod_network_state(pid) == before
    after = core.read_namespaced_pod("app", namespace)
    assert after.metadata.labels == pod.metadata.labels
    assert [s.restart_count for s in after.status.container_statuses] == [0]
    (agent,) = after.status.ephemeral_container_statuses
    assert agent.state.terminated is not None and agent.state.terminated.exit_code == 0, agent.state


KEEP_SUITE = (
    POD_SUITE_HEAD
    + """
def test_up(svctunnel):
    assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)


def test_fails_with_the_network_in_the_pod(svctunnel):
    assert svctunnel.peer is None, "fails on purpose: the report must carry the injected agent's diagnostics"
"""
)


def test_a_failing_injected_session_reports_and_keeps_until_reaped(
    pytester: pytest.Pytester, cluster: TestCluster
) -> None:
    """A failing test's report shows the injected agent's log and the target pod's state and events;
    --svctunnel-keep always leaves the agent and its network in the pod, and says so; 'svctunnel reap
    --include-detached' ends the agent with a goodbye and removes the rest: the pod is as it was."""
    core = client.CoreV1Api(cluster.api)
    namespace = create_app_namespace(cluster)
    try:
        pod, pid, before = start_app(cluster, namespace)
        pytester.makepyfile(test_keep=KEEP_SUITE)
        args = ("--svctunnel-target", f"{namespace}/app", "--svctunnel-pod-dev", "net1", "--svctunnel-keep", "always")
        result, run_id = run_inner(pytester, cluster, *args)
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.TESTS_FAILED, output
        result.assert_outcomes(passed=1, failed=1)
        report = output.split("svctunnel diagnostics", 1)[1]
        for shown in (
            f"--- agent log in {namespace}/app",
            "up: tunnel up with",  # the agent container's own log, through the kubelet
            f"--- target pod {namespace}/app",
            f"ephemeral svctunnel-{run_id}: running",
            f"--- events of {namespace}/app",
            "Started",  # the kubelet's events about the pod
        ):
            assert shown in report, report
        assert f"agent kept in pod {namespace}/app (container svctunnel-{run_id}" in output, output
        assert "net1" in pod_network_state(pid), "the kept network is gone"
        done = subprocess.run(
            [sys.executable, "-m", "pytest_svctunnel", "reap", "--include-detached"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert f"reaped run {run_id}" in done.stdout, done.stdout + done.stderr
        assert_app_as_it_was(core, namespace, pod, pid, before)
        assert_run_left_nothing(cluster, run_id, done.stdout)
    finally:
        core.delete_namespace(namespace)


@pytest.mark.parametrize("case", ["pod-security-baseline", "no-permissions"])
def test_an_injection_the_cluster_refuses_fails_before_anything_is_created(
    pytester: pytest.Pytester, cluster: TestCluster, tmp_path: Path, case: str
) -> None:
    """Each precondition failure is one line naming the fix, and nothing is created: the pod keeps its
    labels and has no ephemeral container, its namespace no Service or Secret of the run."""
    from pytest_svctunnel.backends.kubernetes.preconditions import PSA_ENFORCE

    from .kubelab import certs

    core = client.CoreV1Api(cluster.api)
    labels = {PSA_ENFORCE: "baseline"} if case == "pod-security-baseline" else {}
    namespace = create_app_namespace(cluster, labels)
    pod = {"metadata": {"name": "app", "labels": {"app": "e2e-app"}}, "spec": {"containers": [pause_container()]}}
    try:
        core.create_namespaced_pod(namespace, pod)
        wait_pods_ready(core, namespace, "app=e2e-app", 1)
        args = ["--svctunnel-target", f"{namespace}/app=e2e-app"]
        if case == "no-permissions":
            kubeconfig = tmp_path / "kube-proxy.kubeconfig"  # a real user without those permissions
            plane = cluster.plane
            plane.write_kubeconfig(kubeconfig, plane.server, plane.pki.kube_proxy, certs.KUBE_PROXY_USER)
            args += ["--svctunnel-kubeconfig", str(kubeconfig)]
        pytester.makepyfile(test_hold=HOLD_SUITE)
        result, run_id = run_inner(pytester, cluster, *args)
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.TESTS_FAILED, output
        line = next((x for x in output.splitlines() if "svctunnel: cannot inject a network" in x), output)
        if case == "pod-security-baseline":
            assert f"'kubectl label namespace {namespace} {PSA_ENFORCE}=privileged --overwrite'" in line, line
        else:
            assert "may not get pods, list pods, patch pods, patch pods/ephemeralcontainers" in line, line
            assert "create secrets, delete secrets in namespace" in line and "grant a Role" in line, line
        after = core.read_namespaced_pod("app", namespace)
        assert after.metadata.labels == {"app": "e2e-app"}
        assert not after.spec.ephemeral_containers
        assert core.list_namespaced_service(namespace).items == []
        assert [
            s.metadata.name for s in core.list_namespaced_secret(namespace).items if "svctunnel" in s.metadata.name
        ] == []
        assert_run_left_nothing(cluster, run_id, output)
    finally:
        core.delete_namespace(namespace)


SIDECAR_SUITE = (
    POD_SUITE_HEAD
    + '''
import pytest

APP = """
import socket, sys, time
try:
    index = socket.if_nametoindex("net1")
except OSError:
    print("no net1 at start", flush=True)
    sys.exit(1)
print(f"found net1 at start (index {index})", flush=True)
while True:
    time.sleep(3600)
"""


def app_log(core, namespace):
    try:
        return core.read_namespaced_pod_log("app", namespace, container="app")
    except client.exceptions.ApiException:  # 400 while the kubelet holds the container (PodInitializing)
        return ""


def ready(pod):
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def wait_until(what, check, seconds=60):
    end = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < end, f"not within {seconds} s: {what}"
        time.sleep(0.2)
    return found


@pytest.fixture
def app(svctunnel_sidecar):
    namespace = os.environ["E2E_NAMESPACE"]
    core = client.CoreV1Api(config.new_client_from_config(config_file=os.environ["SVCTUNNEL_KUBECONFIG"]))
    with svctunnel_sidecar(namespace, ["net1"]) as sidecar:
        application = {"name": "app", "image": "svctunnel-agent:0.1.0", "imagePullPolicy": "Never",
                       "command": ["python3", "-c", APP]}
        pod = {
            "metadata": {"name": "app", "labels": {"app": "e2e-side", **sidecar.labels}},
            "spec": {"terminationGracePeriodSeconds": 1, "initContainers": [sidecar.container],
                     "containers": [application]},
        }
        core.create_namespaced_pod(namespace, pod)
        sidecar.wait()
        yield sidecar, core, namespace


def test_the_application_finds_its_interface_at_start(app):
    sidecar, core, namespace = app
    net = sidecar.networks["net1"]
    assert net.pod == "app" and net.pod_dev == "net1"
    assert ping(net.remote_ipv4.ip, net.dev) and ping(net.remote_ipv6.ip, net.dev)
    log = wait_until("the application's first line", lambda: app_log(core, namespace))
    assert "found net1 at start" in log, log
    pod = wait_until("the pod Ready", lambda: (p := core.read_namespaced_pod("app", namespace)) and ready(p) and p)
    statuses = {s.name: s for s in [*pod.status.init_container_statuses, *pod.status.container_statuses]}
    assert statuses["app"].restart_count == 0 and statuses["svctunnel"].restart_count == 0
    # the tunnel does not decide the pod's readiness: with this end gone, the pod stays Ready
    sidecar.close()
    time.sleep(3)
    pod = core.read_namespaced_pod("app", namespace)
    assert ready(pod), pod.status.conditions
    statuses = {s.name: s for s in [*pod.status.init_container_statuses, *pod.status.container_statuses]}
    assert statuses["svctunnel"].state.running is not None and statuses["svctunnel"].restart_count == 0
    print("the sidecar held the application until net1 existed; Ready does not follow the tunnel")
'''
)


def test_a_sidecar_holds_the_application_until_its_interface_exists(
    pytester: pytest.Pytester, cluster: TestCluster
) -> None:
    """The sidecar way: the suite's fixture creates a pod with svctunnel_sidecar's container and labels; the
    kubelet starts the application only once the sidecar's startupProbe saw the tunnel up, so the
    application's first act finds net1 (it would exit otherwise, and restart). The pod's Ready condition does
    not follow the tunnel. After the session the sidecar has removed its networks and still runs, its port
    closed to everyone; once the pod is deleted, nothing of the run is left."""
    core = client.CoreV1Api(cluster.api)
    namespace = create_app_namespace(cluster)
    try:
        os.environ["E2E_NAMESPACE"] = namespace
        try:
            pytester.makepyfile(test_sidecar=SIDECAR_SUITE)
            result, run_id = run_inner(pytester, cluster)
        finally:
            del os.environ["E2E_NAMESPACE"]
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.OK, output
        result.stdout.fnmatch_lines(["*the sidecar held the application*", "svctunnel: sidecar in * ready in *"])
        pod = core.read_namespaced_pod("app", namespace)
        pid = node_of(cluster, pod).pod_pid(namespace, "app")
        links, rules = pod_network_state(pid).split("$ nft list ruleset")
        assert "net1" not in links and "vxlan" not in links, links
        port_filter = rules.split("table inet svctunnel_5533", 1)[1]
        assert "accept;" in port_filter and " accept" not in port_filter.replace("policy accept;", ""), rules
        core.delete_namespaced_pod("app", namespace)  # graceful: gone from the API once the kubelet stopped it
        end = time.monotonic() + 60
        while core.list_namespaced_pod(namespace).items:
            assert time.monotonic() < end, "the pod was not deleted within 60 s"
            time.sleep(0.3)
        assert_run_left_nothing(cluster, run_id, output)
    finally:
        core.delete_namespace(namespace)


GONE_SUITE = (
    POD_SUITE_HEAD
    + """
def test_the_target_pod_is_deleted(svctunnel):
    core = client.CoreV1Api(config.new_client_from_config(config_file=os.environ["SVCTUNNEL_KUBECONFIG"]))
    namespace, pod = os.environ["E2E_NAMESPACE"], svctunnel.default.pod
    assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
    core.delete_namespaced_pod(pod, namespace)
    end = time.monotonic() + 60
    while ping(svctunnel.remote_ipv4.ip, svctunnel.dev):
        assert time.monotonic() < end, "the tunnel outlived its pod"
        time.sleep(0.5)
    time.sleep(6)  # the keepalives miss, the re-handshake asks after the pod
    raise AssertionError("fails on purpose: the report must say that the target pod is gone")
"""
)


def test_a_deleted_target_pod_is_named_in_the_report(pytester: pytest.Pytester, cluster: TestCluster) -> None:
    """A target pod that is deleted takes its network with it; its controller's new pod gets none. The
    failing test's report says so (the external end's last problem, the target pod "gone"), with the
    sections for the agent's log (which went with the pod), the Service and the events; teardown removes
    the rest without waiting on the pod."""
    core = client.CoreV1Api(cluster.api)
    namespace = create_app_namespace(cluster)
    try:
        (pod,) = start_pause_deployment(cluster, namespace, "gone", 1)
        os.environ["E2E_NAMESPACE"] = namespace
        try:
            pytester.makepyfile(test_gone=GONE_SUITE)
            result, run_id = run_inner(pytester, cluster, "--svctunnel-target", f"{namespace}/app=e2e-gone")
        finally:
            del os.environ["E2E_NAMESPACE"]
        output = result.stdout.str()
        assert result.ret == pytest.ExitCode.TESTS_FAILED, output
        name = pod.metadata.name
        assert f"last problem: target pod {namespace}/{name} is " in output, output
        for section in (f"--- agent log in {namespace}/{name}", f"--- Service of {namespace}/{name}", "--- events of"):
            assert section in output, output
        assert f"--- target pod {namespace}/{name}\ngone" in output, output
        assert_run_left_nothing(cluster, run_id, output)
    finally:
        core.delete_namespace(namespace)


# ---- the two load-balancer modes: routed (MetalLB) and proxy (cloud-provider-kind) ----------------------------

_PATH = re.compile(r"the pod sees this end as (?P<peer>[0-9.]+):\d+ through (?P<through>.+) at (?P<service>[0-9.]+):")


@pytest.fixture
def proxy_mode(cluster: TestCluster) -> Iterator[TestCluster]:
    """LoadBalancer Services made meanwhile get a userspace proxy of their own, as with cloud-provider-kind."""
    with cluster.balancer.use("proxy"):
        yield cluster


def assert_proxies_gone(cluster: TestCluster, seconds: float = 60.0) -> None:
    """Once its Service is gone a proxy stops and its namespace goes."""
    deadline, prefix = time.monotonic() + seconds, names.netns_name(cluster.network.run.id, "lb")
    while (cluster.balancer.proxies() or netns.listing(prefix)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.balancer.proxies() == [], "a Service's proxy outlived its Service"
    assert netns.listing(prefix) == [], "a proxy's network namespace outlived its Service"


def test_example_suite_through_the_proxy(pytester: pytest.Pytester, proxy_mode: TestCluster) -> None:
    ready, output, run_id = run_example(pytester, proxy_mode)
    print(f"LoadBalancer through the proxy: {ready}")
    path = _PATH.search(ready)
    assert path is not None, ready
    assert path["through"] == "a proxying load balancer", ready
    assert path["peer"] == path["service"], "the pod must see the proxy's address (cloud-provider-kind's Envoy)"
    assert ipaddress.ip_address(path["service"]) in proxy_mode.network.plan.lb_proxy_pool
    assert_run_left_nothing(proxy_mode, run_id, output)
    assert_proxies_gone(proxy_mode)


def test_the_routed_mode_keeps_the_source_so_a_pinned_peer_works(
    pytester: pytest.Pytester, cluster: TestCluster
) -> None:
    """MetalLB's way: the pod sees this host as the home router's WAN address, and --svctunnel-peer pins it."""
    wan = str(cluster.network.plan.lab.address(4, 2, 1))
    ready, output, run_id = run_example(pytester, cluster, "--svctunnel-peer", wan)
    path = _PATH.search(ready)
    assert path is not None, ready
    assert (path["peer"], path["through"]) == (wan, "the Service"), ready
    assert_run_left_nothing(cluster, run_id, output)


PROXY_REFUSES = {
    # the session's args -> what the error must say
    "pinned-peer": (
        ("--svctunnel-peer", "198.51.100.7"),
        ("--svctunnel-peer 198.51.100.7 cannot work here", "keeps strangers out"),
    ),
    "node-mode": (("--svctunnel-node", "NODE"), ("node mode", "cannot work here", "leave --svctunnel-node out")),
}


@pytest.mark.parametrize("case", list(PROXY_REFUSES))
def test_a_proxy_refuses_what_it_cannot_carry_before_the_pod_end_exists(
    pytester: pytest.Pytester, proxy_mode: TestCluster, case: str
) -> None:
    args, phrases = PROXY_REFUSES[case]
    args = tuple(proxy_mode.node_name if a == "NODE" else a for a in args)
    pytester.makepyfile(test_multinet=EXAMPLE.read_text())
    result, run_id = run_inner(pytester, proxy_mode, *args, "-x")
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    for phrase in (*phrases, "ipMode Proxy"):
        assert phrase in output, output
    assert "--- pod end pods\nno pods" in output, "the pod end must not have been created"
    assert "ScalingReplicaSet" not in output, "the pod end's Deployment must not have been created"
    assert_run_left_nothing(proxy_mode, run_id, output)
    assert_proxies_gone(proxy_mode)


HEAL_SUITE = (
    POD_SUITE_HEAD
    + """
from pathlib import Path


def pings_again(svctunnel, seconds):
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if ping(svctunnel.remote_ipv4.ip, svctunnel.dev) and ping(svctunnel.remote_ipv6.ip, svctunnel.dev):
            return time.monotonic() - started
    raise AssertionError(f"the tunnel did not heal within {seconds} s")


def test_heals(svctunnel):
    assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
    Path("tunnel-up").write_text(str(svctunnel.service_address))
    while not Path("dropped").exists():  # the outer test drops the proxy's session
        time.sleep(0.1)
    print(f"healed {pings_again(svctunnel, 40):.1f} s after the proxy dropped the session")


def test_stays_up(svctunnel):
    for _ in range(30):  # 6 s, three times the proxy's idle timeout in these tests
        assert ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
        time.sleep(0.2)
"""
)


def run_healing(
    pytester: pytest.Pytester, cluster: TestCluster, drop: Callable[[ServiceProxy], None], *args: str
) -> tuple[str, str, str]:
    """The heal suite in the background; ``drop(proxy)`` makes the session's proxy lose the session once the
    tunnel is up. Returns the inner output, its run id and what that proxy logged (restarts included)."""
    pytester.makepyfile(test_heal=HEAL_SUITE)
    up, dropped = pytester.path / "tunnel-up", pytester.path / "dropped"
    outcome: list[tuple[pytest.RunResult, str]] = []
    inner = threading.Thread(target=lambda: outcome.append(run_inner(pytester, cluster, *args)), daemon=True)
    inner.start()
    deadline = time.monotonic() + 120
    while not up.exists() and inner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    address = up.read_text() if up.exists() else ""
    proxy = next((p for p in cluster.balancer.proxies() if str(p.address) == address), None)
    if address:
        if proxy is not None:
            drop(proxy)
        dropped.write_text("")
    inner.join(INNER_TIMEOUT_S)
    assert outcome, "the inner session did not end"
    result, run_id = outcome[0]
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output
    return output, run_id, proxy.log() if proxy is not None else ""


def test_the_tunnel_heals_after_the_proxy_drops_an_idle_session(
    pytester: pytest.Pytester, cluster: TestCluster
) -> None:
    """Keepalives every 4 s against a proxy that drops a session after 2 s idle: the session is dropped while the
    test waits, the next datagrams reach the pod from a new proxy port (which it refuses), and the tunnel heals
    by a new handshake."""
    with cluster.balancer.use("proxy", idle_s=2.0):

        def wait_idle(proxy: ServiceProxy) -> None:
            deadline = time.monotonic() + 30
            while "dropped: idle" not in proxy.log() and time.monotonic() < deadline:
                time.sleep(0.1)

        output, run_id, logs = run_healing(pytester, cluster, wait_idle, "--svctunnel-keepalive", "4", "-k", "heals")
    assert "dropped: idle for 2 s" in logs, logs
    assert re.search(r"healed [0-9.]+ s after the proxy dropped the session", output), output
    assert_run_left_nothing(cluster, run_id, output)
    assert_proxies_gone(cluster)


def test_the_tunnel_heals_after_the_proxy_restarts_and_default_keepalives_keep_it(
    pytester: pytest.Pytester, cluster: TestCluster
) -> None:
    """A restarted proxy has no sessions: the tunnel heals. Then keepalives below the idle timeout (1 s against
    2 s here, as the default 5 s is against cloud-provider-kind's 60 s) keep the session: pings pass for three
    idle timeouts in a row."""
    with cluster.balancer.use("proxy", idle_s=2.0):
        output, run_id, logs = run_healing(pytester, cluster, ServiceProxy.restart)
    assert logs.count("listening on") == 2, logs  # started, then restarted
    assert re.search(r"healed [0-9.]+ s after the proxy dropped the session", output), output
    assert_run_left_nothing(cluster, run_id, output)
    assert_proxies_gone(cluster)
