"""Links one at a time, through pyroute2: routes, MTUs, link state for diagnostics, a node's bridge.

The tunnel devices themselves are built and removed in bulk (``linkbatch``). Functions here are
safe to run twice. The namespace is always named (None is the caller's own namespace).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from .errors import KernelError
from .protocol import Endpoint
from .shield import shield
from .values import IPAddress
from .waiting import Deadline, wait_for

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IFA_F_NODAD = 0x02
OVERHEAD = {4: 50, 6: 70}  # outer IP + UDP + VXLAN + inner Ethernet


def tunnel_mtu(underlay_mtu: int, outer_version: int) -> int:
    """The largest inner packet that fits the underlay without fragmenting."""
    return underlay_mtu - OVERHEAD[outer_version]


@contextmanager
def netlink(netns: str | None) -> Iterator[Any]:
    """An rtnetlink socket in ``netns`` (an existing one; never created here).

    Ctrl-C, SIGTERM and pytest-timeout's alarm wait until it is closed again: pyroute2 catches
    every exception raised while it parses a message (a bare ``except``), so an interrupt that
    lands there would be lost, and the session would carry on as if nothing had happened."""
    with shield():
        try:
            ipr: Any = NetNS(netns, flags=0) if netns else IPRoute()
        except OSError as exc:
            raise KernelError(f"cannot open network namespace {netns!r}: {exc}") from None
        try:
            yield ipr
        finally:
            ipr.close()


@dataclass(frozen=True)
class VxlanSpec:
    """Everything that defines one tunnel device."""

    name: str
    vni: int
    port: int  # listening port, and the one source port (the kernel range is [port, port+1))
    local: IPAddress
    underlay: str | None
    mtu: int
    addresses: tuple[IPInterface, ...]
    # pointed at before the device comes up: traffic already waiting for the device (a test's
    # ping during a rebuild) must not send its first ARP request into a device with nowhere to
    # send it, where the neighbour entry would then wait a second-long retransmit
    peer: Endpoint | None = None


@dataclass(frozen=True)
class LinkState:
    """What the kernel reports for a link, for diagnostics and liveness."""

    name: str
    state: str
    mtu: int
    stats: dict[str, int]
    addresses: tuple[str, ...]
    fdb: tuple[str, ...]

    def render(self) -> str:
        stats = self.stats
        return (
            f"{self.name}: {self.state} mtu {self.mtu} "
            f"rx {stats.get('rx_packets', 0)} pkts/{stats.get('rx_bytes', 0)} B "
            f"tx {stats.get('tx_packets', 0)} pkts/{stats.get('tx_bytes', 0)} B "
            f"rx_err {stats.get('rx_errors', 0)} tx_err {stats.get('tx_errors', 0)} "
            f"tx_drop {stats.get('tx_dropped', 0)}; "
            f"addr {' '.join(self.addresses) or '-'}; fdb {' '.join(self.fdb) or '-'}"
        )


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


RTN_LOCAL = 2
_ADDRESS_READY_S = 5.0


def is_local_address(netns: str | None, address: IPAddress) -> bool:
    """Whether ``address`` is one of this namespace's own (routes as local)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with netlink(netns) as ipr:
        try:
            routes = ipr.route("get", dst=str(address), family=family)
        except NetlinkError:
            return False
    return bool(routes) and routes[0]["type"] == RTN_LOCAL


def _wait_local(ipr: Any, name: str, addresses: tuple[IPInterface, ...]) -> None:
    """Wait until each address of the device routes as local.

    The kernel installs the local route of an address from a work queue once the link is
    up; until then, answers to our own first packets (an IPv6 neighbour advertisement, say)
    are taken for traffic to forward and dropped, which costs a second-long retransmit.
    """

    def pending() -> list[str]:
        late = []
        for address in addresses:
            family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            routes = ipr.route("get", dst=str(address.ip), family=family)
            if not routes or routes[0]["type"] != RTN_LOCAL:
                late.append(str(address.ip))
        return late

    wait_for(
        lambda: True if not pending() else None,
        phase=f"addresses of {name}",
        deadline=Deadline.after(_ADDRESS_READY_S),
        describe=lambda: f"not yet local: {', '.join(pending())}",
        interval=0.002,
    )


def _ensure_address(ipr: Any, index: int, address: IPInterface) -> None:
    try:
        ipr.addr(
            "add",
            index=index,
            address=str(address.ip),
            prefixlen=address.network.prefixlen,
            flags=IFA_F_NODAD if address.version == 6 else 0,
        )
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise KernelError(f"adding address {address}: {exc}") from None


def _kernel(action: Any, what: str) -> Any:
    try:
        return action()
    except NetlinkError as exc:
        raise KernelError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}") from None


def add_addresses(netns: str | None, name: str, addresses: tuple[IPInterface, ...]) -> None:
    """Add addresses to an existing link (a bridge, in node mode) and wait until they route as local."""
    with netlink(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            raise KernelError(f"no link {name} in {netns or 'this namespace'} to put {len(addresses)} address(es) on")
        for address in addresses:
            _ensure_address(ipr, index, address)
        _wait_local(ipr, name, addresses)


def remove_addresses(netns: str | None, name: str, addresses: tuple[IPInterface, ...]) -> None:
    """Remove addresses from a link; addresses (or a link) already gone are success."""
    with netlink(netns) as ipr:
        index = _index(ipr, name)
        for address in addresses if index is not None else ():
            try:
                ipr.addr("del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                    raise KernelError(f"removing address {address} from {name}: {exc}") from None


def join_bridge(netns: str | None, name: str, bridge: str) -> None:
    """Make the device a port of the Linux bridge ``bridge`` (node mode, for a Multus bridge network)."""
    with netlink(netns) as ipr:
        master = _index(ipr, bridge)
        if master is None or link_kind(ipr.link("get", index=master)[0]) != "bridge":
            raise KernelError(
                f"no Linux bridge {bridge} in {netns or 'this namespace'}: create it on the node"
                f" (ip link add {bridge} type bridge) or leave out --svctunnel-bridge"
            )
        index = _index(ipr, name)
        if index is None:
            raise KernelError(f"{name} vanished before it could join bridge {bridge}")
        _kernel(lambda: ipr.link("set", index=index, master=master), f"adding {name} to bridge {bridge}")


def delete_link(netns: str | None, name: str) -> None:
    """Remove a link; one that is already gone (or whose namespace is) is success."""
    try:
        with netlink(netns) as ipr:
            _delete(ipr, name)
    except KernelError:
        return


def _delete(ipr: Any, name: str) -> None:
    index = _index(ipr, name)
    if index is None:
        return
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ENOENT):
            raise KernelError(f"removing link {name}: {exc}") from None


def link_exists(netns: str | None, name: str) -> bool:
    with netlink(netns) as ipr:
        return _index(ipr, name) is not None


def link_kind_of(netns: str | None, name: str) -> str | None:
    """The kind of link ``name`` ("vxlan", "bridge", ...; "" for a plain one), or None if it does not exist."""
    with netlink(netns) as ipr:
        index = _index(ipr, name)
        return None if index is None else link_kind(ipr.link("get", index=index)[0]) or ""


def links_with_prefix(netns: str | None, prefix: str) -> list[str]:
    """Names of the links in ``netns`` that start with ``prefix`` (a run's own links)."""
    with netlink(netns) as ipr:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    return sorted(n for n in names if n.startswith(prefix))


def link_state(netns: str | None, name: str) -> LinkState | None:
    """Counters, addresses and FDB of a link, or None if it does not exist."""
    with netlink(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            return None
        link = ipr.link("get", index=index)[0]
        stats = dict(link.get_attr("IFLA_STATS64") or {})
        addresses = tuple(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.addr("dump", index=index))
        fdb = tuple(
            f"{e.get_attr('NDA_LLADDR')}->{e.get_attr('NDA_DST')}:{e.get_attr('NDA_PORT') or '-'}"
            for e in ipr.fdb("dump", ifindex=index)
            if e.get_attr("NDA_DST")
        )
        return LinkState(
            name=name,
            state=str(link.get_attr("IFLA_OPERSTATE")),
            mtu=int(link.get_attr("IFLA_MTU")),
            stats={k: int(v) for k, v in stats.items()},
            addresses=addresses,
            fdb=fdb,
        )


@dataclass(frozen=True)
class Route:
    """How this host reaches an address: source address, device and its MTU."""

    source: IPAddress
    dev: str
    mtu: int


def route_to(netns: str | None, destination: IPAddress) -> Route:
    """Ask the kernel how it would reach ``destination``."""
    family = socket.AF_INET if destination.version == 4 else socket.AF_INET6
    with netlink(netns) as ipr:
        try:
            route = ipr.route("get", dst=str(destination), family=family)[0]
        except NetlinkError as exc:
            raise KernelError(
                f"no route to {destination} ({exc.args[1] if len(exc.args) > 1 else exc});"
                " check the Service address and this host's routing"
            ) from None
        oif = route.get_attr("RTA_OIF")
        source = route.get_attr("RTA_PREFSRC")
        link = ipr.link("get", index=oif)[0]
        mtu = int(link.get_attr("IFLA_MTU"))
        metrics = route.get_attr("RTA_METRICS")
        if metrics is not None and metrics.get_attr("RTAX_MTU"):
            mtu = min(mtu, int(metrics.get_attr("RTAX_MTU")))
    if source is None:
        raise KernelError(f"the route to {destination} has no source address; add an address on its device")
    return Route(ipaddress.ip_address(source), str(link.get_attr("IFLA_IFNAME")), mtu)


def default_route_devices(netns: str | None) -> list[str]:
    """The devices of the namespace's default routes (IPv4 and IPv6, main table), sorted."""
    found: set[str] = set()
    with netlink(netns) as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family, table=254):
                oif = route.get_attr("RTA_OIF")
                if route["dst_len"] == 0 and oif is not None:
                    found.add(str(ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME")))
    return sorted(found)


def link_mtu(netns: str | None, name: str) -> int:
    with netlink(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            raise KernelError(f"device {name!r} does not exist; check --underlay-dev")
        return int(ipr.link("get", index=index)[0].get_attr("IFLA_MTU"))
