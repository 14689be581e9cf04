"""The pod end: mute until an authenticated hello, then builds the requested networks.

It never sends on the tunnel port before it has heard a valid hello: the first
datagram it sends is a CHALLENGE, which follows the flow the hello opened back
through the Service. It commits to a peer only when that peer answers the
challenge, and its nftables filter keeps the port closed to everyone else.

It ends itself on an authenticated GOODBYE (after removing what it built, it says
goodbye back), and, with ``idle_exit``, after that long without a word from a peer:
an agent that cannot be removed from someone else's pod must not outlive its session.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from pyroute2.netlink.exceptions import NetlinkError

from . import device, linkbatch, nft
from .agentsettings import AgentSettings, describe
from .errors import KernelError, SvcTunnelError
from .guard import ReplayGuard
from .netcodec import PodNetwork
from .packets import UdpDatagram
from .protocol import (
    Ack,
    Challenge,
    Confirm,
    Endpoint,
    Goodbye,
    Hello,
    Message,
    ProtocolError,
    Reject,
    decode,
    encode,
)
from .transport import HelloTap, send_raw_udp

log = logging.getLogger("svctunnel.agent")
_PENDING_TTL_S = 10.0
_PENDING_MAX = 32
_REJECT_LOG_INTERVAL_S = 1.0
_TICK_S = 0.25


@dataclass
class _Pending:
    hello: Hello
    source: Endpoint
    local: Endpoint
    expires: float


@dataclass
class AgentStatus:
    """The agent's state and counters, for logs, SIGUSR1 and diagnostics."""

    state: str = "waiting"
    peer: Endpoint | None = None
    networks: dict[str, PodNetwork] = field(default_factory=dict)
    mtu: int = 0
    counters: collections.Counter[str] = field(default_factory=collections.Counter)

    def render(self) -> str:
        nets = ",".join(f"{n.dev}/vni{n.vni}" for n in self.networks.values()) or "-"
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counters.items())) or "-"
        return f"state={self.state} peer={self.peer or '-'} mtu={self.mtu} networks={nets} counters: {counts}"


class Agent:
    """The pod end's state machine; ``serve`` runs it until ``stop`` returns True."""

    def __init__(self, settings: AgentSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.status = AgentStatus()
        self._clock = clock
        self._guard = ReplayGuard(settings.max_skew)
        self._pending: collections.OrderedDict[bytes, _Pending] = collections.OrderedDict()
        self._committed_nonce: bytes | None = None
        self._last_reject_log = 0.0
        self._unlogged_rejects = 0
        self._dead_after_s = 0.0
        self._last_heard = time.monotonic()
        self._last_word = time.monotonic()  # the last authenticated message or tunnel traffic
        self._rx_total = 0
        self._group = linkbatch.new_group()  # the link group of this agent's devices
        self._torn_down = False
        self.finished = False  # said goodbye, or idle too long: serve returns

    # -- the loop --------------------------------------------------------------

    def serve(self, stop: Callable[[], bool]) -> None:
        """Filter the port, listen for hellos, and remove everything built on the way out."""
        self.check_devices()
        self.check_filter_free()
        try:
            nft.apply(nft.pod_filter(self.settings.port, None, self.settings.host_network))
            self._limit_hellos()
            with HelloTap(self.settings.port, self.settings.underlay_dev) as tap:
                log.info("listening on UDP port %d (%s)", self.settings.port, self._pin_text())
                while not stop() and not self.finished:
                    datagram = tap.receive(timeout=_TICK_S)
                    if datagram is not None:
                        self.handle(datagram)
                    self.tick()
        finally:
            self.teardown()

    def check_devices(self) -> None:
        """The underlay device and the bridge must exist before anything is built: each missing one
        is a KernelError naming the setting, not a failure at the first hello."""
        underlay, bridge = self.settings.underlay_dev, self.settings.bridge
        if underlay is not None and not device.link_exists(None, underlay):
            raise KernelError(
                f"underlay device {underlay!r} does not exist in the agent's network namespace;"
                " fix --underlay-dev (SVCTUNNEL_UNDERLAY_DEV) or leave it out to follow the route"
            )
        if bridge is not None and device.link_kind_of(None, bridge) != "bridge":
            raise KernelError(
                f"no Linux bridge {bridge!r} in the agent's network namespace: create it"
                f" (ip link add {bridge} type bridge), or fix --bridge (SVCTUNNEL_BRIDGE)"
            )

    def check_filter_free(self) -> None:
        """In an application's namespace, a port filter that is there already belongs to another
        agent (or to the application): refuse rather than take it over."""
        table = nft.filter_table(self.settings.port)
        if self.settings.shared_netns and nft.table_exists("inet", table):
            raise KernelError(
                f"the pod already has an nft table inet {table}: another svctunnel agent serves port"
                f" {self.settings.port} here; end it ('svctunnel goodbye') or use another port"
            )

    def _limit_hellos(self) -> None:
        """Bound what a flood of handshake datagrams costs, in the kernel, per source address, on the
        devices hellos arrive on (the underlay device, else those of the default routes)."""
        underlay = self.settings.underlay_dev
        devices = [underlay] if underlay else device.default_route_devices(None)
        if not devices:
            log.warning("no default route: handshake datagrams are not rate-limited in the kernel")
            return
        try:
            nft.apply(nft.hello_limit(self.settings.port, devices))
        except KernelError as exc:  # a kernel without netdev ingress hooks: the agent still works, unbounded
            log.warning("handshake datagrams are not rate-limited in the kernel: %s", str(exc).splitlines()[0])
            return
        log.info("handshake datagrams limited to %d/s per source address on %s", nft.HELLO_RATE, ", ".join(devices))

    def _pin_text(self) -> str:
        return f"hellos only from {self.settings.peer}" if self.settings.peer else "hellos from any address"

    def teardown(self, why: str = "") -> None:
        """Remove every network and the port filter (once)."""
        if self._torn_down:
            return
        try:
            self._remove_networks()
        finally:  # the port filter goes even if a device could not
            nft.delete_table("inet", nft.filter_table(self.settings.port))
            nft.delete_table("netdev", nft.limit_table(self.settings.port))
        self._torn_down = True
        self._set_state("stopped", f"removed all networks and the port filter{why}")

    # -- liveness ----------------------------------------------------------------

    def tick(self) -> None:
        """Withdraw the peer once nothing has come from it for keepalive x misses.

        Only the authenticated peer gets through the port filter, so any frame the
        devices received is a sign of life; the external end's keepalives provide them.
        """
        now = time.monotonic()
        idle = self.settings.idle_exit
        if idle is not None and now - self._last_word > idle and self.settings.stay_after_goodbye:
            if self.status.networks:  # a sidecar: its pod outlives sessions, and the kubelet would restart it
                self._forget_peer(f"no word from a peer for {now - self._last_word:.0f} s: removed every network")
            self._last_word = now
            return
        if idle is not None and now - self._last_word > idle:
            self.teardown(f" after {now - self._last_word:.0f} s without a word from a peer (idle exit {idle:g} s)")
            self.finished = True
            return
        if self.status.state != "up":
            return
        rx = self._received()
        if rx != self._rx_total:
            self._rx_total, self._last_heard, self._last_word = rx, now, now
        elif now - self._last_heard > self._dead_after_s:
            linkbatch.point(None, list(self.status.networks), None)
            self.status.counters["withdrawn"] += 1
            self._set_state(
                "dead",
                f"nothing from {self.status.peer} for {now - self._last_heard:.1f} s;"
                " stopped sending until a new hello",
            )

    def _received(self) -> int:
        return linkbatch.rx_packets(None, self.status.networks) if self.status.networks else 0

    # -- handling datagrams ----------------------------------------------------

    def handle(self, datagram: UdpDatagram) -> None:
        """Process one datagram from the hello tap; invalid ones are counted, never answered."""
        datagram = self._as_delivered(datagram)
        try:
            message = self._authenticate(datagram)
            self._last_word = time.monotonic()
            if isinstance(message.body, Hello):
                self._challenge(message, datagram)
            elif isinstance(message.body, Confirm):
                self._commit(message, datagram)
            elif isinstance(message.body, Goodbye):
                self._farewell(message, datagram)
            else:
                raise ProtocolError(Reject.UNSOLICITED, message.type.name)
        except ProtocolError as exc:
            self._reject(exc, datagram)

    def _as_delivered(self, datagram: UdpDatagram) -> UdpDatagram:
        """With hostNetwork the tap sees a hello before the node's DNAT, addressed to the Service.
        Answers and tunnels must use the address it is delivered to, so that conntrack maps them
        back to the Service's address; that is ``local_address`` when the destination is not ours."""
        local = self.settings.local_address
        dst = datagram.destination
        if local is None or dst.address == local or device.is_local_address(None, dst.address):
            return datagram
        return dataclasses.replace(datagram, destination=Endpoint(local, self.settings.port))

    def _authenticate(self, datagram: UdpDatagram) -> Message:
        if datagram.destination.port != self.settings.port:
            raise ProtocolError(Reject.UNSOLICITED, f"port {datagram.destination.port}")
        pin = self.settings.peer
        if pin is not None and datagram.source.address != pin:
            raise ProtocolError(Reject.PEER, f"from {datagram.source.address}, pinned to {pin}")
        message = decode(datagram.payload, self.settings.key)
        self._guard.check(message, self._now_ms())
        return message

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _reject(self, exc: ProtocolError, datagram: UdpDatagram) -> None:
        self.status.counters[f"rejected-{exc.reason.value}"] += 1
        now = time.monotonic()
        if now - self._last_reject_log < _REJECT_LOG_INTERVAL_S:
            self._unlogged_rejects += 1
            return
        more = f" (+{self._unlogged_rejects} more since last report)" if self._unlogged_rejects else ""
        log.warning("ignored datagram from %s: %s%s", datagram.source, exc, more)
        self._last_reject_log = now
        self._unlogged_rejects = 0

    def _challenge(self, message: Message, datagram: UdpDatagram) -> None:
        assert isinstance(message.body, Hello)
        nonce = secrets.token_bytes(16)
        self._expire_pending()
        self._pending[nonce] = _Pending(
            message.body, datagram.source, datagram.destination, time.monotonic() + _PENDING_TTL_S
        )
        while len(self._pending) > _PENDING_MAX:
            self._pending.popitem(last=False)
        self.status.counters["hellos"] += 1
        self._send(message, Challenge(nonce, datagram.source), datagram)
        if self.status.state == "waiting":
            self._set_state("challenged", f"valid hello from {datagram.source}, challenge sent")

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for nonce in [n for n, p in self._pending.items() if p.expires < now]:
            del self._pending[nonce]

    def _commit(self, message: Message, datagram: UdpDatagram) -> None:
        assert isinstance(message.body, Confirm)
        nonce = message.body.nonce
        if nonce == self._committed_nonce and datagram.source == self.status.peer:
            self._send(message, self._ack(datagram.source), datagram)  # our ACK was lost
            return
        pending = self._pending.get(nonce)
        if pending is None or pending.source != datagram.source:
            # leave the challenge in place: a copy answered from elsewhere must not cancel it
            raise ProtocolError(Reject.UNSOLICITED, "confirm for no challenge sent to this address")
        del self._pending[nonce]
        try:
            self._build(pending)
        except SvcTunnelError as exc:
            self._failed_build(exc)
            return
        self._committed_nonce = nonce
        self.status.counters["handshakes"] += 1
        self._send(message, self._ack(datagram.source), datagram)

    def _farewell(self, message: Message, datagram: UdpDatagram) -> None:
        """Remove everything, then say goodbye back (so the sender knows it is done) and finish; a
        sidecar (``stay_after_goodbye``) removes the networks only and waits for a new hello."""
        self.status.counters["goodbyes"] += 1
        if self.settings.stay_after_goodbye:
            self._forget_peer(f"removed every network on a goodbye from {datagram.source}; waiting for a new hello")
            self._send(message, Goodbye(), datagram)
            return
        self.teardown(f" on a goodbye from {datagram.source}")
        self._send(message, Goodbye(), datagram)
        self.finished = True

    def _failed_build(self, exc: SvcTunnelError) -> None:
        """An authenticated hello that cannot be built: undo it all, stay up, answer nothing."""
        self.status.counters["build-failed"] += 1
        log.error("could not build the requested networks: %s", exc)
        self._forget_peer("removed what was built; waiting for a new hello")

    def _forget_peer(self, why: str) -> None:
        """Remove the networks, close the port to everyone, and wait (mute) for a new hello."""
        self._remove_networks()
        self.status.peer, self.status.mtu, self._committed_nonce = None, 0, None
        nft.apply(nft.pod_filter(self.settings.port, None, self.settings.host_network))
        self._set_state("waiting", why)

    def _remove_networks(self) -> None:
        self._remove(list(self.status.networks.values()))
        self.status.networks.clear()

    def _remove(self, nets: Sequence[PodNetwork]) -> None:
        linkbatch.remove(None, [net.dev for net in nets], self._group)
        bridge = self.settings.bridge
        if bridge is not None:  # node mode: the networks' addresses live on the node's bridge
            for net in nets:
                device.remove_addresses(None, bridge, tuple(a for a in (net.ipv4, net.ipv6) if a))

    def _ack(self, peer: Endpoint) -> Ack:
        return Ack(peer, self.status.mtu, len(self.status.networks))

    def _build(self, pending: _Pending) -> None:
        peer, local = pending.source, pending.local
        route = device.route_to(None, peer.address)
        underlay = self.settings.underlay_dev or route.dev
        mtu = min(pending.hello.mtu, device.tunnel_mtu(route.mtu, peer.address.version))
        wanted = {n.dev: n for n in pending.hello.networks}
        self._check_names_free(list(wanted))
        gone = [net for dev, net in self.status.networks.items() if dev not in wanted]
        self._remove(gone)  # recorded until removed: a failure leaves them for the teardown
        for net in gone:
            del self.status.networks[net.dev]
        self.status.networks.update(wanted)  # recorded first, so half-built devices are removed too
        bridge = self.settings.bridge
        port, specs = self.settings.port, []
        for net in wanted.values():
            addresses = tuple(a for a in (net.ipv4, net.ipv6) if a is not None)
            own = () if bridge else addresses  # a bridge port's own addresses would never answer
            specs.append(device.VxlanSpec(net.dev, net.vni, port, local.address, underlay, mtu, own, peer))
        linkbatch.build(None, specs, self._group, finish_checksums=True)  # whatever relays it on the way back
        if bridge is not None:
            for net in wanted.values():
                device.join_bridge(None, net.dev, bridge)
                device.add_addresses(None, bridge, tuple(a for a in (net.ipv4, net.ipv6) if a is not None))
        nft.apply(nft.pod_filter(self.settings.port, peer, self.settings.host_network))
        self._dead_after_s = pending.hello.keepalive_ms * pending.hello.misses / 1000
        self._last_heard, self._rx_total = time.monotonic(), self._received()
        moved = self.status.peer is not None and self.status.peer != peer
        self.status.peer, self.status.mtu = peer, mtu
        self._set_state(
            "up", f"{'peer moved to' if moved else 'tunnel up with'} {peer}, {len(wanted)} network(s), mtu {mtu}"
        )

    def _check_names_free(self, devs: Sequence[str]) -> None:
        """In an application's namespace only the agent's own devices may be reused; anywhere, a
        link of another kind is never touched."""
        existing = linkbatch.existing(None, devs)
        theirs = [dev for dev in devs if dev in existing and dev not in self.status.networks]
        if self.settings.shared_netns and theirs:
            named = ", ".join(theirs)
            what = f"a link named {named} that is" if len(theirs) == 1 else f"links named {named} that are"
            raise KernelError(
                f"the pod has {what} not the agent's (the application's own): ask for other pod device names (pod_dev=)"
            )
        linkbatch.refuse_foreign(existing, "ask for other pod device names (pod_dev=)")

    def _send(self, request: Message, body: Challenge | Ack | Goodbye, datagram: UdpDatagram) -> None:
        reply = Message(request.session, request.counter, self._now_ms(), body)
        send_raw_udp(datagram.destination, datagram.source, encode(reply, self.settings.key))

    def _set_state(self, state: str, why: str) -> None:
        if state != self.status.state or state == "up":
            log.info("%s: %s", state, why)
        self.status.state = state
        self._mark_ready(state == "up")

    def _mark_ready(self, ready: bool) -> None:
        path = self.settings.ready_file
        if path is None:
            return
        try:
            if ready:
                path.touch()
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("could not %s the ready file %s: %s", "create" if ready else "remove", path, exc)


def run_agent(settings: AgentSettings) -> int:
    """Run until SIGTERM or SIGINT; SIGUSR1 logs the status line. Returns an exit code."""
    stopping: list[int] = []
    agent = Agent(settings)

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    def on_status(_signum: int, _frame: FrameType | None) -> None:
        log.info("status: %s", agent.status.render())

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_status)
    log.info("agent started, pid %d: %s", os.getpid(), describe(settings))
    try:
        agent.serve(lambda: bool(stopping))
    except SvcTunnelError as exc:
        log.error("%s", exc)
        return 1
    except (OSError, NetlinkError) as exc:  # a kernel refusal nothing above foresaw: one line, never a traceback
        log.error(
            "stopped: %s; check the agent's settings above, its capabilities (NET_ADMIN, NET_RAW) and"
            " its network namespace",
            exc,
        )
        return 1
    return 0
