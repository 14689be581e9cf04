"""Pure parts of the kubernetes backend: reading pods container by container (regular, init and
ephemeral), load-balancer host names, and interrupts during a request. The backend itself is
proven against a real control plane in test_kube_e2e.py."""

from __future__ import annotations

import ipaddress
import os
import signal
from typing import Any

import pytest

from pytest_svctunnel.backends.kubernetes import objects, podstate
from pytest_svctunnel.backends.kubernetes.client import Cluster
from pytest_svctunnel.backends.kubernetes.resources import Resource
from pytest_svctunnel.errors import ConfigError, KubeError
from pytest_svctunnel.waiting import Deadline


def status(name: str, waiting: str | None = None, exit_code: int | None = None) -> dict[str, Any]:
    """A container's status as the API server sends it (JSON)."""
    found: dict[str, Any] = {
        "name": name,
        "image": "i",
        "imageID": "",
        "ready": False,
        "restartCount": 3,
        "state": {"waiting": {"reason": waiting, "message": "details"}} if waiting else {"running": {}},
    }
    if exit_code is not None:
        found["lastState"] = {"terminated": {"exitCode": exit_code}}
    return found


def pod(
    waiting: str | None = None,
    unschedulable: bool = False,
    exit_code: int | None = None,
    init: list[dict[str, Any]] | None = None,
    ephemeral: list[dict[str, Any]] | None = None,
) -> Resource:
    """A pending pod as the API server sends it, read as the backend reads it."""
    conditions = (
        [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]
        if unschedulable
        else []
    )
    status_: dict[str, Any] = {
        "phase": "Pending",
        "conditions": conditions,
        "containerStatuses": [status("agent", waiting, exit_code)],
    }
    if init is not None:
        status_["initContainerStatuses"] = init
    if ephemeral is not None:
        status_["ephemeralContainerStatuses"] = ephemeral
    return Resource({"metadata": {"name": "p"}, "spec": {"containers": [], "nodeName": "n1"}, "status": status_})


@pytest.mark.parametrize(
    ("waiting", "says"),
    [
        ("ErrImagePull", "its image cannot be pulled"),
        ("ImagePullBackOff", "kind load docker-image"),
        ("InvalidImageName", "its image name is invalid"),
        ("ErrImageNeverPull", "may not be pulled"),
        ("CreateContainerConfigError", "cannot be configured"),
        ("CrashLoopBackOff", "it keeps exiting"),
    ],
)
def test_states_a_pod_cannot_leave_fail_at_once(waiting: str, says: str) -> None:
    with pytest.raises(KubeError, match=f"pod p, container agent: .*{says}"):
        podstate.raise_if_stuck(pod(waiting), "agent")


def test_a_crash_loop_names_the_last_exit_code() -> None:
    with pytest.raises(KubeError, match="last exit code 2"):
        podstate.raise_if_stuck(pod("CrashLoopBackOff", exit_code=2))


def test_an_unschedulable_pod_names_the_node_option() -> None:
    with pytest.raises(KubeError, match=r"cannot be scheduled: 0/1 nodes.*--svctunnel-node"):
        podstate.raise_if_stuck(pod(unschedulable=True), "agent")


@pytest.mark.parametrize("waiting", [None, "ContainerCreating", "PodInitializing"])
def test_states_on_the_way_are_waited_for(waiting: str | None) -> None:
    podstate.raise_if_stuck(pod(waiting), "agent")


CONTAINERS: dict[str, dict[str, Any]] = {
    # the pod's own container runs; ours is the init (sidecar) or ephemeral one
    "ephemeral": {"ephemeral": [status("svctunnel-x1", "ErrImagePull")]},
    "init-sidecar": {"init": [status("svctunnel-x1", "CrashLoopBackOff", exit_code=1)]},
}


@pytest.mark.parametrize("kind", list(CONTAINERS))
def test_the_named_container_is_found_whatever_its_kind(kind: str) -> None:
    stuck = pod(**CONTAINERS[kind])
    found = podstate.container_status(stuck, "svctunnel-x1")
    assert found is not None and found.kind == kind.split("-")[0] and found.name == "svctunnel-x1"
    assert podstate.running(stuck, "agent") and not podstate.running(stuck, "svctunnel-x1")
    with pytest.raises(KubeError, match=f"container {kind.split('-')[0]} svctunnel-x1: "):
        podstate.raise_if_stuck(stuck, "svctunnel-x1")


def test_an_ephemeral_containers_state_is_not_the_pods() -> None:
    podstate.raise_if_stuck(pod(**CONTAINERS["ephemeral"]), "agent")


def test_a_stuck_init_container_holds_every_container_back() -> None:
    with pytest.raises(KubeError, match="container init svctunnel-x1: it keeps exiting"):
        podstate.raise_if_stuck(pod(**CONTAINERS["init-sidecar"]), "agent")


def test_a_container_not_reported_yet_is_not_running() -> None:
    assert podstate.container_status(pod(), "svctunnel-x1") is None
    assert not podstate.running(pod(), "svctunnel-x1")


def test_pod_line_has_phase_node_and_every_containers_state() -> None:
    line = podstate.describe_pod(pod("ImagePullBackOff"))
    assert line == "pod p: Pending on n1 ip - [] agent: waiting (ImagePullBackOff)"
    both = podstate.describe_pod(pod(ephemeral=[status("svctunnel-x1")], init=[status("setup", "CrashLoopBackOff")]))
    assert both.endswith(
        "init setup: waiting (CrashLoopBackOff); agent: running, ready=False, restarts=3;"
        " ephemeral svctunnel-x1: running, ready=False, restarts=3"
    )


def test_a_load_balancer_host_name_resolves() -> None:
    assert objects.resolve("localhost") in {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert objects.resolve("no-such-host.invalid") is None


def test_an_interrupt_during_an_api_request_is_not_swallowed() -> None:
    """The client can catch whatever is raised inside it and raise something else (pydantic turned
    a SIGTERM's KeyboardInterrupt into a ValidationError): an interrupt waits for the request."""

    def swallowing_request(*, _request_timeout: float) -> str:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the client works
            for _ in range(1000):
                pass  # the interpreter runs handlers between instructions
        except BaseException as exc:  # what the client's validation does with it
            raise ValueError(f"validation error: {exc!r}") from None
        return "response"

    cluster = Cluster(api=None, source="test")
    with pytest.raises(KeyboardInterrupt):
        cluster.call("reading something", swallowing_request, deadline=Deadline.after(5))


def service(ip_mode: str | None) -> Resource:
    ingress = {"ip": "198.51.100.10"} | ({"ipMode": ip_mode} if ip_mode else {})
    return Resource({"metadata": {"namespace": "ns", "name": "s"}, "status": {"loadBalancer": {"ingress": [ingress]}}})


@pytest.mark.parametrize("ip_mode", [None, "VIP"])
def test_a_routing_load_balancer_carries_a_pinned_peer_and_node_mode(ip_mode: str | None) -> None:
    assert not objects.proxied(service(ip_mode))
    objects.refuse_proxy(service(ip_mode), ipaddress.ip_address("192.0.2.1"), "node1", 5533)


def test_a_proxying_load_balancer_refuses_a_pinned_peer_and_node_mode_naming_the_remedy() -> None:
    svc = service("Proxy")
    assert objects.proxied(svc)
    objects.refuse_proxy(svc, None, None, 5533)  # the plain pod mode works through it
    with pytest.raises(ConfigError, match=r"--svctunnel-peer 192.0.2.1 cannot work here: Service ns/s.*ipMode Proxy"):
        objects.refuse_proxy(svc, ipaddress.ip_address("192.0.2.1"), None, 5533)
    with pytest.raises(ConfigError, match=r"node mode .* port 5533; node mode needs .*MetalLB"):
        objects.refuse_proxy(svc, None, "node1", 5533)
