"""Pure parts of the kubernetes backend: reading pod states and load-balancer host names.
(The backend itself is proven against a real control plane in test_kube_e2e.py.)"""

from __future__ import annotations

import ipaddress

import pytest
from kubernetes import client

from pytest_svctunnel import kubebackend
from pytest_svctunnel.errors import KubeError


def pod(waiting: str | None = None, unschedulable: bool = False, exit_code: int | None = None) -> client.V1Pod:
    state = client.V1ContainerState(
        waiting=client.V1ContainerStateWaiting(reason=waiting, message="details") if waiting else None,
        running=None if waiting else client.V1ContainerStateRunning(),
    )
    last = (
        client.V1ContainerState(terminated=client.V1ContainerStateTerminated(exit_code=exit_code))
        if exit_code is not None
        else None
    )
    status = client.V1ContainerStatus(
        name="agent", image="i", image_id="", ready=False, restart_count=3, state=state, last_state=last
    )
    conditions = (
        [client.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable", message="0/1 nodes")]
        if unschedulable
        else []
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="p"),
        spec=client.V1PodSpec(containers=[], node_name="n1"),
        status=client.V1PodStatus(phase="Pending", conditions=conditions, container_statuses=[status]),
    )


@pytest.mark.parametrize(
    ("waiting", "says"),
    [
        ("ErrImagePull", "the image cannot be pulled"),
        ("ImagePullBackOff", "kind load docker-image"),
        ("InvalidImageName", "the image name is invalid"),
        ("CreateContainerConfigError", "cannot be configured"),
        ("CrashLoopBackOff", "the agent keeps exiting"),
    ],
)
def test_states_a_pod_cannot_leave_fail_at_once(waiting: str, says: str) -> None:
    with pytest.raises(KubeError, match=says):
        kubebackend._raise_if_stuck(pod(waiting))


def test_a_crash_loop_names_the_last_exit_code() -> None:
    with pytest.raises(KubeError, match="last exit code 2"):
        kubebackend._raise_if_stuck(pod("CrashLoopBackOff", exit_code=2))


def test_an_unschedulable_pod_names_the_node_option() -> None:
    with pytest.raises(KubeError, match=r"cannot be scheduled: 0/1 nodes.*--svctunnel-node"):
        kubebackend._raise_if_stuck(pod(unschedulable=True))


@pytest.mark.parametrize("waiting", [None, "ContainerCreating", "PodInitializing"])
def test_states_on_the_way_are_waited_for(waiting: str | None) -> None:
    kubebackend._raise_if_stuck(pod(waiting))


def test_pod_line_has_phase_node_and_container_state() -> None:
    line = kubebackend.describe_pod(pod("ImagePullBackOff"))
    assert line == "pod p: Pending on n1 ip - [] agent: waiting (ImagePullBackOff)"


def test_a_load_balancer_host_name_resolves() -> None:
    assert kubebackend._resolve("localhost") in {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert kubebackend._resolve("no-such-host.invalid") is None
