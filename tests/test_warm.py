"""The Kubernetes client warmed in the background: the prepared client is handed over once, and an
error while preparing reaches the session as it would without warming. (A real kubeconfig file; no
API server is asked anything.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_svctunnel.backends.kubernetes import warm
from pytest_svctunnel.errors import ConfigError
from pytest_svctunnel.waiting import Deadline

KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://192.0.2.1:6443", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_the_prepared_client_is_taken_once(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    warm.prepare(str(path), None)
    prepared = warm._prepared[(str(path), None)]
    assert prepared.thread.ident is not None, "prepare started no thread"
    first = warm.take(str(path), None, Deadline.after(30))
    assert first is prepared.cluster and first.server == "https://192.0.2.1:6443"
    second = warm.take(str(path), None, Deadline.after(30))
    assert second is not first and second.server == first.server  # connected anew
    first.close()
    second.close()


def test_an_error_while_preparing_reaches_the_session(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-kubeconfig")
    warm.prepare(missing, "nope")
    with pytest.raises(ConfigError, match="cannot load the Kubernetes configuration"):
        warm.take(missing, "nope", Deadline.after(30))
