"""Kubernetes objects as the API server sends them, and where each kind lives in the API.

The plugin reads the API's JSON as it comes (no typed models: importing and validating those
would cost a session a second). ``Resource`` reads a JSON object with the official client's
attribute names, so ``pod.status.pod_ip`` reads ``status.podIP`` and a field the object lacks
reads as None. ``Kind`` and ``path`` give a resource's URL path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


class Resource:
    """One JSON object of the API, read by attribute: ``snake_case`` names find their
    ``camelCase`` fields (``pod_ip`` finds ``podIP``); a missing field is None; nested objects
    are Resources and lists are lists of them. ``raw`` is the JSON itself."""

    __slots__ = ("_keys", "raw")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self._keys: dict[str, str] | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self.raw:
            return wrap(self.raw[name])
        if self._keys is None:
            self._keys = {key.lower(): key for key in self.raw}
        key = self._keys.get(name.replace("_", "").lower())
        return None if key is None else wrap(self.raw[key])

    def __repr__(self) -> str:
        return f"Resource({self.raw!r})"


def wrap(value: Any) -> Any:
    """A JSON value as ``Resource`` reads it: objects as Resources, lists item by item."""
    if isinstance(value, dict):
        return Resource(value)
    if isinstance(value, list):
        return [wrap(item) for item in value]
    return value


@dataclass(frozen=True)
class Kind:
    """A resource type: its API group and version (``/api/v1``, ``/apis/apps/v1``) and its plural."""

    group: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        """The URL path of the collection (without ``name``), an object, or its subresource ``sub``."""
        parts = [self.group]
        if self.namespaced:
            if namespace is None:
                raise ValueError(f"{self.plural} live in a namespace: name one")
            parts += ["namespaces", quote(namespace, safe="")]
        parts.append(self.plural)
        if name is not None:
            parts.append(quote(name, safe=""))
            if sub is not None:
                parts.append(sub)
        return "/".join(parts)


NAMESPACES = Kind("/api/v1", "namespaces", namespaced=False)
NODES = Kind("/api/v1", "nodes", namespaced=False)
PODS = Kind("/api/v1", "pods")
SECRETS = Kind("/api/v1", "secrets")
SERVICES = Kind("/api/v1", "services")
EVENTS = Kind("/api/v1", "events")
DEPLOYMENTS = Kind("/apis/apps/v1", "deployments")
ACCESS_REVIEWS = Kind("/apis/authorization.k8s.io/v1", "selfsubjectaccessreviews", namespaced=False)
