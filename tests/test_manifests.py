"""The manifests: hand-applicable YAML, least privilege, the Service shape the tunnel needs,
and the objects the kubernetes backend renders from them for each session mode."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pytest_svctunnel import agentsettings
from pytest_svctunnel.agentsettings import AgentSettings
from pytest_svctunnel.backends.kubernetes import manifests as render
from pytest_svctunnel.backends.kubernetes.backend import AGENT_CONTAINER
from pytest_svctunnel.names import RUN_LABEL

MANIFESTS = Path(__file__).parent.parent / "manifests"
KEY = "ab" * 32


def _hand_docs() -> dict[str, Any]:
    text = (MANIFESTS / "svctunnel.yaml").read_text()
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


AGENT_FIELDS = {"port", "peer", "bridge", "host_network", "key"}


def _end(**changes: Any) -> render.PodEnd:
    agent: dict[str, Any] = {"key": bytes.fromhex(KEY), "ready_file": Path(render.READY_FILE)}
    agent.update({k: v for k, v in changes.items() if k in AGENT_FIELDS})
    values: dict[str, Any] = {
        "name": "svctunnel-abc123",
        "run_id": "abc123",
        "image": "svctunnel-agent:0.1.0",
        "agent": AgentSettings(**agent),
    }
    values.update({k: v for k, v in changes.items() if k not in AGENT_FIELDS})
    return render.PodEnd(**values)


def _pod_spec(objects: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = objects["Deployment"]["spec"]["template"]["spec"]
    return spec


def _env(objects: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod_spec(objects)["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_hand_manifest_parses_and_documents_every_placeholder() -> None:
    text = (MANIFESTS / "svctunnel.yaml").read_text()
    assert set(_hand_docs()) == {"Secret", "Deployment", "Service"}
    used = set(re.findall(r"__[A-Z]+__", text.split("apiVersion", 1)[1]))
    header = text.split("apiVersion", 1)[0]
    assert used == {"__NAME__", "__RUN__", "__KEY__", "__IMAGE__", "__PORT__"}
    assert all(f"#   {name}" in header for name in used), header


def test_the_package_ships_the_manifests_directory() -> None:
    for path in MANIFESTS.glob("*.yaml"):
        assert render.template(path.name) == path.read_text()


def test_agent_runs_with_net_admin_and_net_raw_only() -> None:
    objects = render.pod_end(_end())
    (container,) = _pod_spec(objects)["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert container["command"] == ["svctunnel", "agent"]
    assert _pod_spec(objects)["automountServiceAccountToken"] is False


def test_key_reaches_the_agent_from_the_secret_only() -> None:
    objects = render.pod_end(_end())
    assert objects["Secret"]["stringData"] == {"key": KEY}
    assert _env(objects)["SVCTUNNEL_KEY"] == {"secretKeyRef": {"name": "svctunnel-abc123", "key": "key"}}
    assert KEY not in yaml.safe_dump(objects["Deployment"])


def test_the_backend_knows_the_agents_container_by_its_name() -> None:
    (container,) = _pod_spec(render.pod_end(_end()))["containers"]
    assert container["name"] == AGENT_CONTAINER


def test_readiness_follows_the_agents_ready_file() -> None:
    objects = render.pod_end(_end())
    (container,) = _pod_spec(objects)["containers"]
    ready_file = _env(objects)["SVCTUNNEL_READY_FILE"]
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-e", ready_file]


def test_service_keeps_the_source_address_and_publishes_unready_pods() -> None:
    spec = render.pod_end(_end(port=6000))["Service"]["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["externalTrafficPolicy"] == "Local"
    assert spec["publishNotReadyAddresses"] is True
    assert "loadBalancerSourceRanges" not in spec
    (port,) = spec["ports"]
    assert port == {"name": "tunnel", "port": 6000, "targetPort": 6000, "protocol": "UDP"}


def test_every_object_carries_the_run_label() -> None:
    objects = render.pod_end(_end())
    for obj in objects.values():
        assert obj["metadata"]["labels"][RUN_LABEL] == "abc123"
    assert _pod_spec(objects) is not None
    template_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert template_labels[RUN_LABEL] == "abc123"
    assert render.namespace("svctunnel-abc123", "abc123")["metadata"]["labels"][RUN_LABEL] == "abc123"


@pytest.mark.parametrize("peer", ["192.0.2.7", "2001:db8::7"])
def test_peer_limits_the_load_balancer_and_the_agent(peer: str) -> None:
    address = ipaddress.ip_address(peer)
    objects = render.pod_end(_end(peer=address))
    assert objects["Service"]["spec"]["loadBalancerSourceRanges"] == [f"{peer}/{address.max_prefixlen}"]
    assert _env(objects)["SVCTUNNEL_PEER"] == peer


def test_node_port_mode() -> None:
    objects = render.pod_end(_end(service_type="NodePort", peer=ipaddress.ip_address("192.0.2.7")))
    spec = objects["Service"]["spec"]
    assert spec["type"] == "NodePort"
    assert "loadBalancerSourceRanges" not in spec  # only meaningful for load balancers
    assert spec["externalTrafficPolicy"] == "Local"


def test_node_mode_pins_a_host_network_pod_and_joins_the_bridge() -> None:
    objects = render.pod_end(_end(node="kind-worker", bridge="br-multus", host_network=True))
    spec = _pod_spec(objects)
    assert spec["hostNetwork"] is True
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "kind-worker"}
    assert _env(objects)["SVCTUNNEL_BRIDGE"] == "br-multus"
    assert _env(objects)["SVCTUNNEL_HOST_NETWORK"] == "true"  # the node's conntrack must see the handshake
    (container,) = spec["containers"]
    assert container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]


def test_pod_mode_has_no_node_settings() -> None:
    objects = render.pod_end(_end())
    assert not {"hostNetwork", "nodeSelector", "tolerations"} & set(_pod_spec(objects))
    assert not {"SVCTUNNEL_HOST_NETWORK", "SVCTUNNEL_BRIDGE", "SVCTUNNEL_PEER"} & set(_env(objects))


def test_agent_learns_where_the_service_delivers() -> None:
    assert _env(render.pod_end(_end()))["SVCTUNNEL_LOCAL_ADDRESS"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_a_placeholder_without_a_value_is_an_error() -> None:
    with pytest.raises(KeyError, match="__IMAGE__"):
        render.fill("image: __IMAGE__\n", {"NAME": "x"})


@given(
    run_id=st.text("0123456789abcdef", min_size=6, max_size=6),
    key=st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_values_stay_strings_whatever_their_digits(run_id: str, key: str) -> None:
    """A run id or key of digits only must not turn into a YAML number (the API rejects it)."""
    objects = render.pod_end(_end(run_id=run_id, key=bytes.fromhex(key), name=f"svctunnel-{run_id}"))
    assert objects["Secret"]["stringData"]["key"] == key
    for obj in [*objects.values(), render.namespace(f"svctunnel-{run_id}", run_id)]:
        assert obj["metadata"]["labels"][RUN_LABEL] == run_id


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"port": 6000, "peer": ipaddress.ip_address("2001:db8::7")},
        {"node": "kind-worker", "bridge": "br-multus", "host_network": True},
    ],
    ids=["defaults", "port-and-peer", "node-mode"],
)
def test_the_container_environment_is_the_agents_settings(changes: dict[str, Any]) -> None:
    """What the agent reads back from its container's environment (the Secret's key included) is
    exactly what the backend meant: one contract, agentsettings, on both sides."""
    end = _end(**changes)
    objects = render.pod_end(end)
    env = {name: value for name, value in _env(objects).items() if isinstance(value, str)}
    env[agentsettings.KEY_ENV] = objects["Secret"]["stringData"]["key"]
    assert agentsettings.resolve({}, env) == end.agent
