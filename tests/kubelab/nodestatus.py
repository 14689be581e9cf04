"""The node's side of the mini kubelet: reading its Node, posting the Ready condition, lifting the condition
taints nobody else lifts in the test control plane, and renewing its Lease (the heartbeat)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from .errors import KubeletError
from .kubewatch import API_TIMEOUT_S, Obj, drain, now, read_json

log = logging.getLogger(__name__)

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
LEASE_RENEW_S = 10.0
NODE_STATUS_S = 60.0  # the Ready condition is re-posted this often; the Lease is the heartbeat
CONDITION_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def internal_ips(node: Obj) -> list[str]:
    """The node's InternalIP addresses, IPv4 first."""
    found = [a["address"] for a in (node.get("status") or {}).get("addresses") or [] if a.get("type") == "InternalIP"]
    return sorted(found, key=lambda a: ipaddress.ip_address(a).version)


def _micro_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class NodeStatus:
    """The Node ``node_name`` as its kubelet keeps it. ``uid`` (the Node's, set once the kubelet has read it)
    owns the Lease this creates."""

    def __init__(self, api: kubernetes.client.ApiClient, node_name: str) -> None:
        self.core = kubernetes.client.CoreV1Api(api)
        self.coordination = kubernetes.client.CoordinationV1Api(api)
        self.node_name = node_name
        self.uid = ""

    def heartbeat(self, stopping: threading.Event) -> None:
        """Renew the Lease every LEASE_RENEW_S and re-post Ready every NODE_STATUS_S, until ``stopping`` is set."""
        last_status = time.monotonic()
        while not stopping.wait(LEASE_RENEW_S):
            try:
                self.renew_lease()
                if time.monotonic() - last_status >= NODE_STATUS_S:
                    self.post_ready()
                    last_status = time.monotonic()
            except Exception as exc:  # a missed heartbeat is retried at the next one
                log.warning("node %s: heartbeat failed: %r", self.node_name, exc)

    def read(self) -> Obj:
        """The Node; KubeletError when it cannot be read."""
        try:
            return read_json(
                self.core.read_node(self.node_name, _preload_content=False, _request_timeout=API_TIMEOUT_S)
            )
        except ApiException as exc:
            raise KubeletError(
                f"reading node {self.node_name}: {exc.status} {exc.reason}; create it first (ControlPlane.create_node)"
            ) from None

    def post_ready(self) -> None:
        """Post the Ready condition, keeping its transition time while it stays True."""
        conditions = (self.read().get("status") or {}).get("conditions") or []
        ready: Obj = next((c for c in conditions if c.get("type") == "Ready"), {})
        since = ready.get("lastTransitionTime") if ready.get("status") == "True" else None
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "mini kubelet is posting ready status",
            "lastHeartbeatTime": now(),
            "lastTransitionTime": since or now(),
        }
        drain(
            self.core.patch_node_status(
                self.node_name, {"status": {"conditions": [condition]}}, _preload_content=False,
                _request_timeout=API_TIMEOUT_S,
            )
        )  # fmt: skip

    def clear_condition_taints(self) -> None:
        """Remove the not-ready and unreachable taints of a node that is Ready now. The API server's
        TaintNodesByCondition admission puts not-ready:NoSchedule on every new Node; the node lifecycle
        controller, which would lift it, does not run in the test control plane."""
        node = self.read()
        taints = (node.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if t.get("key") not in CONDITION_TAINTS]
        if len(kept) == len(taints):
            return
        patch = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": kept or None}}
        drain(self.core.patch_node(self.node_name, patch, _preload_content=False, _request_timeout=API_TIMEOUT_S))
        log.info(
            "node %s: Ready; removed taints %s",
            self.node_name,
            sorted({t["key"] for t in taints} - {t["key"] for t in kept}),
        )

    def renew_lease(self) -> None:
        """Renew the node's Lease, creating it (owned by the Node) if there is none."""
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_DURATION_S}
        renew = _micro_now()
        try:
            drain(
                self.coordination.patch_namespaced_lease(
                    self.node_name, LEASE_NAMESPACE,
                    {"spec": {**spec, "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}},
                    _preload_content=False, _request_timeout=API_TIMEOUT_S,
                )
            )  # fmt: skip
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        owner = kubernetes.client.V1OwnerReference(api_version="v1", kind="Node", name=self.node_name, uid=self.uid)
        lease = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(
                name=self.node_name, namespace=LEASE_NAMESPACE, owner_references=[owner]
            ),
            spec=kubernetes.client.V1LeaseSpec(
                holder_identity=self.node_name, lease_duration_seconds=LEASE_DURATION_S, renew_time=renew
            ),
        )
        drain(
            self.coordination.create_namespaced_lease(
                LEASE_NAMESPACE, lease, _preload_content=False, _request_timeout=API_TIMEOUT_S
            )
        )
