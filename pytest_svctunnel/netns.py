"""Named network namespaces: create, remove, run commands and set sysctls inside."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyroute2 import netns as _netns

from .errors import KernelError
from .shield import shield

_RUN_DIR = Path("/run/netns")
_CMD_TIMEOUT_S = 20.0


def exists(name: str) -> bool:
    return (_RUN_DIR / name).exists()


def create(name: str) -> None:
    if exists(name):
        raise KernelError(f"network namespace {name} already exists; remove it with 'ip netns del {name}'")
    try:
        with shield():  # pyroute2 could swallow an interrupt (see device.netlink)
            _netns.create(name)
    except OSError as exc:
        raise KernelError(f"creating network namespace {name}: {exc}") from None


def remove(name: str) -> None:
    """Remove a namespace; one that is already gone is success."""
    try:
        _netns.remove(name)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL):
            raise KernelError(f"removing network namespace {name}: {exc}") from None


def listing(prefix: str) -> list[str]:
    if not _RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in _RUN_DIR.iterdir() if p.name.startswith(prefix))


def run(netns: str | None, argv: Sequence[str], check: bool = True, timeout: float = _CMD_TIMEOUT_S) -> str:
    """Run a command inside ``netns`` (None: here); returns its stdout."""
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{' '.join(full)} did not finish within {timeout:g} s") from None
    except FileNotFoundError as exc:
        raise KernelError(f"{exc.filename} is not installed; see the README's install command") from None
    if check and done.returncode != 0:
        raise KernelError(f"{' '.join(full)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def sysctl(netns: str | None, settings: Mapping[str, str]) -> None:
    run(netns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])
