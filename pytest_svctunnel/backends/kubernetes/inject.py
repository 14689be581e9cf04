"""The pod end inside one of the user's pods: an ephemeral container running the agent.

The container shares the pod's network namespace; it gets NET_ADMIN and NET_RAW and nothing
else, runs as root in its own right (a pod-level non-root user would strip the capabilities),
and is never privileged. A UDP Service of its own (``externalTrafficPolicy: Local``,
``publishNotReadyAddresses``) reaches that pod alone, through a label of the run that is added
to the pod and removed again; the owner's labels are never touched.

An ephemeral container can be neither removed nor restarted, and its name never reused: each
session names its own, teardown ends the agent with an authenticated goodbye (it removes its
devices and its port filter, then exits), and the agent ends itself after ``idle_exit`` seconds
without a word from its peer, so a killed session cannot leave a device in the pod for good.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from ... import diagnostics, names
from ...agentsettings import AgentSettings, to_env
from ...errors import KubeError, WaitTimeout
from ...goodbye import say_goodbye
from ...keys import key_text, parse_key
from ...protocol import Endpoint
from ...targets import Target, choose
from ...values import IPAddress
from ...waiting import Deadline, Stopwatch, wait_for
from . import objects, podstate
from .client import MERGE_PATCH, STRATEGIC_MERGE_PATCH, Cluster
from .resources import PODS, SECRETS, SERVICES

log = logging.getLogger("svctunnel.inject")

_POLL_S = 0.2
_DIAGNOSTICS_S = 10.0
GOODBYE_S = 5.0  # how long teardown waits for the agent's goodbye
AGENT_CAPABILITIES = ("NET_ADMIN", "NET_RAW")


@dataclass(frozen=True)
class InjectOptions:
    """How injected agents run: the Service port, pinned peer, image, Service type, and the
    idle time after which an agent that hears nothing removes everything and exits."""

    port: int
    peer: IPAddress | None
    image: str
    service_type: str
    idle_exit: float


@dataclass(frozen=True)
class InjectedPlacement:
    """What one injection adds, by name: the pod's extra label, the Service and Secret, and the
    ephemeral container. Written to the run's state directory, so ``svctunnel reap`` finds it."""

    namespace: str
    pod: str
    container: str
    label_key: str
    label_value: str
    service: str
    secret: str

    @classmethod
    def of(cls, run_id: str, namespace: str, pod: str, index: int) -> InjectedPlacement:
        name = f"{names.object_name(run_id)}-{index}"
        return cls(namespace, pod, names.object_name(run_id), injected_label(run_id), str(index), name, name)

    def record(self) -> dict[str, str]:
        return dict(vars(self))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> InjectedPlacement:
        try:
            return cls(**{k: str(record[k]) for k in cls.__dataclass_fields__})
        except KeyError as exc:
            raise KubeError(f"the run's record of an injected agent has no {exc}; remove it by hand") from None

    def describe(self) -> str:
        return f"pod {self.namespace}/{self.pod} (container {self.container}, Service {self.service})"


def injected_label(run_id: str) -> str:
    """The label the run adds to each pod it injects into; its Service selects on it alone."""
    return f"svctunnel.dev/end-{run_id}"


def find_pods(cluster: Cluster, target: Target, deadline: Deadline) -> list[Any]:
    """The target's pods, Running and on a network of their own; a KubeError lists what was found."""
    what = f"listing the pods of target {target}"
    return choose(target, cluster.items(what, PODS.path(target.namespace), selector=target.selector, deadline=deadline))


def ephemeral_container(place: InjectedPlacement, image: str, agent: AgentSettings) -> dict[str, Any]:
    """The agent's ephemeral container: the key from the Secret, the settings as variables."""
    return agent_container(place.container, place.secret, image, agent)


def agent_container(name: str, secret: str, image: str, agent: AgentSettings) -> dict[str, Any]:
    """The agent as a container in someone's pod: the key from ``secret``, the settings as variables,
    NET_ADMIN and NET_RAW only, and root in its own right."""
    env: list[dict[str, Any]] = [
        {"name": "SVCTUNNEL_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "key"}}}
    ]
    env += [{"name": name, "value": value} for name, value in to_env(agent).items()]
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["svctunnel", "agent"],
        "env": env,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "runAsUser": 0,  # capabilities added for a non-root user never become effective
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "capabilities": {"drop": ["ALL"], "add": list(AGENT_CAPABILITIES)},
        },
    }


def service_manifest(place: InjectedPlacement, run_id: str, options: InjectOptions) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": options.service_type,
        "externalTrafficPolicy": "Local",  # the pod sees the external end's address
        "publishNotReadyAddresses": True,  # the pod's own readiness has nothing to do with the tunnel
        "selector": {place.label_key: place.label_value},
        "ports": [{"name": "tunnel", "port": options.port, "targetPort": options.port, "protocol": "UDP"}],
    }
    peer = options.peer
    if peer is not None and options.service_type == "LoadBalancer":
        spec["loadBalancerSourceRanges"] = [f"{peer}/{peer.max_prefixlen}"]
    return {"metadata": {"name": place.service, "labels": _labels(run_id)}, "spec": spec}


def secret_manifest(place: InjectedPlacement, run_id: str, key_text: str) -> dict[str, Any]:
    return {"metadata": {"name": place.secret, "labels": _labels(run_id)}, "stringData": {"key": key_text}}


def _labels(run_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "svctunnel", names.RUN_LABEL: run_id}


_End = TypeVar("_End", bound="InjectedEnd")


class InjectedEnd:
    """The pod end as an ephemeral container in the pod ``place`` names; a ``Backend``.

    ``cluster`` belongs to the caller, which closes it after every end's teardown.
    """

    def __init__(self, run_id: str, cluster: Cluster, place: InjectedPlacement, options: InjectOptions) -> None:
        self.run_id = run_id
        self.cluster = cluster
        self.place = place
        self.options = options
        self._key: bytes | None = None
        self._service_endpoint: Endpoint | None = None
        self._created: list[str] = []  # what teardown must undo, in the order it was made

    # -- deploying -----------------------------------------------------------------

    def deploy(self, key: bytes, deadline: Deadline, stopwatch: Stopwatch) -> Endpoint:
        p, o = self.place, self.options
        self._key = key
        agent = AgentSettings(key=key, port=o.port, peer=o.peer, idle_exit=o.idle_exit, shared_netns=True)
        self._create_secret(key, deadline)
        self._created.append("label")
        self._patch_label(p.label_value, deadline)
        self._create_service(deadline)
        stopwatch.lap("objects created")
        self._created.append("container")
        self.cluster.patch(
            f"adding the agent's ephemeral container to pod {p.namespace}/{p.pod}",
            PODS.path(p.namespace, p.pod, "ephemeralcontainers"),
            {"spec": {"ephemeralContainers": [ephemeral_container(p, o.image, agent)]}},
            deadline=deadline,
            content_type=STRATEGIC_MERGE_PATCH,
        )
        pod = self._wait_started(deadline)
        stopwatch.lap("agent injected")
        endpoint = self._endpoint(pod, deadline)
        stopwatch.lap("load-balancer address" if o.service_type == "LoadBalancer" else "node port")
        self._service_endpoint = endpoint
        return endpoint

    def _create_secret(self, key: bytes, deadline: Deadline) -> None:
        p = self.place
        self._created.append("secret")
        self.cluster.post(
            f"creating Secret {p.secret} in {p.namespace}",
            SECRETS.path(p.namespace),
            secret_manifest(p, self.run_id, key_text(key)),
            deadline=deadline,
        )

    def _create_service(self, deadline: Deadline) -> None:
        p = self.place
        self._created.append("service")
        self.cluster.post(
            f"creating Service {p.service} in {p.namespace}",
            SERVICES.path(p.namespace),
            service_manifest(p, self.run_id, self.options),
            deadline=deadline,
        )

    def _patch_label(self, value: str | None, deadline: Deadline) -> None:
        p = self.place
        self.cluster.patch(
            f"{'labelling' if value else 'removing the run label from'} pod {p.namespace}/{p.pod}",
            PODS.path(p.namespace, p.pod),
            {"metadata": {"labels": {p.label_key: value}}},
            deadline=deadline,
            missing_ok=value is None,
            content_type=MERGE_PATCH,
        )

    def pod(self, deadline: Deadline) -> Any:
        """The target pod, or None once it is gone."""
        p = self.place
        what = f"reading pod {p.namespace}/{p.pod}"
        return self.cluster.get(what, PODS.path(p.namespace, p.pod), deadline=deadline, missing_ok=True)

    def _wait_started(self, deadline: Deadline) -> Any:
        p = self.place

        def started() -> Any:
            pod = self.pod(deadline)
            self._raise_if_lost(pod, deadline)
            return pod if podstate.running(pod, p.container) else None

        return wait_for(
            started,
            phase="agent injected",
            deadline=deadline,
            describe=lambda: podstate.describe_pod(self.pod(deadline)),
            hint="the node's kubelet starts ephemeral containers; check that it can run the image ("
            + podstate.IMAGE_HINT
            + ")",
            interval=_POLL_S,
        )

    def _raise_if_lost(self, pod: Any, deadline: Deadline) -> None:
        """Raise if the pod is gone, or the agent cannot run or has exited (an ephemeral container
        never restarts): the error carries the agent's last words."""
        p = self.place
        if pod is None or pod.metadata.deletion_timestamp is not None:
            raise KubeError(
                f"target pod {p.namespace}/{p.pod} is {'gone' if pod is None else 'being deleted'}: its network"
                " went with it; a pod its controller makes anew gets no network by itself (attach again)"
            )
        podstate.raise_if_stuck(pod, p.container)
        found = podstate.container_status(pod, p.container)
        terminated = found.status.state.terminated if found is not None and found.status.state else None
        if terminated is not None:
            words = self._last_words(deadline)
            raise KubeError(
                f"the agent in pod {p.namespace}/{p.pod} exited (code {terminated.exit_code}):"
                f" {words or terminated.message or terminated.reason}"
            )

    def _last_words(self, deadline: Deadline) -> str:
        try:
            text = self._log(deadline)
        except KubeError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def _log(self, deadline: Deadline) -> str:
        p = self.place
        return self.cluster.text(
            f"reading the log of the agent in pod {p.namespace}/{p.pod}",
            PODS.path(p.namespace, p.pod, "log"),
            query={"container": p.container, "tailLines": podstate.LOG_LINES},
            deadline=deadline,
        )

    def _service(self, deadline: Deadline) -> Any:
        p = self.place
        what = f"reading Service {p.namespace}/{p.service}"
        return self.cluster.get(what, SERVICES.path(p.namespace, p.service), deadline=deadline)

    def _endpoint(self, pod: Any, deadline: Deadline) -> Endpoint:
        o = self.options
        return objects.service_endpoint(
            self.cluster, pod, lambda: self._service(deadline), o.service_type, o.port, deadline
        )

    def check(self) -> None:
        """Raise once the pod is gone or the agent exited: neither comes back by itself."""
        deadline = Deadline.after(_DIAGNOSTICS_S)
        self._raise_if_lost(self.pod(deadline), deadline)

    # -- removal -----------------------------------------------------------------------

    def teardown(self, deadline: Deadline) -> None:
        """Goodbye to the agent (it removes its devices and port filter and exits), then remove the
        Service, the Secret and the pod's run label. Safe to call twice."""
        problems: list[str] = []
        if "container" in self._created:
            problems += self._end_agent(deadline)
        for step in reversed(self._created):
            try:
                self._undo(step, deadline)
            except (KubeError, WaitTimeout) as exc:
                problems.append(str(exc))
        self._created.clear()
        if problems:
            raise KubeError(
                f"removing the agent from {self.place.describe()}: {'; '.join(problems)}; 'svctunnel reap' tries again"
            )

    def _end_agent(self, deadline: Deadline) -> list[str]:
        p = self.place
        if self._key is None or self._service_endpoint is None:
            return self._wait_exited(deadline, said_goodbye=False)
        if self._not_running(deadline):
            return []  # it ended before (idle exit, or the pod is gone): nothing to say goodbye to
        if say_goodbye(self._service_endpoint, self._key, Deadline.after(min(GOODBYE_S, deadline.remaining()))):
            return self._wait_exited(deadline, said_goodbye=True)
        if self._not_running(deadline):
            return []  # it ended before (idle exit, or the pod is gone): nothing to say goodbye to
        log.warning("the agent in pod %s/%s did not answer the goodbye", p.namespace, p.pod)
        return [
            f"the agent did not answer the goodbye through {self._service_endpoint}; it removes its devices"
            f" after {self.options.idle_exit:g} s without a word (idle exit)"
        ]

    def _not_running(self, deadline: Deadline) -> bool:
        pod = self.pod(deadline)
        return pod is None or not podstate.running(pod, self.place.container)

    def _wait_exited(self, deadline: Deadline, said_goodbye: bool) -> list[str]:
        """After a goodbye the agent exits at once; without one (it never started), it must not
        start later: wait until the kubelet reports it terminated or never running."""
        p = self.place

        def exited() -> bool | None:
            pod = self.pod(deadline)
            if pod is None:
                return True
            found = podstate.container_status(pod, p.container)
            state = found.status.state if found is not None else None
            if state is not None and state.terminated is not None:
                return True
            if not said_goodbye and (state is None or state.waiting is not None):
                return True  # it never ran; if it ever does, it ends itself after idle_exit
            return None

        try:
            wait_for(
                exited,
                phase=f"agent in pod {p.namespace}/{p.pod} exited",
                deadline=Deadline.after(min(GOODBYE_S * 2, max(deadline.remaining(), 0.1))),
                interval=_POLL_S,
            )
        except WaitTimeout as exc:
            return [str(exc)]
        return []

    def _undo(self, step: str, deadline: Deadline) -> None:
        p = self.place
        if step == "label":
            self._patch_label(None, deadline)
        elif step == "service":
            what = f"deleting Service {p.namespace}/{p.service}"
            self.cluster.delete(what, SERVICES.path(p.namespace, p.service), deadline=deadline, missing_ok=True)
        elif step == "secret":
            what = f"deleting Secret {p.namespace}/{p.secret}"
            self.cluster.delete(what, SECRETS.path(p.namespace, p.secret), deadline=deadline, missing_ok=True)

    @classmethod
    def from_record(cls: type[_End], run_id: str, cluster: Cluster, record: dict[str, Any]) -> _End:
        """The end a run recorded (``Attachment`` writes the records), to be torn down by a reaper."""
        place = InjectedPlacement.from_record(dict(record.get("placement") or {}))
        end = cls(run_id, cluster, place, InjectOptions(0, None, "", "", float(record.get("idle_exit") or 0)))
        labelled = place.label_key == injected_label(run_id)  # a sidecar's label is in its owner's pod spec
        end._created = ["secret", *(["label"] if labelled else []), "service", "container"]  # what may exist
        service = record.get("service")
        if isinstance(service, dict) and record.get("key"):
            end._key = parse_key(str(record["key"]), "the run's record")
            end._service_endpoint = Endpoint(ipaddress.ip_address(service["address"]), int(service["port"]))
        return end

    # -- reporting ---------------------------------------------------------------------

    def diagnostics(self) -> list[tuple[str, str]]:
        p = self.place

        def deadline() -> Deadline:
            return Deadline.after(_DIAGNOSTICS_S)

        def pod_line() -> str:
            pod = self.pod(deadline())
            return "gone" if pod is None else podstate.describe_pod(pod)

        title = f"{p.namespace}/{p.pod}"
        return [
            diagnostics.safely(f"agent log in {title}", lambda: self._log(deadline())),
            diagnostics.safely(f"target pod {title}", pod_line),
            diagnostics.safely(f"Service of {title}", lambda: objects.describe_service(self._service(deadline()))),
            diagnostics.safely(
                f"events of {title}", lambda: objects.recent_events(self.cluster, p.namespace, deadline(), about=p.pod)
            ),
        ]

    def describe_kept(self) -> str:
        return (
            f"agent kept in {self.place.describe()}; it removes its devices and exits after"
            f" {self.options.idle_exit:g} s without a word, or at once with 'svctunnel reap --include-detached'"
        )


def remove_recorded(run_id: str, record: dict[str, Any], deadline: Deadline) -> None:
    """End a recorded injected agent with a goodbye and remove what its run added to the pod's
    namespace (for 'svctunnel reap')."""
    from .client import connect
    from .sidecar import SidecarEnd

    kind = SidecarEnd if record.get("kind") == "sidecar" else InjectedEnd
    cluster = connect(record.get("kubeconfig"), record.get("context"))
    try:
        kind.from_record(run_id, cluster, record).teardown(deadline)
    finally:
        cluster.close()


def describe_recorded(record: dict[str, Any]) -> str:
    try:
        return "agent in " + InjectedPlacement.from_record(dict(record.get("placement") or {})).describe()
    except KubeError as exc:
        return str(exc)
