"""What a stranger's flood of handshake datagrams costs the agent, on the built-in lab (run as root).

    python benchmarks/hello_flood.py [seconds]

A stranger on the internet side sends datagrams that start with the protocol's magic to the
Service port for ``seconds`` (default 5): 115 000 a second (the flood that pinned an agent
without the limit at 99 % of a core), then as fast as one process can. Printed for the agent of
its own pod and for an agent in an application's namespace (as injected): the flood's rate, the
agent's CPU over the flood (per core, user and system) next to its idle CPU, how many datagrams
the kernel's per-source limit dropped and how many reached the agent, and the time of a
legitimate handshake during the flood next to one without it.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' stranger host

from pytest_svctunnel import device, keys, netns
from pytest_svctunnel.connector import ConnectSettings, _handshake
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.names import new_run_id
from pytest_svctunnel.protocol import Hello, PodNetwork
from pytest_svctunnel.runs import Run
from tests import faults


def handshake_s(lab: Lab, key: bytes, dev: str) -> float:
    service = lab.plan.service(4)
    hello = Hello(1450, (PodNetwork(333, dev, ipaddress.IPv4Interface("10.30.30.1/30"), None),), 1000, 3)
    started = time.monotonic()
    _handshake(ConnectSettings(service, key, (), timeout=10.0), device.route_to(None, service.address), hello)
    return time.monotonic() - started


def cpu_split(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def agent_cpu(pid: int, seconds: float) -> tuple[float, float]:
    """(user, system) CPU per core of ``pid`` over the next ``seconds``."""
    before, started = cpu_split(pid), time.monotonic()
    time.sleep(seconds)
    after, elapsed = cpu_split(pid), time.monotonic() - started
    return (after[0] - before[0]) / elapsed, (after[1] - before[1]) / elapsed


def measure(shared: bool, seconds: float, rate: float) -> str:
    run = Run.create(new_run_id())
    lab = Lab(run)
    stranger = None
    try:
        lab.up()
        key = keys.new_key()
        agent = lab.start_agent(key, shared_netns=shared)
        assert agent.pid is not None
        stranger = faults.add_internet_host(lab, 1)
        quiet = handshake_s(lab, key, "bench0")
        time.sleep(3.5)  # its peer (no devices on this side) counts as gone: the state the flood meets
        idle = sum(agent_cpu(agent.pid, 3.0))
        service = lab.plan.service(4)
        argv = faults.hello_flood_argv(str(service.address), service.port, seconds + 3.0, rate)
        flood = subprocess.Popen(["ip", "netns", "exec", stranger, *argv], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        user, system = agent_cpu(agent.pid, seconds)
        during = handshake_s(lab, key, "bench1")
        sent = int(flood.communicate(timeout=seconds + 30)[0])
        dropped, passed = faults.limiter_counts(lab.plan.ns("pod"), lab.plan.port)
        where = "agent in an application's namespace (injected)" if shared else "agent in its own pod"
        return (
            f"{where}: flood of {sent / (seconds + 3):,.0f} datagrams/s with the magic from one stranger;"
            f" agent CPU {user + system:.1%} of a core (user {user:.1%}, system {system:.1%}; idle {idle:.1%});"
            f" the kernel's per-source limit dropped {dropped:,}, {passed:,}"
            f" reached the agent; a legitimate handshake took {during * 1000:.0f} ms during the flood"
            f" ({quiet * 1000:.0f} ms without)"
        )
    finally:
        if stranger is not None:
            netns.remove(stranger)
        lab.down()
        run.remove()


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    for rate in (115_000.0, 0.0):
        for shared in (False, True):
            print(measure(shared, seconds, rate), flush=True)


if __name__ == "__main__":
    main()
