"""The Kubernetes client, imported and configured in the background while pytest collects.

Importing the official client's configuration and connection pool and loading a kubeconfig take
about 0.3 s of CPU, which a session would otherwise spend at the start of its setup.
``prepare`` starts that in a thread as soon as the plugin knows a tunnel into a cluster is wanted
(at collection: a suite that collects for longer than that pays nothing); ``take`` hands the prepared client to the
first session that asks for the same kubeconfig and context (or connects anew). Errors (a missing
kubeconfig, say) are raised by ``take``, in the session, as they would be without warming.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib import import_module
from typing import TYPE_CHECKING

from ...errors import KubeError
from ...waiting import Deadline

if TYPE_CHECKING:
    from .client import Cluster

_Key = tuple[str | None, str | None]


class _Prepared:
    def __init__(self, key: _Key, preload: Sequence[str]) -> None:
        self.done = threading.Event()
        self.cluster: Cluster | None = None
        self.error: BaseException | None = None
        self.preload = preload
        self.thread = threading.Thread(target=self._connect, args=key, name="svctunnel-kube-warm", daemon=True)

    def _connect(self, kubeconfig: str | None, context: str | None) -> None:
        try:
            for module in self.preload:  # what the session needs first (one thread loads it all)
                import_module(module)
            from .client import connect

            self.cluster = connect(kubeconfig, context)
        except BaseException as exc:  # handed to the session by take()
            self.error = exc
        finally:
            self.done.set()


_lock = threading.Lock()
_prepared: dict[_Key, _Prepared] = {}


def prepare(kubeconfig: str | None, context: str | None, preload: Sequence[str] = ()) -> None:
    """Start importing the client and loading this kubeconfig and context, once; first the
    modules ``preload`` names."""
    with _lock:
        if (kubeconfig, context) in _prepared:
            return
        prepared = _prepared[(kubeconfig, context)] = _Prepared((kubeconfig, context), preload)
    prepared.thread.start()


def take(kubeconfig: str | None, context: str | None, deadline: Deadline) -> Cluster:
    """The client prepared for this kubeconfig and context (each is taken once), else a new one."""
    with _lock:
        prepared = _prepared.pop((kubeconfig, context), None)
    if prepared is None:
        from .client import connect

        return connect(kubeconfig, context)
    if not prepared.done.wait(max(deadline.remaining(), 0.0)):
        raise KubeError(f"loading the Kubernetes client and configuration took longer than {deadline.seconds:g} s")
    if prepared.error is not None:
        raise prepared.error
    assert prepared.cluster is not None
    return prepared.cluster
