"""The pod end as a native sidecar of a pod the suite creates: the network is there before the
application starts.

The sidecar is an init container with ``restartPolicy: Always`` (Kubernetes 1.33 and newer, or
1.29 with the feature gate) running the agent. Its startupProbe succeeds only once the tunnel is
up, so the kubelet starts the pod's main containers after the interface exists; then the sidecar
keeps the tunnel alive and heals it. It has no readinessProbe: a sidecar without one counts as
ready while it runs, so the tunnel never takes the application out of its Services.

The run creates the Secret with the key and a UDP Service that selects the pod by a label of the
run, both before the pod exists; the suite puts ``container`` into the pod's ``initContainers``
and ``labels`` into its labels. A goodbye at teardown makes the agent remove its networks and wait
(it does not exit: the kubelet would restart it); so does ``idle_exit`` without a word.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ... import names
from ...agentsettings import AgentSettings
from ...errors import KubeError
from ...goodbye import say_goodbye
from ...protocol import Endpoint
from ...waiting import Deadline, Stopwatch, wait_for
from . import manifests, podstate
from .inject import GOODBYE_S, InjectedEnd, InjectedPlacement, agent_container
from .resources import PODS

SIDECAR = "svctunnel"  # the sidecar container's name
STARTUP_S = 600  # how long the kubelet waits for the tunnel before it restarts the sidecar
_POLL_S = 0.2


def sidecar_label(run_id: str) -> str:
    return f"svctunnel.dev/sidecar-{run_id}"


def sidecar_placement(run_id: str, namespace: str, index: int) -> InjectedPlacement:
    """The names of one sidecar's objects; its pod is named once it exists."""
    name = f"{names.object_name(run_id)}-s{index}"
    return InjectedPlacement(namespace, "", SIDECAR, sidecar_label(run_id), str(index), name, name)


def sidecar_container(
    secret: str, image: str, agent: AgentSettings, startup_s: int = STARTUP_S, name: str = SIDECAR
) -> dict[str, Any]:
    """The native sidecar: goes into the pod's ``initContainers``."""
    settings = replace(agent, shared_netns=True, stay_after_goodbye=True, ready_file=Path(manifests.READY_FILE))
    container = agent_container(name, secret, image, settings)
    container["restartPolicy"] = "Always"
    container["startupProbe"] = {
        "exec": {"command": ["test", "-e", manifests.READY_FILE]},
        "periodSeconds": 1,
        "failureThreshold": startup_s,
    }
    return container


class SidecarEnd(InjectedEnd):
    """The pod end as a sidecar in the one pod that carries ``place``'s label; a ``Backend``.
    ``prepare`` creates the Secret and the Service before the pod exists; ``deploy`` waits for the
    pod and its sidecar and returns where to send the hello."""

    def prepare(self, key: bytes, deadline: Deadline) -> dict[str, Any]:
        """Create the Secret and the Service; return the sidecar container for the pod's spec."""
        self._key = key
        self._create_secret(key, deadline)
        self._create_service(deadline)
        o = self.options
        agent = AgentSettings(key=key, port=o.port, peer=o.peer, idle_exit=o.idle_exit)
        return sidecar_container(self.place.secret, o.image, agent)

    def deploy(self, key: bytes, deadline: Deadline, stopwatch: Stopwatch) -> Endpoint:
        pod = self._wait_pod(deadline)
        self.place = replace(self.place, pod=str(pod.metadata.name))
        stopwatch.lap("pod created")
        self._created.append("container")
        pod = self._wait_started(deadline)
        stopwatch.lap("sidecar started")
        endpoint = self._endpoint(pod, deadline)
        stopwatch.lap("load-balancer address" if self.options.service_type == "LoadBalancer" else "node port")
        self._service_endpoint = endpoint
        return endpoint

    def _wait_pod(self, deadline: Deadline) -> Any:
        p = self.place
        selector = f"{p.label_key}={p.label_value}"

        def one() -> Any:
            what = f"listing the pods -l {selector} in {p.namespace}"
            listing = self.cluster.items(what, PODS.path(p.namespace), selector=selector, deadline=deadline)
            pods = [x for x in listing if x.metadata.deletion_timestamp is None]
            if len(pods) > 1:
                raise KubeError(
                    f"{len(pods)} pods carry the sidecar's label {selector} in {p.namespace}"
                    f" ({', '.join(sorted(x.metadata.name for x in pods))}): a sidecar serves one pod;"
                    " use one svctunnel_sidecar per pod, or inject into a Deployment's pods (svctunnel_attach)"
                )
            return pods[0] if pods else None

        return wait_for(
            one,
            phase="pod with the sidecar created",
            deadline=deadline,
            hint=f"create the pod with the sidecar's labels ({selector}) and its container in initContainers",
            interval=_POLL_S,
        )

    def _end_agent(self, deadline: Deadline) -> list[str]:
        """Goodbye: the sidecar removes its networks and waits; a pod that is gone already needs none."""
        if self._key is not None and self._service_endpoint is not None and self.pod(deadline) is not None:
            say_goodbye(self._service_endpoint, self._key, Deadline.after(min(GOODBYE_S, deadline.remaining())))
        return []

    def check(self) -> None:
        pod = self.pod(Deadline.after(10.0))
        if pod is None or pod.metadata.deletion_timestamp is not None:
            raise KubeError(f"the pod with the sidecar, {self.place.namespace}/{self.place.pod}, is gone")
        podstate.raise_if_stuck(pod, SIDECAR)


def render_for_manifests(
    name: str, namespace: str | None, image: str, key_text: str, options_port: int, service_type: str
) -> str:
    """``svctunnel sidecar``: the Secret and the Service as YAML documents, and, as comments to paste
    into the pod (or pod template), its label and the sidecar container; then how to connect."""
    import yaml

    from .inject import InjectOptions, secret_manifest, service_manifest

    place = InjectedPlacement(namespace or "", "", SIDECAR, "svctunnel.dev/sidecar", name, name, name)
    options = InjectOptions(options_port, None, image, service_type, 0.0)
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Secret", **secret_manifest(place, name, key_text)},
        {"apiVersion": "v1", "kind": "Service", **service_manifest(place, name, options)},
    ]
    if namespace:
        for obj in objects:
            obj["metadata"]["namespace"] = namespace
    agent = AgentSettings(key=b"\0" * 32, port=options_port)
    fragment = {
        "metadata": {"labels": {place.label_key: name}},
        "spec": {"initContainers": [sidecar_container(name, image, agent)]},
    }
    pasted = "\n".join(f"#   {line}" for line in str(yaml.safe_dump(fragment, sort_keys=False)).splitlines())
    return (
        str(yaml.safe_dump_all(objects, sort_keys=False))
        + "# Into your pod (or pod template): this label, and the sidecar first in initContainers.\n"
        + "# The pod's main containers start once the tunnel is up; one pod per sidecar name.\n"
        + pasted
        + "\n# Then, with the Service's address:\n"
        + f"# $ svctunnel connect --service ADDRESS:{options_port} --key-file KEY_FILE --pod-dev net1\n"
    )
