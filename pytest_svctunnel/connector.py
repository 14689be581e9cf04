"""The external end: handshake with the pod end through the Service, then local devices.

The hello leaves from the port the local VXLAN devices will use, so the flow it
opens through every NAT and the Service is the flow the tunnel runs on.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from . import device
from .errors import WaitTimeout
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
RETRANSMIT_S = 1.0


@dataclass(frozen=True)
class ConnectSettings:
    """What the external end needs to open a tunnel."""

    service: Endpoint
    key: bytes
    networks: tuple[Network, ...]
    timeout: float = 30.0
    underlay_dev: str | None = None


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


def _handshake(settings: ConnectSettings, route: device.Route, hello: Hello) -> tuple[Ack, Endpoint]:
    family = socket.AF_INET if route.source.version == 4 else socket.AF_INET6
    deadline = Deadline.after(settings.timeout)
    shake = Handshake(settings.key, hello)
    target = (str(settings.service.address), settings.service.port)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((str(route.source), 0))
        local = Endpoint(route.source, sock.getsockname()[1])
        log.info("handshake: hello from %s to %s", local, settings.service)
        while not deadline.expired():
            sock.sendto(shake.next_datagram(), target)
            resend_at = time.monotonic() + RETRANSMIT_S
            while (left := min(resend_at, deadline.expires_at) - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(4096)
                except (TimeoutError, ConnectionRefusedError):
                    continue
                challenged = shake.nonce is not None
                ack = shake.receive(data)
                if ack is not None:
                    return ack, local
                if shake.nonce is not None and not challenged:
                    break  # answer the challenge now rather than at the next retransmit
    stage = "no answer to any hello" if shake.nonce is None else "challenge answered but no ACK"
    raise WaitTimeout(
        "handshake",
        settings.timeout,
        f"{stage} from {settings.service} (sent {shake.counter} datagrams)",
        "check that the Service forwards UDP to the agent, the key matches, and --peer/--svctunnel-peer is right",
    )


class ExternalEnd:
    """Opens the tunnel from this host and removes its devices on close (safe to call twice)."""

    def __init__(self, settings: ConnectSettings, stopwatch: Stopwatch | None = None) -> None:
        self.settings = settings
        self.stopwatch = stopwatch or Stopwatch()
        self._stack = ExitStack()
        self.connection: Connection | None = None

    def open(self) -> Connection:
        try:
            return self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> Connection:
        s = self.settings
        route = device.route_to(None, s.service.address)
        underlay_mtu = device.link_mtu(None, s.underlay_dev) if s.underlay_dev else route.mtu
        mtu = device.tunnel_mtu(underlay_mtu, s.service.address.version)
        for net in s.networks:
            device.check_name_free(None, net.dev)
        hello = Hello(mtu, tuple(n.pod_network() for n in s.networks))
        deadline = Deadline.after(s.timeout)
        ack, local = _handshake(s, route, hello)
        self.stopwatch.lap("handshake")
        mtu = min(mtu, ack.mtu)
        nets = tuple(n.with_mtu(mtu) for n in s.networks)
        for net in nets:
            self._stack.callback(device.delete_vxlan, None, net.dev)
            addresses = tuple(a for a in (net.local_ipv4, net.local_ipv6) if a is not None)
            spec = device.VxlanSpec(
                net.dev, net.vni, local.port, route.source, s.underlay_dev or route.dev, mtu, addresses
            )
            device.ensure_vxlan(None, spec)
            device.set_peer(None, net.dev, s.service)
        log.info("handshake done: the pod sees this end as %s; %d network(s), mtu %d", ack.observed, len(nets), mtu)
        self.stopwatch.lap("devices")
        wait_carries_traffic(nets, deadline)
        self.stopwatch.lap("first ping")
        self.connection = Connection(s.service, ack.observed, local, nets)
        return self.connection

    def close(self) -> None:
        self._stack.close()


def wait_carries_traffic(nets: Sequence[Network], deadline: Deadline) -> None:
    """Ping every pod-end address over its device until each answers, or time out."""
    targets = [(n.dev, a.ip) for n in nets for a in (n.remote_ipv4, n.remote_ipv6) if a is not None]
    waiting = list(targets)
    while waiting:
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
