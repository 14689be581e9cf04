"""The kubernetes backend: the pod end as a Deployment behind a UDP Service in a real cluster.

``deploy`` creates the session's objects (a fresh namespace unless one is given, a Secret
with the key, the agent's Deployment, the Service), waits for the pod to start (failing early
on image pull errors, crash loops and unschedulable pods) and for the Service's address, and
returns where the external end sends its hello. ``teardown`` deletes what the session made
and waits until it is gone. Every object carries the label ``svctunnel.dev/run=<run id>``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from . import diagnostics, keys, kube, render
from .config import TunnelConfig
from .errors import KubeError
from .protocol import Endpoint, IPAddress
from .runs import KUBE_FILE, Run
from .waiting import Deadline, Stopwatch, wait_for

log = logging.getLogger("svctunnel.kubernetes")
_FATAL_WAITING = {
    "ErrImagePull": "the image cannot be pulled",
    "ImagePullBackOff": "the image cannot be pulled",
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not on the node and may not be pulled",
    "CreateContainerConfigError": "the container cannot be configured",
    "CreateContainerError": "the container cannot be created",
    "CrashLoopBackOff": "the agent keeps exiting",
}
_IMAGE_HINT = (
    "build the agent image from the Dockerfile and make it available to the cluster"
    " (KinD: 'kind load docker-image IMAGE'), or pass --svctunnel-image"
)
_POLL_S = 0.2


class KubernetesBackend:
    """Where the pod end runs when ``--svctunnel-backend kubernetes`` (the default)."""

    def __init__(self, run: Run, config: TunnelConfig) -> None:
        self.run = run
        self.config = config
        self.name = f"svctunnel-{run.id}"
        self.namespace = config.namespace or self.name
        self.owns_namespace = config.namespace is None
        self.selector = f"{render.RUN_LABEL}={run.id}"
        self._cluster: kube.Cluster | None = None

    @property
    def cluster(self) -> kube.Cluster:
        if self._cluster is None:
            raise KubeError("not connected to a cluster yet")
        return self._cluster

    # -- deploying -----------------------------------------------------------------

    def deploy(self, key_file: Path, peer: IPAddress | None, deadline: Deadline, stopwatch: Stopwatch) -> Endpoint:
        c = self.config
        end = render.PodEnd(
            self.name, self.run.id, keys.read_key_file(key_file).hex(), c.image, c.port, c.service_type, peer, c.node,
            c.bridge,
        )  # fmt: skip
        objects = render.pod_end(end)
        self._cluster = kube.connect(c.kubeconfig, c.context)
        self.run.write(KUBE_FILE, self._record())
        self._create(objects)
        stopwatch.lap("objects created")
        pod = self._wait_pod_started(deadline)
        stopwatch.lap("pod started")
        endpoint = self._service_endpoint(pod, deadline)
        stopwatch.lap("load-balancer address" if c.service_type == "LoadBalancer" else "node port")
        return endpoint

    def _record(self) -> dict[str, Any]:
        c = self.config
        return {
            "kubeconfig": c.kubeconfig,
            "context": c.context,
            "namespace": self.namespace,
            "owns_namespace": self.owns_namespace,
            "selector": self.selector,
        }

    def _create(self, objects: dict[str, render.Obj]) -> None:
        core, apps, ns = self.cluster.core, self.cluster.apps, self.namespace
        if self.owns_namespace:
            body = render.namespace(self.namespace, self.run.id)
            kube.call(f"creating namespace {ns}", lambda: core.create_namespace(body))
        kube.call(f"creating Secret {self.name} in {ns}", lambda: core.create_namespaced_secret(ns, objects["Secret"]))
        kube.call(
            f"creating Deployment {self.name} in {ns}",
            lambda: apps.create_namespaced_deployment(ns, objects["Deployment"]),
        )
        kube.call(
            f"creating Service {self.name} in {ns}", lambda: core.create_namespaced_service(ns, objects["Service"])
        )

    # -- waiting ---------------------------------------------------------------------

    def pods(self) -> list[Any]:
        core, ns = self.cluster.core, self.namespace
        listing = kube.call(
            f"listing the pods in {ns}",
            lambda: core.list_namespaced_pod(ns, label_selector=self.selector, _request_timeout=kube.request_timeout()),
        )
        return list(listing.items) if listing is not None else []

    def _wait_pod_started(self, deadline: Deadline) -> Any:
        """The pod end's pod once its container runs; fails at once on a state it cannot leave."""

        def started() -> Any:
            live = [p for p in self.pods() if p.metadata.deletion_timestamp is None]
            for pod in live:
                _raise_if_stuck(pod)
            running = [p for p in live if _container_running(p) and p.status.pod_ip]
            return running[0] if running else None

        return wait_for(
            started,
            phase="pod end started",
            deadline=deadline,
            describe=lambda: "; ".join(describe_pod(p) for p in self.pods()) or "no pod yet",
            hint="check that the cluster has a schedulable node and can run the image (" + _IMAGE_HINT + ")",
            interval=_POLL_S,
        )

    def check(self) -> None:
        """Raise if the pod end's pod is stuck (crash loop, image, unschedulable); a missing pod is
        being replaced by its Deployment and is fine."""
        for pod in self.pods():
            if pod.metadata.deletion_timestamp is None:
                _raise_if_stuck(pod)

    def _service_endpoint(self, pod: Any, deadline: Deadline) -> Endpoint:
        if self.config.service_type == "NodePort":
            return self._node_port(pod)
        return wait_for(
            self._load_balancer_address,
            phase="load-balancer address",
            deadline=deadline,
            describe=lambda: f"Service {self.namespace}/{self.name} has no load-balancer address",
            hint=(
                "the cluster needs a load-balancer provider (KinD: run cloud-provider-kind, or install MetalLB"
                " with an address pool), or use --svctunnel-service-type NodePort"
            ),
            interval=_POLL_S,
        )

    def service(self) -> Any:
        core, ns = self.cluster.core, self.namespace
        return kube.call(f"reading Service {ns}/{self.name}", lambda: core.read_namespaced_service(self.name, ns))

    def _load_balancer_address(self) -> Endpoint | None:
        """The first ingress address; a host name (AWS load balancers) once it resolves."""
        ingress = self.service().status.load_balancer.ingress or []
        for entry in ingress:
            if entry.ip:
                return Endpoint(ipaddress.ip_address(entry.ip), self.config.port)
            if entry.hostname and (address := _resolve(entry.hostname)) is not None:
                return Endpoint(address, self.config.port)
        return None

    def _node_port(self, pod: Any) -> Endpoint:
        """The node the pod runs on (externalTrafficPolicy Local answers only there) and the node port."""
        node_port = self.service().spec.ports[0].node_port
        if pod.spec.host_network:
            address = pod.status.pod_ip
        else:
            name = pod.spec.node_name
            node = kube.call(f"reading node {name}", lambda: self.cluster.core.read_node(name))
            addresses = {a.type: a.address for a in node.status.addresses or []}
            address = addresses.get("ExternalIP") or addresses.get("InternalIP")
            if not address:
                raise KubeError(f"node {name} reports no InternalIP or ExternalIP address for its node port")
        return Endpoint(ipaddress.ip_address(address), int(node_port))

    # -- removal -----------------------------------------------------------------------

    def teardown(self, deadline: Deadline) -> None:
        """Delete what the session created and wait until it is gone."""
        if self._cluster is None:
            return
        delete_run_objects(self.cluster, self.namespace, self.owns_namespace, self.selector, deadline)
        self.cluster.close()
        self._cluster = None

    # -- reporting ---------------------------------------------------------------------

    def diagnostics(self) -> list[tuple[str, str]]:
        if self._cluster is None:
            return [("kubernetes", "not connected to a cluster")]
        return [
            diagnostics.safely("pod end log", self._pod_logs),
            diagnostics.safely("pod end pods", lambda: "\n".join(describe_pod(p) for p in self.pods()) or "no pods"),
            diagnostics.safely("pod end Service", self._service_status),
            diagnostics.safely("recent events", self._events),
        ]

    def _pod_logs(self) -> str:
        core, ns = self.cluster.core, self.namespace
        parts = []
        for pod in self.pods():
            name: str = pod.metadata.name
            read = partial(core.read_namespaced_pod_log, name, ns, tail_lines=60, _request_timeout=10)
            text = kube.call(f"reading the log of pod {ns}/{name}", read)
            parts.append(f"--- {name}\n{text}")
        return "\n".join(parts) or "no pods"

    def _service_status(self) -> str:
        svc = self.service()
        ingress = [e.ip or e.hostname for e in svc.status.load_balancer.ingress or []]
        ports = ", ".join(f"{p.port}/{p.protocol} node port {p.node_port}" for p in svc.spec.ports)
        return f"{svc.spec.type} {self.namespace}/{self.name}: ports {ports}; load-balancer {ingress or 'none'}"

    def _events(self) -> str:
        core, ns = self.cluster.core, self.namespace
        events = kube.call(f"listing events in {ns}", lambda: core.list_namespaced_event(ns)).items
        events.sort(key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
        lines = [f"{e.type} {e.involved_object.kind}/{e.involved_object.name} {e.reason}: {e.message}" for e in events]
        return "\n".join(lines[-20:]) or "no events"

    def describe_kept(self) -> str:
        where = (
            f"namespace {self.namespace}" if self.owns_namespace else f"objects -l {self.selector} in {self.namespace}"
        )
        remove = (
            f"kubectl delete namespace {self.namespace}"
            if self.owns_namespace
            else f"kubectl -n {self.namespace} delete deployment,service,secret -l {self.selector}"
        )
        return (
            f"pod end kept: {where} ({self.cluster_source()}), and this end's devices svt{self.run.id}-*;"
            f" remove all with 'svctunnel reap --include-detached', or the pod end with '{remove}'"
        )

    def cluster_source(self) -> str:
        return self._cluster.source if self._cluster else "no cluster"


def delete_recorded(record: dict[str, Any], deadline: Deadline) -> None:
    """Delete a run's cluster objects from what it recorded (for 'svctunnel reap')."""
    cluster = kube.connect(record.get("kubeconfig"), record.get("context"))
    try:
        delete_run_objects(
            cluster, str(record["namespace"]), bool(record["owns_namespace"]), str(record["selector"]), deadline
        )
    finally:
        cluster.close()


def delete_run_objects(
    cluster: kube.Cluster, namespace: str, owns_namespace: bool, selector: str, deadline: Deadline
) -> None:
    """Delete a run's objects (its namespace, if it made one) and wait until they are gone."""
    core, apps = cluster.core, cluster.apps
    if owns_namespace:
        kube.call_unless_missing(f"deleting namespace {namespace}", lambda: core.delete_namespace(namespace))
        wait_for(
            lambda: _gone(
                kube.call_unless_missing(f"reading namespace {namespace}", lambda: core.read_namespace(namespace))
            ),
            phase=f"namespace {namespace} removed",
            deadline=deadline,
            hint="the namespace controller of the cluster finalizes namespaces; check kube-controller-manager",
            interval=_POLL_S,
        )
        return
    deleters: list[tuple[str, Callable[..., Any]]] = [
        ("Deployments", apps.delete_collection_namespaced_deployment),
        ("Secrets", core.delete_collection_namespaced_secret),
    ]
    for kind, delete in deleters:
        delete_all = partial(delete, namespace, label_selector=selector, propagation_policy="Foreground")
        kube.call(f"deleting {kind} -l {selector} in {namespace}", delete_all)
    services = kube.call(
        f"listing Services in {namespace}", lambda: core.list_namespaced_service(namespace, label_selector=selector)
    ).items
    for svc in services:  # Services have no delete-collection
        delete_service = partial(core.delete_namespaced_service, svc.metadata.name, namespace)
        kube.call_unless_missing(f"deleting Service {svc.metadata.name}", delete_service)
    listers: list[tuple[str, Callable[..., Any]]] = [
        ("Deployments", apps.list_namespaced_deployment),
        ("pods", core.list_namespaced_pod),
        ("Services", core.list_namespaced_service),
        ("Secrets", core.list_namespaced_secret),
    ]

    def left() -> list[str]:
        return [
            f"{kind}: {', '.join(o.metadata.name for o in items)}"
            for kind, lister in listers
            if (items := lister(namespace, label_selector=selector).items)
        ]

    wait_for(
        lambda: True if not left() else None,
        phase=f"objects -l {selector} removed from {namespace}",
        deadline=deadline,
        describe=lambda: "; ".join(left()),
        interval=_POLL_S,
    )


def _resolve(hostname: str) -> IPAddress | None:
    """An IPv4 address of ``hostname`` (else IPv6), or None while its DNS record is not there yet."""
    try:
        infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_UDP)
    except OSError:
        return None
    addresses = sorted({ipaddress.ip_address(info[4][0]) for info in infos}, key=lambda a: (a.version, a))
    return addresses[0] if addresses else None


def _gone(found: object) -> bool | None:
    return True if found is None else None


def _container_running(pod: Any) -> bool:
    statuses = pod.status.container_statuses or []
    return bool(statuses) and all(s.state is not None and s.state.running is not None for s in statuses)


def _raise_if_stuck(pod: Any) -> None:
    name = pod.metadata.name
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            raise KubeError(
                f"pod {name} cannot be scheduled: {condition.message}; check --svctunnel-node and that the"
                " cluster has a ready node that accepts it"
            )
    for status in pod.status.container_statuses or []:
        waiting = status.state.waiting if status.state is not None else None
        if waiting is not None and waiting.reason in _FATAL_WAITING:
            hint = _IMAGE_HINT if "image" in _FATAL_WAITING[waiting.reason] else "see its log below"
            last = _last_exit(status)
            raise KubeError(
                f"pod {name}: {_FATAL_WAITING[waiting.reason]} ({waiting.reason}: {waiting.message or '-'}{last});"
                f" {hint}"
            )


def _last_exit(status: Any) -> str:
    terminated = status.last_state.terminated if status.last_state is not None else None
    return f"; last exit code {terminated.exit_code}" if terminated is not None else ""


def describe_pod(pod: Any) -> str:
    """One line: name, phase, node, IP, readiness and each container's state."""
    states = []
    for s in pod.status.container_statuses or []:
        state = s.state
        if state is None:
            states.append(f"{s.name}: unknown")
        elif state.waiting is not None:
            states.append(f"{s.name}: waiting ({state.waiting.reason})")
        elif state.terminated is not None:
            states.append(f"{s.name}: terminated ({state.terminated.exit_code})")
        else:
            states.append(f"{s.name}: running, ready={s.ready}, restarts={s.restart_count}")
    conditions = ",".join(f"{c.type}={c.status}" for c in pod.status.conditions or [])
    return (
        f"pod {pod.metadata.name}: {pod.status.phase} on {pod.spec.node_name or '-'} ip {pod.status.pod_ip or '-'}"
        f" [{conditions}] {'; '.join(states) or 'no container status'}"
    )
