"""The pod network, the node's "CNI": pod network namespaces wired to the node namespace by veth pairs, with
one /30 and one /64 per pod carved from the node's pod CIDRs and default routes through the node side."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pytest_svctunnel import device, netns, pids
from pytest_svctunnel.errors import SvcTunnelError
from pytest_svctunnel.lab import NO_DAD
from pytest_svctunnel.waiting import Deadline

from .container import KILL_WAIT_S
from .errors import KubeletError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

POD_PREFIXLEN = {4: 30, 6: 64}


@dataclass(frozen=True)
class Sandbox:
    """Where a pod's container runs: a network namespace, the pod's addresses (IPv4 first) and, for a pod
    namespace of its own, the slot and the node-side link (None for hostNetwork)."""

    netns: str
    ips: tuple[str, ...]
    slot: int | None = None
    link: str | None = None


def slot_subnet(cidr: IPNetwork, prefixlen: int, slot: int) -> IPNetwork:
    """The ``slot``-th subnet of length ``prefixlen`` in ``cidr``."""
    if prefixlen < cidr.prefixlen or slot >= 1 << (prefixlen - cidr.prefixlen):
        raise KubeletError(f"pod CIDR {cidr} has no /{prefixlen} number {slot}; give the node a larger pod CIDR")
    size = 1 << (cidr.max_prefixlen - prefixlen)
    return ipaddress.ip_network(f"{cidr.network_address + slot * size}/{prefixlen}")


class PodNetwork:
    """Wires pod namespaces to the node namespace: slot n is namespace ``<prefix>n`` with ``eth0``, the node's
    ``p<n>``, and subnet n of each pod CIDR. Slot 0 is never used, so no pod gets a CIDR's network address."""

    def __init__(self, node_netns: str, pod_prefix: str, cidrs: Sequence[IPNetwork]) -> None:
        self.node_netns = node_netns
        self.pod_prefix = pod_prefix
        self.cidrs = sorted(cidrs, key=lambda c: c.version)
        self.capacity = min((1 << (POD_PREFIXLEN[c.version] - c.prefixlen)) - 1 for c in self.cidrs)
        if self.capacity < 1:
            raise KubeletError(f"pod CIDRs {[str(c) for c in self.cidrs]} hold no /30 or /64 per pod besides the first")
        self._names = re.compile(re.escape(pod_prefix) + r"(\d+)$")

    def names(self, slot: int) -> tuple[str, str]:
        return f"{self.pod_prefix}{slot}", f"p{slot}"

    def interfaces(self, slot: int) -> list[tuple[IPInterface, IPInterface]]:
        """(node side, pod side) per address family, IPv4 first."""
        pairs = []
        for cidr in self.cidrs:
            subnet = slot_subnet(cidr, POD_PREFIXLEN[cidr.version], slot)
            pairs.append(
                (
                    ipaddress.ip_interface(f"{subnet.network_address + 1}/{subnet.prefixlen}"),
                    ipaddress.ip_interface(f"{subnet.network_address + 2}/{subnet.prefixlen}"),
                )
            )
        return pairs

    def create(self, slot: int) -> Sandbox:
        """Build slot ``slot`` (replacing leftovers of an earlier one); on failure nothing of it is left."""
        name, link = self.names(slot)
        pairs = self.interfaces(slot)
        with ExitStack() as undo:
            self.remove(name, link)
            netns.create(name)
            undo.callback(self.remove, name, link)
            netns.sysctl(name, NO_DAD)
            with device.netlink(self.node_netns) as ipr:
                ipr.link("add", ifname=link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            netns.sysctl(self.node_netns, {f"net.ipv6.conf.{link}.accept_dad": "0"})
            _configure(self.node_netns, link, [node for node, _ in pairs])
            _configure(name, "eth0", [pod for _, pod in pairs])
            with device.netlink(name) as ipr:
                for node_side, _ in pairs:
                    ipr.route("add", dst="0.0.0.0/0" if node_side.version == 4 else "::/0", gateway=str(node_side.ip))
            undo.pop_all()
        return Sandbox(name, tuple(str(pod.ip) for _, pod in pairs), slot, link)

    def remove(self, name: str, link: str | None) -> None:
        """Stop what runs in the namespace, remove it and the node-side link; gone already is fine."""
        identity = pids.netns_id(Path("/run/netns") / name)
        if identity is not None:
            stuck = pids.terminate(pids.in_netns({identity}), Deadline.after(KILL_WAIT_S + 1.0), grace=0.5)
            if stuck:
                log.warning("processes %s in %s survived SIGKILL", [p.pid for p in stuck], name)
        netns.remove(name)
        if link:
            device.delete_link(self.node_netns, link)

    def leftovers(self) -> list[tuple[str, str]]:
        """(namespace, link) of every slot that exists on this host, whoever made it."""
        slots = {int(m.group(1)) for n in netns.listing(self.pod_prefix) if (m := self._names.match(n))}
        with contextlib.suppress(SvcTunnelError):  # no node namespace: no links either
            slots |= {int(n[1:]) for n in device.links_with_prefix(self.node_netns, "p") if n[1:].isdigit()}
        return [self.names(s) for s in sorted(slots)]


def _configure(netns_name: str, ifname: str, addresses: Sequence[IPInterface]) -> None:
    with device.netlink(netns_name) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for address in addresses:
            flags = device.IFA_F_NODAD if address.version == 6 else 0
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen, flags=flags)
        ipr.link("set", index=index, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
