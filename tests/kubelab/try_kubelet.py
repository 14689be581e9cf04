"""Try the mini kubelet and the load-balancer controller by hand (not a pytest test); needs root, nftables and
the built binaries.

    python -m tests.kubelab.try_kubelet [BIN_DIR]

Starts the control plane, a Node and its kube-proxy in namespace svt-kltry-node, the mini kubelet and the
load-balancer controller; then, in namespace svt-kltry: a Deployment whose pod must become Running and Ready
(with a Secret and fieldRefs in its env, NET_ADMIN only, a private /tmp), a UDP LoadBalancer Service that must
get a pool address, an EndpointSlice and kube-proxy's DNAT; the pod deleted and replaced; a pod that crash
loops, one that cannot be scheduled and one whose image is unknown; and the namespace deleted. Prints each
phase's time and removes everything; the work directory (logs) is kept on failure.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

from pytest_svctunnel import netns
from pytest_svctunnel.lab import NO_DAD
from pytest_svctunnel.waiting import Deadline, wait_for

from .controlplane import ControlPlane
from .kubelet import MiniKubelet, Obj, read_json
from .loadbalancer import LoadBalancerController

T = TypeVar("T")

DEFAULT_BIN_DIR = Path.home() / ".cache/svctunnel/kube/v1.37.2-etcd-v3.7.0/bin"
NETNS = "svt-kltry-node"
NODE = "svt-kltry-node"
NODE_IP = "10.251.0.2"
CLUSTER_CIDR = "10.244.0.0/16"
POD_CIDR_V4 = ipaddress.IPv4Network("10.244.9.0/24")
POD_CIDR_V6 = ipaddress.IPv6Network("fd00:10:244:900::/56")
POOL = [ipaddress.IPv4Address(f"10.251.1.{host}") for host in range(10, 14)]
NAMESPACE = "svt-kltry"
IMAGE = "svctunnel-agent:test"
PORT = 5533
SECRET_VALUE = "kltry-secret-value"

timings: dict[str, float] = {}


@contextmanager
def timed(phase: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[phase] = time.monotonic() - started
        print(f"== {phase}: {timings[phase]:.2f} s")


def poll(check: Callable[[], T | None], phase: str, seconds: float, describe: Callable[[], str]) -> T:
    return wait_for(check, phase=phase, deadline=Deadline.after(seconds), describe=describe, interval=0.1)


def make_node_netns() -> None:
    netns.create(NETNS)
    netns.sysctl(NETNS, {**NO_DAD, "net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
    netns.run(NETNS, ["ip", "link", "set", "lo", "up"])
    netns.run(NETNS, ["ip", "address", "add", f"{NODE_IP}/32", "dev", "lo"])


# -- objects --------------------------------------------------------------------------------------------------


def agent_container(image: str, script: str) -> client.V1Container:
    return client.V1Container(
        name="agent",
        image=image,
        command=["sh", "-c", script],
        env=[
            client.V1EnvVar(
                name="SVT_SECRET",
                value_from=client.V1EnvVarSource(secret_key_ref=client.V1SecretKeySelector(name="kltry", key="key")),
            ),
            client.V1EnvVar(
                name="POD_IP",
                value_from=client.V1EnvVarSource(field_ref=client.V1ObjectFieldSelector(field_path="status.podIP")),
            ),
            client.V1EnvVar(
                name="POD_NAME",
                value_from=client.V1EnvVarSource(field_ref=client.V1ObjectFieldSelector(field_path="metadata.name")),
            ),
            client.V1EnvVar(name="GREETING", value="hello $(POD_NAME)"),
        ],
        ports=[client.V1ContainerPort(name="tunnel", container_port=PORT, protocol="UDP")],
        readiness_probe=client.V1Probe(
            _exec=client.V1ExecAction(command=["test", "-e", "/tmp/ready"]), period_seconds=1
        ),
        security_context=client.V1SecurityContext(capabilities=client.V1Capabilities(add=["NET_ADMIN"])),
    )


AGENT_SCRIPT = (
    'echo "$GREETING secret=$SVT_SECRET ip=$POD_IP $(grep CapEff /proc/self/status)"; touch /tmp/ready; exec sleep 1000'
)


def deployment(name: str, image: str) -> client.V1Deployment:
    labels = {"app": name}
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(
            containers=[agent_container(image, AGENT_SCRIPT)],
            termination_grace_period_seconds=5,
            automount_service_account_token=False,
        ),
    )
    spec = client.V1DeploymentSpec(
        replicas=1,
        selector=client.V1LabelSelector(match_labels=labels),
        template=template,
        strategy=client.V1DeploymentStrategy(type="Recreate"),
    )
    return client.V1Deployment(metadata=client.V1ObjectMeta(name=name), spec=spec)


def service(name: str) -> client.V1Service:
    port = client.V1ServicePort(name="tunnel", protocol="UDP", port=PORT, target_port=PORT)
    spec = client.V1ServiceSpec(
        type="LoadBalancer",
        selector={"app": name},
        ports=[port],
        external_traffic_policy="Local",
        load_balancer_source_ranges=["10.251.0.0/16"],
    )
    return client.V1Service(metadata=client.V1ObjectMeta(name=name), spec=spec)


def bare_pod(name: str, script: str, node_selector: dict[str, str] | None = None) -> client.V1Pod:
    container = client.V1Container(name="main", image=IMAGE, command=["sh", "-c", script])
    spec = client.V1PodSpec(
        containers=[container],
        node_selector=node_selector,
        termination_grace_period_seconds=1,
        automount_service_account_token=False,
    )
    return client.V1Pod(metadata=client.V1ObjectMeta(name=name), spec=spec)


# -- looking --------------------------------------------------------------------------------------------------


def raw(response: Any) -> Obj:
    return read_json(response)


def pods(core: client.CoreV1Api, app: str | None = None) -> list[Obj]:
    selector = f"app={app}" if app else None
    items = raw(core.list_namespaced_pod(NAMESPACE, label_selector=selector, _preload_content=False))["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def read_pod(core: client.CoreV1Api, name: str) -> Obj:
    return raw(core.read_namespaced_pod(name, NAMESPACE, _preload_content=False))


def is_ready(pod: Obj) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def describe_pods(core: client.CoreV1Api) -> str:
    lines = []
    for pod in pods(core):
        status = pod["status"]
        states = [
            f"{s['name']}: {s['state']} restarts={s['restartCount']}" for s in status.get("containerStatuses") or []
        ]
        conditions = [f"{c['type']}={c['status']}" for c in status.get("conditions") or []]
        lines.append(f"{pod['metadata']['name']} {status.get('phase')} ip={status.get('podIP')} {conditions} {states}")
    return "; ".join(lines) or "no pods"


def ready_pod(core: client.CoreV1Api, app: str, not_named: str = "") -> Obj | None:
    found = [p for p in pods(core, app) if p["metadata"]["name"] != not_named]
    return next((p for p in found if p["status"].get("phase") == "Running" and is_ready(p)), None)


def waiting_reason(pod: Obj) -> str | None:
    for status in pod["status"].get("containerStatuses") or []:
        if waiting := status["state"].get("waiting"):
            return str(waiting.get("reason"))
    return None


def slice_addresses(api: client.ApiClient, name: str) -> list[str]:
    discovery = client.DiscoveryV1Api(api)
    selector = f"kubernetes.io/service-name={name}"
    slices = raw(discovery.list_namespaced_endpoint_slice(NAMESPACE, label_selector=selector, _preload_content=False))
    return [a for s in slices["items"] for e in s.get("endpoints") or [] for a in e["addresses"]]


def lb_address(core: client.CoreV1Api, name: str) -> str | None:
    svc = raw(core.read_namespaced_service_status(name, NAMESPACE, _preload_content=False))
    ingress = (svc.get("status", {}).get("loadBalancer") or {}).get("ingress") or []
    return str(ingress[0]["ip"]) if ingress else None


def ruleset() -> str:
    return netns.run(NETNS, ["nft", "list", "ruleset"])


def programmed(pod_ip: str, lb_ip: str) -> str | None:
    text = ruleset()
    return text if f"dnat to {pod_ip}:{PORT}" in text and lb_ip in text else None


def container_facts(kubelet: MiniKubelet, name: str) -> str:
    pid = kubelet.container_pid(NAMESPACE, name)
    if pid is None:
        return "no container process"
    caps = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Cap")]
    log_path = kubelet.log_path(NAMESPACE, name)
    log_text = log_path.read_text() if log_path else ""
    host_has = Path("/tmp/ready").exists()
    return f"pid {pid}; {'; '.join(caps)}; /tmp/ready on the host: {host_has}\n--- container log ---\n{log_text}"


# -- the phases -----------------------------------------------------------------------------------------------


def run(api: client.ApiClient, kubelet: MiniKubelet, balancer: LoadBalancerController) -> None:
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    core.create_namespaced_secret(
        NAMESPACE, client.V1Secret(metadata=client.V1ObjectMeta(name="kltry"), string_data={"key": SECRET_VALUE})
    )
    with timed("deployment to a ready pod"):
        apps.create_namespaced_deployment(NAMESPACE, deployment("agent", IMAGE))
        core.create_namespaced_service(NAMESPACE, service("agent"))
        pod = poll(lambda: ready_pod(core, "agent"), "pod Running and Ready", 60, lambda: describe_pods(core))
    pod_name, pod_ip = str(pod["metadata"]["name"]), str(pod["status"]["podIP"])
    print(f"pod {pod_name}: ips {[i['ip'] for i in pod['status']['podIPs']]}, host {pod['status']['hostIP']}")
    print(container_facts(kubelet, pod_name))
    ping = netns.run(NETNS, ["ping", "-c", "1", "-W", "2", pod_ip], check=False)
    print("ping from the node:", "ok" if " 0% packet loss" in ping else ping)
    with timed("endpointslice lists the pod"):
        addresses = poll(lambda: slice_addresses(api, "agent") or None, "EndpointSlice", 30, lambda: "no endpoints yet")
    print("endpointslice addresses:", addresses)
    with timed("load-balancer address"):
        lb_ip = poll(lambda: lb_address(core, "agent"), "LB address", 30, lambda: str(balancer.assigned))
    print(f"service address {lb_ip}; controller: {balancer.assigned}")
    with timed("kube-proxy DNAT to the pod"):
        text = poll(lambda: programmed(pod_ip, lb_ip), "kube-proxy rules", 60, ruleset)
    print("kube-proxy rules naming the pod or the LB address:")
    print("\n".join(line for line in text.splitlines() if pod_ip in line or lb_ip in line))

    with timed("deleted pod replaced and ready"):
        old = pod_name
        core.delete_namespaced_pod(old, NAMESPACE)
        new = poll(lambda: ready_pod(core, "agent", not_named=old), "replacement", 60, lambda: describe_pods(core))
        poll(lambda: True if not any(p["metadata"]["name"] == old for p in pods(core, "agent")) else None,
             "old pod gone", 30, lambda: describe_pods(core))  # fmt: skip
    print(f"replacement {new['metadata']['name']} at {new['status']['podIP']}; kubelet:\n{kubelet.describe()}")

    with timed("unknown image to ImagePullBackOff"):
        apps.create_namespaced_deployment(NAMESPACE, deployment("noimage", "no-such-image:latest"))
        reason = poll(
            lambda: next((r for p in pods(core, "noimage") if (r := waiting_reason(p)) == "ImagePullBackOff"), None),
            "ImagePullBackOff", 30, lambda: describe_pods(core),
        )  # fmt: skip
    print("noimage pod waits:", reason)

    with timed("crash loop to CrashLoopBackOff"):
        core.create_namespaced_pod(NAMESPACE, bare_pod("crasher", "echo crashing; exit 3"))
        poll(
            lambda: True if waiting_reason(read_pod(core, "crasher")) == "CrashLoopBackOff" else None,
            "CrashLoopBackOff", 30, lambda: describe_pods(core),
        )  # fmt: skip
    crasher = read_pod(core, "crasher")["status"]["containerStatuses"][0]
    print(f"crasher: restarts {crasher['restartCount']}, last state {crasher['lastState']}")

    with timed("unschedulable pod marked"):
        core.create_namespaced_pod(NAMESPACE, bare_pod("nowhere", "sleep 1", node_selector={"disk": "ssd"}))

        def unschedulable() -> str | None:
            conditions = read_pod(core, "nowhere")["status"].get("conditions") or []
            return next(
                (c["message"] for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None
            )

        message = poll(unschedulable, "PodScheduled=False", 30, lambda: describe_pods(core))
    print("nowhere:", message)

    with timed("namespace deleted and gone"):
        core.delete_namespace(NAMESPACE)

        def gone() -> bool | None:
            try:
                core.read_namespace(NAMESPACE)
            except client.ApiException as exc:
                return True if exc.status == 404 else None
            return None

        poll(gone, "namespace gone", 90, lambda: describe_pods(core))
    poll(lambda: True if not balancer.assigned else None, "LB address freed", 10, lambda: str(balancer.assigned))
    print("after the namespace: kubelet runs", kubelet.describe(), "; LB assigned", balancer.assigned)


def main(bin_dir: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    work_dir = Path(tempfile.mkdtemp(prefix="svt-kltry-"))
    plane = ControlPlane(bin_dir, work_dir)
    ok = False
    try:
        with ExitStack() as stack:
            stack.callback(netns.remove, NETNS)
            with timed("node netns"):
                make_node_netns()
            stack.callback(plane.stop)
            with timed("control plane"):
                plane.start(timeout=240)
            with timed("node and kube-proxy"):
                plane.create_node(NODE, NODE_IP, str(POD_CIDR_V4))
                plane.start_kube_proxy(NETNS, NODE, CLUSTER_CIDR, timeout=90)
            api: Any = stack.enter_context(plane.api_client())
            kubelet = MiniKubelet(
                api, NODE, NETNS, "svt-kltry-pod", POD_CIDR_V4, POD_CIDR_V6, work_dir / "pods", {IMAGE}
            )
            balancer = LoadBalancerController(api, POOL)
            with timed("kubelet and LB controller start"):
                stack.callback(kubelet.stop)
                kubelet.start()
                stack.callback(balancer.stop)
                balancer.start()
            try:
                run(api, kubelet, balancer)
                ok = True
            finally:
                stop_started = time.monotonic()
        timings["stop"] = time.monotonic() - stop_started
    finally:
        print("control plane phases:", ", ".join(f"{k} {v:.2f} s" for k, v in plane.timings.items()))
        print("script phases:", ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        leftovers = subprocess.run(["pgrep", "-af", str(work_dir)], capture_output=True, text=True).stdout.strip()
        print("processes left:", leftovers or "none", "; namespaces left:", netns.listing("svt-kltry-") or "none")
        if ok:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print(f"logs kept in {work_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_BIN_DIR))
