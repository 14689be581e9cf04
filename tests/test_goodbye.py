"""An agent ends itself: on an authenticated goodbye (it removes its devices and port filter, says
goodbye back, exits), and after a long silence of its peer (``idle_exit``). On the real kernel, in
the lab: the agent runs in the lab's pod namespace, the goodbye crosses the home NAT and the node's
DNAT like a hello."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pytest_svctunnel import netns
from pytest_svctunnel.agentsettings import AgentSettings
from pytest_svctunnel.lab import Lab

from .helpers import Connect, ping, svctunnel_cmd, wait_until

pytestmark = pytest.mark.root


def pod_state(lab: Lab) -> tuple[str, str]:
    """The pod namespace's VXLAN links and nftables tables."""
    pod = lab.plan.ns("pod")
    links = netns.run(pod, ["ip", "-o", "link", "show", "type", "vxlan"], check=False)
    tables = netns.run(pod, ["nft", "list", "tables"], check=False)
    return links.strip(), tables.strip()


def goodbye(lab: Lab, key_file: Path, timeout: str = "5") -> subprocess.CompletedProcess[str]:
    argv = svctunnel_cmd("goodbye", "--service", str(lab.plan.service(4)), "--key-file", str(key_file))
    return subprocess.run([*argv, "--timeout", timeout], capture_output=True, text=True, timeout=30)


def test_goodbye_removes_everything_and_the_agent_exits(
    lab: Lab, key: bytes, key_file: Path, connect: type[Connect], dev: str
) -> None:
    lab.start_agent(key)
    c = connect(["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev])
    c.ready_line()
    assert ping("10.30.30.1", dev).returncode == 0
    links, tables = pod_state(lab)
    assert dev in links and "svctunnel_5533" in tables, (links, tables)
    done = goodbye(lab, key_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed everything and exits" in done.stdout
    wait_until(lambda: not lab.agent.alive(), "the agent's exit", seconds=10)
    assert pod_state(lab) == ("", ""), "the agent left a device or its table"
    log = lab.log_text()
    assert f"removed all networks and the port filter on a goodbye from {lab.plan.public_address(4)}" in log, log
    assert ping("10.30.30.1", dev).returncode != 0


def test_a_goodbye_with_another_key_changes_nothing(
    lab: Lab, key: bytes, key_file: Path, connect: type[Connect], dev: str, tmp_path: Path
) -> None:
    lab.start_agent(key)
    c = connect(["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev])
    c.ready_line()
    stranger = tmp_path / "other.key"
    stranger.write_text(subprocess.run(svctunnel_cmd("keygen"), capture_output=True, text=True).stdout)
    done = goodbye(lab, stranger, timeout="1")
    assert done.returncode == 1 and "no goodbye back from" in done.stderr, done.stdout + done.stderr
    assert lab.agent.alive()
    assert ping("10.30.30.1", dev).returncode == 0
    assert "rejected-bad-mac" in lab.log_text() or "bad-mac" in lab.log_text()


def test_an_agent_left_alone_cleans_up_and_exits(
    lab: Lab, key: bytes, key_file: Path, connect: type[Connect], dev: str
) -> None:
    """With idle_exit the agent outlives a live session (keepalives are words), but not a gone one:
    once the external end is stopped, it removes everything and exits on its own."""
    idle = 2.0
    lab.agent.start(AgentSettings(key=key, port=lab.plan.port, idle_exit=idle))
    c = connect(
        ["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev, "--keepalive", "0.5"]
    )
    c.ready_line()
    time.sleep(3 * idle)
    assert lab.agent.alive(), f"the agent left a live session:\n{lab.log_text()}"
    assert ping("10.30.30.1", dev).returncode == 0
    c.stop()
    stopped = time.monotonic()
    wait_until(lambda: not lab.agent.alive(), "the idle agent's exit", seconds=idle + 10)
    print(f"exited {time.monotonic() - stopped:.2f} s after the external end stopped (idle exit {idle:g} s)")
    assert pod_state(lab) == ("", ""), "the agent left a device or its table"
    assert "without a word from a peer (idle exit 2 s)" in lab.log_text(), lab.log_text()


def test_a_sidecar_removes_its_networks_on_a_goodbye_and_stays(
    lab: Lab, key: bytes, key_file: Path, connect: type[Connect], dev: str
) -> None:
    """A sidecar (stay_after_goodbye) must not exit: the kubelet would restart it. A goodbye removes its
    networks and closes the port to everyone again; it keeps listening, and a new session gets a tunnel;
    idle_exit does the same without a goodbye."""
    lab.agent.start(AgentSettings(key=key, port=lab.plan.port, stay_after_goodbye=True, shared_netns=True, idle_exit=2))
    argv = ["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev]
    first = connect(argv)
    first.ready_line()
    done = goodbye(lab, key_file)
    assert done.returncode == 0, done.stdout + done.stderr
    time.sleep(0.5)
    assert lab.agent.alive()
    links, tables = pod_state(lab)
    assert links == "" and "svctunnel_5533" in tables, (links, tables)
    assert "removed every network on a goodbye from" in lab.log_text()
    first.stop()
    again = connect(argv)
    again.ready_line()
    assert ping("10.30.30.1", dev).returncode == 0
    again.stop()
    idle = "no word from a peer for"
    wait_until(lambda: idle in lab.log_text(), "the idle sidecar's networks removed", seconds=15)
    assert pod_state(lab)[0] == "" and lab.agent.alive(), lab.log_text()
