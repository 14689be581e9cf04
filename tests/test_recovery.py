"""The tunnel heals itself: faults on the path, and no step by the test beyond causing them.

Each test asserts that IPv4 and IPv6 pings pass again within three keepalive intervals
of the fault ending (the keepalive is 1 s here, misses the default 3).
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import device, faults, netns
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.probe import ping_once
from pytest_svctunnel.waiting import Deadline

from .helpers import Connect, connect_argv

pytestmark = pytest.mark.root

KEEPALIVE = 1.0
LOCAL4, REMOTE4 = "10.77.0.2/30", "10.77.0.1/30"  # not the defaults: other runs may hold those
LOCAL6, REMOTE6 = "fd00:77::2/126", "fd00:77::1/126"


@pytest.fixture
def agent(lab: Lab, key_file: Path) -> Lab:
    lab.start_agent(key_file)
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


def assert_recovers(dev: str, fault_ended: float) -> float:
    """Wait for IPv4 and IPv6 pings; fail if they are not back within three keepalive intervals."""
    deadline = Deadline(3 * KEEPALIVE, fault_ended + 3 * KEEPALIVE)
    while not deadline.expired():
        try:
            if both_ping(dev):
                took = time.monotonic() - fault_ended
                print(f"recovered {took:.2f} s after the fault ended")
                return took
        except OSError:
            time.sleep(0.05)  # the external end is rebuilding its device
    raise AssertionError(f"no IPv4 and IPv6 pings over {dev} within {3 * KEEPALIVE:g} s of the fault ending")


def test_node_conntrack_flushed_while_the_pod_sends(tunnel: Connect, agent: Lab, dev: str) -> None:
    """The original's catch, mid-session: after the flush the pod speaks first and is masqueraded."""
    pod = agent.plan.ns("pod")
    talker = subprocess.Popen(
        ["ip", "netns", "exec", pod, "ping", "-i", "0.05", "-q", ipaddress.ip_interface(LOCAL4).ip.compressed],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        faults.flush_node_conntrack_pod_first(agent)  # returns once the pod's masqueraded flow exists
        ended = time.monotonic()
        assert_recovers(dev, ended)
    finally:
        talker.terminate()
        talker.wait(10)
    tunnel.stop()
    log = tunnel.stderr()
    assert "dead: " in log and "rehandshake: " in log and "carries traffic again" in log


def test_pod_restarted(tunnel: Connect, agent: Lab, key_file: Path, dev: str) -> None:
    faults.restart_pod(agent, key_file)
    assert_recovers(dev, time.monotonic())
    assert "up: tunnel up" in agent.log_text()


def test_home_nat_rebinds(tunnel: Connect, agent: Lab, dev: str) -> None:
    faults.rebind_home_nat(agent, (40000, 49999))
    ended = time.monotonic()
    assert_recovers(dev, ended)
    assert "peer moved to" in agent.log_text()
    peer_port = int(agent.log_text().split("peer moved to ")[-1].split(",")[0].rsplit(":", 1)[1])
    assert 40000 <= peer_port <= 49999


def test_agent_stopped_for_a_minute(tunnel: Connect, agent: Lab, key_file: Path, dev: str) -> None:
    agent.stop_agent()
    time.sleep(60)
    assert not both_ping(dev)
    agent.start_agent(key_file)
    assert_recovers(dev, time.monotonic())


def test_external_end_restarted(tunnel: Connect, agent: Lab, key_file: Path, dev: str, connect: type[Connect]) -> None:
    tunnel.proc.kill()  # no cleanup: the old device stays behind with its old port
    tunnel.proc.wait(10)
    started = time.monotonic()
    fresh = connect(connect_args(agent, key_file, dev))
    fresh.ready_line()
    assert_recovers(dev, started)


def test_pod_withdraws_when_the_peer_falls_silent(tunnel: Connect, agent: Lab, dev: str) -> None:
    """Nothing from the peer for keepalive x misses: the pod stops sending into the flow."""
    pod = agent.plan.ns("pod")
    assert "00:00:00:00:00:00" in netns.run(pod, ["bridge", "fdb", "show", "dev", dev])
    tunnel.proc.kill()  # the external end vanishes without a word
    tunnel.proc.wait(10)
    device.delete_vxlan(None, dev)  # what it left here; the pod end is what this test watches
    time.sleep(3 * KEEPALIVE + 1)
    assert "00:00:00:00:00:00" not in netns.run(pod, ["bridge", "fdb", "show", "dev", dev])
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


def test_both_ends_report_state_and_counters_on_sigusr1(tunnel: Connect, agent: Lab) -> None:
    import os
    import signal

    pid = agent.agent.pid
    assert pid is not None
    time.sleep(1.5 * KEEPALIVE)  # at least one keepalive has gone out and come back
    os.kill(pid, signal.SIGUSR1)
    tunnel.proc.send_signal(signal.SIGUSR1)
    deadline = Deadline.after(5)
    while "status: state=up" not in agent.log_text() and not deadline.expired():
        time.sleep(0.05)
    agent_status = agent.log_text().split("status: ")[-1]
    assert agent_status.startswith("state=up peer=") and "handshakes=1" in agent_status and "hellos=" in agent_status
    time.sleep(0.3)
    tunnel.stop()
    end_status = tunnel.stderr().split("status: ")[-1].splitlines()[0]
    assert end_status.startswith("state=up local=") and "handshakes=1" in end_status and "keepalives=" in end_status
