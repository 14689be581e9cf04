"""The test cluster's proxy-mode load balancer (``tests/kubelab/lbproxy.py``), on its own in real namespaces:
the controller's periodic check must never take a restart in progress for a dead proxy."""

from __future__ import annotations

import dataclasses
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import names, netns
from pytest_svctunnel.runs import Run

from .kubelab.lbproxy import ProxyConfig, ServiceProxy

CONFIG = ProxyConfig(ports=((5533, 30533),), nodes=("192.0.2.1",), health_port=0, idle_s=60.0, check_s=2.0)


@pytest.fixture
def proxy(run: Run, tmp_path: Path) -> Iterator[ServiceProxy]:
    router = names.netns_name(run.id, "wan")
    netns.create(router)
    made = ServiceProxy(run.id, 0, router, ipaddress.IPv4Address("198.51.100.7"), tmp_path)
    try:
        yield made
    finally:
        made.stop()
        netns.remove(router)


def starts(proxy: ServiceProxy) -> int:
    return proxy.log().count("listening on")


@pytest.mark.root
def test_ensure_runs_a_proxy_once_and_again_only_for_a_new_config(proxy: ServiceProxy) -> None:
    proxy.ensure(CONFIG)
    proxy.ensure(CONFIG)
    assert starts(proxy) == 1, proxy.log()
    proxy.ensure(dataclasses.replace(CONFIG, idle_s=2.0))
    assert starts(proxy) == 2, proxy.log()
    assert proxy.config is not None and proxy.config.idle_s == 2.0


@pytest.mark.root
def test_ensure_during_a_restart_waits_for_it_instead_of_running_a_third_proxy(proxy: ServiceProxy) -> None:
    """What the controller's resync (every 5 s) does while a test restarts the proxy: the restart's gap, between
    stopping the old process and the new one listening, must not read as a dead proxy."""
    proxy.run(CONFIG)
    restarting = threading.Thread(target=proxy.restart)
    restarting.start()
    checks = 0
    while restarting.is_alive():
        proxy.ensure(CONFIG)
        checks += 1
    restarting.join()
    assert checks > 0
    assert starts(proxy) == 2, proxy.log()  # started, restarted: none more


@pytest.mark.root
def test_stop_removes_the_proxy_and_its_namespace(proxy: ServiceProxy) -> None:
    proxy.run(CONFIG)
    proxy.stop()
    assert not netns.exists(proxy.netns)
    proxy.ensure(CONFIG)  # a stopped proxy runs again when asked
    assert netns.exists(proxy.netns) and starts(proxy) == 2
