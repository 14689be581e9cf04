"""A userspace UDP load balancer for one Service, as cloud-provider-kind's Envoy is one for KinD.

    python -m tests.kubelab.udpproxy CONFIG_JSON

It runs in a network namespace of its own that holds the Service's load-balancer address (the
Envoy container's address on KinD's network), and behaves as Envoy's ``udp_proxy`` does with the
configuration cloud-provider-kind writes:

- Each client (source address and port, per listening port) is a session with an upstream
  socket of its own: a new source port per session, so the pod sees this proxy's address and a
  port it chose, never the client's.
- A new session goes to a random healthy node, to the Service's node port there.
- Nodes are checked with ``GET /healthz`` on the Service's health check node port (kube-proxy
  answers 200 where a local endpoint exists; ``externalTrafficPolicy: Cluster`` has no such port
  and every node counts as healthy). A node starts unhealthy, is healthy after one passed check,
  unhealthy after two failed ones (Envoy: ``healthy_threshold`` 1, ``unhealthy_threshold`` 2,
  ``healthy_panic_threshold`` 0, so no healthy node means no traffic).
- A datagram of a session whose node turned unhealthy starts a new session to a healthy node.
- A session that saw no datagram either way for ``idle_s`` (Envoy's default: 60 s) is dropped.

CONFIG_JSON: ``{"listen": ADDRESS, "ports": [[PORT, NODE_PORT], ...], "nodes": [ADDRESS, ...],
"health_port": PORT or 0, "idle_s": SECONDS, "check_s": SECONDS, "ready_file": PATH}``. It writes
``ready_file`` once it listens, logs every session it makes or drops to stdout, and exits on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import random
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_DATAGRAM = 65535
CHECK_TIMEOUT_S = 1.0
HEALTHY_AFTER, UNHEALTHY_AFTER = 1, 2


@dataclass
class Session:
    client: tuple[str, int]
    listener: socket.socket
    upstream: socket.socket
    node: str
    last: float = field(default_factory=time.monotonic)


class Health:
    """Which nodes pass the health check now (``healthy``); checked in a thread every ``check_s``, the only
    writer: it replaces ``healthy`` whole, so the proxy's loop reads it per datagram without a lock or copy."""

    def __init__(self, nodes: list[str], port: int, check_s: float) -> None:
        self.nodes, self.port, self.check_s = nodes, port, check_s
        self._passed = {node: 0 for node in nodes}
        self._failed = {node: 0 for node in nodes}
        self.healthy: frozenset[str] = frozenset(nodes) if port == 0 else frozenset()

    def run(self, stop: threading.Event) -> None:
        while self.port and not stop.is_set():
            for node in self.nodes:
                self._record(node, self._passes(node))
            stop.wait(self.check_s)

    def _record(self, node: str, passed: bool) -> None:
        if passed:
            self._passed[node], self._failed[node] = self._passed[node] + 1, 0
            if self._passed[node] >= HEALTHY_AFTER and node not in self.healthy:
                self.healthy = self.healthy | {node}
                print(f"node {node} healthy", flush=True)
        else:
            self._failed[node], self._passed[node] = self._failed[node] + 1, 0
            if self._failed[node] >= UNHEALTHY_AFTER and node in self.healthy:
                self.healthy = self.healthy - {node}
                print(f"node {node} unhealthy", flush=True)

    def _passes(self, node: str) -> bool:
        try:
            with socket.create_connection((node, self.port), timeout=CHECK_TIMEOUT_S) as sock:
                sock.sendall(f"GET /healthz HTTP/1.0\r\nHost: {node}\r\n\r\n".encode())
                status = sock.recv(64).split(b"\r\n", 1)[0].split()
                return len(status) >= 2 and status[1] == b"200"
        except OSError:
            return False


class Proxy:
    def __init__(self, config: dict[str, Any]) -> None:
        self.listen = str(config["listen"])
        self.ports = [(int(p), int(n)) for p, n in config["ports"]]
        self.idle_s = float(config.get("idle_s", 60.0))
        nodes = [str(n) for n in config["nodes"]]
        self.health = Health(nodes, int(config.get("health_port", 0)), float(config.get("check_s", 2.0)))
        self.selector = selectors.DefaultSelector()
        self.node_port: dict[socket.socket, int] = {}
        self.sessions: dict[tuple[socket.socket, tuple[str, int]], Session] = {}  # by listener and client
        self.stop = threading.Event()

    def open(self, ready_file: Path) -> None:
        for port, node_port in self.ports:
            listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.listen, port))
            listener.setblocking(False)
            self.node_port[listener] = node_port
            self.selector.register(listener, selectors.EVENT_READ, None)
        threading.Thread(target=self.health.run, args=(self.stop,), daemon=True).start()
        ready_file.write_text("listening\n")
        print(f"listening on {self.listen} ports {[p for p, _ in self.ports]}", flush=True)

    def serve(self) -> None:
        next_sweep = time.monotonic() + 1.0
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data is None:
                    self._from_client(sock)
                else:
                    self._from_node(sock, key.data)
            if (now := time.monotonic()) >= next_sweep:
                self._sweep(now)
                next_sweep = now + min(1.0, self.idle_s / 4)

    def _from_client(self, listener: socket.socket) -> None:
        while True:
            try:
                data, client = listener.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            session = self._session(listener, client)
            if session is None:
                continue  # no healthy node: dropped
            session.last = time.monotonic()
            with contextlib.suppress(OSError):  # unreachable for now: the datagram is lost, as on any network
                session.upstream.send(data)

    def _from_node(self, upstream: socket.socket, session: Session) -> None:
        while True:
            try:
                data = upstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:  # ICMP errors reported on the connected socket
                continue
            session.last = time.monotonic()
            session.listener.sendto(data, session.client)

    def _session(self, listener: socket.socket, client: tuple[str, int]) -> Session | None:
        key = (listener, client)
        session = self.sessions.get(key)
        healthy = self.health.healthy
        if session is not None and (session.node in healthy or not healthy):
            return session
        if not healthy:
            return None
        if session is not None:
            self._drop(key, f"node {session.node} unhealthy")
        node = random.choice(sorted(healthy))
        upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        upstream.bind((self.listen, 0))  # a new source port for every session
        upstream.connect((node, self.node_port[listener]))
        upstream.setblocking(False)
        session = self.sessions[key] = Session(client, listener, upstream, node)
        self.selector.register(upstream, selectors.EVENT_READ, session)
        print(f"session {client[0]}:{client[1]} -> {node}:{self.node_port[listener]} from port"
              f" {upstream.getsockname()[1]}", flush=True)  # fmt: skip
        return session

    def _sweep(self, now: float) -> None:
        for key, session in list(self.sessions.items()):
            if now - session.last >= self.idle_s:
                self._drop(key, f"idle for {self.idle_s:g} s")

    def _drop(self, key: tuple[socket.socket, tuple[str, int]], why: str) -> None:
        session = self.sessions.pop(key)
        self.selector.unregister(session.upstream)
        session.upstream.close()
        print(f"session {session.client[0]}:{session.client[1]} dropped: {why}", flush=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    proxy = Proxy(config)
    signal.signal(signal.SIGTERM, lambda *_: proxy.stop.set())
    proxy.open(Path(str(config["ready_file"])))
    proxy.serve()


if __name__ == "__main__":
    main()
