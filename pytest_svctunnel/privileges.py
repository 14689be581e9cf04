"""Capability checks, so a missing privilege fails before anything is touched."""

from __future__ import annotations

from pathlib import Path

from .errors import PrivilegeError

CAP_NET_ADMIN = 12


def effective_caps(status: str | None = None) -> int:
    text = status if status is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def require(cap: int, name: str, what: str, remedy: str) -> None:
    if not effective_caps() & (1 << cap):
        raise PrivilegeError(f"{what} needs {name}, which this process lacks; {remedy}")


LOCAL_REMEDY = (
    "run as root (e.g. 'sudo -E pytest ...') or grant the capability"
    " (e.g. 'sudo setcap cap_net_admin,cap_net_raw+ep' on the Python interpreter)"
)
AGENT_REMEDY = (
    "in a pod, the container needs securityContext.capabilities.add [NET_ADMIN, NET_RAW] (as in"
    " manifests/svctunnel.yaml; a policy that strips them must allow them for the agent); elsewhere run it as root"
)


def require_net_admin(what: str, remedy: str = LOCAL_REMEDY) -> None:
    require(CAP_NET_ADMIN, "CAP_NET_ADMIN", what, remedy)
