"""The network plan: which tunnel networks a session builds, with which addresses.

Pure logic. Marker requests and defaults become a tuple of ``Network`` objects,
or a ConfigError that names the conflict and how to fix it.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError
from .names import device_names
from .netcodec import MAX_NETWORKS, PodNetwork
from .protocol import MAX_DATAGRAM, hello_size
from .targets import Target, parse_target
from .values import parse_ifname

if TYPE_CHECKING:
    from .config import TunnelConfig

DEFAULT_NAME = "default"
ATTACH = "svctunnel_attach"  # the ``where`` of requests made through that fixture
DEFAULT_VNI = 333
DEFAULT_IPV4 = ipaddress.IPv4Network("10.30.30.0/30")
DEFAULT_IPV6 = ipaddress.IPv6Network("fd00:3030::/126")
# the blocks of networks without addresses of their own: from 10.30.30.0 on (then around the
# pool) and from fd00:3030:: on, 16384 of each
_POOL_IPV4 = ipaddress.IPv4Network("10.30.0.0/16")
_POOL_IPV6 = ipaddress.IPv6Network("fd00:3030::/112")
_POOL_START = {4: DEFAULT_IPV4.network_address, 6: DEFAULT_IPV6.network_address}
MAX_VNI = 0xFFFFFF

Held = tuple[str, "AnyNetwork"]  # an address block another run (or this host) holds, and who: for the error
Disabled = Literal[False]
Net4 = ipaddress.IPv4Network | None | Disabled
Net6 = ipaddress.IPv6Network | None | Disabled
AnyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Network:
    """One tunnel network as built: both ends' addresses, its VNI, device and MTU.

    ``local_*`` are this (external) end's addresses, ``remote_*`` the pod end's.
    ``mtu`` is 0 until the tunnel is built. ``pod_dev`` names the device in the pod (None: the
    same name as ``dev``). ``target`` is where the network goes (None: the plugin's own pod end;
    else ``NAMESPACE/SELECTOR`` or ``NAMESPACE/NAME`` of the user's pods) and ``pod`` the pod it
    went into, once it is built.
    """

    name: str
    vni: int
    dev: str
    local_ipv4: ipaddress.IPv4Interface | None
    remote_ipv4: ipaddress.IPv4Interface | None
    local_ipv6: ipaddress.IPv6Interface | None
    remote_ipv6: ipaddress.IPv6Interface | None
    mtu: int = 0
    pod_dev: str | None = None
    target: Target | None = None
    pod: str | None = None

    def pod_network(self) -> PodNetwork:
        """What the pod end is asked to build: the same VNI, its device name, its addresses."""
        return PodNetwork(self.vni, self.pod_dev or self.dev, self.remote_ipv4, self.remote_ipv6)

    def with_mtu(self, mtu: int) -> Network:
        return replace(self, mtu=mtu)


class NetworkMap(Mapping[str, Network]):
    """Networks by name. A network that went into several pods of a target has one ``Network``
    per pod: ``pods(name)`` maps pod name to it, and ``networks[name]`` says to use that."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self.all = tuple(networks)
        self._by_name: dict[str, list[Network]] = {}
        for net in self.all:
            self._by_name.setdefault(net.name, []).append(net)

    def __getitem__(self, name: str) -> Network:
        found = self._by_name.get(name)
        if found is None:
            raise KeyError(f"no svctunnel network {name!r}; the session has {', '.join(self._by_name) or 'none'}")
        if len(found) > 1:
            pods = ", ".join(str(n.pod) for n in found)
            raise KeyError(f"network {name!r} went into {len(found)} pods ({pods}); use .pods({name!r})[POD]")
        return found[0]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def pods(self, name: str) -> dict[str, Network]:
        """Pod name -> the network ``name`` in that pod (its own device, addresses and VNI)."""
        if name not in self._by_name:
            self[name]  # the KeyError that names what there is
        return {str(n.pod): n for n in self._by_name[name] if n.pod is not None}


@dataclass(frozen=True)
class NetworkRequest:
    """One ``svctunnel_network`` mark: None means "pick a default", False "none"."""

    name: str
    ipv4: Net4 = None
    ipv6: Net6 = None
    vni: int | None = None
    where: str = field(default="", compare=False)
    target: Target | None = None
    pod_dev: str | None = None


def parse_request(
    name: object,
    ipv4: object,
    ipv6: object,
    vni: object,
    where: str,
    target: object = None,
    pod_dev: object = None,
) -> NetworkRequest:
    """Check one marker's arguments; errors name the test that carries the mark."""

    def fail(text: str) -> ConfigError:
        return ConfigError(f"{where}: {text}" if where == ATTACH else f"svctunnel_network mark on {where}: {text}")

    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise fail(f"name {name!r} must be a non-empty word (letters, digits, '-', '_')")
    if name == DEFAULT_NAME:
        raise fail(f"the name {DEFAULT_NAME!r} is reserved for the default network; pick another")
    if vni is not None and (not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni <= MAX_VNI):
        raise fail(f"vni={vni!r} is outside 1..{MAX_VNI}")
    net4 = _parse_net(ipv4, 4, fail)
    net6 = _parse_net(ipv6, 6, fail)
    assert not isinstance(net4, ipaddress.IPv6Network) and not isinstance(net6, ipaddress.IPv4Network)
    if net4 is False and net6 is False:
        raise fail("a network needs IPv4 or IPv6; do not disable both")
    return NetworkRequest(name, net4, net6, vni, where, _parse_target(target, fail), _parse_pod_dev(pod_dev, fail))


def _parse_target(value: object, fail: Callable[[str], ConfigError]) -> Target | None:
    if value is None or isinstance(value, Target):
        return value
    try:
        return parse_target(str(value))
    except ValueError as exc:
        raise fail(f"target={value!r}: {exc}") from None


def _parse_pod_dev(value: object, fail: Callable[[str], ConfigError]) -> str | None:
    if value is None:
        return None
    try:
        return parse_ifname(str(value))
    except ValueError as exc:
        raise fail(f"pod_dev={value!r} is not a device name ({exc})") from None


def _parse_net(value: object, version: int, fail: Callable[[str], ConfigError]) -> AnyNetwork | Disabled | None:
    if value is None or value is False:
        return value
    keyword = f"ipv{version}"
    try:
        net = ipaddress.ip_network(str(value), strict=True)
    except ValueError:
        raise fail(
            f"{keyword}={value!r} is not a network; give one like "
            + ("'10.40.0.0/30'" if version == 4 else "'fd00:40::/126'")
        ) from None
    if net.version != version:
        raise fail(f"{keyword}={value!r} is an IPv{net.version} network")
    if net.num_addresses < 2 or len(list(_two_hosts(net))) < 2:
        raise fail(f"{keyword}={value!r} has room for fewer than two addresses")
    return net


def network_option(version: int) -> Callable[[str], AnyNetwork]:
    """A parser of an option's network of one IP version, with room for both ends."""
    example = "10.30.30.0/30" if version == 4 else "fd00:3030::/126"

    def parse(text: str) -> AnyNetwork:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError:
            raise ValueError(f"not a network; give one like {example}") from None
        if net.version != version:
            raise ValueError(f"an IPv{net.version} network; give one like {example}")
        if len(list(_two_hosts(net))) < 2:
            raise ValueError("room for fewer than two addresses")
        return net

    return parse


def _two_hosts(net: AnyNetwork) -> Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    hosts: Iterator[Any] = iter(net.hosts())
    for _ in range(2):
        nxt = next(iter(hosts), None)
        if nxt is None:
            return
        yield nxt


def _ends(net: AnyNetwork) -> tuple[str, str]:
    """(local, remote) interfaces: the pod takes the first host, this end the second."""
    pod, local = list(_two_hosts(net))
    return f"{local}/{net.prefixlen}", f"{pod}/{net.prefixlen}"


def make_network(name: str, vni: int, dev: str, net4: AnyNetwork | None, net6: AnyNetwork | None) -> Network:
    local4 = remote4 = local6 = remote6 = None
    if net4 is not None:
        local, remote = _ends(net4)
        local4, remote4 = ipaddress.IPv4Interface(local), ipaddress.IPv4Interface(remote)
    if net6 is not None:
        local, remote = _ends(net6)
        local6, remote6 = ipaddress.IPv6Interface(local), ipaddress.IPv6Interface(remote)
    return Network(name, vni, dev, local4, remote4, local6, remote6)


def merge_requests(requests: Sequence[NetworkRequest]) -> list[NetworkRequest]:
    """One request per name; the same name with different settings is an error."""
    by_name: dict[str, NetworkRequest] = {}
    for request in requests:
        seen = by_name.get(request.name)
        if seen is None:
            by_name[request.name] = request
        elif seen != request:
            raise ConfigError(
                f"svctunnel_network {request.name!r} is marked with different settings on "
                f"{seen.where} and {request.where}; use one setting per name"
            )
    return [by_name[name] for name in sorted(by_name, key=natural_order)]


def natural_order(name: str) -> tuple[tuple[tuple[int, str], ...], str]:
    """Sort key that puts ``vlan9`` before ``vlan10``: numbers compare as numbers (``a0`` before ``a00``)."""
    split = re.split(r"(\d+)", name)  # odd places hold the numbers
    parts = tuple((int(part), "") if i % 2 else (-1, part) for i, part in enumerate(split) if part)
    return parts, name


class _Spans:
    """Taken addresses of one IP version as sorted, disjoint integer ranges [start, end]."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, end) - 1
        return i >= 0 and self.ends[i] >= start

    def add(self, start: int, end: int) -> None:
        lo = bisect.bisect_left(self.ends, start - 1)  # the first range that touches or follows
        hi = bisect.bisect_right(self.starts, end + 1)  # past the last range that touches
        if lo < hi:
            start, end = min(start, self.starts[lo]), max(end, self.ends[hi - 1])
        self.starts[lo:hi], self.ends[lo:hi] = [start], [end]


class _Allocator:
    """Hands out the next free /30 (/126) block of a pool and the next free VNI, skipping taken ones."""

    def __init__(
        self, taken: Sequence[AnyNetwork], vnis: set[int], owners: Sequence[tuple[str, AnyNetwork]] = ()
    ) -> None:
        self.spans = {4: _Spans(), 6: _Spans()}
        for net in taken:
            self._take(net)
        self.vnis = set(vnis)
        self.owners = list(owners)  # who holds which of ``taken``, for the error when a pool is full
        self._cursor: dict[tuple[AnyNetwork, int], int] = {}

    def _take(self, net: AnyNetwork) -> None:
        self.spans[net.version].add(int(net.network_address), int(net.broadcast_address))

    def subnet(self, pool: AnyNetwork, prefix: int, name: str = "") -> AnyNetwork:
        size = 2 ** (pool.max_prefixlen - prefix)
        count = pool.num_addresses // size
        base = int(pool.network_address)
        first = (int(_POOL_START[pool.version]) - base) // size
        cursor = self._cursor.get((pool, prefix), 0)
        for step in range(cursor, cursor + count):
            start = base + ((first + step) % count) * size
            if not self.spans[pool.version].overlaps(start, start + size - 1):
                self._cursor[(pool, prefix)] = step + 1
                block = ipaddress.ip_network((start, prefix))
                self._take(block)
                return block
        inside = [f"{who} ({net})" for who, net in self.owners if net.version == pool.version and net.overlaps(pool)]
        what = f"svctunnel network {name!r}" if name else "a svctunnel network"
        how = "--svctunnel-ipv4/--svctunnel-ipv6" if name == DEFAULT_NAME else "ipv4=/ipv6="
        raise ConfigError(
            f"{what} gets no free {pool} block left"
            + (f"; these overlap the pool: {', '.join(inside)}" if inside else "")
            + f"; give it addresses of its own ({how}) or move what overlaps the pool"
        )

    def vni(self, base: int) -> int:
        vni = (base - 1) % MAX_VNI + 1  # wrap past the top of the range
        while vni in self.vnis:
            vni = vni % MAX_VNI + 1
        self.vnis.add(vni)
        return vni


def plan_networks(
    default_vni: int,
    requests: Sequence[NetworkRequest],
    dev_name: Sequence[str],
    default_target: Target | None = None,
    default_pod_dev: str | None = None,
    default_ipv4: ipaddress.IPv4Network | None = None,
    default_ipv6: ipaddress.IPv6Network | None = None,
    held: Sequence[Held] = (),
) -> tuple[Network, ...]:
    """The default network plus one per distinct request, with conflict checks.

    ``dev_name[i]`` names the device of the i-th network (0 is the default).
    Extra networks are ordered by name, so the defaults they get are deterministic.
    ``default_target`` is where the default network and every request without a target of its
    own go (None: the plugin's own pod end); ``default_pod_dev`` the default network's pod device;
    ``default_ipv4``/``default_ipv6`` its addresses (None: the first free blocks, 10.30.30.0/30 and
    fd00:3030::/126 unless taken). ``held`` are blocks that others on this host hold: networks
    without addresses of their own avoid them, one with addresses of its own that overlaps is a
    ConfigError naming the holder. A target's networks are planned for one pod;
    ``spread_over_pods`` gives the other pods theirs.
    """
    merged = merge_requests(requests)
    if len(merged) + 1 > min(len(dev_name), MAX_NETWORKS):
        raise ConfigError(f"at most {min(len(dev_name), MAX_NETWORKS) - 1} extra networks per session")
    explicit: list[tuple[str, AnyNetwork]] = [(DEFAULT_NAME, n) for n in (default_ipv4, default_ipv6) if n]
    for req in merged:
        explicit += [(req.name, n) for n in (req.ipv4, req.ipv6) if n]
    _check_overlaps(explicit)
    check_held(explicit, held)
    _check_vnis(default_vni, merged)
    owners = [(repr(name), n) for name, n in explicit] + list(held)  # for the error if a pool is full
    alloc = _Allocator([n for _, n in owners], {default_vni} | {r.vni for r in merged if r.vni}, owners)
    own4 = default_ipv4 or alloc.subnet(_POOL_IPV4, 30, DEFAULT_NAME)
    own6 = default_ipv6 or alloc.subnet(_POOL_IPV6, 126, DEFAULT_NAME)
    default = make_network(DEFAULT_NAME, default_vni, dev_name[0], own4, own6)
    nets = [replace(default, target=default_target, pod_dev=default_pod_dev)]
    for index, req in enumerate(merged, start=1):
        net4 = req.ipv4 if req.ipv4 is not None else alloc.subnet(_POOL_IPV4, 30, req.name)
        net6 = req.ipv6 if req.ipv6 is not None else alloc.subnet(_POOL_IPV6, 126, req.name)
        vni = req.vni if req.vni is not None else alloc.vni(default_vni + index)
        net = make_network(req.name, vni, dev_name[index], net4 or None, net6 or None)
        nets.append(replace(net, target=req.target or default_target, pod_dev=req.pod_dev))
    _check_pod_devs(nets)
    check_hellos_fit(nets)
    return tuple(nets)


@dataclass(frozen=True)
class Plan:
    """What a session asks for (``plan_networks``' arguments); ``networks(held)`` plans it around
    the blocks that others on this host hold, when the session claims its addresses."""

    default_vni: int
    requests: tuple[NetworkRequest, ...] = ()
    dev_name: tuple[str, ...] = ()
    target: Target | None = None
    pod_dev: str | None = None
    ipv4: ipaddress.IPv4Network | None = None
    ipv6: ipaddress.IPv6Network | None = None

    def networks(self, held: Sequence[Held] = ()) -> tuple[Network, ...]:
        return plan_networks(
            self.default_vni, self.requests, self.dev_name, self.target, self.pod_dev, self.ipv4, self.ipv6, held
        )


def session_plan(config: TunnelConfig, run_id: str, requests: Sequence[NetworkRequest] = ()) -> Plan:
    """The plan of a session with these settings and marks."""
    names = tuple(device_names(run_id))
    return Plan(config.vni, tuple(requests), names, config.target, config.pod_dev, config.ipv4, config.ipv6)


def check_held(explicit: Sequence[tuple[str, AnyNetwork]], held: Sequence[Held], remedy: str = "") -> None:
    """A network with addresses of its own must not overlap what another run (or this host) holds."""
    for name, net in explicit:
        for owner, block in held:
            if net.version == block.version and net.overlaps(block):
                how = remedy or (
                    "move it with --svctunnel-ipv4/--svctunnel-ipv6 (env SVCTUNNEL_IPV4/SVCTUNNEL_IPV6), or leave"
                    " them out to get free addresses"
                    if name == DEFAULT_NAME
                    else "give its mark other ipv4=/ipv6=, or leave them out to get free ones"
                )
                raise ConfigError(f"svctunnel network {name!r} ({net}) overlaps {block}, which {owner} holds: {how}")


def blocks(nets: Sequence[Network]) -> list[AnyNetwork]:
    """The address blocks of this end's side of the networks."""
    return [a.network for n in nets for a in (n.local_ipv4, n.local_ipv6) if a is not None]


def check_targets_need_a_cluster(nets: Sequence[Network], backend: str) -> None:
    """A network into the user's pods needs the kubernetes backend."""
    targeted = [n for n in nets if n.target is not None]
    if targeted and backend != "kubernetes":
        net = targeted[0]
        raise ConfigError(
            f"svctunnel network {net.name!r} goes into the pods of target {net.target}, which needs the"
            f" kubernetes backend (this session uses {backend}); leave out --svctunnel-backend {backend}"
            " or the network's target="
        )


def check_hellos_fit(nets: Sequence[Network]) -> None:
    """Each pod end's networks travel in one hello datagram of at most MAX_DATAGRAM bytes."""
    ends: dict[tuple[Target | None, str | None], list[Network]] = {}
    for net in nets:
        ends.setdefault((net.target, net.pod), []).append(net)
    for (target, pod), group in ends.items():
        where = f"pod {pod} of target {target}" if pod else f"target {target}" if target else "the pod end"
        if len(group) > MAX_NETWORKS:
            raise ConfigError(f"{len(group)} svctunnel networks go into {where}; one pod end takes {MAX_NETWORKS}")
        size = hello_size([n.pod_network() for n in group])
        if size > MAX_DATAGRAM:
            raise ConfigError(
                f"the {len(group)} svctunnel networks into {where} need a {size}-byte hello, more than"
                f" {MAX_DATAGRAM}: networks whose VNIs, addresses and device names follow each other (as the"
                " defaults do) pack into one run, any other starts a run of its own; leave vni=, ipv4=, ipv6="
                " and pod_dev= to the defaults on more of them, or number them in sequence"
            )


def _check_pod_devs(nets: Sequence[Network]) -> None:
    """Two networks into the same pods need two device names there."""
    owner: dict[tuple[str, str], str] = {}
    for net in nets:
        key = (str(net.target), net.pod_dev or net.dev)
        if key in owner:
            where = f"target {net.target}" if net.target else "the pod end"
            raise ConfigError(
                f"svctunnel networks {owner[key]!r} and {net.name!r} both want device {key[1]} in {where};"
                " give one of them another pod_dev="
            )
        owner[key] = net.name


def spread_over_pods(
    nets: Sequence[Network],
    pods: Mapping[Target, Sequence[str]],
    next_dev: Callable[[], str],
    taken: Sequence[Network] = (),
    held: Sequence[Held] = (),
) -> tuple[Network, ...]:
    """Every network as built: one per pod of its target (``pods`` lists them, sorted), the first
    pod's as planned, every other pod's with its own local device (``next_dev()``), its own VNI and
    its own address blocks (none of ``taken``'s). A network whose addresses were given explicitly
    fits one pod only: a ConfigError says so when its target has more."""
    everything = [*taken, *nets]
    alloc = _Allocator([*blocks(everything), *(block for _, block in held)], {n.vni for n in everything})
    built = [net if net.target is None else replace(net, pod=pods[net.target][0]) for net in nets]
    for target in dict.fromkeys(n.target for n in nets if n.target is not None):
        names, own = list(pods[target]), [n for n in nets if n.target == target]
        fixed = [n.name for n in own if not _default_addresses(n)]
        if fixed and len(names) > 1:
            raise ConfigError(
                f"svctunnel network {fixed[0]!r} has addresses of its own, but target {target} matches"
                f" {len(names)} pods ({', '.join(names)}): leave ipv4=/ipv6= out (each pod gets its own"
                " block) or target one pod"
            )
        for pod in names[1:]:  # pod by pod, so that each pod's networks follow each other (one run in its hello)
            vni = own[0].vni
            for net in own:
                net4 = alloc.subnet(_POOL_IPV4, 30) if net.local_ipv4 else None
                net6 = alloc.subnet(_POOL_IPV6, 126) if net.local_ipv6 else None
                vni = alloc.vni(vni + 1)
                other = make_network(net.name, vni, next_dev(), net4, net6)
                built.append(replace(other, pod_dev=net.pod_dev, target=target, pod=pod))
    check_hellos_fit(built)
    return tuple(built)


def plan_attached(
    requests: Sequence[NetworkRequest],
    target: Target,
    taken: Sequence[Network],
    next_dev: Callable[[], str],
    base_vni: int,
    held: Sequence[Held] = (),
) -> tuple[Network, ...]:
    """The networks of one ``svctunnel_attach`` call into ``target``, planned for one pod: each
    request's own addresses and VNI where it gives them, else free ones (none of ``taken``'s, none
    of ``held``); the device in the pod is ``pod_dev``, else the network's name."""
    merged = merge_requests(requests)
    explicit = [(r.name, n) for r in merged for n in (r.ipv4, r.ipv6) if n]
    used = [(n.name, a.network) for n in taken for a in (n.local_ipv4, n.local_ipv6) if a is not None]
    _check_overlaps([*used, *explicit])
    check_held(explicit, held, "give it other ipv4=/ipv6=, or leave them out to get free ones")
    vnis = {n.vni for n in taken} | {r.vni for r in merged if r.vni}
    alloc = _Allocator([n for _, n in [*used, *explicit, *held]], vnis)
    nets = []
    for req in merged:
        net4 = req.ipv4 if req.ipv4 is not None else alloc.subnet(_POOL_IPV4, 30)
        net6 = req.ipv6 if req.ipv6 is not None else alloc.subnet(_POOL_IPV6, 126)
        vni = req.vni if req.vni is not None else alloc.vni(base_vni + 1)
        net = make_network(req.name, vni, next_dev(), net4 or None, net6 or None)
        nets.append(replace(net, target=target, pod_dev=req.pod_dev or req.name))
    _check_pod_devs(nets)
    check_hellos_fit(nets)
    return tuple(nets)


def _default_addresses(net: Network) -> bool:
    return all(
        a is None or a.network.subnet_of(pool)  # type: ignore[arg-type]
        for a, pool in ((net.local_ipv4, _POOL_IPV4), (net.local_ipv6, _POOL_IPV6))
    )


def _check_overlaps(nets: Sequence[tuple[str, AnyNetwork]]) -> None:
    for i, (name_a, a) in enumerate(nets):
        for name_b, b in nets[i + 1 :]:
            if a.version == b.version and name_a != name_b and a.overlaps(b):
                raise ConfigError(
                    f"svctunnel networks {name_a!r} ({a}) and {name_b!r} ({b}) overlap;"
                    " give one of them other addresses in its mark"
                )


def _check_vnis(default_vni: int, requests: Sequence[NetworkRequest]) -> None:
    owner = {default_vni: DEFAULT_NAME}
    for req in requests:
        if req.vni is None:
            continue
        if req.vni in owner:
            raise ConfigError(
                f"svctunnel networks {owner[req.vni]!r} and {req.name!r} both use VNI {req.vni};"
                " give each its own vni= (the default network's is --svctunnel-vni)"
            )
        owner[req.vni] = req.name


def single_network(
    dev: str,
    vni: int,
    ipv4: ipaddress.IPv4Interface | None,
    ipv6: ipaddress.IPv6Interface | None,
    remote_ipv4: ipaddress.IPv4Interface | None,
    remote_ipv6: ipaddress.IPv6Interface | None,
    held: Sequence[Held] = (),
) -> Network:
    """The network ``svctunnel connect`` builds: flags where given, else the first free blocks
    (10.30.30.0/30 and fd00:3030::/126 unless ``held``).

    A local address without a remote one gets the other end's address from the same
    subnet (the first host that is not the local address). An address given that overlaps
    ``held`` is a ConfigError naming the holder.
    """
    given = [(DEFAULT_NAME, a.network) for a in (ipv4, ipv6, remote_ipv4, remote_ipv6) if a is not None]
    check_held(given, held, "give other --ipv4/--ipv6 (and --remote-*), or leave them out to get free addresses")
    alloc = _Allocator([block for _, block in [*given, *held]], set())
    free4 = alloc.subnet(_POOL_IPV4, 30) if ipv4 is None and remote_ipv4 is None else None
    free6 = alloc.subnet(_POOL_IPV6, 126) if ipv6 is None and remote_ipv6 is None else None
    base = make_network(DEFAULT_NAME, vni, dev, free4, free6)
    local4 = ipv4 or (None if remote_ipv4 else base.local_ipv4)
    local6 = ipv6 or (None if remote_ipv6 else base.local_ipv6)
    remote4 = remote_ipv4 or (_other_host(local4) if ipv4 else base.remote_ipv4 if local4 else None)
    remote6 = remote_ipv6 or (_other_host(local6) if ipv6 else base.remote_ipv6 if local6 else None)
    if (local4 is None) != (remote4 is None) or (local6 is None) != (remote6 is None):
        raise ConfigError("give both --ipv4 and --remote-ipv4 (or --ipv6 and --remote-ipv6), or neither")
    return Network(DEFAULT_NAME, vni, dev, local4, remote4, local6, remote6)


def _other_host(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None) -> Any:
    if iface is None:
        return None
    for host in iface.network.hosts():
        if host != iface.ip:
            return ipaddress.ip_interface(f"{host}/{iface.network.prefixlen}")
    raise ConfigError(f"{iface} leaves no address for the other end; use a larger subnet")
