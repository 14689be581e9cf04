"""What an injection asks of the cluster, as rendered (pure): the agent's ephemeral container, the Service
that reaches one pod alone, the Secret, and the record 'svctunnel reap' reads back. Running them on a real
cluster is tests/test_kube_e2e.py's."""

from __future__ import annotations

import ipaddress

import pytest

from pytest_svctunnel import keys
from pytest_svctunnel.agentsettings import AgentSettings, resolve
from pytest_svctunnel.backends.kubernetes.inject import (
    InjectedPlacement,
    InjectOptions,
    ephemeral_container,
    injected_label,
    secret_manifest,
    service_manifest,
)
from pytest_svctunnel.errors import KubeError
from pytest_svctunnel.names import RUN_LABEL

PLACE = InjectedPlacement.of("abc123", "cnf", "upf-7d9f8-x2x4k", 2)
OPTIONS = InjectOptions(5533, None, "svctunnel-agent:0.1.0", "LoadBalancer", 600.0)


def test_names_are_the_runs_own() -> None:
    assert InjectedPlacement(
        "cnf", "upf-7d9f8-x2x4k", "svctunnel-abc123", "svctunnel.dev/end-abc123", "2", "svctunnel-abc123-2",
        "svctunnel-abc123-2",
    ) == PLACE  # fmt: skip
    assert injected_label("abc123") == PLACE.label_key
    assert InjectedPlacement.from_record(PLACE.record()) == PLACE
    with pytest.raises(KubeError, match="has no 'service'; remove it by hand"):
        InjectedPlacement.from_record({k: v for k, v in PLACE.record().items() if k != "service"})


def test_the_agent_container_gets_two_capabilities_and_its_own_root_user() -> None:
    key = keys.new_key()
    agent = AgentSettings(key=key, port=5533, idle_exit=600.0, shared_netns=True)
    container = ephemeral_container(PLACE, "reg.example/agent:1", agent)
    assert container["name"] == "svctunnel-abc123" and container["image"] == "reg.example/agent:1"
    assert container["command"] == ["svctunnel", "agent"]
    assert container["securityContext"] == {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
    }
    assert "ports" not in container and "readinessProbe" not in container, "ephemeral containers take neither"
    env = {e["name"]: e for e in container["env"]}
    assert env["SVCTUNNEL_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "svctunnel-abc123-2", "key": "key"}}
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    assert key.hex() not in str(container), "the key travels in the Secret only"
    settings = resolve({}, {**values, "SVCTUNNEL_KEY": keys.key_text(key)})
    assert settings == agent, "the agent reads back exactly what was meant"


@pytest.mark.parametrize(("service_type", "ranges"), [("LoadBalancer", ["192.0.2.7/32"]), ("NodePort", None)])
def test_the_service_reaches_the_one_labelled_pod(service_type: str, ranges: list[str] | None) -> None:
    options = InjectOptions(6000, ipaddress.ip_address("192.0.2.7"), "img", service_type, 600.0)
    service = service_manifest(PLACE, "abc123", options)
    spec = service["spec"]
    assert service["metadata"]["name"] == "svctunnel-abc123-2"
    assert service["metadata"]["labels"][RUN_LABEL] == "abc123"
    assert spec["selector"] == {"svctunnel.dev/end-abc123": "2"}, "its own label only, never the owner's"
    assert (spec["type"], spec["externalTrafficPolicy"], spec["publishNotReadyAddresses"]) == (
        service_type,
        "Local",
        True,
    )
    assert spec["ports"] == [{"name": "tunnel", "port": 6000, "targetPort": 6000, "protocol": "UDP"}]
    assert spec.get("loadBalancerSourceRanges") == ranges


def test_the_secret_holds_the_key() -> None:
    key = keys.new_key()
    secret = secret_manifest(PLACE, "abc123", keys.key_text(key))
    assert secret["metadata"] == {
        "name": "svctunnel-abc123-2",
        "labels": {"app.kubernetes.io/name": "svctunnel", RUN_LABEL: "abc123"},
    }
    assert keys.parse_key(secret["stringData"]["key"], "the Secret") == key


def test_the_sidecar_waits_for_the_tunnel_and_never_decides_readiness() -> None:
    from pytest_svctunnel.backends.kubernetes.sidecar import sidecar_container

    key = keys.new_key()
    container = sidecar_container("svctunnel-abc123-s1", "img", AgentSettings(key=key, port=6000, idle_exit=600.0))
    assert container["restartPolicy"] == "Always", "a native sidecar: an init container that keeps running"
    assert container["startupProbe"]["exec"]["command"] == ["test", "-e", "/tmp/svctunnel-ready"]
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 600
    assert "readinessProbe" not in container and "livenessProbe" not in container
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = resolve({}, {**values, "SVCTUNNEL_KEY": keys.key_text(key)})
    assert (settings.port, settings.idle_exit, settings.shared_netns, settings.stay_after_goodbye) == (
        6000,
        600.0,
        True,
        True,
    )
    assert str(settings.ready_file) == "/tmp/svctunnel-ready"


def test_svctunnel_sidecar_prints_what_a_manifest_needs() -> None:
    import yaml

    from pytest_svctunnel.backends.kubernetes.sidecar import render_for_manifests

    key = keys.new_key()
    text = render_for_manifests("upf", "cnf", "reg.example/agent:1", keys.key_text(key), 6000, "NodePort")
    secret, service = yaml.safe_load_all(text)
    assert (secret["kind"], secret["metadata"]["namespace"], secret["stringData"]["key"]) == (
        "Secret",
        "cnf",
        keys.key_text(key),
    )
    assert service["spec"]["selector"] == {"svctunnel.dev/sidecar": "upf"} and service["spec"]["type"] == "NodePort"
    pasted = yaml.safe_load("\n".join(line[4:] for line in text.splitlines() if line.startswith("#   ")))
    (container,) = pasted["spec"]["initContainers"]
    assert pasted["metadata"]["labels"] == {"svctunnel.dev/sidecar": "upf"}
    assert container["image"] == "reg.example/agent:1" and container["restartPolicy"] == "Always"
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "upf"
    assert "--service ADDRESS:6000 --key-file KEY_FILE --pod-dev net1" in text
