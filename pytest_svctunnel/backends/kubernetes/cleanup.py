"""Deleting a run's objects from the cluster and waiting until they are gone.

Used by the backend's teardown and by ``svctunnel reap`` (from what a run recorded). Every
request, the listings included, goes through ``Cluster.call``: bounded by the deadline, and an
API error or an API server that does not answer is a KubeError with a remedy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...waiting import Deadline, wait_for
from .client import Cluster, connect
from .options import Placement

_POLL_S = 0.2


def delete_run_objects(cluster: Cluster, placement: Placement, deadline: Deadline) -> None:
    """Delete a run's objects (its namespace, if it made one) and wait until they are gone."""
    if placement.owns_namespace:
        _delete_namespace(cluster, placement.namespace, deadline)
    else:
        _delete_labelled(cluster, placement, deadline)


def delete_recorded(record: dict[str, Any], deadline: Deadline) -> None:
    """Delete a run's objects from what it recorded (for 'svctunnel reap')."""
    placement, target = Placement.from_record(record)
    cluster = connect(target.kubeconfig, target.context)
    try:
        delete_run_objects(cluster, placement, deadline)
    finally:
        cluster.close()


def _delete_namespace(cluster: Cluster, namespace: str, deadline: Deadline) -> None:
    core = cluster.core
    cluster.call(
        f"deleting namespace {namespace}", core.delete_namespace, namespace, deadline=deadline, missing_ok=True
    )

    def gone() -> bool | None:
        found = cluster.call(
            f"reading namespace {namespace}", core.read_namespace, namespace, deadline=deadline, missing_ok=True
        )
        return True if found is None else None

    wait_for(
        gone,
        phase=f"namespace {namespace} removed",
        deadline=deadline,
        hint="the namespace controller of the cluster finalizes namespaces; check kube-controller-manager",
        interval=_POLL_S,
    )


def _delete_labelled(cluster: Cluster, placement: Placement, deadline: Deadline) -> None:
    core, apps, ns, selector = cluster.core, cluster.apps, placement.namespace, placement.selector
    deleters: list[tuple[str, Callable[..., Any]]] = [
        ("Deployments", apps.delete_collection_namespaced_deployment),
        ("Secrets", core.delete_collection_namespaced_secret),
    ]
    for kind, delete in deleters:
        cluster.call(
            f"deleting {kind} -l {selector} in {ns}",
            delete,
            ns,
            label_selector=selector,
            propagation_policy="Foreground",
            deadline=deadline,
        )
    for name in _names(cluster, "Services", core.list_namespaced_service, placement, deadline):  # no delete-collection
        cluster.call(
            f"deleting Service {ns}/{name}",
            core.delete_namespaced_service,
            name,
            ns,
            deadline=deadline,
            missing_ok=True,
        )
    listers: list[tuple[str, Callable[..., Any]]] = [
        ("Deployments", apps.list_namespaced_deployment),
        ("pods", core.list_namespaced_pod),
        ("Services", core.list_namespaced_service),
        ("Secrets", core.list_namespaced_secret),
    ]

    def left() -> list[str]:
        return [
            f"{kind}: {', '.join(found)}"
            for kind, lister in listers
            if (found := _names(cluster, kind, lister, placement, deadline))
        ]

    wait_for(
        lambda: True if not left() else None,
        phase=f"objects -l {selector} removed from {ns}",
        deadline=deadline,
        describe=lambda: "; ".join(left()),
        interval=_POLL_S,
    )


def _names(
    cluster: Cluster, kind: str, lister: Callable[..., Any], placement: Placement, deadline: Deadline
) -> list[str]:
    listing = cluster.call(
        f"listing {kind} -l {placement.selector} in {placement.namespace}",
        lister,
        placement.namespace,
        label_selector=placement.selector,
        deadline=deadline,
    )
    return [str(o.metadata.name) for o in listing.items]
