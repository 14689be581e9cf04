"""The load balancer's data path in the test cluster: routes in the WAN router that send a Service's address only
to the nodes that should get its traffic, as a cloud load balancer's health checks decide.

A Service with ``externalTrafficPolicy: Local`` goes to the nodes whose ``healthCheckNodePort`` (kube-proxy's
health server on the node) answers 200, i.e. the nodes with a local endpoint; any other to every node. One
node gets a plain route, several an ECMP route; none, no route (the packet is not routable, as with a load
balancer without healthy backends). A thread checks every ``POLL_S`` and changes a route only when its set of
nodes changes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pytest_svctunnel import device
from pytest_svctunnel.errors import LabError

from .forward import socket_in_netns

log = logging.getLogger(__name__)

POLL_S = 0.2
_CHECK_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Target:
    """One load-balancer address and how to pick its nodes (health check port 0: every node)."""

    address: ipaddress.IPv4Address
    health_port: int


class HealthRouter:
    """Keeps the WAN router's routes for the ``targets()`` in step with the nodes' health checks."""

    def __init__(
        self, router_netns: str, nodes: Mapping[str, ipaddress.IPv4Address], targets: Callable[[], list[Target]]
    ) -> None:
        self.router_netns = router_netns
        self.nodes = dict(nodes)
        self._targets = targets
        self._routes: dict[ipaddress.IPv4Address, tuple[str, ...]] = {}  # address -> node names routed to
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lb-routes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise LabError(f"the load balancer's routing thread did not stop within {timeout:g} s")
        for address in list(self._routes):
            with contextlib.suppress(Exception):  # the router namespace may be gone already
                self._set(address, ())

    def routed(self, address: ipaddress.IPv4Address) -> tuple[str, ...]:
        """The nodes ``address`` goes to now."""
        return self._routes.get(address, ())

    def _run(self) -> None:
        while not self._stopping.wait(POLL_S):
            try:
                self.sync()
            except Exception:  # the loop outlives a namespace in flux and its own bugs; the next round retries
                log.exception("load-balancer routes: sync failed")

    def sync(self) -> None:
        targets = {t.address: t for t in self._targets()}
        for address in [a for a in self._routes if a not in targets]:
            self._set(address, ())
        for address, target in targets.items():
            self._set(address, self._healthy(target))

    def _healthy(self, target: Target) -> tuple[str, ...]:
        if not target.health_port:
            return tuple(self.nodes)
        return tuple(name for name, node in self.nodes.items() if self._passes(node, target.health_port))

    def _passes(self, node: ipaddress.IPv4Address, port: int) -> bool:
        """GET / on the node's health check port answers 200 (kube-proxy: a local endpoint exists)."""
        try:
            sock = socket_in_netns(self.router_netns)
        except LabError:
            return False
        try:
            sock.settimeout(_CHECK_TIMEOUT_S)
            sock.connect((str(node), port))
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {node}\r\n\r\n".encode())
            status = sock.recv(64).split(b"\r\n", 1)[0].split()
            return len(status) >= 2 and status[1] == b"200"
        except OSError:
            return False
        finally:
            sock.close()

    def _set(self, address: ipaddress.IPv4Address, nodes: tuple[str, ...]) -> None:
        if self._routes.get(address, ()) == nodes:
            return
        destination = f"{address}/32"
        with device.netlink(self.router_netns) as ipr:
            if not nodes:
                with contextlib.suppress(Exception):  # absent already
                    ipr.route("del", dst=destination)
            elif len(nodes) == 1:
                ipr.route("replace", dst=destination, gateway=str(self.nodes[nodes[0]]))
            else:
                hops = [{"gateway": str(self.nodes[name])} for name in nodes]
                ipr.route("replace", dst=destination, multipath=hops)
        if nodes:
            self._routes[address] = nodes
        else:
            self._routes.pop(address, None)
        log.info("load balancer: %s -> %s", address, ", ".join(nodes) or "no node")
