"""The kubernetes backend: the pod end as a Deployment behind a UDP Service in a real cluster.

``deploy`` creates the run's objects (a fresh namespace unless one is given, a Secret with
the key, the agent's Deployment, the Service), waits for the agent's pod to be on a node with its
address (failing early on image pull errors, crash loops and unschedulable pods) and for the
Service's address,
and returns where the external end sends its hello. ``teardown`` deletes what the run made and
waits until it is on its way out. Every object carries the label ``svctunnel.dev/run=<run id>``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ... import diagnostics, names
from ...agentsettings import AgentSettings
from ...errors import KubeError, WaitTimeout
from ...protocol import Endpoint
from ...runs import KUBE_FILE, Run
from ...waiting import Deadline, Stopwatch, wait_for
from . import manifests, objects, podstate, warm
from .cleanup import delete_run_objects
from .client import Cluster
from .options import ClusterTarget, Placement, PodEndOptions

AGENT_CONTAINER = "agent"  # the container's name in manifests/svctunnel.yaml
_POLL_S = 0.05  # placement decides when the handshake starts: look often (a list of one pod)
_DIAGNOSTICS_S = 10.0


class KubernetesBackend:
    """The pod end in the cluster of ``target``, run as ``options`` say; the run's objects are
    named and labelled for ``run``, which also records them for ``svctunnel reap``."""

    def __init__(self, run: Run, target: ClusterTarget, options: PodEndOptions) -> None:
        self.run = run
        self.target = target
        self.options = options
        self.placement = Placement.of(run.id, options.namespace)
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            raise KubeError("not connected to a cluster yet: deploy() connects")
        return self._cluster

    # -- deploying -----------------------------------------------------------------

    def deploy(self, key: bytes, deadline: Deadline, stopwatch: Stopwatch) -> Endpoint:
        o = self.options
        agent = AgentSettings(
            key=key,
            port=o.port,
            peer=o.peer,
            bridge=o.bridge,
            host_network=o.node is not None,
            ready_file=Path(manifests.READY_FILE),
        )
        rendered = manifests.pod_end(
            manifests.PodEnd(self.placement.name, self.run.id, o.image, agent, o.service_type, o.node)
        )
        self._cluster = warm.take(self.target.kubeconfig, self.target.context, deadline)
        stopwatch.lap("client ready")
        self.run.write(KUBE_FILE, self.placement.record(self.target))
        objects.create(self.cluster, self.placement, self.run.id, rendered, deadline, self._check_provider(deadline))
        stopwatch.lap("objects created")
        pod = self._wait_pod_placed(deadline)
        stopwatch.lap("pod placed")
        endpoint = self._service_endpoint(pod, deadline)
        stopwatch.lap("load-balancer address" if o.service_type == "LoadBalancer" else "node port")
        return endpoint

    def _check_provider(self, deadline: Deadline) -> Callable[[], None] | None:
        """With a pinned peer or node mode behind a load balancer: a check, run once the Service has
        its address and before the pod end exists, that the provider does not proxy (``refuse_proxy``)."""
        o = self.options
        if o.service_type != "LoadBalancer" or (o.peer is None and o.node is None):
            return None

        def check() -> None:
            svc, _ = objects.wait_load_balancer(lambda: self._service(deadline), o.port, deadline)
            objects.refuse_proxy(svc, o.peer, o.node, o.port)

        return check

    def pods(self, deadline: Deadline) -> list[Any]:
        return objects.pods(self.cluster, self.placement, deadline)

    def _wait_pod_placed(self, deadline: Deadline) -> Any:
        """The pod end's pod once it is on a node with its address (its Service endpoint exists, so
        kube-proxy programs the Service while the agent's container starts; the handshake's hellos
        follow each other closely until the agent answers, and ``check`` fails the session at once
        on a state the pod cannot leave); fails at once on such a state here too."""

        def placed() -> Any:
            live = [p for p in self.pods(deadline) if p.metadata.deletion_timestamp is None]
            for pod in live:
                podstate.raise_if_stuck(pod, AGENT_CONTAINER)
            found = [p for p in live if p.spec.node_name and p.status.pod_ip]
            return found[0] if found else None

        return wait_for(
            placed,
            phase="pod end placed",
            deadline=deadline,
            describe=lambda: "; ".join(podstate.describe_pod(p) for p in self.pods(deadline)) or "no pod yet",
            hint="check that the cluster has a schedulable node and can run the image (" + podstate.IMAGE_HINT + ")",
            interval=_POLL_S,
        )

    def check(self) -> None:
        """Raise if the pod end's pod is stuck (crash loop, image, unschedulable); a missing pod is
        being replaced by its Deployment and is fine."""
        for pod in self.pods(Deadline.after(_DIAGNOSTICS_S)):
            if pod.metadata.deletion_timestamp is None:
                podstate.raise_if_stuck(pod, AGENT_CONTAINER)

    def _service_endpoint(self, pod: Any, deadline: Deadline) -> Endpoint:
        o = self.options
        return objects.service_endpoint(
            self.cluster, pod, lambda: self._service(deadline), o.service_type, o.port, deadline
        )

    def _service(self, deadline: Deadline) -> Any:
        return objects.service(self.cluster, self.placement, deadline)

    # -- removal -----------------------------------------------------------------------

    def teardown(self, deadline: Deadline) -> None:
        """Delete what the run created and wait until it is on its way out (the API server has set
        each object's deletion timestamp; the cluster finishes the rest, pods included)."""
        if self._cluster is None:
            return
        try:
            delete_run_objects(self._cluster, self.placement, deadline, wait=False)
        except (KubeError, WaitTimeout) as exc:
            raise KubeError(
                f"removing the pod end ({self.placement.describe()}): {exc}; 'svctunnel reap' removes what is left"
                " once the cluster lets it",
                getattr(exc, "status", None),
            ) from None
        self._cluster.close()
        self._cluster = None

    # -- reporting ---------------------------------------------------------------------

    def diagnostics(self) -> list[tuple[str, str]]:
        if self._cluster is None:
            return [("kubernetes", "not connected to a cluster")]
        cluster, placement = self._cluster, self.placement

        def deadline() -> Deadline:
            return Deadline.after(_DIAGNOSTICS_S)

        return [
            diagnostics.safely(
                "pod end log",
                lambda: podstate.read_logs(cluster, placement.namespace, self.pods(deadline()), AGENT_CONTAINER),
            ),
            diagnostics.safely(
                "pod end pods", lambda: "\n".join(map(podstate.describe_pod, self.pods(deadline()))) or "no pods"
            ),
            diagnostics.safely("pod end Service", lambda: objects.describe_service(self._service(deadline()))),
            diagnostics.safely(
                "recent events", partial(objects.recent_events, cluster, placement.namespace, deadline())
            ),
        ]

    def describe_kept(self) -> str:
        ns, selector = self.placement.namespace, self.placement.selector
        remove = (
            f"kubectl delete namespace {ns}"
            if self.placement.owns_namespace
            else f"kubectl -n {ns} delete deployment,service,secret -l {selector}"
        )
        source = self._cluster.source if self._cluster else "no cluster"
        devices = names.link_prefix(self.run.id) + "*"
        return (
            f"pod end kept: {self.placement.describe()} ({source}), and this end's devices {devices};"
            f" remove all with 'svctunnel reap --include-detached', or the pod end with '{remove}'"
        )
