"""The external end: handshake with the pod end through the Service, then local devices.

The hello leaves from the port the local VXLAN devices will use, so the flow it
opens through every NAT and the Service is the flow the tunnel runs on.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

from . import device, linkbatch
from .errors import HandshakeError, SvcTunnelError, WaitTimeout
from .networks import Network
from .probe import ping_once
from .protocol import (
    Ack,
    Challenge,
    Confirm,
    Endpoint,
    Hello,
    Message,
    ProtocolError,
    decode,
    encode,
)
from .waiting import Deadline, Stopwatch

log = logging.getLogger("svctunnel.connect")
# The first hello often arrives before kube-proxy has programmed the endpoint, so for a second the
# hellos follow each other closely (within the agent's limit of 10/s after a burst of 20); then the
# wait doubles up to RETRANSMIT_S.
RETRANSMIT_FIRST_S = 0.1
FAST_FOR = 10
RETRANSMIT_S = 1.0
HEALTH_EVERY_S = 1.0  # at most this often the pod end's health is asked during a handshake
FRESH_PORT_AFTER = 2  # unanswered hellos from one port before the next comes from a fresh one: a hello that
# met no Service rule yet leaves a conntrack entry that holds every later datagram of its port


def relayed(observed: Endpoint, service: Endpoint) -> bool:
    """Whether a proxy relays the tunnel: the pod sees this end as the load balancer's own address
    (cloud-provider-kind's Envoy forwards from there), as the agent's ACK tells."""
    return observed.address == service.address


@dataclass(frozen=True)
class ConnectSettings:
    """What the external end needs to open a tunnel."""

    service: Endpoint
    key: bytes
    networks: tuple[Network, ...]
    timeout: float = 30.0
    underlay_dev: str | None = None
    keepalive: float = 5.0
    misses: int = 3


@dataclass(frozen=True)
class Connection:
    """A tunnel as built by the external end."""

    service: Endpoint
    peer: Endpoint  # this end as the pod saw it, after every NAT
    local: Endpoint  # this end's own tunnel address and port
    networks: tuple[Network, ...]


class Handshake:
    """HELLO, CHALLENGE, CONFIRM, ACK over one UDP socket; pure protocol bookkeeping."""

    def __init__(self, key: bytes, hello: Hello) -> None:
        self.key = key
        self.hello = hello
        self.session = secrets.token_bytes(8)
        self.counter = 0
        self.sent: set[int] = set()
        self.nonce: bytes | None = None
        self.observed: Endpoint | None = None

    def next_datagram(self) -> bytes:
        """The message to (re)send now: a HELLO until challenged, then a CONFIRM."""
        self.counter += 1
        self.sent.add(self.counter)
        body: Hello | Confirm = self.hello if self.nonce is None else Confirm(self.nonce)
        return encode(Message(self.session, self.counter, int(time.time() * 1000), body), self.key)

    def receive(self, datagram: bytes) -> Ack | None:
        """Take one answer; returns the ACK once it arrives. Invalid datagrams are ignored."""
        try:
            message = decode(datagram, self.key)
        except ProtocolError as exc:
            log.debug("ignored answer: %s", exc)
            return None
        if message.session != self.session or message.counter not in self.sent:
            return None
        if isinstance(message.body, Challenge) and self.nonce is None:
            self.nonce, self.observed = message.body.nonce, message.body.observed
        elif isinstance(message.body, Ack) and self.nonce is not None:
            return message.body
        return None


def _handshake(
    settings: ConnectSettings,
    route: device.Route,
    hello: Hello,
    cancel: threading.Event | None = None,
    health: Callable[[], None] | None = None,
) -> tuple[Ack, Endpoint]:
    """Run the handshake; retransmits every RETRANSMIT_FIRST_S for FAST_FOR hellos, then twice as long
    each time up to RETRANSMIT_S, until the deadline. While nothing answers, every FRESH_PORT_AFTER hellos come from a
    fresh port, so a conntrack entry made before the Service's rules existed cannot hold the flow.
    ``health`` raises if the pod end is gone for good (asked at most every HEALTH_EVERY_S)."""
    family = socket.AF_INET if route.source.version == 4 else socket.AF_INET6
    deadline = Deadline.after(settings.timeout)
    shake = Handshake(settings.key, hello)
    target = (str(settings.service.address), settings.service.port)
    intervals = retransmit_intervals()
    health = _throttled(health, HEALTH_EVERY_S) if health is not None else None
    while not _stopped(deadline, cancel):
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(route.source), 0))
            local = Endpoint(route.source, sock.getsockname()[1])
            log.info("handshake: hello from %s to %s", local, settings.service)
            ack = _shake_from(sock, shake, target, deadline, cancel, health, intervals)
            if ack is not None:
                return ack, local
    stage = "no answer to any hello" if shake.nonce is None else "challenge answered but no ACK"
    raise WaitTimeout(
        "handshake",
        settings.timeout,
        f"{stage} from {settings.service} (sent {shake.counter} datagrams)",
        "check that the Service forwards UDP to the agent, the key matches, and --peer/--svctunnel-peer is right"
        " (a load balancer that proxies shows the pod its own address, never yours: leave the peer out there)",
    )


def retransmit_intervals() -> Iterator[float]:
    """How long to wait for an answer after each hello: 0.1 s ten times, then 0.2, 0.4, 0.8, then 1 s each."""
    for _ in range(FAST_FOR):
        yield RETRANSMIT_FIRST_S
    wait = RETRANSMIT_FIRST_S
    while True:
        wait = min(2 * wait, RETRANSMIT_S)
        yield wait


def _throttled(check: Callable[[], None], every: float) -> Callable[[], None]:
    """``check`` at most once per ``every`` seconds (the first call always runs)."""
    last = [-every]

    def run() -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            check()

    return run


def _stopped(deadline: Deadline, cancel: threading.Event | None) -> bool:
    return deadline.expired() or (cancel is not None and cancel.is_set())


def _shake_from(
    sock: socket.socket,
    shake: Handshake,
    target: tuple[str, int],
    deadline: Deadline,
    cancel: threading.Event | None,
    health: Callable[[], None] | None,
    intervals: Iterator[float],
) -> Ack | None:
    """Hellos from one port: the ACK, or None once FRESH_PORT_AFTER went unanswered or time is up."""
    unanswered = 0
    while not _stopped(deadline, cancel) and (shake.nonce is not None or unanswered < FRESH_PORT_AFTER):
        if health is not None:
            health()
        sock.sendto(shake.next_datagram(), target)
        unanswered += 1
        resend_at = time.monotonic() + next(intervals)
        while (left := min(resend_at, deadline.expires_at) - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(4096)
            except (TimeoutError, ConnectionRefusedError):
                continue
            challenged = shake.nonce is not None
            ack = shake.receive(data)
            if ack is not None:
                return ack
            if shake.nonce is not None and not challenged:
                break  # answer the challenge now rather than at the next retransmit
    return None


@dataclass
class EndStatus:
    """The external end's state and counters, for logs, SIGUSR1 and diagnostics."""

    state: str = "handshake"
    peer: Endpoint | None = None
    local: Endpoint | None = None
    counters: Counter[str] = field(default_factory=Counter)
    problem: str = ""  # why the last re-handshake failed (the pod end is gone, say)

    def render(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counters.items())) or "-"
        line = f"state={self.state} local={self.local or '-'} peer={self.peer or '-'} counters: {counts}"
        return f"{line}\nlast problem: {self.problem}" if self.problem else line


class ExternalEnd:
    """Opens the tunnel from this host, keeps it alive, and removes its devices on close.

    After ``open``, a keeper thread pings through the tunnel every keepalive interval
    (more often once one goes unanswered). After ``misses`` misses in a row the path
    is dead: the keeper runs a new handshake from a fresh source port, so no stale
    conntrack entry on the node or in a NAT can capture it, and moves the devices
    over to that port. ``close`` is safe to call twice.
    """

    def __init__(
        self,
        settings: ConnectSettings,
        stopwatch: Stopwatch | None = None,
        health: Callable[[], None] | None = None,
        group: int | None = None,
    ) -> None:
        self.settings = settings
        self.health = health  # raises when the pod end is gone for good (a crash loop, say)
        self.stopwatch = stopwatch or Stopwatch()
        self.status = EndStatus()
        self._stack = ExitStack()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._hello: Hello | None = None
        self.group = group or linkbatch.new_group()  # the link group of this end's devices
        self.connection: Connection | None = None

    def open(self) -> Connection:
        try:
            connection = self._open()
        except BaseException:
            self.close()
            raise
        self._keeper = threading.Thread(target=self._keep, name="svctunnel-keepalive", daemon=True)
        self._keeper.start()
        return connection

    def _open(self) -> Connection:
        s = self.settings
        route = device.route_to(None, s.service.address)
        underlay_mtu = device.link_mtu(None, s.underlay_dev) if s.underlay_dev else route.mtu
        mtu = device.tunnel_mtu(underlay_mtu, s.service.address.version)
        names = [net.dev for net in s.networks]
        linkbatch.refuse_foreign(linkbatch.existing(None, names), "choose other device names (--dev)")
        self._hello = Hello(mtu, tuple(n.pod_network() for n in s.networks), round(s.keepalive * 1000), s.misses)
        self._stack.callback(linkbatch.remove, None, names, self.group)
        connection = self._connect(route, Deadline.after(s.timeout), self.stopwatch)
        log.info(
            "up: the pod sees this end as %s; %d network(s), mtu %d",
            connection.peer,
            len(connection.networks),
            connection.networks[0].mtu,
        )
        return connection

    def _connect(self, route: device.Route, deadline: Deadline, stopwatch: Stopwatch) -> Connection:
        """Handshake from a fresh port, then (re)build the devices on that port and check traffic."""
        s, hello = self.settings, self._hello
        assert hello is not None
        ack, local = _handshake(s, route, hello, self._stop, self.health)
        stopwatch.lap("handshake")
        mtu = min(hello.mtu, ack.mtu)
        nets = tuple(n.with_mtu(mtu) for n in s.networks)
        underlay, specs = s.underlay_dev or route.dev, []
        for net in nets:
            addresses = tuple(a for a in (net.local_ipv4, net.local_ipv6) if a is not None)
            spec = device.VxlanSpec(net.dev, net.vni, local.port, route.source, underlay, mtu, addresses, s.service)
            specs.append(spec)
        linkbatch.build(None, specs, self.group, finish_checksums=relayed(ack.observed, s.service))
        stopwatch.lap("devices")
        wait_carries_traffic(nets, deadline, self._stop)
        stopwatch.lap("first ping")
        self.connection = Connection(s.service, ack.observed, local, nets)
        self.status.state, self.status.peer, self.status.local = "up", ack.observed, local
        self.status.counters["handshakes"] += 1
        return self.connection

    # -- keeping it alive ------------------------------------------------------

    def _keep(self) -> None:
        interval, misses = self.settings.keepalive, self.settings.misses
        probe_timeout = interval / misses
        missed = 0
        while not self._stop.wait(interval if missed == 0 else 0):
            if self._probe(probe_timeout):
                missed = 0
                continue
            missed += 1
            self.status.counters["keepalives-missed"] += 1
            if missed >= misses:
                self._set_state("dead", f"{missed} keepalives in a row unanswered")
                self._reopen()
                missed = 0

    def _probe(self, timeout: float) -> bool:
        self.status.counters["keepalives"] += 1
        net = self.settings.networks[0]
        target = net.remote_ipv4 or net.remote_ipv6
        assert target is not None
        try:
            return ping_once(net.dev, target.ip, timeout)
        except OSError:
            return False  # the device is being rebuilt

    def _reopen(self) -> None:
        """New handshakes from fresh ports until one carries traffic again, or close()."""
        while not self._stop.is_set():
            old = self.status.peer
            self.status.counters["rehandshakes"] += 1
            self._set_state("rehandshake", f"re-opening the flow from a fresh port (was {self.status.local})")
            try:
                route = device.route_to(None, self.settings.service.address)
                conn = self._connect(route, Deadline.after(self.settings.timeout), Stopwatch())
            except (SvcTunnelError, OSError) as exc:
                if self._stop.is_set():
                    return
                self.status.problem = str(exc)
                log.warning("re-handshake failed: %s", exc)
                self._stop.wait(min(self.settings.keepalive, 1.0))
                continue
            self.status.problem = ""
            moved = f"; peer moved from {old} to {conn.peer}" if old != conn.peer else ""
            log.info("up: tunnel carries traffic again via port %d%s", conn.local.port, moved)
            return

    def _set_state(self, state: str, why: str) -> None:
        if state != self.status.state:
            log.info("%s: %s", state, why)
        self.status.state = state

    def close(self) -> None:
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout=RETRANSMIT_S + self.settings.keepalive + 5)
        self._stack.close()


def wait_carries_traffic(nets: Sequence[Network], deadline: Deadline, cancel: threading.Event | None = None) -> None:
    """Ping every pod-end address over its device until each answers, or time out."""
    targets = [(n.dev, a.ip) for n in nets for a in (n.remote_ipv4, n.remote_ipv6) if a is not None]
    waiting = list(targets)
    while waiting:
        if cancel is not None and cancel.is_set():
            raise HandshakeError("stopped while waiting for tunnel traffic")
        dev, address = waiting[0]
        if ping_once(dev, address, timeout=min(0.2, max(deadline.remaining(), 0.01))):
            waiting.pop(0)
        elif deadline.expired():
            raise WaitTimeout(
                "tunnel traffic",
                deadline.seconds,
                f"no echo reply from {address} over {dev}",
                "the handshake succeeded, so look at the link counters in the diagnostics",
            )
