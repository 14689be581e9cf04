"""A tunnel session: configuration and plan in, a built tunnel out, everything undone after.

Plain Python: the pytest fixtures are a thin shell over ``TunnelSession``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import claims, diagnostics, keys, names, neighbours
from .backends import make_backend
from .backends.base import Backend
from .config import TunnelConfig
from .connector import Connection, ConnectSettings, ExternalEnd, relayed
from .networks import DEFAULT_NAME, Held, Network, NetworkMap, NetworkRequest, Plan, plan_attached
from .privileges import require_net_admin
from .protocol import Endpoint
from .runs import Run
from .shield import shield
from .targets import Target
from .values import IPAddress
from .waiting import Deadline, Stopwatch

if TYPE_CHECKING:  # the Kubernetes client loads only when a network goes into a pod
    from .attachments import Attachment, Sidecar


class EndCounter:
    """Hands out the session's indices of injected ends (their Services' names) and local devices,
    and remembers which pods have this session's agent: a pod takes one agent per session."""

    def __init__(self, dev_name: Callable[[int], str], first_dev: int) -> None:
        self._dev_name = dev_name
        self._next_dev = first_dev
        self._next_end = 0
        self.pods: dict[tuple[str, str], str] = {}  # (namespace, pod) -> what attached it

    def next_dev(self) -> str:
        name = self._dev_name(self._next_dev)
        self._next_dev += 1
        return name

    def next_end(self) -> int:
        self._next_end += 1
        return self._next_end


@dataclass(frozen=True)
class Tunnel:
    """What the ``svctunnel`` fixture yields: the default network's fields, all networks,
    the Service address and the peer (this end as the pod end saw it; with targets only, the
    first pod's)."""

    networks: NetworkMap
    service: Endpoint
    peer: Endpoint
    run_id: str

    @property
    def default(self) -> Network:
        return self.networks[DEFAULT_NAME]

    def pods(self, name: str = DEFAULT_NAME) -> dict[str, Network]:
        """Pod name -> network ``name`` in that pod, for a network that went into target pods."""
        return self.networks.pods(name)

    @property
    def service_address(self) -> IPAddress:
        return self.service.address

    def describe_path(self) -> str:
        """Where the pod sees this end, and through what (``connector.relayed``)."""
        through = "a proxying load balancer" if relayed(self.peer, self.service) else "the Service"
        return f"the pod sees this end as {self.peer} through {through} at {self.service}"

    @property
    def dev(self) -> str:
        return self.default.dev

    @property
    def vni(self) -> int:
        return self.default.vni

    @property
    def mtu(self) -> int:
        return self.default.mtu

    @property
    def local_ipv4(self) -> ipaddress.IPv4Interface | None:
        return self.default.local_ipv4

    @property
    def local_ipv6(self) -> ipaddress.IPv6Interface | None:
        return self.default.local_ipv6

    @property
    def remote_ipv4(self) -> ipaddress.IPv4Interface | None:
        return self.default.remote_ipv4

    @property
    def remote_ipv6(self) -> ipaddress.IPv6Interface | None:
        return self.default.remote_ipv6


class TunnelSession:
    """Builds the tunnel of one test session and removes it again.

    ``start`` deploys the pod end through the backend (for the networks without a target) and
    injects agents into the target pods (for those with one), runs the handshakes, builds the
    local devices and returns a ``Tunnel``; ``attach`` adds networks into more pods later. On any
    failure (also KeyboardInterrupt or a pytest-timeout) each undoes what it did before
    re-raising. ``stop`` removes everything, or applies --svctunnel-keep.
    """

    def __init__(
        self, config: TunnelConfig, plan: Plan, run_id: str, run: Run | None = None, stopwatch: Stopwatch | None = None
    ) -> None:
        """``run``: a run that exists already and that its owner removes (a keeper's for xdist
        workers); without it the session makes its run when it starts and removes it at the end.
        ``stopwatch``: one started when the setup began (by default, now)."""
        self.config = config
        self.plan = plan
        self.networks = plan.networks()  # as asked; ``start`` plans them anew around what others hold
        self.run_id = run_id
        self._stack = ExitStack()
        self._backend: Backend | None = None
        self._run: Run | None = run
        self._owns_run = run is None
        self._key = b""
        self._snapshot: str | None = None
        self.stopwatch = stopwatch or Stopwatch()
        self._end: ExternalEnd | None = None
        self._attachments: list[Attachment] = []
        self.counter = EndCounter(lambda index: names.link_name(run_id, str(index)), len(self.networks))
        self.tunnel: Tunnel | None = None
        self.teardown_failed = False  # then the run stays on record for 'svctunnel reap'

    @property
    def backend(self) -> Backend | None:
        """The backend once ``start`` has chosen it (for diagnostics and benchmarks)."""
        return self._backend

    def _ensure_run(self) -> Run:
        if not self._key:
            self._run = self._run or Run.create(self.run_id)
            self._stack.push(self._forget_run_when_clean)
            self._key = keys.new_key()
        assert self._run is not None
        return self._run

    def start(self) -> Tunnel:
        require_net_admin("the svctunnel fixture")
        neighbours.check_room(self.networks)
        parts, attached_before = ExitStack(), bool(self._attachments)
        try:
            self.tunnel = self._start(parts)
        except BaseException:
            with shield():  # a second Ctrl-C, SIGTERM or timeout waits until all is undone
                self._snapshot = self.diagnostics()
                self._undo_start(parts, close_all=not attached_before)
            raise
        self._stack.enter_context(parts.pop_all())
        return self.tunnel

    def _undo_start(self, parts: ExitStack, close_all: bool) -> None:
        """Undo a failed start; with nothing attached before it, the whole session (its run too)."""
        try:
            parts.close()
        except BaseException:
            self.teardown_failed = True  # the run stays on record for 'svctunnel reap'
            raise
        finally:
            if close_all:
                self._stack.close()

    def _start(self, parts: ExitStack) -> Tunnel:
        timeout = self.config.timeout
        run = self._ensure_run()
        self.networks = claims.claim_networks(run, self.plan.networks)
        own = tuple(n for n in self.networks if n.target is None)
        targeted = tuple(n for n in self.networks if n.target is not None)
        built: list[Network] = []
        service = peer = None
        if own or not targeted:  # the plugin's own pod end, unless every network goes into target pods
            backend = self._backend = make_backend(self.config, run)
            parts.callback(lambda: backend.teardown(Deadline.after(timeout)))
            service = backend.deploy(self._key, Deadline.after(timeout), self.stopwatch)
            settings = ConnectSettings(
                service,
                self._key,
                own,
                timeout,
                self.config.underlay_dev,
                self.config.keepalive,
                self.config.misses,
            )
            end = self._end = ExternalEnd(settings, self.stopwatch, backend.check)
            parts.callback(end.close)
            conn: Connection = end.open()
            built += conn.networks
            peer = conn.peer
        if targeted:
            attachment = self._attachment(targeted, built)
            parts.callback(attachment.close)
            attachment.open()
            built += attachment.networks.all
            first = next(iter(attachment.tunnels.values()))
            service, peer = service or first.service, peer or first.peer
        assert service is not None and peer is not None
        return Tunnel(NetworkMap(built), service, peer, self.run_id)

    def _attachment(self, networks: Sequence[Network], taken: Sequence[Network]) -> Attachment:
        from .attachments import Attachment

        attachment = Attachment(
            self.config, self._ensure_run(), self._key, networks, self.counter, taken, self.stopwatch
        )
        self._attachments.append(attachment)
        return attachment

    def built_networks(self) -> tuple[Network, ...]:
        """Every network this session has built so far, its own pod end's and every pod's."""
        own = self.tunnel.networks.all if self.tunnel is not None else ()
        return (*own, *(n for a in self._attachments for n in a.networks.all))

    def attach(self, target: Target, requests: Sequence[NetworkRequest]) -> Attachment:
        """Networks into the pods of ``target`` (one per request, in each pod), until the returned
        ``Attachment`` is closed, at the latest when the session stops."""
        require_net_admin("svctunnel_attach")
        taken = self.built_networks()
        planned = self._plan_attached(requests, target, taken)
        neighbours.check_room(planned)
        attachment = self._attachment(planned, taken)
        attachment.open()
        self._stack.callback(attachment.close)  # a no-op once the test closed it
        return attachment

    def sidecar(self, namespace: str, requests: Sequence[NetworkRequest]) -> Sidecar:
        """A sidecar for a pod the suite is about to create in ``namespace``, with one network per
        request; its Secret and Service exist when this returns (see ``attachments.Sidecar``)."""
        from .attachments import Sidecar

        require_net_admin("svctunnel_sidecar")
        target = Target(namespace, selector=f"svctunnel.dev/sidecar-{self.run_id}")
        taken = self.built_networks()
        planned = self._plan_attached(requests, target, taken)
        sidecar = Sidecar(self.config, self._ensure_run(), self._key, planned, self.counter, namespace)
        self._attachments.append(sidecar)
        sidecar.open()
        self._stack.callback(sidecar.close)
        return sidecar

    def _plan_attached(
        self, requests: Sequence[NetworkRequest], target: Target, taken: Sequence[Network]
    ) -> tuple[Network, ...]:
        """The networks of an attach or a sidecar, planned around what others hold and claimed."""

        def plan(held: Sequence[Held]) -> tuple[Network, ...]:
            return plan_attached(requests, target, taken, self.counter.next_dev, self.config.vni, held)

        return claims.claim_networks(self._ensure_run(), plan)

    def _forget_run_when_clean(self, kind: type[BaseException] | None, _exc: object, _tb: object) -> bool:
        """The last undo step: remove the run's record only when every other step succeeded."""
        if kind is not None:
            self.teardown_failed = True
        elif self._run is not None and not self.teardown_failed and self._owns_run:
            self._run.remove()
        return False

    def stop(self, failed: bool) -> str | None:
        """Tear down unless --svctunnel-keep says otherwise; returns a note when kept."""
        keep = self.config.keep == "always" or (self.config.keep == "on-failure" and failed)
        kept = [self._backend.describe_kept()] if self._backend is not None else []
        kept += [end.describe_kept() for a in self._attachments for end, _ in a.ends]
        if keep and kept:
            self._stack.pop_all()
            return "; ".join(kept)
        with shield():  # SIGINT, SIGTERM and pytest-timeout's alarm wait until all is removed
            self._stack.close()
        return None

    def diagnostics(self) -> str:
        """Agent log tail and both ends' link state, or the snapshot taken when setup failed."""
        if self._snapshot is not None:
            return self._snapshot
        parts = [
            diagnostics.safely("external end links", lambda: diagnostics.local_links(names.link_prefix(self.run_id)))
        ]
        if self._end is not None:
            parts.append(("external end status", self._end.status.render()))
        if self._backend is not None:
            parts += self._backend.diagnostics()
        for attachment in self._attachments:
            parts += attachment.diagnostics()
        return diagnostics.render(parts)
