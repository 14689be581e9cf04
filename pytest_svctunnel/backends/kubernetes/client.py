"""The Kubernetes API as this plugin uses it: one client per session, and one way to call it.

Every request goes through ``Cluster.call``: it carries a request timeout bounded by the
caller's deadline (and at most ``MAX_REQUEST_S``), it is never retried behind our back (a
retry would double the time a request may take), interrupts wait until it returns (the client
can turn an exception raised inside it into another), and every error becomes a KubeError
that says what failed and what to do. Only the official client (its kubeconfig loading, TLS and
authentication); no kubectl. Requests name their URL path (``resources.Kind``) and send and
receive JSON: answers are ``resources.Resource`` objects, read with the client's attribute
names, so no typed API or model is imported (that would cost a session about a second).

The client is imported here only, and this module only when the kubernetes backend is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import config as k8s_config
from kubernetes.client.api_client import ApiClient
from kubernetes.client.configuration import Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from ...errors import ConfigError, KubeError
from ...shield import shield
from ...waiting import Deadline
from .resources import wrap

MAX_REQUEST_S = 15.0  # one request; waits poll with their own deadlines
MIN_REQUEST_S = 0.2  # what a request still gets once its deadline has passed (a last try)
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
Query = dict[str, str | int]


def request_timeout(deadline: Deadline) -> float:
    """The timeout of one request made under ``deadline``."""
    return max(MIN_REQUEST_S, min(deadline.remaining(), MAX_REQUEST_S))


@dataclass
class Cluster:
    """One cluster's API client, and where its configuration came from (for messages)."""

    api: Any  # kubernetes.client.ApiClient
    source: str

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    # -- requests by URL path (see resources.Kind) ---------------------------------------

    def get(
        self, what: str, path: str, *, deadline: Deadline, query: Query | None = None, missing_ok: bool = False
    ) -> Any:
        """The object at ``path`` (a Resource); with ``missing_ok``, None when it does not exist."""
        return self.call(what, self._send, "GET", path, query, None, deadline=deadline, missing_ok=missing_ok)

    def items(
        self, what: str, path: str, *, deadline: Deadline, selector: str | None = None, fields: str | None = None
    ) -> list[Any]:
        """The objects of the collection at ``path`` with the label ``selector`` and field selector ``fields``."""
        query: Query = {}
        if selector is not None:
            query["labelSelector"] = selector
        if fields is not None:
            query["fieldSelector"] = fields
        return list(self.get(what, path, deadline=deadline, query=query).items or [])

    def post(self, what: str, path: str, body: dict[str, Any], *, deadline: Deadline) -> Any:
        """Create ``body`` in the collection at ``path``; the object as created."""
        return self.call(what, self._send, "POST", path, None, body, JSON, deadline=deadline)

    def patch(
        self,
        what: str,
        path: str,
        body: dict[str, Any],
        *,
        deadline: Deadline,
        content_type: str = MERGE_PATCH,
        missing_ok: bool = False,
    ) -> Any:
        """Patch the object at ``path`` with ``body`` (a JSON merge patch unless ``content_type`` says otherwise)."""
        return self.call(
            what, self._send, "PATCH", path, None, body, content_type, deadline=deadline, missing_ok=missing_ok
        )

    def delete(
        self, what: str, path: str, *, deadline: Deadline, query: Query | None = None, missing_ok: bool = False
    ) -> Any:
        """Delete the object (or, with a ``labelSelector`` query, the objects) at ``path``."""
        return self.call(what, self._send, "DELETE", path, query, None, deadline=deadline, missing_ok=missing_ok)

    def text(self, what: str, path: str, *, deadline: Deadline, query: Query | None = None) -> str:
        """The plain text at ``path`` (a container's log)."""
        return str(self.call(what, self._send, "GET", path, query, None, None, False, deadline=deadline))

    def _send(
        self,
        verb: str,
        path: str,
        query: Query | None,
        body: dict[str, Any] | None,
        content_type: str | None = None,
        parse: bool = True,
        *,
        _request_timeout: float,
    ) -> Any:
        """One HTTP request through the client's connection pool, with its TLS and authentication."""
        headers = {"Accept": JSON if parse else "*/*"}
        if body is not None and content_type is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, post = self.api.param_serialize(
            method=verb,
            resource_path=path,
            query_params=list(query.items()) if query else None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, headers, body, post, _request_timeout=_request_timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=data.decode("utf-8", "replace"), data=None)
        return wrap(json.loads(data)) if parse else data.decode("utf-8", "replace")

    def call(
        self, what: str, method: Callable[..., Any], *args: Any, deadline: Deadline, missing_ok: bool = False, **kw: Any
    ) -> Any:
        """``method(*args, **kw)`` with a request timeout from ``deadline``. An API error or an
        unreachable server is a KubeError naming ``what`` and a remedy; with ``missing_ok``,
        404 Not Found (gone already) returns None."""
        timeout = request_timeout(deadline)
        try:
            # Ctrl-C, SIGTERM and pytest-timeout's alarm wait for the request (at most its timeout):
            # raised inside the client, a KeyboardInterrupt can come out as a pydantic ValidationError
            with shield():
                return method(*args, _request_timeout=timeout, **kw)
        except ApiException as exc:
            if missing_ok and exc.status == 404:
                return None
            raise KubeError(f"{what}: {_describe(exc)}{_remedy(exc)}", exc.status) from None
        except OSError as exc:  # urllib3 wraps most connection failures, but not all
            raise self._unreachable(what, exc, timeout) from None
        except Exception as exc:  # urllib3's MaxRetryError, ReadTimeoutError and friends; answers it cannot read
            if type(exc).__module__.startswith("urllib3"):
                raise self._unreachable(what, exc, timeout) from None
            raise KubeError(
                f"{what}: the client could not use the API server's answer ({type(exc).__name__}: {exc});"
                " check that the kubeconfig points at a Kubernetes API server this client supports"
            ) from None

    def _unreachable(self, what: str, exc: Exception, timeout: float) -> KubeError:
        text = str(exc)
        if "timed out" in text.lower() or "Timeout" in type(exc).__name__:
            cause = f"no answer from the API server {self.server} within {timeout:.1f} s"
        else:
            cause = f"cannot reach the API server {self.server} ({text})"
        return KubeError(
            f"{what}: {cause}; check that the API server runs and the kubeconfig ({self.source}) points at it"
        )

    def close(self) -> None:
        self.api.close()


def connect(kubeconfig: str | None, context: str | None) -> Cluster:
    """A client for the kubeconfig (default: $KUBECONFIG, then ~/.kube/config) and context;
    inside a pod without a kubeconfig, the pod's service account."""
    configuration = Configuration()
    try:
        load: Any = k8s_config.load_kube_config  # untyped
        load(config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False)
        where = f"kubeconfig {kubeconfig or '(default)'}" + (f", context {context}" if context else "")
    except Exception as exc:  # a missing or broken file, a YAML error, a failing exec credential plugin
        if kubeconfig is not None or context is not None or not _in_cluster(configuration):
            raise ConfigError(
                f"cannot load the Kubernetes configuration ({exc}): point --svctunnel-kubeconfig (or"
                " KUBECONFIG) at a kubeconfig and --svctunnel-context at one of its contexts,"
                " or use --svctunnel-backend lab for the built-in lab"
            ) from None
        where = "in-cluster service account"
    configuration.retries = 0  # every request ends within its own timeout: no hidden retries
    return Cluster(ApiClient(configuration), where)


def _in_cluster(configuration: Any) -> bool:
    try:
        load_incluster: Any = k8s_config.load_incluster_config
        load_incluster(client_configuration=configuration)
    except ConfigException:
        return False
    return True


def _describe(exc: ApiException) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    return f"{exc.status} {exc.reason}: {message}"


def _remedy(exc: ApiException) -> str:
    status = exc.status or 0
    if status in (401, 403):
        return (
            "; the kubeconfig's user needs to create and delete namespaces, Secrets, Deployments"
            " and Services, and to read pods, pod logs and events"
        )
    if status == 404:
        return "; it does not exist: check --svctunnel-namespace (the namespace must exist) and the context"
    if status == 409:
        return "; an object of that name exists already: remove it, or choose another namespace"
    if status == 422:
        return "; the API server refused the object: check the options it was made from (image, node, port)"
    if status >= 500:
        return "; the API server failed: check its health (and its admission webhooks), then run again"
    return "; see the message for what the API server wants"
