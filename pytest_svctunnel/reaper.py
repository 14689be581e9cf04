"""Reaping: remove what runs that are gone left behind, chosen by run id under one state root.

A run is gone when its owner process no longer runs (pid and start time, see ``runs``) and
it is not detached (``svctunnel lab up`` and kept sessions outlive their owner on purpose;
``include_detached`` takes those too once their owner has exited). For each gone run the
reaper stops its agent and every process in its namespaces, removes the namespaces
``svt-<id>-*`` and this namespace's links ``svt<id>-*``, then its state directory.

Only runs with a state directory under this state root are touched. Objects named for an id
without one belong to another state root (another user or test session) and are only
listed. Running it twice is harmless; what is already gone counts as removed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import device, names, netns
from .backends.kubernetes.options import Placement
from .errors import KubeError, PrivilegeError, StateError, SvcTunnelError
from .hostobjects import Leftovers, remove_run_objects
from .privileges import require_net_admin
from .runs import INJECTED_PREFIX, KUBE_FILE, Liveness, Run, all_runs, state_root
from .shield import shield
from .waiting import Deadline

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Verdict:
    """One run under the state root and whether to reap it."""

    run: Run
    liveness: Liveness
    reap: bool


@dataclass
class ReapReport:
    """What one reaping pass did (or, dry, would do): one line per reaped run, failures, notes."""

    root: Path
    dry_run: bool
    reaped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = self.reaped + self.failed + self.left_alone + self.orphans
        return lines or [f"nothing to reap under {self.root}"]


class Reaper:
    """Finds the runs under the current state root that are gone and removes what they left."""

    def __init__(self, include_detached: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.include_detached = include_detached
        self.timeout = timeout
        self.root = state_root()

    def verdicts(self) -> list[Verdict]:
        """Every run under the state root (named like a run id) with its liveness and the decision."""
        out = []
        for run in all_runs():
            if names.RUN_ID.fullmatch(run.id):
                liveness = run.liveness()
                detached_and_done = self.include_detached and liveness.detached and not liveness.owner_alive
                out.append(Verdict(run, liveness, liveness.gone or detached_and_done))
        return out

    def run(self, dry_run: bool = False) -> ReapReport:
        """Reap every gone run (or only say what that would remove) and list what stays."""
        report = ReapReport(self.root, dry_run)
        verdicts = self.verdicts()
        for verdict in verdicts:
            if not verdict.reap:
                report.left_alone.append(f"left alone: run {verdict.run.id} ({verdict.liveness.reason})")
            elif dry_run:
                found = leftovers(verdict.run, verdict.run.read(KUBE_FILE))
                report.reaped.append(f"would reap run {verdict.run.id} ({verdict.liveness.reason}): {found.describe()}")
            else:
                self._reap_one(verdict, report)
        report.orphans = self.orphans({v.run.id for v in verdicts})
        return report

    def _reap_one(self, verdict: Verdict, report: ReapReport) -> None:
        run = verdict.run
        try:
            found = reap_run(run, Deadline.after(self.timeout))
        except SvcTunnelError as exc:
            report.failed.append(f"could not reap run {run.id}: {exc}")
            return
        report.reaped.append(f"reaped run {run.id} ({verdict.liveness.reason}): {found.describe()}")

    def orphans(self, known: set[str]) -> list[str]:
        """Notes on objects named for runs without a state directory here: never touched."""
        found_by_run: dict[str, list[str]] = {}
        for name in netns.listing(names.NETNS_PREFIX):
            if (run_id := names.run_of_netns(name)) and run_id not in known:
                found_by_run.setdefault(run_id, []).append(name)
        for name in device.links_with_prefix(None, names.LINK_PREFIX):
            if (run_id := names.run_of_link(name)) and run_id not in known:
                found_by_run.setdefault(run_id, []).append(name)
        return [
            f"not touched: {', '.join(found)} (run {run_id} has no state directory under {self.root};"
            " another state root's, see SVCTUNNEL_STATE_DIR)"
            for run_id, found in sorted(found_by_run.items())
        ]


def reap_run(run: Run, deadline: Deadline) -> Leftovers:
    """Remove everything of one run and then its state directory; returns what there was.
    SIGINT, SIGTERM and SIGALRM wait until it is done. The state directory stays if removal failed."""
    with shield():
        record = run.read(KUBE_FILE)
        found = leftovers(run, record)
        remove_run_objects(run, deadline)
        for name in run.records(INJECTED_PREFIX):
            from .backends.kubernetes.inject import remove_recorded  # the client loads only for such runs

            injected = run.read(name)
            if injected is not None:
                remove_recorded(run.id, injected, deadline)
            run.forget(name)
        if record is not None:
            from .backends.kubernetes.cleanup import delete_recorded

            delete_recorded(record, deadline)
        run.remove()
    return found


def leftovers(run: Run, record: dict[str, Any] | None) -> Leftovers:
    """What the run left on this host, and the Kubernetes objects of its ``record`` (kube.json)."""
    found = Leftovers.of(run)
    parts = []
    if record is not None:
        try:
            parts.append(Placement.from_record(record)[0].describe())
        except KubeError as exc:
            parts.append(str(exc))
    for name in run.records(INJECTED_PREFIX):
        from .backends.kubernetes.inject import describe_recorded

        parts.append(describe_recorded(run.read(name) or {}))
    return dataclasses.replace(found, cluster="; ".join(parts)) if parts else found


def reap_for_session(timeout: float) -> list[str]:
    """What --svctunnel-reap does at session start: reap gone runs under the state root; returns
    one line per reaped run and per failure (a missing privilege or a state root this user cannot use
    is one line, not an error)."""
    try:
        require_net_admin("--svctunnel-reap")
        report = Reaper(timeout=timeout).run()
    except (PrivilegeError, StateError) as exc:
        return [f"reaping skipped: {exc}"]
    return report.reaped + report.failed
