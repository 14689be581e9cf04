"""What runs hold on this host, claimed under a host-wide lock: address blocks and device names.

Two sessions on one host (two CI jobs on one runner, a kept session and a new one, two
``svctunnel connect``) must never take the same device or overlapping addresses: traffic that is
not bound to a device (a client that just connects to the pod end's address) would go into the
other's tunnel. So a run claims what it builds before it builds it: under an exclusive lock in the
state root it reads what live runs claimed (``claims.json`` in their state directories) and which
addresses this host's interfaces carry, plans around them, and records its own claim. A run that
is gone (its owner exited, not detached) holds nothing any more; what it left on the host's
interfaces is still avoided, until ``svctunnel reap`` removes it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from . import linkbatch, names, rtnl
from .errors import StateError
from .networks import AnyNetwork, Held, Network, blocks
from .runs import Run, all_runs, usable_root

CLAIMS_FILE = "claims.json"
_LOCK_FILE = ".claims.lock"
_LOCK_S = 10.0
# a host address of a narrower network than these is held as its network (routes to it would
# compete with ours), of a wider one as itself only (a 10.0.0.0/8 of a cloud VM must not block us)
_NARROW = {4: 24, 6: 64}
T = TypeVar("T")


@dataclass(frozen=True)
class Claim:
    """What one run holds: its address blocks (this end's), device names, their link group (so the
    reaper removes only devices it made), and what the run is, for errors."""

    blocks: tuple[AnyNetwork, ...] = ()
    devices: tuple[str, ...] = ()
    group: int | None = None
    what: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "blocks": [str(b) for b in self.blocks],
            "devices": list(self.devices),
            "group": self.group,
            "what": self.what,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claim:
        group = data.get("group")
        return cls(
            tuple(ipaddress.ip_network(str(b)) for b in data.get("blocks", ())),
            tuple(str(d) for d in data.get("devices", ())),
            group if isinstance(group, int) else None,
            str(data.get("what", "")),
        )

    def joined(self, other: Claim) -> Claim:
        return Claim(
            tuple(dict.fromkeys([*self.blocks, *other.blocks])),
            tuple(dict.fromkeys([*self.devices, *other.devices])),
            other.group if other.group is not None else self.group,
            other.what or self.what,
        )


def read(run: Run) -> Claim | None:
    data = run.read(CLAIMS_FILE)
    if data is None:
        return None
    try:
        return Claim.from_json(data)
    except ValueError:
        return None


@dataclass(frozen=True)
class Others:
    """What others hold: the live runs' address blocks, this host's addresses (each with its link),
    the live runs' device names, and every link of this host."""

    runs: tuple[Held, ...]
    host: tuple[tuple[str, Held], ...]
    devices: dict[str, str]
    links: dict[str, rtnl.Link]

    @property
    def blocks(self) -> tuple[Held, ...]:
        return self.except_on(None)

    def except_on(self, link: str | None) -> tuple[Held, ...]:
        """Every held block but the addresses on ``link`` (a device about to be made anew)."""
        return (*self.runs, *(held for name, held in self.host if name != link))

    def leftover(self, name: str) -> bool:
        """Whether link ``name`` is a tunnel device of svctunnel's (its link group says so) that no live
        run holds: what a killed run left, free to be made anew."""
        link = self.links.get(name)
        return link is not None and link.kind == "vxlan" and is_ours(link.group) and name not in self.devices


def is_ours(group: int) -> bool:
    """Whether a link group is one of those svctunnel gives its devices (``linkbatch.new_group``)."""
    return group >> 16 == linkbatch.GROUP_MARK


def others(own: Run) -> Others:
    """Live runs' claims (not ``own``'s), then this host's addresses (not on ``own``'s devices)."""
    held: list[Held] = []
    devices: dict[str, str] = {}
    own_claim = read(own) or Claim()
    for run in all_runs():
        claim = read(run) if run.id != own.id else None
        if claim is None or run.liveness().gone:
            continue
        who = f"run {run.id} ({claim.what or 'svctunnel'})"
        held += [(who, block) for block in claim.blocks]
        devices.update(dict.fromkeys(claim.devices, who))
    with rtnl.opened(None) as nl:
        links = nl.links()
        addresses = nl.addresses()
    by_index = {link.index: name for name, link in links.items()}
    mine = set(own_claim.devices)
    host: list[tuple[str, Held]] = []
    for index, address in addresses:
        name = by_index.get(index, f"link {index}")
        if name in mine or names.run_of_link(name) == own.id:
            continue
        narrow = address.network.prefixlen >= _NARROW[address.version]
        block = address.network if narrow else ipaddress.ip_network(address.ip)
        host.append((name, (f"{address} on {name} of this host", block)))
    return Others(tuple(held), tuple(host), devices, links)


@contextmanager
def _locked() -> Iterator[None]:
    """The host-wide lock of claims (every run of this state root), with a deadline."""
    root = usable_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = root / _LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateError(
                        f"another svctunnel run has held the lock {path} for {_LOCK_S:g} s; if no svctunnel is"
                        " running, remove the file"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def claim(own: Run, choose: Callable[[Others], T], record: Callable[[T], Claim]) -> T:
    """``choose`` what to build around what ``others`` hold, and record it as ``own``'s claim (added to
    what it claimed before), all under the lock: a run starting meanwhile sees it."""
    with _locked():
        result = choose(others(own))
        before = read(own) or Claim()
        own.write(CLAIMS_FILE, before.joined(record(result)).to_json())
    return result


Plan = Callable[[Sequence[Held]], Sequence[Network]]


def claim_networks(own: Run, plan: Plan, what: str = "") -> tuple[Network, ...]:
    """Networks planned around what others hold, claimed for ``own`` (``what`` it is: a pytest session
    by default)."""
    what = what or f"pytest session, pid {os.getpid()}"

    def choose(held: Others) -> tuple[Network, ...]:
        return tuple(plan(held.blocks))

    def record(nets: tuple[Network, ...]) -> Claim:
        return Claim(tuple(blocks(nets)), tuple(n.dev for n in nets), None, what)

    return claim(own, choose, record)
