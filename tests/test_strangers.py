"""A public load-balancer address lets anyone send to the tunnel port: none of them get in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import keys, netns, nft
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.runs import Run

from . import faults
from .helpers import Connect, connect_argv, svctunnel_cmd

pytestmark = pytest.mark.root

LOCAL4, REMOTE4, LOCAL6, REMOTE6 = "10.78.0.2/30", "10.78.0.1/30", "fd00:78::2/126", "fd00:78::1/126"

CAPTURE = """
import sys
from pytest_svctunnel.transport import HelloTap
with HelloTap(int(sys.argv[1])) as tap:
    print("open", flush=True)
    d = tap.receive(timeout=30.0)
    print(d.payload.hex() if d else "", flush=True)
"""

FLOOD = """
import os, random, socket, sys
rng = random.Random(11)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(int(sys.argv[3])):
        s.sendto(os.urandom(rng.randint(1, 1400)), (sys.argv[1], int(sys.argv[2])))
"""

REPLAY = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(5):
        s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture
def strangers(lab: Lab) -> Iterator[tuple[str, str]]:
    made = [faults.add_internet_host(lab, 1), faults.add_internet_host(lab, 2)]
    yield made[0], made[1]
    for ns in made:
        netns.remove(ns)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def dropped_by_nft(ns: str) -> int:
    """Packets counted by every dropping rule of a namespace's whole nftables ruleset."""
    ruleset = json.loads(netns.run(ns, ["nft", "-j", "list", "ruleset"]))
    total = 0
    for item in ruleset["nftables"]:
        expressions = item.get("rule", {}).get("expr", [])
        if any("drop" in e for e in expressions):
            total += sum(e["counter"]["packets"] for e in expressions if "counter" in e)
    return total


def wait_for_line(lab: Lab, marker: str, seconds: float = 10.0) -> str:
    """The agent's first log line with ``marker`` (waiting for it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found = [line for line in lab.log_text().splitlines() if marker in line]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} line in the agent's log:\n{lab.log_text()}")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_strangers_cannot_disturb_a_running_tunnel(
    lab: Lab, key: bytes, key_file: Path, run: Run, dev: str, connect: type[Connect], strangers: tuple[str, str]
) -> None:
    wrong_key_host, replay_host = strangers
    service = lab.plan.service(4)
    lab.start_agent(key)
    # capture the valid hello on its way, at the home router
    capture = subprocess.Popen(
        ["ip", "netns", "exec", lab.plan.ns("home"), sys.executable, "-c", CAPTURE, str(service.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert capture.stdout is not None and capture.stdout.readline().strip() == "open"
    good = connect(connect_argv(service, key_file, dev, LOCAL4, REMOTE4, LOCAL6, REMOTE6))
    good.ready_line()
    hello_hex = capture.communicate(timeout=30)[0].strip()
    assert hello_hex.startswith(b"SVTN".hex())
    peer_before = lab.log_text().split("tunnel up with ")[1].split(",")[0]
    pid = lab.agent.pid
    assert pid is not None
    rss_before = _rss_kib(pid)

    pingers = [
        subprocess.Popen(
            ["ping", "-I", dev, "-i", "0.05", "-c", "200", "-W", "1", address.split("/")[0]],
            stdout=subprocess.PIPE,
            text=True,
        )
        for address in (REMOTE4, REMOTE6)
    ]
    wrong = run.dir / "wrong.key"
    keys.write_key_file(wrong, keys.new_key())
    intruder = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            wrong_key_host,
            *svctunnel_cmd(
                "connect",
                "--service",
                str(service),
                "--key-file",
                str(wrong),
                "--dev",
                "svtstranger0",
                "--timeout",
                "3",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    netns.run(replay_host, [sys.executable, "-c", REPLAY, str(service.address), str(service.port), hello_hex])
    started, cpu_before = time.monotonic(), _cpu_s(pid)
    netns.run(replay_host, [sys.executable, "-c", FLOOD, str(service.address), str(service.port), "10000"], timeout=120)
    flood_s, cpu_after = time.monotonic() - started, _cpu_s(pid)
    outputs = [p.communicate(timeout=60)[0] for p in pingers]

    rss_after = _rss_kib(pid)
    print(
        f"flood of 10000 datagrams in {flood_s:.2f} s: agent CPU {1000 * (cpu_after - cpu_before):.0f} ms,"
        f" RSS {rss_before} -> {rss_after} KiB"
    )
    assert intruder.returncode == 1 and "no answer to any hello" in intruder.stderr
    for out in outputs:
        assert " 0% packet loss" in out, out
    assert lab.agent.alive()
    log = lab.log_text()
    assert "peer moved" not in log
    assert log.split("tunnel up with ")[-1].split(",")[0] == peer_before
    fdb = netns.run(lab.plan.ns("pod"), ["bridge", "fdb", "show", "dev", dev])
    assert f"dst {peer_before.rsplit(':', 1)[0]} port {peer_before.rsplit(':', 1)[1]}" in fdb
    # the rejects by reason, from the agent's counters (its log reports at most one reject a second)
    os.kill(pid, signal.SIGUSR1)
    status = wait_for_line(lab, "status: ")
    assert "rejected-bad-mac=" in status and "rejected-replayed=" in status, status
    assert rss_after - rss_before < 2048, "the agent's memory must stay flat under a flood"
    # the flood never reached the VXLAN device: the pod's packet filter dropped it
    assert dropped_by_nft(lab.plan.ns("pod")) >= 10000


@pytest.mark.parametrize("shared", [False, True], ids=["own-pod", "injected"])
def test_a_hello_flood_is_dropped_in_the_kernel_per_source(
    lab: Lab, key: bytes, key_file: Path, dev: str, connect: type[Connect], strangers: tuple[str, str], shared: bool
) -> None:
    """A stranger floods the port with datagrams that start with the magic: beyond a burst, the kernel lets
    HELLO_RATE a second from that address reach the agent's sockets and drops the rest on the way in, so the
    agent (in its own pod, or injected into an application's) stays idle, and the tunnel keeps 0 % loss.
    Removing the agent removes the limit with its port filter. (The CPU and handshake figures under such a
    flood: benchmarks/hello_flood.py.)"""
    flooder, _ = strangers
    service = lab.plan.service(4)
    agent = lab.start_agent(key, shared_netns=shared)
    assert agent.pid is not None
    good = connect(connect_argv(service, key_file, dev, LOCAL4, REMOTE4, LOCAL6, REMOTE6))
    good.ready_line()
    pinger = subprocess.Popen(
        ["ping", "-I", dev, "-i", "0.05", "-c", "40", "-W", "1", REMOTE4.split("/")[0]],
        stdout=subprocess.PIPE,
        text=True,
    )
    started, cpu_before = time.monotonic(), _cpu_s(agent.pid)
    flood = netns.run(flooder, faults.hello_flood_argv(str(service.address), service.port, 2.0), timeout=60)
    elapsed, cpu = time.monotonic() - started, _cpu_s(agent.pid) - cpu_before
    sent = int(flood)
    dropped, passed = faults.limiter_counts(lab.plan.ns("pod"), service.port)
    print(
        f"{sent} datagrams in {elapsed:.2f} s: the kernel dropped {dropped}, {passed} reached the agent;"
        f" agent CPU {1000 * cpu:.0f} ms"
    )
    allowed = nft.HELLO_BURST + nft.HELLO_RATE * (elapsed + 1) + 6  # and the good client's handshake datagrams
    assert dropped > 10 * allowed, "the flood must be a flood, and dropped"
    assert passed <= allowed
    assert " 0% packet loss" in pinger.communicate(timeout=60)[0]
    assert agent.alive() and "peer moved" not in lab.log_text()
    lab.stop_agent()
    pod = lab.plan.ns("pod")
    assert "svctunnel" not in netns.run(pod, ["nft", "list", "ruleset"]), "the agent's tables went with it"
