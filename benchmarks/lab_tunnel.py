"""Setup time and throughput on the built-in lab (run as root).

    python benchmarks/lab_tunnel.py [seconds]

Prints: the time from session start to the first successful ping over the tunnel,
split into phases; iperf3 TCP throughput over the tunnel and over the same path
without it (home NAT, WAN router, the node's DNAT, into the pod); and the
agent's CPU time during the tunnel run (per-packet work in user space would show
there).
"""

from __future__ import annotations

import os
import sys

from iperf import PORT, tcp_gbits

from pytest_svctunnel import nft
from pytest_svctunnel.backends.lab import LabBackend
from pytest_svctunnel.config import resolve
from pytest_svctunnel.names import new_run_id
from pytest_svctunnel.networks import session_plan
from pytest_svctunnel.session import TunnelSession


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    config = resolve({"backend": "lab"}, {}, {})
    run_id = new_run_id()
    session = TunnelSession(config, session_plan(config, run_id), run_id)
    tunnel = session.start()
    try:
        print(f"session start to first ping: {session.stopwatch.render()}")
        assert isinstance(session.backend, LabBackend)
        lab = session.backend.lab
        plan = lab.plan
        pod_ns = plan.ns("pod")
        agent_pid = lab.agent.pid
        assert agent_pid is not None
        cpu_before = cpu_seconds(agent_pid)
        enter = ["ip", "netns", "exec", pod_ns]
        over = tcp_gbits(enter, str(tunnel.default.remote_ipv4.ip), str(tunnel.default.remote_ipv4.ip), seconds)
        agent_cpu = cpu_seconds(agent_pid) - cpu_before
        service = plan.service(4).address
        nft.apply(
            f"add rule inet svtlab prerouting ip daddr {service} tcp dport {PORT}"
            f" dnat ip to {plan.pod_address(4)}:{PORT}\n",
            plan.ns("node"),
        )
        direct = tcp_gbits(enter, str(plan.pod_address(4)), str(service), seconds)
        print(
            f"iperf3 TCP, {seconds} s each: over the tunnel {over:.2f} Gbit/s, "
            f"same path without the tunnel {direct:.2f} Gbit/s ({over / direct:.0%})"
        )
        print(f"agent CPU time during the tunnel run: {agent_cpu * 1000:.0f} ms over {seconds} s")
    finally:
        session.stop(failed=False)


if __name__ == "__main__":
    main()
