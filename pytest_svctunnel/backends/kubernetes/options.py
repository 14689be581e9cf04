"""What the kubernetes backend is told: which cluster, and how to run the pod end there.

Plain values, light to import: the plugin's option table reads the defaults from here
without loading the Kubernetes client.
"""

from __future__ import annotations

from dataclasses import dataclass

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
