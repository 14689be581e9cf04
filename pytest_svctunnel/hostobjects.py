"""A run's objects on this host, found by its id alone: what exists, and removing all of it.

A run may own network namespaces ``svt-<id>-*`` (a lab, a test cluster's nodes), links
``svt<id>-*`` in this namespace (a lab's wire, the tunnel devices), devices it claimed under names
of the user's choice (``svctunnel connect --dev``), the lab's agent and any process inside its
namespaces. Used by the lab's ``down``, by ``svctunnel reap`` for runs
whose owner is gone, and by the tests' cluster network. Needs nothing the run recorded but
its agent's pid file, so it also works for a run whose setup was cut short.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from . import claims, device, linkbatch, names, netns, pids, rtnl
from .errors import LabError, SvcTunnelError
from .labagent import LabAgent
from .runs import Run
from .waiting import Deadline, wait_for

NETNS_DIR = Path("/run/netns")  # where named network namespaces live
AGENT_STOP_S = 10.0


@dataclass(frozen=True)
class Leftovers:
    """What exists of one run on this host right now (and, filled in by the reaper, in a cluster)."""

    namespaces: tuple[str, ...]
    links: tuple[str, ...]
    processes: tuple[int, ...]
    cluster: str = ""  # the Kubernetes objects it recorded

    @classmethod
    def of(cls, run: Run) -> Leftovers:
        namespaces = tuple(netns.listing(names.netns_prefix(run.id)))
        found = {ref.pid for ref in pids.in_netns(_identities(namespaces))}
        agent = _agent(run)
        if agent.alive() and agent.pid is not None:
            found.add(agent.pid)
        links = tuple(device.links_with_prefix(None, names.link_prefix(run.id))) + tuple(claimed_links(run))
        return cls(namespaces, links, tuple(sorted(found)))

    def describe(self) -> str:
        parts = [
            f"{label} {', '.join(map(str, items))}"
            for label, items in (("namespaces", self.namespaces), ("links", self.links), ("processes", self.processes))
            if items
        ]
        if self.cluster:
            parts.append(f"Kubernetes {self.cluster}")
        return "; ".join(parts) if parts else "only its state directory"


def claimed_links(run: Run) -> list[str]:
    """The devices a run claimed under names of the user's choice (``svctunnel connect --dev``) that
    still exist: VXLAN devices of the link group it recorded, never another link of that name."""
    claim = claims.read(run)
    if claim is None or claim.group is None or not claim.devices:
        return []
    with rtnl.opened(None) as nl:
        links = nl.links()
    return [
        name
        for name in claim.devices
        if name in links and links[name].kind == "vxlan" and links[name].group == claim.group
    ]


def _agent(run: Run) -> LabAgent:
    return LabAgent(run, names.netns_name(run.id, "pod"))


def _identities(namespaces: tuple[str, ...] | list[str]) -> set[tuple[int, int]]:
    return {ident for name in namespaces if (ident := pids.netns_id(NETNS_DIR / name)) is not None}


def remove_run_objects(run: Run, deadline: Deadline, agent: LabAgent | None = None) -> None:
    """Stop the run's agent (``agent``, the lab's own, which waits for its child; else the one its
    pid file names) and every process in its namespaces, remove the namespaces and this
    namespace's links of the run, and wait until they are gone. Gone already is success;
    LabError names what is left."""
    errors: list[str] = []
    with contextlib.suppress(SvcTunnelError, OSError):  # what survives is stopped with the namespaces' processes
        (agent or _agent(run)).stop(min(deadline.remaining(), AGENT_STOP_S))
    namespaces = netns.listing(names.netns_prefix(run.id))
    identities = _identities(namespaces)
    pids.terminate(pids.in_netns(identities), deadline)
    for name in namespaces:
        try:
            netns.remove(name)
        except SvcTunnelError as exc:
            errors.append(str(exc))
    prefix = names.link_prefix(run.id)
    for name in device.links_with_prefix(None, prefix):
        device.delete_link(None, name)
    claimed = claimed_links(run)
    if claimed:
        linkbatch.remove(None, claimed)
    # again: a process may have entered a namespace between the first look and its removal
    if stuck := pids.terminate(pids.in_netns(identities), deadline):
        errors.append(f"processes {', '.join(str(p.pid) for p in stuck)} in its namespaces survived SIGKILL")
    wait_for(
        lambda: None if device.links_with_prefix(None, prefix) else True,
        phase="removal of the run's links",
        deadline=deadline,
        describe=lambda: f"links still there: {device.links_with_prefix(None, prefix)}",
    )
    if errors:
        raise LabError(
            f"removing run {run.id}: " + "; ".join(errors) + "; everything left carries the run id:"
            " 'svctunnel reap' removes it once this process has exited"
        )
