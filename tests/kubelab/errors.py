"""The errors of the mini kubelet and the controllers that share its machinery."""

from __future__ import annotations

from pytest_svctunnel.errors import LabError


class KubeletError(LabError):
    """The mini kubelet could not start, run a pod, or stop."""


class ContainerConfigError(KubeletError):
    """A container's environment cannot be resolved yet (a missing Secret or key)."""


class StartError(KubeletError):
    """A container process could not be started."""
