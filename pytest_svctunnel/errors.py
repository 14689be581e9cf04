"""One base exception, one small subclass per phase.

Every message says what failed, what was checked, and which option or
environment variable fixes it.
"""

from __future__ import annotations


class SvcTunnelError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SvcTunnelError):
    """A setting, marker or CLI argument is invalid; raised before any side effect."""


class PrivilegeError(SvcTunnelError):
    """The process lacks a capability it needs (CAP_NET_ADMIN, CAP_NET_RAW)."""


class StateError(SvcTunnelError):
    """The directory where runs keep their state cannot be used by this user."""


class KernelError(SvcTunnelError):
    """Creating or changing kernel state (links, addresses, nftables) failed."""


class LabError(SvcTunnelError):
    """Building, running or removing the built-in lab failed."""


class HandshakeError(SvcTunnelError):
    """The authenticated handshake with the pod end did not complete."""


class WaitTimeout(SvcTunnelError):
    """A wait ran past its deadline; the message names the phase and the last state."""

    def __init__(self, phase: str, seconds: float, last_state: str, hint: str = "") -> None:
        self.phase = phase
        self.seconds = seconds
        self.last_state = last_state
        self.hint = hint
        text = f"{phase}: not done after {seconds:g} s; last state: {last_state}"
        if hint:
            text += f"; {hint}"
        super().__init__(text)


class KubeError(SvcTunnelError):
    """A Kubernetes API call failed (``status`` is its HTTP status), or the cluster cannot run
    the pod end as asked."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
