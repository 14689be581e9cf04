"""Networks into the pods of the user's workloads: one injected agent and one external end per pod.

An ``Attachment`` takes networks planned for one pod of each target, asks the API server
whether injection is allowed and which pods the targets match (all before anything is
created), gives every further pod its own device, addresses and VNI, then injects the agent
into each pod and opens the tunnel to it. ``close`` ends each agent with a goodbye and removes
what was added; each injected agent is on record in the run's state directory until then, so
``svctunnel reap`` can end it after a killed session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from . import claims
from .backends.kubernetes.client import Cluster, connect
from .backends.kubernetes.inject import InjectedEnd, InjectedPlacement, InjectOptions, find_pods
from .backends.kubernetes.preconditions import check_injection, check_sidecar
from .backends.kubernetes.sidecar import SidecarEnd, sidecar_placement
from .config import TunnelConfig
from .connector import ConnectSettings, ExternalEnd
from .errors import ConfigError
from .networks import Network, NetworkMap, spread_over_pods
from .protocol import Endpoint
from .runs import INJECTED_PREFIX, Run
from .shield import shield
from .targets import Target
from .waiting import Deadline, Stopwatch

if TYPE_CHECKING:
    from .session import EndCounter

_AnyEnd = TypeVar("_AnyEnd", bound=InjectedEnd)


@dataclass(frozen=True)
class PodTunnel:
    """The networks of one target pod, the Service that reaches it, and this end as it saw it."""

    namespace: str
    pod: str
    networks: tuple[Network, ...]
    service: Endpoint
    peer: Endpoint


class Attachment:
    """Networks in the user's pods; usable as a context manager (``close`` on exit)."""

    def __init__(
        self,
        config: TunnelConfig,
        run: Run,
        key: bytes,
        networks: Sequence[Network],
        counter: EndCounter,
        taken: Sequence[Network] = (),
        stopwatch: Stopwatch | None = None,
    ) -> None:
        self.config = config
        self.run = run
        self.key = key
        self.planned = tuple(networks)
        self.counter = counter
        self.taken = tuple(taken)
        self.stopwatch = stopwatch or Stopwatch()
        self.tunnels: dict[str, PodTunnel] = {}  # by pod name
        self.ends: list[tuple[InjectedEnd, ExternalEnd | None]] = []
        self._records: dict[int, tuple[str, str]] = {}  # id(end) -> (its record's file name, its kind)
        self._stack = ExitStack()
        self._cluster: Cluster | None = None

    # -- opening ---------------------------------------------------------------------

    def open(self) -> Attachment:
        """Check, inject and connect; on any failure (also Ctrl-C) undo it all before re-raising."""
        try:
            self._open()
        except BaseException:
            with shield():
                self._stack.close()
            raise
        return self

    def _open(self) -> None:
        c = self.config
        deadline = Deadline.after(c.timeout)
        cluster = self._cluster = connect(c.kubeconfig, c.context)
        self._stack.callback(cluster.close)
        targets = sorted({n.target for n in self.planned if n.target is not None}, key=str)
        for namespace in sorted({t.namespace for t in targets}):
            check_injection(cluster, namespace, deadline)
        pods = {t: [str(p.metadata.name) for p in find_pods(cluster, t, deadline)] for t in targets}
        self._claim(pods)
        built = claims.claim_networks(
            self.run, lambda held: spread_over_pods(self.planned, pods, self.counter.next_dev, self.taken, held)
        )
        self.stopwatch.lap("pods chosen")
        options = InjectOptions(c.port, c.peer, c.image, c.service_type, c.idle_exit)
        for target in targets:
            for pod in pods[target]:
                nets = tuple(n for n in built if n.target == target and n.pod == pod)
                self._connect(cluster, target, pod, nets, options)

    def _claim(self, pods: Mapping[Target, Sequence[str]]) -> None:
        """One agent per pod and session: a pod that two targets (or an earlier attach) reach is an error."""
        seen: dict[tuple[str, str], str] = {}
        for target, names in pods.items():
            for pod in names:
                key = (target.namespace, pod)
                other = self.counter.pods.get(key) or seen.get(key)
                if other is not None:
                    raise ConfigError(
                        f"pod {target.namespace}/{pod} is reached by target {target} and by {other}; a pod takes"
                        " one agent per session: give all its networks the same target (or one svctunnel_attach)"
                    )
                seen[key] = f"target {target}"
        self.counter.pods.update(seen)
        self._stack.callback(lambda: [self.counter.pods.pop(k, None) for k in seen])

    def _connect(
        self, cluster: Cluster, target: Target, pod: str, nets: tuple[Network, ...], options: InjectOptions
    ) -> None:
        index = self.counter.next_end()
        place = InjectedPlacement.of(self.run.id, target.namespace, pod, index)
        end = self._register(InjectedEnd(self.run.id, cluster, place, options), f"{INJECTED_PREFIX}{index}.json")
        self._open_end(end, nets)

    def _register(self, end: _AnyEnd, record: str) -> _AnyEnd:
        """Put the end on record (for 'svctunnel reap') and on the undo stack."""
        kind = "sidecar" if isinstance(end, SidecarEnd) else "injected"
        self.run.write(record, self._record(end.place, None, kind))
        self._records[id(end)] = (record, kind)

        def undo() -> None:
            end.teardown(Deadline.after(self.config.timeout))
            self.run.forget(record)  # only after a clean teardown: else 'svctunnel reap' finishes it

        self._stack.callback(undo)
        self.ends.append((end, None))
        return end

    def _open_end(self, end: InjectedEnd, nets: tuple[Network, ...]) -> None:
        """Deploy (or wait for) the pod end, then open the tunnel to it."""
        c = self.config
        service = end.deploy(self.key, Deadline.after(c.timeout), self.stopwatch)
        record, kind = self._records[id(end)]
        self.run.write(record, self._record(end.place, service, kind))
        nets = tuple(replace(n, pod=end.place.pod) for n in nets)
        settings = ConnectSettings(service, self.key, nets, c.timeout, c.underlay_dev, c.keepalive, c.misses)
        external = ExternalEnd(settings, self.stopwatch, end.check)
        self._stack.callback(external.close)
        self.ends = [(e, external if e is end else x) for e, x in self.ends]
        conn = external.open()
        self.tunnels[end.place.pod] = PodTunnel(end.place.namespace, end.place.pod, conn.networks, service, conn.peer)

    def _record(self, place: InjectedPlacement, service: Endpoint | None, kind: str = "injected") -> dict[str, Any]:
        from .keys import key_text

        return {
            "kind": kind,
            "kubeconfig": self.config.kubeconfig,
            "context": self.config.context,
            "placement": place.record(),
            "service": None if service is None else {"address": str(service.address), "port": service.port},
            "key": key_text(self.key),
            "idle_exit": self.config.idle_exit,
        }

    # -- what the tests see ----------------------------------------------------------

    @property
    def networks(self) -> NetworkMap:
        """The networks by name; ``networks.pods(name)`` by pod."""
        return NetworkMap([n for t in self.tunnels.values() for n in t.networks])

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """End every agent (goodbye), remove this end's devices and what was added to the pods."""
        with shield():
            self._stack.close()
        self.tunnels.clear()
        self.ends.clear()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def diagnostics(self) -> list[tuple[str, str]]:
        parts: list[tuple[str, str]] = []
        for end, external in self.ends:
            title = f"{end.place.namespace}/{end.place.pod}"
            if external is not None:
                parts.append((f"external end to {title}", external.status.render()))
            parts += end.diagnostics()
        return parts


class Sidecar(Attachment):
    """Networks into a pod the suite is about to create, there before its application starts.

    ``open`` creates the Secret and the Service and fills in ``container`` (for the pod's
    ``initContainers``) and ``labels`` (for the pod's labels); create the pod, then ``wait``
    returns once its sidecar has the tunnel up (only then does the kubelet start the pod's main
    containers). ``close`` (or the session's end) removes the Secret and the Service and tells the
    sidecar to remove its networks; the pod is the suite's."""

    def __init__(
        self,
        config: TunnelConfig,
        run: Run,
        key: bytes,
        networks: Sequence[Network],
        counter: EndCounter,
        namespace: str,
        stopwatch: Stopwatch | None = None,
    ) -> None:
        super().__init__(config, run, key, networks, counter, (), stopwatch)
        self.namespace = namespace
        self.container: dict[str, Any] = {}
        self.labels: dict[str, str] = {}
        self._end: SidecarEnd | None = None
        self.ready = False  # wait() returned: the tunnel was up

    def _open(self) -> None:
        c = self.config
        deadline = Deadline.after(c.timeout)
        cluster = self._cluster = connect(c.kubeconfig, c.context)
        self._stack.callback(cluster.close)
        check_sidecar(cluster, self.namespace, deadline)
        index = self.counter.next_end()
        place = sidecar_placement(self.run.id, self.namespace, index)
        options = InjectOptions(c.port, c.peer, c.image, c.service_type, c.idle_exit)
        end = self._end = self._register(
            SidecarEnd(self.run.id, cluster, place, options), f"{INJECTED_PREFIX}{index}.json"
        )
        self.container = end.prepare(self.key, deadline)
        self.labels = {place.label_key: place.label_value}
        self.stopwatch.lap("objects created")

    def wait(self) -> Sidecar:
        """Wait for the pod, its sidecar and the tunnel; on failure everything is removed."""
        assert self._end is not None, "open() first"
        try:
            self._open_end(self._end, self.planned)
        except BaseException:
            with shield():
                self._stack.close()
            raise
        self.ready = True
        return self
