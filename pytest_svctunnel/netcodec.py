"""The networks of a hello, packed as runs, so that hundreds of them fit one datagram.

A run is a row of networks that follow each other: the VNI, the IPv4 and the IPv6 address each
grow by a fixed step, and the device names end in consecutive numbers (``svtab12cd-1``, ``-2``,
...). A session's default plan is one run however many networks it has; a network that breaks the
pattern (its own addresses, VNI or device name) starts a run of its own. A run takes at most
``RUN_MAX`` bytes, so a hello always carries ``MAX_RUNS`` networks of any kind, and up to
``MAX_NETWORKS`` networks that fall into at most that many runs. Pure logic; errors are ValueError.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from .values import ifname_problem

MAX_NETWORKS = 1024  # networks of one pod end (one hello)
MAX_VNI = 0xFFFFFF
# count, VNI and its step, IPv4 prefix length, address and step, IPv6 the same, name prefix length
_RUN = struct.Struct("!HIIB4sIB16sQB")
_SUFFIX = struct.Struct("!HB")  # the first device's number and its digits (0: the name has no number)
_ABSENT = 0xFF
_NUMBERED = re.compile(r"(?P<prefix>.*?)(?P<digits>\d{1,4})")
RUN_MAX = _RUN.size + 15 + _SUFFIX.size  # the largest run: a 15-character name
MAX_RUNS = 255  # a hello counts its runs in one byte
_STEP_MAX = (2**32 - 1, 2**32 - 1, 2**64 - 1)  # the widths of the VNI, IPv4 and IPv6 steps on the wire


@dataclass(frozen=True)
class PodNetwork:
    """One network the pod end is asked to build."""

    vni: int
    dev: str
    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None


def validate_network(net: PodNetwork) -> None:
    if not 1 <= net.vni <= MAX_VNI:
        raise ValueError(f"VNI {net.vni} is outside 1..{MAX_VNI}")
    if (problem := ifname_problem(net.dev)) is not None:
        raise ValueError(f"device name {net.dev!r} is not a valid interface name: {problem}")


@dataclass(frozen=True)
class _Name:
    """A device name as a prefix and a number of ``width`` digits (width 0: no number)."""

    prefix: str
    number: int = 0
    width: int = 0

    @classmethod
    def of(cls, name: str) -> _Name:
        match = _NUMBERED.fullmatch(name)
        if match is None:
            return cls(name)
        return cls(match["prefix"], int(match["digits"]), len(match["digits"]))

    def nth(self, i: int) -> str:
        return self.prefix + str(self.number + i).zfill(self.width) if self.width else self.prefix


@dataclass(frozen=True)
class _Family:
    """One address family of a run: the first address (None: the run has none) and the step."""

    first: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None
    step: int = 0

    def nth(self, i: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
        if self.first is None:
            return None
        address = int(self.first.ip) + i * self.step
        top = 2**self.first.max_prefixlen - 1
        if address > top:
            raise ValueError(f"the run's addresses grow past the top of IPv{self.first.version}")
        return type(self.first)((address, self.first.network.prefixlen))  # the family of the first, never guessed


@dataclass(frozen=True)
class Run:
    """``count`` networks, the i-th with VNI ``vni + i*vni_step``, addresses ``first + i*step``
    (same prefix length) and device ``name.nth(i)``."""

    count: int
    vni: int
    vni_step: int
    ipv4: _Family
    ipv6: _Family
    name: _Name

    @classmethod
    def single(cls, net: PodNetwork) -> Run:
        return cls(1, net.vni, 0, _Family(net.ipv4), _Family(net.ipv6), _Name.of(net.dev))

    def nth(self, i: int) -> PodNetwork:
        v4, v6 = self.ipv4.nth(i), self.ipv6.nth(i)
        assert not isinstance(v4, ipaddress.IPv6Interface) and not isinstance(v6, ipaddress.IPv4Interface)
        return PodNetwork(self.vni + i * self.vni_step, self.name.nth(i), v4, v6)

    def networks(self) -> list[PodNetwork]:
        return [self.nth(i) for i in range(self.count)]

    def grown_by(self, net: PodNetwork) -> Run | None:
        """This run with ``net`` as its next network, or None if ``net`` does not follow it."""
        grown = replace(self, count=self.count + 1)
        if self.count == 1:  # the second network fixes the steps
            steps = (net.vni - self.vni, _step(self.ipv4.first, net.ipv4), _step(self.ipv6.first, net.ipv6))
            if any(step is None or not 0 <= step <= top for step, top in zip(steps, _STEP_MAX, strict=True)):
                return None
            if not self.name.width:
                return None
            vni_step, step4, step6 = steps
            assert vni_step is not None and step4 is not None and step6 is not None
            four, six = replace(self.ipv4, step=step4), replace(self.ipv6, step=step6)
            grown = replace(grown, vni_step=vni_step, ipv4=four, ipv6=six)
        if grown.count > 0xFFFF or not 1 <= grown.vni + self.count * grown.vni_step <= MAX_VNI:
            return None
        try:
            return grown if grown.nth(self.count) == net else None
        except ValueError:
            return None


def _step(
    first: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None,
    then: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None,
) -> int | None:
    """The address step from ``first`` to ``then``; None if they cannot be one run's."""
    if first is None or then is None:
        return 0 if first is then else None
    if first.network.prefixlen != then.network.prefixlen:
        return None
    return int(then.ip) - int(first.ip)


def pack_runs(nets: Iterable[PodNetwork]) -> list[Run]:
    """The networks as runs, in their order: each network joins the run before it if it follows it."""
    runs: list[Run] = []
    for net in nets:
        grown = runs[-1].grown_by(net) if runs else None
        if grown is not None:
            runs[-1] = grown
        else:
            runs.append(Run.single(net))
    return runs


def encoded_size(nets: Sequence[PodNetwork]) -> int:
    """The bytes the networks take in a hello."""
    return sum(_RUN.size + len(run.name.prefix) + _SUFFIX.size for run in pack_runs(nets))


def encode_runs(runs: Sequence[Run]) -> bytes:
    return b"".join(_encode_run(run) for run in runs)


def _encode_run(run: Run) -> bytes:
    v4, v6 = run.ipv4.first, run.ipv6.first
    prefix = run.name.prefix.encode("ascii")
    head = _RUN.pack(
        run.count,
        run.vni,
        run.vni_step,
        v4.network.prefixlen if v4 else _ABSENT,
        v4.ip.packed if v4 else bytes(4),
        run.ipv4.step,
        v6.network.prefixlen if v6 else _ABSENT,
        v6.ip.packed if v6 else bytes(16),
        run.ipv6.step,
        len(prefix),
    )
    return head + prefix + _SUFFIX.pack(run.name.number, run.name.width)


def decode_runs(raw: bytes, runs: int) -> tuple[tuple[PodNetwork, ...], int]:
    """``runs`` runs from the start of ``raw``: their networks, checked, and the bytes they took."""
    nets: list[PodNetwork] = []
    offset = 0
    for _ in range(runs):
        run, offset = _decode_run(raw, offset)
        if len(nets) + run.count > MAX_NETWORKS:
            raise ValueError(f"more than {MAX_NETWORKS} networks")
        nets += run.networks()
    for net in nets:
        validate_network(net)
    if len({n.vni for n in nets}) != len(nets) or len({n.dev for n in nets}) != len(nets):
        raise ValueError("duplicate VNI or device name")
    return tuple(nets), offset


def _decode_run(raw: bytes, offset: int) -> tuple[Run, int]:
    count, vni, vni_step, plen4, addr4, step4, plen6, addr6, step6, name_len = _RUN.unpack_from(raw, offset)
    offset += _RUN.size
    if count == 0 or name_len > 15 or (count > 1 and vni_step == 0):
        raise ValueError(f"a run of {count} network(s) with a {name_len}-byte name and VNI step {vni_step}")
    prefix = raw[offset : offset + name_len].decode("ascii")
    if len(prefix) != name_len:
        raise ValueError("a run's device name is cut short")
    number, width = _SUFFIX.unpack_from(raw, offset + name_len)
    if width > 4 or (count > 1 and width == 0):
        raise ValueError(f"a run of {count} numbered with {width} digits")
    four, six = _Family(_iface(4, plen4, addr4), step4), _Family(_iface(6, plen6, addr6), step6)
    return Run(count, vni, vni_step, four, six, _Name(prefix, number, width)), offset + name_len + _SUFFIX.size


def _iface(version: int, plen: int, packed: bytes) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    if plen == _ABSENT:
        return None
    if plen > (32 if version == 4 else 128):
        raise ValueError(f"prefix length {plen}")
    return ipaddress.ip_interface((ipaddress.ip_address(packed), plen))
