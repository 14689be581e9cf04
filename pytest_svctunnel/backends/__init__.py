"""Backends: where the pod end runs. One module (or package) per backend behind ``base.Backend``.

``make_backend`` is the one place that turns the plugin's configuration into a backend's
explicit arguments; backends import lazily, so the Kubernetes client loads only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # light to import: config reads the kubernetes backend's defaults from this package
    from ..config import TunnelConfig
    from ..runs import Run
    from .base import Backend


def make_backend(config: TunnelConfig, run: Run) -> Backend:
    """The backend ``config.backend`` names, for ``run``."""
    if config.backend == "lab":
        from .lab import LabBackend

        return LabBackend(run, config.port, config.peer)
    from .kubernetes.backend import KubernetesBackend
    from .kubernetes.options import ClusterTarget, PodEndOptions

    options = PodEndOptions(
        port=config.port,
        peer=config.peer,
        namespace=config.namespace,
        image=config.image,
        service_type=config.service_type,
        node=config.node,
        bridge=config.bridge,
    )
    return KubernetesBackend(run, ClusterTarget(config.kubeconfig, config.context), options)
