"""What the kubernetes backend is told: which cluster, how to run the pod end there, and where
a run's objects live (what a run records for ``svctunnel reap``).

Plain values, light to import: the plugin's option table reads the defaults from here
without loading the Kubernetes client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ... import names
from ...errors import KubeError
from ...protocol import DEFAULT_PORT
from ...values import IPAddress

DEFAULT_IMAGE = "svctunnel-agent:0.1.0"  # built from the Dockerfile; a fixed tag, so KinD never pulls it
SERVICE_TYPES = ("LoadBalancer", "NodePort")


@dataclass(frozen=True)
class ClusterTarget:
    """Which cluster: a kubeconfig (default: $KUBECONFIG, then ~/.kube/config) and a context in it."""

    kubeconfig: str | None = None
    context: str | None = None


@dataclass(frozen=True)
class PodEndOptions:
    """How the pod end runs: port, pinned peer, namespace (None: a fresh one per run), image,
    Service type, and node mode (hostNetwork on ``node``, devices joining ``bridge``)."""

    port: int = DEFAULT_PORT
    peer: IPAddress | None = None
    namespace: str | None = None
    image: str = DEFAULT_IMAGE
    service_type: str = "LoadBalancer"
    node: str | None = None
    bridge: str | None = None


@dataclass(frozen=True)
class Placement:
    """Where a run's objects live: ``namespace`` (made by the run when ``owns_namespace``),
    their name, and the selector of the run label that finds every one of them."""

    namespace: str
    owns_namespace: bool
    name: str
    selector: str

    @classmethod
    def of(cls, run_id: str, namespace: str | None) -> Placement:
        name = names.object_name(run_id)
        return cls(namespace or name, namespace is None, name, names.label_selector(run_id))

    def record(self, target: ClusterTarget) -> dict[str, Any]:
        """What a run writes to its state directory, so that ``svctunnel reap`` finds the objects."""
        return {
            "kubeconfig": target.kubeconfig,
            "context": target.context,
            "namespace": self.namespace,
            "owns_namespace": self.owns_namespace,
            "name": self.name,
            "selector": self.selector,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> tuple[Placement, ClusterTarget]:
        try:
            namespace, owns, selector = (
                str(record["namespace"]),
                bool(record["owns_namespace"]),
                str(record["selector"]),
            )
        except KeyError as exc:
            raise KubeError(f"the run's record of its Kubernetes objects has no {exc}; delete them by hand") from None
        placement = cls(namespace, owns, str(record.get("name") or ""), selector)  # older records have no name
        return placement, ClusterTarget(record.get("kubeconfig"), record.get("context"))

    def describe(self) -> str:
        return (
            f"namespace {self.namespace}" if self.owns_namespace else f"objects -l {self.selector} in {self.namespace}"
        )
