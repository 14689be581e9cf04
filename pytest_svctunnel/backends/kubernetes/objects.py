"""A run's objects in the cluster: creating them where their ``Placement`` says, and reading
the pods and the Service back; every request carries a deadline (``Cluster.call``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from ...errors import ConfigError, KubeError
from ...protocol import Endpoint
from ...values import IPAddress
from ...waiting import Deadline, wait_for
from . import manifests
from .client import Cluster
from .options import Placement
from .resources import DEPLOYMENTS, EVENTS, NAMESPACES, NODES, PODS, SECRETS, SERVICES

_POLL_S = 0.2


def create(
    cluster: Cluster,
    placement: Placement,
    run_id: str,
    objects: dict[str, manifests.Obj],
    deadline: Deadline,
    before_pod: Callable[[], None] | None = None,
) -> None:
    """Create the run's namespace (when it owns one), then its Service, Secret and Deployment;
    ``before_pod`` runs between the Service and the rest (a check that may refuse the Service).

    The Service goes first: kube-proxy programs a new Service at once but its first endpoint at
    the earliest one minimum sync period (1 s by default, and in KinD) later, and that second
    runs while the pod starts."""
    ns = placement.namespace
    if placement.owns_namespace:
        body = manifests.namespace(ns, run_id)
        cluster.post(f"creating namespace {ns}", NAMESPACES.path(), body, deadline=deadline)
    cluster.post(f"creating Service {placement.name} in {ns}", SERVICES.path(ns), objects["Service"], deadline=deadline)
    if before_pod is not None:
        before_pod()
    for kind, resource in (("Secret", SECRETS), ("Deployment", DEPLOYMENTS)):
        what = f"creating {kind} {placement.name} in {ns}"
        cluster.post(what, resource.path(ns), objects[kind], deadline=deadline)


def pods(cluster: Cluster, placement: Placement, deadline: Deadline) -> list[Any]:
    """The run's pods in its namespace."""
    what = f"listing the pods in {placement.namespace}"
    return cluster.items(what, PODS.path(placement.namespace), selector=placement.selector, deadline=deadline)


def service(cluster: Cluster, placement: Placement, deadline: Deadline) -> Any:
    """The run's Service."""
    what = f"reading Service {placement.namespace}/{placement.name}"
    return cluster.get(what, SERVICES.path(placement.namespace, placement.name), deadline=deadline)


LB_HINT = (
    "the cluster needs a load-balancer provider (KinD: run cloud-provider-kind, or install MetalLB"
    " with an address pool), or use --svctunnel-service-type NodePort"
)


def wait_load_balancer(read: Callable[[], Any], port: int, deadline: Deadline) -> tuple[Any, Endpoint]:
    """The Service (as ``read`` reads it) and where it is reached, once its load-balancer provider
    gave it an address (a host name once it resolves)."""

    def addressed() -> tuple[Any, Endpoint] | None:
        svc = read()
        endpoint = load_balancer_endpoint(svc, port)
        return None if endpoint is None else (svc, endpoint)

    def describe() -> str:
        svc = read()
        return f"Service {svc.metadata.namespace}/{svc.metadata.name} has no load-balancer address"

    return wait_for(
        addressed, phase="load-balancer address", deadline=deadline, describe=describe, hint=LB_HINT, interval=_POLL_S
    )


def proxied(svc: Any) -> bool:
    """Whether the Service's load balancer proxies rather than routes: its ingress says ``ipMode:
    Proxy`` (cloud-provider-kind's Envoy, and cloud proxies), so the pod sees the proxy's address
    and a port it chose, and the proxy delivers to node ports."""
    return any(entry.ip_mode == "Proxy" for entry in svc.status.load_balancer.ingress or [])


def refuse_proxy(svc: Any, peer: IPAddress | None, node: str | None, port: int) -> None:
    """Raise before the pod end exists when a proxying load balancer (``proxied``) can never carry
    what the options ask: a pinned ``peer`` (the pod sees the proxy instead), or node mode (the agent
    on the node's network sees the node port, not the Service's ``port``)."""
    if not proxied(svc):
        return
    where = (
        f"Service {svc.metadata.namespace}/{svc.metadata.name}'s load balancer proxies (its ingress"
        " says ipMode Proxy, as cloud-provider-kind's does)"
    )
    if peer is not None:
        raise ConfigError(
            f"--svctunnel-peer {peer} cannot work here: {where}, so the pod sees the proxy's address and"
            " never yours; leave --svctunnel-peer out (the pod end answers only hellos signed with the"
            " session's key, which keeps strangers out), or use --svctunnel-service-type NodePort or a"
            " load balancer that keeps sources (MetalLB)"
        )
    if node is not None:
        raise ConfigError(
            f"node mode (--svctunnel-node {node}) cannot work here: {where}, and a proxy delivers to the"
            f" node port, where the agent on the node's network does not see the Service's port {port};"
            " node mode needs a load balancer that routes to the Service's port (MetalLB), or leave"
            " --svctunnel-node out to run the pod end in a pod of its own"
        )


def service_endpoint(
    cluster: Cluster, pod: Any, read: Callable[[], Any], service_type: str, port: int, deadline: Deadline
) -> Endpoint:
    """Where the external end sends to: the node port on the pod's node, or (LoadBalancer) the
    Service's load-balancer address once the provider gave it one. ``read`` reads the Service."""
    if service_type == "NodePort":
        return node_port_endpoint(cluster, pod, read(), deadline)
    return wait_load_balancer(read, port, deadline)[1]


def load_balancer_endpoint(svc: Any, port: int) -> Endpoint | None:
    """The Service's first ingress address; a host name (AWS load balancers) once it resolves."""
    for entry in svc.status.load_balancer.ingress or []:
        if entry.ip:
            return Endpoint(ipaddress.ip_address(entry.ip), port)
        if entry.hostname and (address := resolve(entry.hostname)) is not None:
            return Endpoint(address, port)
    return None


def node_port_endpoint(cluster: Cluster, pod: Any, svc: Any, deadline: Deadline) -> Endpoint:
    """The node the pod runs on (externalTrafficPolicy Local answers only there) and the node port."""
    node_port = int(svc.spec.ports[0].node_port)
    if pod.spec.host_network:
        return Endpoint(ipaddress.ip_address(pod.status.pod_ip), node_port)
    name = pod.spec.node_name
    node = cluster.get(f"reading node {name}", NODES.path(name=name), deadline=deadline)
    addresses = {a.type: a.address for a in node.status.addresses or []}
    address = addresses.get("ExternalIP") or addresses.get("InternalIP")
    if not address:
        raise KubeError(f"node {name} reports no InternalIP or ExternalIP address for its node port")
    return Endpoint(ipaddress.ip_address(address), node_port)


def resolve(hostname: str) -> IPAddress | None:
    """An IPv4 address of ``hostname`` (else IPv6), or None while its DNS record is not there yet."""
    try:
        infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_UDP)
    except OSError:
        return None
    addresses = sorted({ipaddress.ip_address(info[4][0]) for info in infos}, key=lambda a: (a.version, a))
    return addresses[0] if addresses else None


def describe_service(svc: Any) -> str:
    """One line: type, name, ports and load-balancer ingress."""
    ingress = [e.ip or e.hostname for e in svc.status.load_balancer.ingress or []]
    ports = ", ".join(f"{p.port}/{p.protocol} node port {p.node_port}" for p in svc.spec.ports)
    where = f"{svc.metadata.namespace}/{svc.metadata.name}"
    return f"{svc.spec.type} {where}: ports {ports}; load-balancer {ingress or 'none'}"


def recent_events(
    cluster: Cluster, namespace: str, deadline: Deadline, count: int = 20, about: str | None = None
) -> str:
    """The namespace's last events (only those about the object named ``about``, when given),
    oldest first, one line each."""
    events = cluster.items(
        f"listing events in {namespace}",
        EVENTS.path(namespace),
        fields=None if about is None else f"involvedObject.name={about}",
        deadline=deadline,
    )
    items = sorted(events, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp or "")
    lines = [f"{e.type} {e.involved_object.kind}/{e.involved_object.name} {e.reason}: {e.message}" for e in items]
    return "\n".join(lines[-count:]) or "no events"
