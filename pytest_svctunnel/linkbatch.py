"""An end's tunnel devices in bulk: one netlink batch per step. ``netns`` is a named namespace, or
None for this process's own.

Each step (remove stale devices, create, set MTU and addresses, point, bring up) is one batch of
requests (``rtnl``), so an end with hundreds of networks builds them in a fraction of a second.
The devices of one end share a link group: removing them is one request, one RCU grace period
instead of one per device (about 18 ms each).
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Collection, Sequence

from . import rtnl
from .device import IFA_F_NODAD, IPInterface, VxlanSpec
from .errors import KernelError
from .protocol import Endpoint
from .rtnl import Link, Request
from .values import IPAddress
from .waiting import Deadline, wait_for

_GONE = frozenset({errno.ENODEV, errno.ENOENT})


GROUP_MARK = 0x5356  # 'SV': the high half of every link group svctunnel gives its devices


def new_group() -> int:
    """A link group for one end's devices: random, so that no other end (or user) shares it."""
    return GROUP_MARK << 16 | secrets.randbelow(0xFFFF) + 1  # never 0, the default group


def _matches(link: Link, spec: VxlanSpec, underlay: int | None) -> bool:
    """Whether an existing VXLAN device is already the one ``spec`` describes."""
    data = link.vxlan
    local = data.get(rtnl.VXLAN_LOCAL if spec.local.version == 4 else rtnl.VXLAN_LOCAL6)
    return bool(
        link.kind == "vxlan"
        and data.get(rtnl.VXLAN_ID) == rtnl.u32(spec.vni)
        and data.get(rtnl.VXLAN_PORT) == rtnl.be16(spec.port)
        and data.get(rtnl.VXLAN_PORT_RANGE) == rtnl.be16(spec.port) + rtnl.be16(spec.port + 1)
        and local == spec.local.packed
        and (underlay is None or data.get(rtnl.VXLAN_LINK) == rtnl.u32(underlay))
        and data.get(rtnl.VXLAN_UDP_CSUM) == _udp_checksum(spec)
    )


def _udp_checksum(spec: VxlanSpec) -> bytes:
    """The outer UDP checksum: zero over IPv4, as RFC 7348 says it should be; over IPv6, where a
    zero checksum is refused, a real one (and ``_checksums_before_encapsulation``).

    A checksum over IPv4 cost TCP its life on the test cluster: a locally sent TCP segment leaves
    its own checksum for later (offload) and the outer checksum counts on that; after this host's
    NAT, kube-proxy's DNAT and the CNI bridge, the pod found every such outer checksum wrong
    (UdpInCsumErrors): ping worked, TCP never connected."""
    return b"\0" if spec.local.version == 4 else b"\1"


def _create(spec: VxlanSpec, group: int, underlay: int | None) -> Request:
    local = rtnl.VXLAN_LOCAL if spec.local.version == 4 else rtnl.VXLAN_LOCAL6
    data = (
        rtnl.attr(rtnl.VXLAN_ID, rtnl.u32(spec.vni))
        + rtnl.attr(rtnl.VXLAN_PORT, rtnl.be16(spec.port))
        + rtnl.attr(rtnl.VXLAN_PORT_RANGE, rtnl.be16(spec.port) + rtnl.be16(spec.port + 1))
        + rtnl.attr(rtnl.VXLAN_LEARNING, b"\0")
        + rtnl.attr(rtnl.VXLAN_UDP_CSUM, _udp_checksum(spec))
        + rtnl.attr(local, spec.local.packed)
        + (rtnl.attr(rtnl.VXLAN_LINK, rtnl.u32(underlay)) if underlay is not None else b"")
    )
    info = rtnl.attr(rtnl.IFLA_INFO_KIND, rtnl.text("vxlan")) + rtnl.attr(rtnl.IFLA_INFO_DATA, data)
    extra = (
        rtnl.attr(rtnl.IFLA_IFNAME, rtnl.text(spec.name))
        + rtnl.attr(rtnl.IFLA_MTU, rtnl.u32(spec.mtu))
        + rtnl.attr(rtnl.IFLA_GROUP, rtnl.u32(group))
        + rtnl.attr(rtnl.IFLA_LINKINFO, info)
    )
    body = rtnl.link_request(0, extra=extra)
    return Request(
        rtnl.RTM_NEWLINK, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL, body, f"creating VXLAN device {spec.name} VNI {spec.vni}"
    )


def _set(link: Link, *, up: bool | None = None, mtu: int | None = None, group: int | None = None) -> Request:
    extra = rtnl.attr(rtnl.IFLA_MTU, rtnl.u32(mtu)) if mtu is not None else b""
    extra += rtnl.attr(rtnl.IFLA_GROUP, rtnl.u32(group)) if group is not None else b""
    what = f"bringing {link.name} up" if up else f"setting MTU {mtu} on {link.name}"
    return Request(rtnl.RTM_NEWLINK, 0, rtnl.link_request(link.index, up=up, extra=extra), what)


def _delete(link: Link) -> Request:
    return Request(rtnl.RTM_DELLINK, 0, rtnl.link_request(link.index), f"removing link {link.name}", _GONE)


def _delete_group(group: int) -> Request:
    body = rtnl.link_request(0, extra=rtnl.attr(rtnl.IFLA_GROUP, rtnl.u32(group)))
    return Request(rtnl.RTM_DELLINK, 0, body, f"removing the links of group {group:#x}", _GONE)


def _address(link: Link, address: IPInterface) -> Request:
    body = rtnl.address_body(link.index, address, IFA_F_NODAD if address.version == 6 else 0)
    flags = rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL
    return Request(rtnl.RTM_NEWADDR, flags, body, f"adding address {address} to {link.name}", frozenset({errno.EEXIST}))


def _point(link: Link, peer: Endpoint) -> Request:
    body = rtnl.fdb_body(link.index, peer.address, peer.port)
    flags = rtnl.NLM_F_CREATE | rtnl.NLM_F_APPEND
    return Request(rtnl.RTM_NEWNEIGH, flags, body, f"pointing {link.name} at {peer}")


def _unpoint(link: Link, address: IPAddress, port: int | None) -> Request:
    # with the entry's port as dumped: without it the kernel looks for one on the device's own port,
    # which is right only where the dump left the port out (it was the device's own)
    body = rtnl.fdb_body(link.index, address, port)
    what = f"removing the forwarding entry of {link.name} to {address} port {port or 'of the device'}"
    return Request(rtnl.RTM_DELNEIGH, 0, body, what, _GONE)


def existing(netns: str | None, names: Collection[str]) -> dict[str, str | None]:
    """Those of ``names`` that are links here, with their kind ("vxlan", ...; None for a plain one)."""
    with rtnl.opened(netns) as nl:
        found = nl.links()
    return {name: found[name].kind for name in names if name in found}


def refuse_foreign(kinds: dict[str, str | None], remedy: str) -> None:
    """A KernelError if any of the links (name -> kind) is not a VXLAN device: those are never touched."""
    refused = [f"{name} ({kind or 'plain'} link)" for name, kind in kinds.items() if kind != "vxlan"]
    if refused:
        raise KernelError(
            f"{', '.join(refused)} already exist(s) and {'is' if len(refused) == 1 else 'are'} not a VXLAN device;"
            f" left alone: {remedy}"
        )


def build(netns: str | None, specs: Sequence[VxlanSpec], group: int, finish_checksums: bool = False) -> None:
    """Create (or reuse matching) VXLAN devices with their MTU and addresses in link group ``group``,
    point each at its peer, bring them up, and wait until every address routes as local. With
    ``finish_checksums`` (and always over IPv6) the kernel finishes inner checksums before it
    encapsulates (``_checksums_before_encapsulation``). A link of another kind under one of the
    names, or a missing underlay, is a KernelError before any change."""
    with rtnl.opened(netns) as nl:
        found = nl.links()
        _check(netns, specs, found)

        def underlay(spec: VxlanSpec) -> int | None:
            return found[spec.underlay].index if spec.underlay else None

        stale = [found[s.name] for s in specs if s.name in found and not _matches(found[s.name], s, underlay(s))]
        _remove(nl, found, stale, group)
        kept = {s.name for s in specs if s.name in found} - {link.name for link in stale}
        nl.run([_create(s, group, underlay(s)) for s in specs if s.name not in kept])
        now = nl.links()
        lost = [s.name for s in specs if s.name not in now]
        if lost:
            raise KernelError(f"{', '.join(lost)} was created but cannot be found; another process removed it")
        requests = [_set(now[s.name], mtu=s.mtu, group=group) for s in specs if s.name in kept]
        requests += [_address(now[s.name], a) for s in specs for a in s.addresses]
        nl.run(requests)
        _repoint(nl, {now[s.name].index: now[s.name] for s in specs if s.name in kept}, None)
        nl.run([_point(now[s.name], s.peer) for s in specs if s.peer is not None])
        _checksums_before_encapsulation(netns, {s.name: finish_checksums or s.local.version == 6 for s in specs})
        nl.run([_set(now[s.name], up=True) for s in specs])
        _wait_local(nl, [a for s in specs for a in s.addresses])


def _checksums_before_encapsulation(netns: str | None, finish: dict[str, bool]) -> None:
    """Turn transmit checksum offload off on the devices ``finish`` says, on on the others.

    With offload off the kernel finishes an inner packet's checksum before it encapsulates it, so
    the frame stays right whatever happens on the way: an outer UDP checksum rewritten by NATs
    (kept over IPv6, see ``_udp_checksum``), and a proxy that relays the frame from user space
    (cloud-provider-kind's Envoy: the inner TCP checksum left to offload arrives unfinished, and
    the pod drops the segment). It costs TCP its segmentation offload where the frames pass
    several namespaces: the lab's host to pod TCP fell from 22 to 1.6 Gbit/s. So this end's
    devices keep offload on unless a proxy relays them or the underlay is IPv6."""
    try:
        rtnl.set_tx_checksums(netns, {name: not off for name, off in finish.items()})
    except OSError as exc:
        raise KernelError(f"setting transmit checksum offload: {exc}") from None


def _check(netns: str | None, specs: Sequence[VxlanSpec], found: dict[str, Link]) -> None:
    refuse_foreign({s.name: found[s.name].kind for s in specs if s.name in found}, "choose other device names")
    missing = sorted({s.underlay for s in specs if s.underlay and s.underlay not in found})
    if missing:
        raise KernelError(f"underlay device {missing[0]!r} does not exist in {netns or 'this namespace'}")


def point(netns: str | None, names: Sequence[str], peer: Endpoint | None) -> None:
    """Point every named device's default forwarding entry at ``peer``, or withdraw it (None)."""
    with rtnl.opened(netns) as nl:
        found = nl.links()
        _repoint(nl, {found[n].index: found[n] for n in names if n in found}, peer)


def _repoint(nl: rtnl.Socket, links: dict[int, Link], peer: Endpoint | None) -> None:
    if not links:
        return
    old = nl.zero_entries(set(links))
    nl.run([_unpoint(links[index], address, port) for index, address, port in old])
    if peer is not None:
        nl.run([_point(link, peer) for link in links.values()])


def remove(netns: str | None, names: Collection[str], group: int | None = None) -> None:
    """Remove the named VXLAN devices (gone already is fine; other kinds of link are left alone): in
    one request when they include every link of ``group``, else one request each."""
    with rtnl.opened(netns) as nl:
        found = nl.links()
        _remove(nl, found, [found[n] for n in names if n in found and found[n].kind == "vxlan"], group)


def _remove(nl: rtnl.Socket, found: dict[str, Link], doomed: Sequence[Link], group: int | None) -> None:
    if not doomed:
        return
    members = {name for name, link in found.items() if group and link.group == group}
    if members and members <= {link.name for link in doomed}:
        nl.run([_delete_group(group or 0)])
        doomed = [link for link in doomed if link.name not in members]
    nl.run([_delete(link) for link in doomed])


def rx_packets(netns: str | None, names: Collection[str]) -> int:
    """The packets the named devices received, summed: one dump."""
    with rtnl.opened(netns) as nl:
        return sum(link.rx_packets for name, link in nl.links().items() if name in names)


def _wait_local(nl: rtnl.Socket, addresses: Sequence[IPInterface], seconds: float = 5.0) -> None:
    """Wait until every address routes as local: the kernel installs the local route of an address
    from a work queue once its link is up; until then answers to our own first packets are taken
    for traffic to forward and dropped, which costs a second-long retransmit."""
    wanted = {str(a.ip) for a in addresses}

    def pending() -> set[str]:
        return wanted - nl.local_addresses()

    wait_for(
        lambda: True if not pending() else None,
        phase=f"addresses of {len(addresses)} device(s)",
        deadline=Deadline.after(seconds),
        describe=lambda: f"not yet local: {', '.join(sorted(pending())[:5])}",
        interval=0.005,
    )
