"""What the cluster must allow before a network is injected into someone's pod, asked of the API
server before anything is created: a release with ephemeral containers, a namespace whose Pod
Security level admits NET_ADMIN, and the permissions of the kubeconfig's user.

Each problem is one line naming the fix; all of them are reported together, so one run shows
everything that has to change. Pure but for ``check_injection``, which asks the API server
(``version``, ``namespace``, one SelfSubjectAccessReview per permission).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ...errors import KubeError
from ...waiting import Deadline
from .client import Cluster
from .resources import ACCESS_REVIEWS, NAMESPACES

EPHEMERAL_SINCE = (1, 25)  # pods/ephemeralcontainers is stable from this release on
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
PSA_REFUSING = ("baseline", "restricted")  # both forbid adding NET_ADMIN and NET_RAW


@dataclass(frozen=True)
class Permission:
    """One verb on one resource (``resource/subresource``) of the core API group, in a namespace."""

    verb: str
    resource: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}"


# what injecting into a running pod does in the target's namespace
INJECTION_NEEDS = (
    Permission("get", "pods"),
    Permission("list", "pods"),
    Permission("patch", "pods"),  # the run's label on the target pod, so that its Service selects it alone
    Permission("patch", "pods/ephemeralcontainers"),
    Permission("create", "services"),
    Permission("delete", "services"),
    Permission("get", "services"),  # its load-balancer address
    Permission("create", "secrets"),  # the session key, which the agent reads from a Secret
    Permission("delete", "secrets"),
)


# what a sidecar needs: its Secret and Service, and finding its pod
SIDECAR_NEEDS = (
    Permission("list", "pods"),
    Permission("get", "pods"),
    Permission("create", "services"),
    Permission("delete", "services"),
    Permission("get", "services"),
    Permission("create", "secrets"),
    Permission("delete", "secrets"),
)
SIDECAR_SINCE = (1, 29)  # restartable init containers, on by default from this release on


def version_problem(major: str, minor: str, since: tuple[int, int] = EPHEMERAL_SINCE) -> str | None:
    """Why a server of this version cannot take ephemeral containers, or None. ``minor`` may carry
    a vendor suffix (``"27+"``)."""
    digits = re.match(r"\d+", minor)
    if not major.isdigit() or digits is None:
        return None  # a version the server does not state plainly: let the request itself tell
    found = (int(major), int(digits.group()))
    if found >= since:
        return None
    need = ".".join(map(str, since))
    if since == SIDECAR_SINCE:
        return (
            f"the cluster runs Kubernetes {found[0]}.{found[1]}, which has no native sidecars;"
            f" the sidecar way needs {need} or newer (or inject into the running pod)"
        )
    return (
        f"the cluster runs Kubernetes {found[0]}.{found[1]}, which has no ephemeral containers;"
        f" injecting a network needs {need} or newer (or use the sidecar way)"
    )


def pod_security_problem(namespace: str, labels: dict[str, str] | None) -> str | None:
    """Why the namespace's Pod Security level refuses the agent's capabilities, or None."""
    level = (labels or {}).get(PSA_ENFORCE)
    if level not in PSA_REFUSING:
        return None
    return (
        f"namespace {namespace} enforces Pod Security level {level!r} ({PSA_ENFORCE}), which refuses the"
        f" agent's NET_ADMIN and NET_RAW; allow them with"
        f" 'kubectl label namespace {namespace} {PSA_ENFORCE}=privileged --overwrite', or target a"
        " namespace that allows them"
    )


def permission_problem(namespace: str, denied: list[Permission]) -> str | None:
    """The permissions the user lacks, with a Role that grants them, or None."""
    if not denied:
        return None
    rules = "; ".join(f"{p.verb} on {p.resource}" for p in denied)
    return (
        f"the kubeconfig's user may not {', '.join(map(str, denied))} in namespace {namespace};"
        f" grant a Role there with: {rules} (the built-in admin and edit roles do not include"
        " pods/ephemeralcontainers)"
    )


def check_injection(cluster: Cluster, namespace: str, deadline: Deadline) -> None:
    """Raise one KubeError listing every reason the cluster refuses injection into ``namespace``."""
    _check(cluster, namespace, deadline, INJECTION_NEEDS, EPHEMERAL_SINCE, "cannot inject a network")


def check_sidecar(cluster: Cluster, namespace: str, deadline: Deadline) -> None:
    """Raise one KubeError listing every reason the cluster refuses a sidecar's pod in ``namespace``."""
    _check(cluster, namespace, deadline, SIDECAR_NEEDS, SIDECAR_SINCE, "cannot give a pod the svctunnel sidecar")


def _check(
    cluster: Cluster,
    namespace: str,
    deadline: Deadline,
    needs: tuple[Permission, ...],
    since: tuple[int, int],
    what: str,
) -> None:
    problems = [
        version_problem(*_server_version(cluster, deadline), since),
        pod_security_problem(namespace, _namespace_labels(cluster, namespace, deadline)),
        permission_problem(namespace, [p for p in needs if not _allowed(cluster, namespace, p, deadline)]),
    ]
    found = [p for p in problems if p is not None]
    if found:
        raise KubeError(f"{what}: " + "; and ".join(found))


def _server_version(cluster: Cluster, deadline: Deadline) -> tuple[str, str]:
    info = cluster.get("reading the server's version", "/version", deadline=deadline)
    return str(info.major), str(info.minor)


def _namespace_labels(cluster: Cluster, namespace: str, deadline: Deadline) -> dict[str, str] | None:
    """The namespace's labels; None when the user may not read namespaces (the admission of the
    injection itself then tells)."""
    try:
        found: Any = cluster.get(
            f"reading namespace {namespace}", NAMESPACES.path(name=namespace), deadline=deadline, missing_ok=True
        )
    except KubeError as exc:
        if exc.status == 403:
            return None
        raise
    if found is None:
        raise KubeError(f"namespace {namespace} does not exist; check the target's namespace")
    labels = found.metadata.labels
    return dict(labels.raw) if labels is not None else {}


def _allowed(cluster: Cluster, namespace: str, permission: Permission, deadline: Deadline) -> bool:
    resource, _, subresource = permission.resource.partition("/")
    attributes = {"namespace": namespace, "verb": permission.verb, "resource": resource}
    if subresource:
        attributes["subresource"] = subresource
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    answer: Any = cluster.post(
        f"asking whether the user may {permission} in {namespace}", ACCESS_REVIEWS.path(), review, deadline=deadline
    )
    return bool(answer.status.allowed)
