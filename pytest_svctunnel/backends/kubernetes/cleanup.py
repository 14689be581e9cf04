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


def delete_run_objects(cluster: Cluster, placement: Placement, deadline: Deadline, wait: bool = True) -> None:
    """Delete a run's objects (its namespace, if it made one) and wait until they are gone; with
    ``wait`` False only until each is provably on its way out (the API server has set its deletion
    timestamp: the cluster finishes the rest, the pods' termination included)."""
    if placement.owns_namespace:
        _delete_namespace(cluster, placement.namespace, deadline, wait)
    else:
        _delete_labelled(cluster, placement, deadline, wait)


def delete_recorded(record: dict[str, Any], deadline: Deadline) -> None:
    """Delete a run's objects from what it recorded (for 'svctunnel reap')."""
    placement, target = Placement.from_record(record)
    cluster = connect(target.kubeconfig, target.context)
    try:
        delete_run_objects(cluster, placement, deadline)
    finally:
        cluster.close()


def _delete_namespace(cluster: Cluster, namespace: str, deadline: Deadline, wait: bool) -> None:
    core = cluster.core
    cluster.call(
        f"deleting namespace {namespace}", core.delete_namespace, namespace, deadline=deadline, missing_ok=True
    )

    def gone() -> bool | None:
        found = cluster.call(
            f"reading namespace {namespace}", core.read_namespace, namespace, deadline=deadline, missing_ok=True
        )
        return True if found is None or (not wait and _leaving(found)) else None

    wait_for(
        gone,
        phase=f"namespace {namespace} removed" if wait else f"namespace {namespace} terminating",
        deadline=deadline,
        hint="the namespace controller of the cluster finalizes namespaces; check kube-controller-manager",
        interval=_POLL_S,
    )


def _leaving(obj: Any) -> bool:
    """Whether the API server has set the object's deletion timestamp: it is on its way out."""
    return obj.metadata.deletion_timestamp is not None


def _delete_labelled(cluster: Cluster, placement: Placement, deadline: Deadline, wait: bool) -> None:
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

    if not wait:  # the Deployment goes in the foreground: its ReplicaSet and pods go before it
        listers = listers[:1] + listers[2:]

    def left() -> list[str]:
        return [
            f"{kind}: {', '.join(found)}"
            for kind, lister in listers
            if (found := _names(cluster, kind, lister, placement, deadline, staying=not wait))
        ]

    wait_for(
        lambda: True if not left() else None,
        phase=f"objects -l {selector} removed from {ns}" if wait else f"objects -l {selector} in {ns} terminating",
        deadline=deadline,
        describe=lambda: "; ".join(left()),
        interval=_POLL_S,
    )


def _names(
    cluster: Cluster,
    kind: str,
    lister: Callable[..., Any],
    placement: Placement,
    deadline: Deadline,
    staying: bool = False,
) -> list[str]:
    """The names of the run's objects of one kind; with ``staying``, only those not yet on their way out."""
    listing = cluster.call(
        f"listing {kind} -l {placement.selector} in {placement.namespace}",
        lister,
        placement.namespace,
        label_selector=placement.selector,
        deadline=deadline,
    )
    return [str(o.metadata.name) for o in listing.items if not (staying and _leaving(o))]
