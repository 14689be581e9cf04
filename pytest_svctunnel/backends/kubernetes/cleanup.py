"""Deleting a run's objects from the cluster and waiting until they are gone.

Used by the backend's teardown and by ``svctunnel reap`` (from what a run recorded). Every
request, the listings included, goes through ``Cluster.call``: bounded by the deadline, and an
API error or an API server that does not answer is a KubeError with a remedy.
"""

from __future__ import annotations

from typing import Any

from ...waiting import Deadline, wait_for
from .client import Cluster, connect
from .options import Placement
from .resources import DEPLOYMENTS, NAMESPACES, PODS, SECRETS, SERVICES, Kind

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
    path = NAMESPACES.path(name=namespace)
    cluster.delete(f"deleting namespace {namespace}", path, deadline=deadline, missing_ok=True)

    def gone() -> bool | None:
        found = cluster.get(f"reading namespace {namespace}", path, deadline=deadline, missing_ok=True)
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
    ns, selector = placement.namespace, placement.selector
    for kind in (DEPLOYMENTS, SECRETS):
        cluster.delete(
            f"deleting {kind.plural} -l {selector} in {ns}",
            kind.path(ns),
            query={"labelSelector": selector, "propagationPolicy": "Foreground"},
            deadline=deadline,
        )
    for name in _names(cluster, SERVICES, placement, deadline):  # Services have no delete-collection
        cluster.delete(f"deleting Service {ns}/{name}", SERVICES.path(ns, name), deadline=deadline, missing_ok=True)
    # the Deployment goes in the foreground: once it is on its way out, its ReplicaSet and pods go before it
    kinds = (DEPLOYMENTS, PODS, SERVICES, SECRETS) if wait else (DEPLOYMENTS, SERVICES, SECRETS)

    def left() -> list[str]:
        return [
            f"{kind.plural}: {', '.join(found)}"
            for kind in kinds
            if (found := _names(cluster, kind, placement, deadline, staying=not wait))
        ]

    wait_for(
        lambda: True if not left() else None,
        phase=f"objects -l {selector} removed from {ns}" if wait else f"objects -l {selector} in {ns} terminating",
        deadline=deadline,
        describe=lambda: "; ".join(left()),
        interval=_POLL_S,
    )


def _names(cluster: Cluster, kind: Kind, placement: Placement, deadline: Deadline, staying: bool = False) -> list[str]:
    """The names of the run's objects of one kind; with ``staying``, only those not yet on their way out."""
    ns, selector = placement.namespace, placement.selector
    what = f"listing {kind.plural} -l {selector} in {ns}"
    found = cluster.items(what, kind.path(ns), selector=selector, deadline=deadline)
    return [str(o.metadata.name) for o in found if not (staying and _leaving(o))]
