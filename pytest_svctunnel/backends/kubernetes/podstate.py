"""Reading pods, container by container: regular, init (native sidecars too) and ephemeral.

Whether a named container runs, whether a pod is stuck in a state it cannot leave (image
pull errors, crash loops, unschedulable), one line per pod for reports, and pod logs that
name their container. Pure but for ``read_logs``, which asks the API server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import KubeError
from ...waiting import Deadline
from .client import Cluster
from .resources import PODS

FATAL_WAITING = {
    "ErrImagePull": "its image cannot be pulled",
    "ImagePullBackOff": "its image cannot be pulled",
    "InvalidImageName": "its image name is invalid",
    "ErrImageNeverPull": "its image is not on the node and may not be pulled",
    "CreateContainerConfigError": "it cannot be configured",
    "CreateContainerError": "it cannot be created",
    "CrashLoopBackOff": "it keeps exiting",
}
IMAGE_HINT = (
    "build the agent image from the Dockerfile and make it available to the cluster"
    " (KinD: 'kind load docker-image IMAGE'), or pass --svctunnel-image"
)
LOG_LINES = 60
LOG_READ_S = 10.0


@dataclass(frozen=True)
class ContainerStatus:
    """One container's status with the kind of container it belongs to."""

    kind: str  # "container", "init" or "ephemeral"
    status: Any  # kubernetes.client.V1ContainerStatus

    @property
    def name(self) -> str:
        return str(self.status.name)

    @property
    def label(self) -> str:
        return self.name if self.kind == "container" else f"{self.kind} {self.name}"


def statuses(pod: Any) -> list[ContainerStatus]:
    """Every container status of the pod: init containers, containers, ephemeral containers."""
    status = pod.status
    return [
        ContainerStatus(kind, entry)
        for kind, entries in (
            ("init", status.init_container_statuses),
            ("container", status.container_statuses),
            ("ephemeral", status.ephemeral_container_statuses),
        )
        for entry in entries or []
    ]


def container_status(pod: Any, container: str) -> ContainerStatus | None:
    """The status of the named container, whatever its kind; None until the kubelet reports it."""
    return next((s for s in statuses(pod) if s.name == container), None)


def running(pod: Any, container: str) -> bool:
    """Whether the named container runs now."""
    found = container_status(pod, container)
    return found is not None and found.status.state is not None and found.status.state.running is not None


def raise_if_stuck(pod: Any, container: str | None = None) -> None:
    """Raise KubeError if the pod cannot be scheduled, or the named container (every container,
    when None) or an init container (it holds the others back) waits in a state it cannot leave;
    the message names the pod, container and remedy."""
    name = pod.metadata.name
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            raise KubeError(
                f"pod {name} cannot be scheduled: {condition.message}; check --svctunnel-node and that the"
                " cluster has a ready node that accepts it"
            )
    for entry in statuses(pod):
        if container is not None and entry.name != container and entry.kind != "init":
            continue
        state = entry.status.state
        waiting = state.waiting if state is not None else None
        if waiting is not None and waiting.reason in FATAL_WAITING:
            what = FATAL_WAITING[waiting.reason]
            hint = IMAGE_HINT if "image" in what else "see its log below"
            raise KubeError(
                f"pod {name}, container {entry.label}: {what} ({waiting.reason}: {waiting.message or '-'}"
                f"{_last_exit(entry.status)}); {hint}"
            )


def _last_exit(status: Any) -> str:
    terminated = status.last_state.terminated if status.last_state is not None else None
    return f"; last exit code {terminated.exit_code}" if terminated is not None else ""


def describe_container(entry: ContainerStatus) -> str:
    state, label = entry.status.state, entry.label
    if state is None:
        return f"{label}: unknown"
    if state.waiting is not None:
        return f"{label}: waiting ({state.waiting.reason})"
    if state.terminated is not None:
        return f"{label}: terminated ({state.terminated.exit_code})"
    return f"{label}: running, ready={entry.status.ready}, restarts={entry.status.restart_count}"


def describe_pod(pod: Any) -> str:
    """One line: name, phase, node, IP, conditions and each container's state."""
    conditions = ",".join(f"{c.type}={c.status}" for c in pod.status.conditions or [])
    containers = "; ".join(describe_container(entry) for entry in statuses(pod)) or "no container status"
    return (
        f"pod {pod.metadata.name}: {pod.status.phase} on {pod.spec.node_name or '-'} ip {pod.status.pod_ip or '-'}"
        f" [{conditions}] {containers}"
    )


def read_logs(cluster: Cluster, namespace: str, pods: list[Any], container: str) -> str:
    """The last lines of the named container's log in each pod, each titled ``pod/container``."""
    parts = []
    for pod in pods:
        name = pod.metadata.name
        text = cluster.text(
            f"reading the log of {namespace}/{name} container {container}",
            PODS.path(namespace, name, "log"),
            query={"container": container, "tailLines": LOG_LINES},
            deadline=Deadline.after(LOG_READ_S),
        )
        parts.append(f"--- {name}/{container}\n{text}")
    return "\n".join(parts) or "no pods"
