"""Room in the kernel's neighbour tables (ARP, NDP) for a session's networks, checked before setup.

Each network of a family needs a neighbour entry on this end and one on the pod end. The kernel
keeps one table per family for all its namespaces together, so a lab, a KinD node or a test
cluster on this kernel counts both; the table holds ``net.ipv4.neigh.default.gc_thresh3`` entries
(``ipv6`` likewise; 1024 by default). Past that, pings over the tunnel fail with "neighbor table
overflow" in the kernel log: hundreds of networks need the limit raised first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError
from .networks import Network

PER_NETWORK = 2  # this end's entry and the pod end's, when both run on this kernel
_PROC = Path("/proc")
_TABLES = {4: ("ipv4", "arp_cache"), 6: ("ipv6", "ndisc_cache")}


def in_use(cache: str, proc: Path = _PROC) -> int:
    """Entries in the kernel's table now (all namespaces); 0 if the kernel does not say."""
    try:
        lines = (proc / "net" / "stat" / cache).read_text().splitlines()
        return int(lines[1].split()[0], 16)
    except (OSError, IndexError, ValueError):
        return 0


def limit(family: str, proc: Path = _PROC) -> int | None:
    """The table's hard limit, gc_thresh3; None if the kernel does not say."""
    try:
        return int((proc / "sys" / "net" / family / "neigh" / "default" / "gc_thresh3").read_text())
    except (OSError, ValueError):
        return None


def check_room(networks: Sequence[Network], proc: Path = _PROC) -> None:
    """A ConfigError naming the sysctl to raise when the networks would overflow a neighbour table."""
    for version, (family, cache) in _TABLES.items():
        count = sum(1 for n in networks if (n.local_ipv4 if version == 4 else n.local_ipv6) is not None)
        top = limit(family, proc)
        if not count or top is None:
            continue
        used, wanted = in_use(cache, proc), PER_NETWORK * count
        if used + wanted > top:
            setting, room = f"net.{family}.neigh.default.gc_thresh3", _room(used + wanted)
            raise ConfigError(
                f"{count} IPv{version} networks need up to {wanted} neighbour entries (this end's and the pod"
                f" end's, when it runs on this kernel), and the kernel's table holds {top} for all namespaces"
                f" together ({setting}), {used} in use: raise it first, e.g. 'sysctl -w {setting}={room}"
                f" net.{family}.neigh.default.gc_thresh2={room // 2}', or ask for fewer networks"
            )


def _room(needed: int) -> int:
    """A power of two with a quarter to spare."""
    size = 1024
    while size < needed * 5 // 4:
        size *= 2
    return size
