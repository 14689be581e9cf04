"""The names a run owns: one home for them, used by the lab, the backends, the reaper and the tests.

Every network namespace a run creates is ``svt-<id>-<role>``, every link it creates in a
shared namespace starts with ``svt<id>-``, and every Kubernetes object carries the label
``svctunnel.dev/run=<id>``. Teardown and the reaper select by these, never by a broader name.
"""

from __future__ import annotations

import re
import secrets

from .netcodec import MAX_NETWORKS

RUN_ID = re.compile(r"[0-9a-f]{6}")
NETNS_PREFIX = "svt-"  # every run's namespaces
LINK_PREFIX = "svt"  # every run's links in a shared namespace
RUN_LABEL = "svctunnel.dev/run"
MAX_DEVICES = MAX_NETWORKS  # devices of the plugin's own pod end: the default network and the marked ones
_NETNS_OF_RUN = re.compile(rf"{NETNS_PREFIX}(?P<run>[0-9a-f]{{6}})-")
_LINK_OF_RUN = re.compile(rf"{LINK_PREFIX}(?P<run>[0-9a-f]{{6}})-")


def new_run_id() -> str:
    """A fresh random run id: six hex digits."""
    return secrets.token_hex(3)


def netns_prefix(run_id: str) -> str:
    """What every network namespace of the run starts with."""
    return f"{NETNS_PREFIX}{run_id}-"


def netns_name(run_id: str, role: str) -> str:
    """The run's network namespace for one role (a lab's ``home``, ``pod``, a test cluster's node)."""
    return netns_prefix(run_id) + role


def link_prefix(run_id: str) -> str:
    """What every link the run creates in a shared namespace (this host's, a node's) starts with."""
    return f"{LINK_PREFIX}{run_id}-"


def link_name(run_id: str, suffix: str) -> str:
    return link_prefix(run_id) + suffix


def device_names(run_id: str, count: int = MAX_DEVICES) -> list[str]:
    """The tunnel devices of a run on this host: ``svt<id>-0`` (the default network), ``-1``, ..."""
    return [link_name(run_id, str(i)) for i in range(count)]


def object_name(run_id: str) -> str:
    """The name of the run's Kubernetes objects, and of the namespace it creates."""
    return f"svctunnel-{run_id}"


def label_selector(run_id: str) -> str:
    """The label selector that finds every Kubernetes object of the run."""
    return f"{RUN_LABEL}={run_id}"


def run_of_netns(name: str) -> str | None:
    """The run id a namespace name carries, or None if it is not a run's."""
    match = _NETNS_OF_RUN.match(name)
    return match["run"] if match else None


def run_of_link(name: str) -> str | None:
    """The run id a link name carries, or None if it is not a run's."""
    match = _LINK_OF_RUN.match(name)
    return match["run"] if match else None
