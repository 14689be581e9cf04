"""The Kubernetes objects of one session, rendered from the YAML in ``manifests/``.

The templates are the files a person can apply by hand: ``__PLACEHOLDER__`` values are
filled in as text, then the per-session choices the files cannot express (Service type,
source ranges, node mode) are set on the parsed objects, and the agent's settings become
its container's environment through ``agentsettings.to_env``, the agent's one contract.
Pure: no client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ... import keys
from ...agentsettings import AgentSettings, to_env

READY_FILE = "/tmp/svctunnel-ready"  # the readiness probe of manifests/svctunnel.yaml tests it
_PLACEHOLDER = re.compile(r"__([A-Z]+)__")
Obj = dict[str, Any]


@dataclass(frozen=True)
class PodEnd:
    """What differs between sessions' pod ends: names, image, the agent's settings (its key goes
    into the Secret, the rest into the container's environment), Service type and node."""

    name: str
    run_id: str
    image: str
    agent: AgentSettings
    service_type: str = "LoadBalancer"
    node: str | None = None


def template(name: str) -> str:
    return (resources.files("pytest_svctunnel") / "manifests" / name).read_text(encoding="utf-8")


def fill(text: str, values: dict[str, str]) -> list[Obj]:
    """Replace every ``__NAME__`` with ``values["NAME"]`` and parse the documents."""

    def value(match: re.Match[str]) -> str:
        if match[1] not in values:
            raise KeyError(f"no value for placeholder {match[0]}")
        return values[match[1]]

    return [doc for doc in yaml.safe_load_all(_PLACEHOLDER.sub(value, text)) if doc]


def namespace(name: str, run_id: str) -> Obj:
    (obj,) = fill(template("namespace.yaml"), {"NAME": name, "RUN": run_id})
    return obj


def pod_end(end: PodEnd) -> dict[str, Obj]:
    """The Secret, Deployment and Service of one session, by kind."""
    values = {
        "NAME": end.name,
        "RUN": end.run_id,
        "KEY": keys.key_text(end.agent.key),
        "IMAGE": end.image,
        "PORT": str(end.agent.port),
    }
    objects = {obj["kind"]: obj for obj in fill(template("svctunnel.yaml"), values)}
    _shape_service(objects["Service"]["spec"], end)
    _shape_pod(objects["Deployment"]["spec"]["template"]["spec"], end)
    return objects


def _shape_service(spec: Obj, end: PodEnd) -> None:
    spec["type"] = end.service_type
    peer = end.agent.peer
    if peer is not None and end.service_type == "LoadBalancer":
        spec["loadBalancerSourceRanges"] = [f"{peer}/{peer.max_prefixlen}"]


def _shape_pod(spec: Obj, end: PodEnd) -> None:
    (container,) = spec["containers"]
    env: list[Obj] = container["env"]
    for name, value in to_env(end.agent).items():
        entry = {"name": name, "value": value}
        same = [i for i, e in enumerate(env) if e["name"] == name]
        if same:
            env[same[0]] = entry
        else:
            env.append(entry)
    if end.node is not None:
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
        spec["nodeSelector"] = {"kubernetes.io/hostname": end.node}
        spec["tolerations"] = [{"operator": "Exists"}]  # also control-plane nodes
