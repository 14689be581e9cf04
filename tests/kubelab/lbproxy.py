"""The proxy mode's data path: one userspace UDP proxy per Service, each in a network namespace of its own.

cloud-provider-kind runs an Envoy container per LoadBalancer Service on KinD's network; the container's address
is the Service's load-balancer address. Here a Service's proxy namespace holds its load-balancer address on a
veth to the WAN router, which routes that address to it, and runs ``udpproxy`` there (see that module for what
the proxy does). The namespace's name carries the run id, so the cluster's teardown and leak check cover it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_svctunnel import device, names, netns
from pytest_svctunnel.errors import LabError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent.parent
ROUTER_SIDE = "169.254.255.1"  # the WAN router's end of every proxy veth (the proxies' default gateway)
LINK_SCOPE = 253  # RT_SCOPE_LINK: the address is on the link itself
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ProxyConfig:
    """What one Service's proxy forwards: its ports to node ports on the nodes, checked on ``health_port``
    (0: every node is healthy), sessions dropped after ``idle_s`` without a datagram."""

    ports: tuple[tuple[int, int], ...]  # (Service port, node port), UDP
    nodes: tuple[str, ...]
    health_port: int
    idle_s: float
    check_s: float


class ServiceProxy:
    """The proxy of one Service at ``address``: ``run`` builds its namespace and runs the proxy, ``restart``
    runs the proxy anew (its sessions are lost, as when a container restarts), ``stop`` removes both."""

    def __init__(self, run_id: str, index: int, router_netns: str, address: ipaddress.IPv4Address, work_dir: Path):
        self.netns = names.netns_name(run_id, f"lb{index}")
        self.router_netns = router_netns
        self.router_link = f"lb{index}"
        self.address = address
        self.work_dir = work_dir
        self.log_file = work_dir / f"{self.netns}.log"
        self.ready_file = work_dir / f"{self.netns}.ready"
        self.config: ProxyConfig | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # the controller's watch thread and a test may both act on it

    def run(self, config: ProxyConfig) -> None:
        """Run the proxy with ``config`` (building its namespace the first time), anew if it runs."""
        self._run_if(config, always=True)

    def ensure(self, config: ProxyConfig) -> None:
        """Run the proxy with ``config`` unless it runs with it already. The check and the start are one step
        under the lock, so a ``restart`` in progress is waited for, not taken for a dead proxy and run twice."""
        self._run_if(config, always=False)

    def _run_if(self, config: ProxyConfig, always: bool) -> None:
        try:
            with self._lock:
                if not always and self.config == config and self._alive():
                    return
                if not netns.exists(self.netns):
                    self._network()
                self._terminate()
                self.config = config
                self._run()
        except BaseException:
            self.stop()
            raise

    def _network(self) -> None:
        netns.create(self.netns)
        with device.netlink(self.router_netns) as ipr:
            ipr.link("add", ifname=self.router_link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.netns})
            index = ipr.link_lookup(ifname=self.router_link)[0]
            ipr.addr("add", index=index, address=ROUTER_SIDE, prefixlen=32)
            ipr.link("set", index=index, state="up")
            ipr.route("replace", dst=f"{self.address}/32", oif=index, scope=LINK_SCOPE)
        with device.netlink(self.netns) as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=str(self.address), prefixlen=32)
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.route("add", dst=f"{ROUTER_SIDE}/32", oif=index, scope=LINK_SCOPE)  # so it can be a gateway
            ipr.route("add", dst="0.0.0.0/0", gateway=ROUTER_SIDE, oif=index)

    def _run(self) -> None:
        assert self.config is not None
        c = self.config
        settings = {
            "listen": str(self.address),
            "ports": [list(p) for p in c.ports],
            "nodes": list(c.nodes),
            "health_port": c.health_port,
            "idle_s": c.idle_s,
            "check_s": c.check_s,
            "ready_file": str(self.ready_file),
        }
        self.ready_file.unlink(missing_ok=True)
        command = [
            "ip",
            "netns",
            "exec",
            self.netns,
            sys.executable,
            "-m",
            "tests.kubelab.udpproxy",
            json.dumps(settings),
        ]
        with self.log_file.open("ab") as out:
            self._process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready_file.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the proxy for {self.address} did not start: see {self.log_file}")
            time.sleep(0.02)
        log.info("proxy for %s listening in %s (%s)", self.address, self.netns, c)

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def restart(self) -> None:
        """Stop the proxy and run it again, as ``docker restart`` does to cloud-provider-kind's container."""
        assert self.config is not None, "restart() of a proxy that never ran"
        self.run(self.config)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the proxy and remove its namespace (the WAN router's end of its veth and route go with it)."""
        with self._lock:
            self._terminate()
            if netns.exists(self.netns):
                netns.remove(self.netns)
            self.ready_file.unlink(missing_ok=True)
