"""A tunnel session: configuration and plan in, a built tunnel out, everything undone after.

Plain Python: the pytest fixtures are a thin shell over ``TunnelSession``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from types import MappingProxyType

from . import diagnostics, keys, names
from .backends import make_backend
from .backends.base import Backend
from .config import TunnelConfig
from .connector import Connection, ConnectSettings, ExternalEnd
from .networks import DEFAULT_NAME, Network
from .privileges import require_net_admin
from .protocol import Endpoint
from .runs import Run
from .shield import shield
from .values import IPAddress
from .waiting import Deadline, Stopwatch


@dataclass(frozen=True)
class Tunnel:
    """What the ``svctunnel`` fixture yields: the default network's fields, all networks,
    the Service address and the peer (this end as the pod end saw it)."""

    networks: Mapping[str, Network]
    service: Endpoint
    peer: Endpoint
    run_id: str

    @property
    def default(self) -> Network:
        return self.networks[DEFAULT_NAME]

    @property
    def service_address(self) -> IPAddress:
        return self.service.address

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

    ``start`` deploys the pod end through the backend, runs the handshake, builds the
    local devices and returns a ``Tunnel``; on any failure (also KeyboardInterrupt or a
    pytest-timeout) it undoes what it did before re-raising. ``stop`` applies --svctunnel-keep.
    """

    def __init__(self, config: TunnelConfig, networks: tuple[Network, ...], run_id: str) -> None:
        self.config = config
        self.networks = networks
        self.run_id = run_id
        self._stack = ExitStack()
        self._backend: Backend | None = None
        self._run: Run | None = None
        self._snapshot: str | None = None
        self.stopwatch = Stopwatch()
        self._end: ExternalEnd | None = None
        self.tunnel: Tunnel | None = None
        self.teardown_failed = False  # then the run stays on record for 'svctunnel reap'

    @property
    def backend(self) -> Backend | None:
        """The backend once ``start`` has chosen it (for diagnostics and benchmarks)."""
        return self._backend

    def start(self) -> Tunnel:
        require_net_admin("the svctunnel fixture")
        try:
            return self._start()
        except BaseException:
            with shield():  # a second Ctrl-C, SIGTERM or timeout waits until all is undone
                self._snapshot = self.diagnostics()
                self._stack.close()
            raise

    def _start(self) -> Tunnel:
        timeout = self.config.timeout
        run = self._run = Run.create(self.run_id)
        self._stack.push(self._forget_run_when_clean)
        key = keys.new_key()
        backend = self._backend = make_backend(self.config, run)
        self._stack.callback(lambda: backend.teardown(Deadline.after(timeout)))
        service = backend.deploy(key, Deadline.after(timeout), self.stopwatch)
        settings = ConnectSettings(
            service,
            key,
            self.networks,
            timeout,
            self.config.underlay_dev,
            self.config.keepalive,
            self.config.misses,
        )
        end = self._end = ExternalEnd(settings, self.stopwatch, backend.check)
        self._stack.callback(end.close)
        conn: Connection = end.open()
        self.tunnel = Tunnel(MappingProxyType({n.name: n for n in conn.networks}), service, conn.peer, self.run_id)
        return self.tunnel

    def _forget_run_when_clean(self, kind: type[BaseException] | None, _exc: object, _tb: object) -> bool:
        """The last undo step: remove the run's record only when every other step succeeded."""
        if kind is not None:
            self.teardown_failed = True
        elif self._run is not None:
            self._run.remove()
        return False

    def stop(self, failed: bool) -> str | None:
        """Tear down unless --svctunnel-keep says otherwise; returns a note when kept."""
        keep = self.config.keep == "always" or (self.config.keep == "on-failure" and failed)
        if keep and self._backend is not None:
            self._stack.pop_all()
            return self._backend.describe_kept()
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
        return diagnostics.render(parts)
