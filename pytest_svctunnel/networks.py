"""The network plan: which tunnel networks a session builds, with which addresses.

Pure logic. Marker requests and defaults become a tuple of ``Network`` objects,
or a ConfigError that names the conflict and how to fix it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import ConfigError
from .protocol import PodNetwork

DEFAULT_NAME = "default"
DEFAULT_VNI = 333
DEFAULT_IPV4 = ipaddress.IPv4Network("10.30.30.0/30")
DEFAULT_IPV6 = ipaddress.IPv6Network("fd00:3030::/126")
_POOL_IPV4 = ipaddress.IPv4Network("10.30.30.0/24")
_POOL_IPV6 = ipaddress.IPv6Network("fd00:3030::/120")
MAX_VNI = 0xFFFFFF

Disabled = Literal[False]
Net4 = ipaddress.IPv4Network | None | Disabled
Net6 = ipaddress.IPv6Network | None | Disabled
AnyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Network:
    """One tunnel network as built: both ends' addresses, its VNI, device and MTU.

    ``local_*`` are this (external) end's addresses, ``remote_*`` the pod end's.
    ``mtu`` is 0 until the tunnel is built.
    """

    name: str
    vni: int
    dev: str
    local_ipv4: ipaddress.IPv4Interface | None
    remote_ipv4: ipaddress.IPv4Interface | None
    local_ipv6: ipaddress.IPv6Interface | None
    remote_ipv6: ipaddress.IPv6Interface | None
    mtu: int = 0

    def pod_network(self) -> PodNetwork:
        """What the pod end is asked to build: the same VNI and device name, its addresses."""
        return PodNetwork(self.vni, self.dev, self.remote_ipv4, self.remote_ipv6)

    def with_mtu(self, mtu: int) -> Network:
        return replace(self, mtu=mtu)


@dataclass(frozen=True)
class NetworkRequest:
    """One ``svctunnel_network`` mark: None means "pick a default", False "none"."""

    name: str
    ipv4: Net4 = None
    ipv6: Net6 = None
    vni: int | None = None
    where: str = field(default="", compare=False)


def parse_request(name: object, ipv4: object, ipv6: object, vni: object, where: str) -> NetworkRequest:
    """Check one marker's arguments; errors name the test that carries the mark."""

    def fail(text: str) -> ConfigError:
        return ConfigError(f"svctunnel_network mark on {where}: {text}")

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
    return NetworkRequest(name, net4, net6, vni, where)


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
    return [by_name[name] for name in sorted(by_name)]


class _Allocator:
    """Hands out the lowest free /30 (/126) block and VNI, skipping taken ones."""

    def __init__(self, taken: Sequence[AnyNetwork], vnis: set[int]) -> None:
        self.taken = list(taken)
        self.vnis = set(vnis)

    def subnet(self, pool: AnyNetwork, prefix: int) -> AnyNetwork:
        for candidate in pool.subnets(new_prefix=prefix):
            if not any(candidate.version == t.version and candidate.overlaps(t) for t in self.taken):
                self.taken.append(candidate)
                return candidate
        raise ConfigError(f"no free {pool} block left for another network; give ipv4=/ipv6= explicitly")

    def vni(self, base: int) -> int:
        vni = (base - 1) % MAX_VNI + 1  # wrap past the top of the range
        while vni in self.vnis:
            vni = vni % MAX_VNI + 1
        self.vnis.add(vni)
        return vni


def plan_networks(default_vni: int, requests: Sequence[NetworkRequest], dev_name: Sequence[str]) -> tuple[Network, ...]:
    """The default network plus one per distinct request, with conflict checks.

    ``dev_name[i]`` names the device of the i-th network (0 is the default).
    Extra networks are ordered by name, so the defaults they get are deterministic.
    """
    merged = merge_requests(requests)
    if len(merged) + 1 > len(dev_name):
        raise ConfigError(f"at most {len(dev_name) - 1} extra networks per session")
    explicit: list[tuple[str, AnyNetwork]] = [(DEFAULT_NAME, DEFAULT_IPV4), (DEFAULT_NAME, DEFAULT_IPV6)]
    for req in merged:
        explicit += [(req.name, n) for n in (req.ipv4, req.ipv6) if n]
    _check_overlaps(explicit)
    _check_vnis(default_vni, merged)
    alloc = _Allocator([n for _, n in explicit], {default_vni} | {r.vni for r in merged if r.vni})
    nets = [make_network(DEFAULT_NAME, default_vni, dev_name[0], DEFAULT_IPV4, DEFAULT_IPV6)]
    for index, req in enumerate(merged, start=1):
        net4 = req.ipv4 if req.ipv4 is not None else alloc.subnet(_POOL_IPV4, 30)
        net6 = req.ipv6 if req.ipv6 is not None else alloc.subnet(_POOL_IPV6, 126)
        vni = req.vni if req.vni is not None else alloc.vni(default_vni + index)
        nets.append(make_network(req.name, vni, dev_name[index], net4 or None, net6 or None))
    return tuple(nets)


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
) -> Network:
    """The network ``svctunnel connect`` builds: flags where given, else the defaults.

    A local address without a remote one gets the other end's address from the same
    subnet (the first host that is not the local address).
    """
    base = make_network(DEFAULT_NAME, vni, dev, DEFAULT_IPV4, DEFAULT_IPV6)
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
