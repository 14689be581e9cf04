"""Setup time and memory for many networks in one session, on the built-in lab (run as root).

    python benchmarks/networks.py [COUNT ...]        # default: 1 16 64 256

For each count, one session with that many networks (the default one and COUNT-1 marked ones,
with the default addresses, so each has IPv4 and IPv6) is built and removed again. Prints per
count: the time from the agent listening to every network answering a ping on both families
(handshake, which includes the agent building its devices; this end's devices; the first pings),
the hello's size, teardown time, the agent's resident memory, this process's growth, and the
kernel's slab growth; then the growth per network between the smallest and the largest count.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass

from pytest_svctunnel.backends.lab import LabBackend
from pytest_svctunnel.config import resolve
from pytest_svctunnel.names import new_run_id
from pytest_svctunnel.networks import parse_request, session_plan
from pytest_svctunnel.protocol import hello_size
from pytest_svctunnel.session import TunnelSession

AFTER_LISTENING = ("handshake", "devices", "first ping")


@dataclass(frozen=True)
class Figures:
    count: int
    ready_s: float
    phases: str
    hello_bytes: int
    teardown_s: float
    agent_rss_kib: int
    own_growth_kib: int
    slab_growth_kib: int


def rss_kib(pid: int | str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def slab_kib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def measure(count: int) -> Figures:
    config = resolve({"backend": "lab"}, {}, {})
    run_id = new_run_id()
    requests = [parse_request(f"net{i}", None, None, None, "benchmark") for i in range(1, count)]
    session = TunnelSession(config, session_plan(config, run_id, requests), run_id)
    own_before, slab_before = rss_kib("self"), slab_kib()
    session.start()
    try:
        watch = session.stopwatch
        ready = sum(watch.phases.get(phase, 0.0) for phase in AFTER_LISTENING)
        assert isinstance(session.backend, LabBackend)
        agent_pid = session.backend.lab.agent.pid
        assert agent_pid is not None
        agent_rss = rss_kib(agent_pid)
        own_growth, slab_growth = rss_kib("self") - own_before, slab_kib() - slab_before
    finally:
        started = time.monotonic()
        session.stop(failed=False)
        teardown = time.monotonic() - started
    size = hello_size([n.pod_network() for n in session.networks])
    return Figures(count, ready, watch.render(), size, teardown, agent_rss, own_growth, slab_growth)


def main() -> None:
    counts = [int(arg) for arg in sys.argv[1:]] or [1, 16, 64, 256]
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    results = []
    for count in counts:
        figures = measure(count)
        results.append(figures)
        print(
            f"{count:5d} networks: ready {figures.ready_s:.2f} s after the agent listened"
            f" (session {figures.phases}); hello {figures.hello_bytes} B; teardown {figures.teardown_s:.2f} s;"
            f" agent RSS {figures.agent_rss_kib / 1024:.1f} MiB; this process +{figures.own_growth_kib / 1024:.1f} MiB;"
            f" kernel slab +{figures.slab_growth_kib / 1024:.1f} MiB",
            flush=True,
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        extra = last.count - first.count
        ready_ms = (last.ready_s - first.ready_s) / extra * 1000
        print(
            f"per network ({first.count} -> {last.count}): ready +{ready_ms:.1f} ms,"
            f" teardown +{(last.teardown_s - first.teardown_s) / extra * 1000:.1f} ms,"
            f" agent RSS +{(last.agent_rss_kib - first.agent_rss_kib) / extra:.1f} KiB,"
            f" kernel slab +{(last.slab_growth_kib - first.slab_growth_kib) / extra:.1f} KiB"
        )


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: the lab needs network namespaces")
    main()
