"""Scheduling for the mini kubelet's one node, as pure functions over raw objects: which pods wait for a node,
and whether a pod fits the node (nodeSelector, required node affinity, unschedulable, taints and tolerations)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from .kubewatch import Obj


def wants_scheduling(pod: Obj) -> bool:
    """A pending pod of the default scheduler that has no node yet and is not being deleted."""
    spec, meta = pod["spec"], pod["metadata"]
    return (
        not spec.get("nodeName")
        and not meta.get("deletionTimestamp")
        and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
        and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
    )


def _tolerates(toleration: Obj, taint: Obj) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    operator = toleration.get("operator") or "Equal"
    if not toleration.get("key"):
        return operator == "Exists"  # an empty key with Exists tolerates every taint
    if toleration["key"] != taint.get("key"):
        return False
    return operator == "Exists" or (toleration.get("value") or "") == (taint.get("value") or "")


def _requirement_holds(requirement: Obj, values: Mapping[str, str]) -> bool:
    key, operator, wanted = requirement.get("key", ""), requirement.get("operator"), requirement.get("values") or []
    if operator == "In":
        return key in values and values[key] in wanted
    if operator == "NotIn":
        return key not in values or values[key] not in wanted
    if operator == "Exists":
        return key in values
    if operator == "DoesNotExist":
        return key not in values
    if operator in ("Gt", "Lt") and key in values and len(wanted) == 1:
        with contextlib.suppress(ValueError):
            have, limit = int(values[key]), int(wanted[0])
            return have > limit if operator == "Gt" else have < limit
    return False


def _affinity_holds(pod: Obj, node: Obj) -> bool:
    """The pod's requiredDuringScheduling node affinity: terms are ORed, their requirements ANDed."""
    affinity = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if not affinity:
        return True
    labels = node["metadata"].get("labels") or {}
    fields = {"metadata.name": node["metadata"]["name"]}
    return any(
        all(_requirement_holds(r, labels) for r in term.get("matchExpressions") or [])
        and all(_requirement_holds(r, fields) for r in term.get("matchFields") or [])
        for term in affinity.get("nodeSelectorTerms") or []
    )


def unschedulable_reason(pod: Obj, node: Obj) -> str | None:
    """Why ``pod`` cannot run on ``node``, in the scheduler's words, or None if it fits."""
    labels = node["metadata"].get("labels") or {}
    selector = pod["spec"].get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()) or not _affinity_holds(pod, node):
        return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    if (node.get("spec") or {}).get("unschedulable"):
        return "0/1 nodes are available: 1 node(s) were unschedulable."
    tolerations = pod["spec"].get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(_tolerates(t, taint) for t in tolerations):
            return (
                "0/1 nodes are available: 1 node(s) had untolerated taint "
                f"{{{taint.get('key')}: {taint.get('value') or ''}}}."
            )
    return None
