"""The Kubernetes objects of one session, rendered from the YAML in ``manifests/``.

The templates are the files a person can apply by hand: ``__PLACEHOLDER__`` values are
filled in as text, then the per-session choices the files cannot express (Service type,
source ranges, node mode, the pinned peer) are set on the parsed objects. Pure: no client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from .protocol import IPAddress

RUN_LABEL = "svctunnel.dev/run"
_PLACEHOLDER = re.compile(r"__([A-Z]+)__")
Obj = dict[str, Any]


@dataclass(frozen=True)
class PodEnd:
    """What differs between sessions' pod ends."""

    name: str
    run_id: str
    key_hex: str
    image: str
    port: int
    service_type: str = "LoadBalancer"
    peer: IPAddress | None = None
    node: str | None = None
    bridge: str | None = None


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
    values = {"NAME": end.name, "RUN": end.run_id, "KEY": end.key_hex, "IMAGE": end.image, "PORT": str(end.port)}
    objects = {obj["kind"]: obj for obj in fill(template("svctunnel.yaml"), values)}
    _shape_service(objects["Service"]["spec"], end)
    _shape_pod(objects["Deployment"]["spec"]["template"]["spec"], end)
    return objects


def _shape_service(spec: Obj, end: PodEnd) -> None:
    spec["type"] = end.service_type
    if end.peer is not None and end.service_type == "LoadBalancer":
        spec["loadBalancerSourceRanges"] = [f"{end.peer}/{end.peer.max_prefixlen}"]


def _shape_pod(spec: Obj, end: PodEnd) -> None:
    (container,) = spec["containers"]
    env: list[Obj] = container["env"]
    if end.peer is not None:
        env.append({"name": "SVCTUNNEL_PEER", "value": str(end.peer)})
    if end.node is not None:
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
        spec["nodeSelector"] = {"kubernetes.io/hostname": end.node}
        spec["tolerations"] = [{"operator": "Exists"}]  # also control-plane nodes
        env.append({"name": "SVCTUNNEL_HOST_NETWORK", "value": "1"})
    if end.bridge is not None:
        env.append({"name": "SVCTUNNEL_BRIDGE", "value": end.bridge})
