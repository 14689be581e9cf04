"""Reading the API's JSON as the backend does, and the URL paths of the kinds it uses (pure
logic; the requests themselves go to a real API server in test_kube_e2e.py)."""

from __future__ import annotations

import pytest

from pytest_svctunnel.backends.kubernetes.resources import DEPLOYMENTS, NAMESPACES, NODES, PODS, Resource

POD = {
    "metadata": {"name": "p", "labels": {"app": "x"}, "deletionTimestamp": None},
    "spec": {"nodeName": "n1", "hostNetwork": True},
    "status": {"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}], "phase": "Running"},
}


def test_client_names_find_the_json_fields_whatever_their_case() -> None:
    pod = Resource(POD)
    assert pod.spec.node_name == "n1" and pod.spec.host_network is True
    assert pod.status.pod_ip == "10.0.0.5"  # podIP, not podIp
    assert [entry.ip for entry in pod.status.pod_ips] == ["10.0.0.5", "fd00::5"]
    assert pod.metadata.labels.raw == {"app": "x"}


def test_missing_fields_read_as_none_and_objects_keep_their_json() -> None:
    pod = Resource(POD)
    assert pod.metadata.deletion_timestamp is None
    assert pod.status.container_statuses is None
    assert pod.spec.raw is POD["spec"]
    with pytest.raises(AttributeError):
        pod.__wrapped__  # noqa: B018  (dunder names are never fields)


def test_paths_of_namespaced_and_cluster_kinds() -> None:
    assert NAMESPACES.path() == "/api/v1/namespaces"
    assert NAMESPACES.path(name="svctunnel-1a2b3c") == "/api/v1/namespaces/svctunnel-1a2b3c"
    assert NODES.path(name="node/1") == "/api/v1/nodes/node%2F1"
    assert DEPLOYMENTS.path("ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert PODS.path("ns", "p", "ephemeralcontainers") == "/api/v1/namespaces/ns/pods/p/ephemeralcontainers"
    with pytest.raises(ValueError, match="live in a namespace"):
        PODS.path()
