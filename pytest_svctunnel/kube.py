"""The Kubernetes API as this plugin uses it: one client per session, calls whose errors
say what failed and what to do. Only the official client; no kubectl.

The client is imported here only, and this module only when the kubernetes backend is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from .errors import ConfigError, KubeError

T = TypeVar("T")
_REQUEST_TIMEOUT_S = 15.0  # every API request; waits poll with their own deadlines


@dataclass
class Cluster:
    """The APIs of one cluster, and where its configuration came from (for messages)."""

    api: Any  # kubernetes.client.ApiClient
    source: str

    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.api)

    @property
    def apps(self) -> Any:
        return k8s.AppsV1Api(self.api)

    def close(self) -> None:
        self.api.close()


def connect(kubeconfig: str | None, context: str | None) -> Cluster:
    """A client for the kubeconfig (default: $KUBECONFIG, then ~/.kube/config) and context;
    inside a pod without a kubeconfig, the pod's service account."""
    try:
        load: Any = k8s_config.new_client_from_config  # untyped
        api = load(config_file=kubeconfig, context=context, persist_config=False)
        where = f"kubeconfig {kubeconfig or '(default)'}" + (f", context {context}" if context else "")
    except (ConfigException, FileNotFoundError, OSError) as exc:
        if kubeconfig is None and context is None:
            try:
                config = k8s.Configuration()
                load_incluster: Any = k8s_config.load_incluster_config
                load_incluster(client_configuration=config)
                return Cluster(k8s.ApiClient(config), "in-cluster service account")
            except ConfigException:
                pass
        raise ConfigError(
            f"cannot load the Kubernetes configuration ({exc}): point --svctunnel-kubeconfig (or"
            " KUBECONFIG) at a kubeconfig and --svctunnel-context at one of its contexts,"
            " or use --svctunnel-backend lab for the built-in lab"
        ) from None
    return Cluster(api, where)


def call(what: str, action: Callable[[], T]) -> T:
    """Run one API call; an ApiException becomes a KubeError naming ``what`` and a remedy."""
    try:
        return action()
    except ApiException as exc:
        raise KubeError(f"{what}: {_describe(exc)}{_remedy(exc)}", exc.status) from None
    except OSError as exc:  # urllib3 wraps most, but not all, connection failures
        raise KubeError(f"{what}: cannot reach the API server ({exc}); check the kubeconfig's server") from None
    except Exception as exc:  # urllib3's MaxRetryError and friends
        if type(exc).__module__.startswith("urllib3"):
            raise KubeError(f"{what}: cannot reach the API server ({exc}); check the kubeconfig's server") from None
        raise


def call_unless_missing(what: str, action: Callable[[], T]) -> T | None:
    """``call``, where 404 Not Found (gone already) returns None."""
    try:
        return call(what, action)
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def request_timeout() -> float:
    return _REQUEST_TIMEOUT_S


def _describe(exc: ApiException) -> str:
    import json

    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except ValueError:
        message = exc.reason
    return f"{exc.status} {exc.reason}: {message}"


def _remedy(exc: ApiException) -> str:
    if exc.status in (401, 403):
        return (
            "; the kubeconfig's user needs to create and delete namespaces, Secrets, Deployments"
            " and Services, and to read pods, pod logs and events"
        )
    if exc.status == 409:
        return "; an object of that name exists already: remove it, or choose another namespace"
    return ""
