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


def require_net_admin(what: str) -> None:
    require(
        CAP_NET_ADMIN,
        "CAP_NET_ADMIN",
        what,
        "run as root (e.g. 'sudo -E pytest ...') or grant the capability"
        " (e.g. 'sudo setcap cap_net_admin,cap_net_raw+ep' on the Python interpreter)",
    )
