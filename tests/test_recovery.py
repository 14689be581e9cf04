"""The tunnel heals itself: faults on the path, and no step by the test beyond causing them.

Each test asserts that IPv4 and IPv6 pings pass again within three keepalive intervals
of the fault ending (the keepalive is 1 s here, misses the default 3).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import linkbatch, netns
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.probe import ping_once
from pytest_svctunnel.waiting import Deadline

from . import faults
from .helpers import Connect, connect_argv, wait_until

pytestmark = pytest.mark.root

KEEPALIVE = 1.0
LOCAL4, REMOTE4 = "10.77.0.2/30", "10.77.0.1/30"  # not the defaults: other runs may hold those
LOCAL6, REMOTE6 = "fd00:77::2/126", "fd00:77::1/126"


@pytest.fixture
def agent(lab: Lab, key: bytes) -> Lab:
    lab.start_agent(key)
    return lab


def connect_args(lab: Lab, key_file: Path, dev: str) -> list[str]:
    return [
        *connect_argv(lab.plan.service(4), key_file, dev, LOCAL4, REMOTE4, LOCAL6, REMOTE6),
        "--keepalive",
        str(KEEPALIVE),
        "--timeout",
        "30",
    ]


@pytest.fixture
def tunnel(agent: Lab, key_file: Path, dev: str, connect: type[Connect]) -> Iterator[Connect]:
    c = connect(connect_args(agent, key_file, dev))
    c.ready_line()
    yield c


def both_ping(dev: str) -> bool:
    return all(ping_once(dev, ipaddress.ip_interface(remote).ip, 0.2) for remote in (REMOTE4, REMOTE6))


def first_pings_after(dev: str, fault_ended: float, seconds: float) -> float | None:
    """Seconds from the fault's end to IPv4 and IPv6 pings over ``dev`` again, or None within ``seconds``."""
    deadline = Deadline(seconds, fault_ended + seconds)
    while not deadline.expired():
        try:
            if both_ping(dev):
                return time.monotonic() - fault_ended
        except OSError:
            time.sleep(0.05)  # the external end is rebuilding its device
    return None


def assert_recovers(dev: str, fault_ended: float, external: Connect, lab: Lab) -> float:
    """Wait for IPv4 and IPv6 pings; fail if they are not back within three keepalive intervals,
    saying when they did come back (if within ten more) and what both ends logged."""
    took = first_pings_after(dev, fault_ended, 3 * KEEPALIVE)
    if took is not None:
        print(f"recovered {took:.2f} s after the fault ended")
        return took
    late = first_pings_after(dev, fault_ended, 3 * KEEPALIVE + 10)
    raise AssertionError(
        f"no IPv4 and IPv6 pings over {dev} within {3 * KEEPALIVE:g} s of the fault ending"
        f" ({'not within 10 s more' if late is None else f'they came back after {late:.2f} s'});"
        f"\nexternal end:\n{external.stderr()}\nagent:\n{lab.log_tail(30)}"
    )


def test_node_conntrack_flushed_while_the_pod_sends(tunnel: Connect, agent: Lab, dev: str) -> None:
    """The original's catch, mid-session: after the flush the pod speaks first and is masqueraded."""
    pod = agent.plan.ns("pod")
    talker = subprocess.Popen(
        ["ip", "netns", "exec", pod, "ping", "-i", "0.05", "-q", ipaddress.ip_interface(LOCAL4).ip.compressed],
        stdout=subprocess.DEVNULL,
    )
    try:
        faults.flush_node_conntrack_pod_first(agent)  # returns once the pod's masqueraded flow exists
        ended = time.monotonic()
        assert_recovers(dev, ended, tunnel, agent)
    finally:
        talker.terminate()
        talker.wait(10)
    tunnel.stop()
    log = tunnel.stderr()
    assert "dead: " in log and "rehandshake: " in log and "carries traffic again" in log


def test_pod_restarted(tunnel: Connect, agent: Lab, key: bytes, dev: str) -> None:
    faults.restart_pod(agent, key)
    assert_recovers(dev, time.monotonic(), tunnel, agent)
    assert "up: tunnel up" in agent.log_text()


def test_home_nat_rebinds(tunnel: Connect, agent: Lab, dev: str) -> None:
    faults.rebind_home_nat(agent, (40000, 49999))
    ended = time.monotonic()
    assert_recovers(dev, ended, tunnel, agent)
    assert "peer moved to" in agent.log_text()
    peer_port = int(agent.log_text().split("peer moved to ")[-1].split(",")[0].rsplit(":", 1)[1])
    assert 40000 <= peer_port <= 49999


# short UDP conntrack timeouts on the path, so that "long enough for every NAT and Service
# mapping of the old flow to expire" takes seconds rather than the kernel's default minutes
SHORT_UDP_TIMEOUTS = {
    "net.netfilter.nf_conntrack_udp_timeout": "2",
    "net.netfilter.nf_conntrack_udp_timeout_stream": "3",
}


def assured_tunnel_flows(lab: Lab, role: str) -> list[str]:
    """Conntrack entries of one lab router for the tunnel port that saw traffic both ways."""
    return [line for line in lab.conntrack(role).splitlines() if f"dport={lab.plan.port}" in line and "ASSURED" in line]


def test_agent_stopped_until_the_path_forgot_the_flow(tunnel: Connect, agent: Lab, key: bytes, dev: str) -> None:
    """The pod end is gone for so long that the external end gives the path up and every router
    on it (the home NAT, the node's Service DNAT) forgets the old flow; when the agent comes back
    the tunnel is rebuilt through new mappings."""
    for role in ("home", "node"):
        netns.sysctl(agent.plan.ns(role), SHORT_UDP_TIMEOUTS)
    wait_until(lambda: assured_tunnel_flows(agent, "node"), "the live tunnel's flow assured on the node", 10)
    agent.stop_agent()
    tunnel.wait_log("rehandshake: ", seconds=3 * KEEPALIVE + 10)
    wait_until(
        lambda: not assured_tunnel_flows(agent, "home") and not assured_tunnel_flows(agent, "node"),
        "the old flow expired on the home router and the node",
    )
    assert not both_ping(dev)
    agent.start_agent(key)
    assert_recovers(dev, time.monotonic(), tunnel, agent)


def test_external_end_restarted(tunnel: Connect, agent: Lab, key_file: Path, dev: str, connect: type[Connect]) -> None:
    tunnel.proc.kill()  # no cleanup: the old device stays behind with its old port
    tunnel.proc.wait(10)
    started = time.monotonic()
    fresh = connect(connect_args(agent, key_file, dev))
    fresh.ready_line()
    assert_recovers(dev, started, fresh, agent)


def fdb_points_somewhere(ns: str, dev: str) -> bool:
    return "00:00:00:00:00:00" in netns.run(ns, ["bridge", "fdb", "show", "dev", dev])


def test_pod_withdraws_when_the_peer_falls_silent(tunnel: Connect, agent: Lab, dev: str) -> None:
    """Nothing from the peer for keepalive x misses: the pod stops sending into the flow."""
    pod = agent.plan.ns("pod")
    assert fdb_points_somewhere(pod, dev)
    tunnel.proc.kill()  # the external end vanishes without a word
    tunnel.proc.wait(10)
    linkbatch.remove(None, [dev])  # what it left here; the pod end is what this test watches
    wait_until(
        lambda: not fdb_points_somewhere(pod, dev), "the pod withdrawing its forwarding entry", 3 * KEEPALIVE + 10
    )
    assert "dead: nothing from" in agent.log_text()
    before = int(netns.run(pod, ["cat", f"/sys/class/net/{dev}/statistics/tx_packets"]))
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            pod,
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            ipaddress.ip_interface(LOCAL4).ip.compressed,
        ],
        capture_output=True,
    )
    after = int(netns.run(pod, ["cat", f"/sys/class/net/{dev}/statistics/tx_packets"]))
    assert after == before, "the pod must send nothing on the tunnel while the peer is withdrawn"


def status_lines(log: str) -> list[str]:
    return [line.split("status: ", 1)[1] for line in log.splitlines() if "status: " in line]


def test_both_ends_report_state_and_counters_on_sigusr1(tunnel: Connect, agent: Lab) -> None:
    pid = agent.agent.pid
    assert pid is not None

    def external_status_after_a_keepalive() -> bool:
        """Ask for the external end's status until it has sent a keepalive."""
        asked = len(status_lines(tunnel.stderr()))
        tunnel.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: len(status_lines(tunnel.stderr())) > asked, "the external end's status line", 5)
        return "keepalives=" in status_lines(tunnel.stderr())[-1]

    wait_until(external_status_after_a_keepalive, "a keepalive counted", 3 * KEEPALIVE + 5, interval=KEEPALIVE / 4)
    end_status = status_lines(tunnel.stderr())[-1]
    assert end_status.startswith("state=up local=") and "handshakes=1" in end_status
    os.kill(pid, signal.SIGUSR1)
    wait_until(lambda: status_lines(agent.log_text()), "the agent's status line", 5)
    agent_status = status_lines(agent.log_text())[-1]
    assert agent_status.startswith("state=up peer=") and "handshakes=1" in agent_status and "hellos=" in agent_status
