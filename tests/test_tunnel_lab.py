"""Both tunnel ends on real kernel networking: the lab, the agent, ``svctunnel connect``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import keys, names, netns
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.runs import Run, state_root

from .helpers import Connect, ping, svctunnel_cmd, wait_until

pytestmark = pytest.mark.root


def _ready_fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split()[1:])


@pytest.fixture
def agent(lab: Lab, key: bytes) -> Lab:
    lab.start_agent(key)
    return lab


def test_default_network_carries_ipv4_and_ipv6(agent: Lab, key_file: Path, connect: type[Connect], dev: str) -> None:
    c = connect(["--service", str(agent.plan.service(4)), "--key-file", str(key_file), "--dev", dev, "--timeout", "20"])
    fields = _ready_fields(c.ready_line())
    assert fields["dev"] == dev and fields["vni"] == "333"
    assert fields["local"] == "10.30.30.2/30,fd00:3030::2/126"
    assert fields["remote"] == "10.30.30.1/30,fd00:3030::1/126"
    assert ping("10.30.30.1", dev, count=3).returncode == 0
    assert ping("fd00:3030::1", dev, count=3).returncode == 0
    # and from the pod end towards us, over the same tunnel
    assert ping("10.30.30.2", ns=agent.plan.ns("pod")).returncode == 0
    assert ping("fd00:3030::2", ns=agent.plan.ns("pod")).returncode == 0


def test_port_rewriting_nat_is_learned(agent: Lab, key_file: Path, connect: type[Connect], dev: str) -> None:
    c = connect(["--service", str(agent.plan.service(4)), "--key-file", str(key_file), "--dev", dev])
    fields = _ready_fields(c.ready_line())
    peer_address, peer_port = fields["peer"].rsplit(":", 1)
    assert peer_address == str(agent.plan.public_address(4))
    assert peer_port != fields["port"], "the home NAT should have rewritten the source port"
    assert 20000 <= int(peer_port) <= 29999
    fdb = netns.run(agent.plan.ns("pod"), ["bridge", "fdb", "show", "dev", dev])
    assert f"dst {peer_address}" in fdb and f"port {peer_port}" in fdb
    assert ping("10.30.30.1", dev).returncode == 0


@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-outer", "ipv6-outer"])
def test_dont_fragment_mtu(agent: Lab, key_file: Path, connect: type[Connect], outer: int, dev: str) -> None:
    c = connect(["--service", str(agent.plan.service(outer)), "--key-file", str(key_file), "--dev", dev])
    fields = _ready_fields(c.ready_line())
    mtu = 1500 - (50 if outer == 4 else 70)
    assert fields["mtu"] == str(mtu)
    pod_mtu = netns.run(agent.plan.ns("pod"), ["cat", f"/sys/class/net/{dev}/mtu"]).strip()
    assert pod_mtu == str(mtu)
    for address, header in (("10.30.30.1", 28), ("fd00:3030::1", 48)):
        largest = ping(address, dev, size=mtu - header, dont_fragment=True)
        assert largest.returncode == 0, largest.stdout + largest.stderr
        too_big = ping(address, dev, size=mtu - header + 1, dont_fragment=True)
        assert too_big.returncode != 0
        assert "message too long" in (too_big.stdout + too_big.stderr).lower()


def test_wrong_key_is_never_answered(agent: Lab, run: Run, connect: type[Connect], dev: str) -> None:
    wrong = run.dir / "wrong.key"
    keys.write_key_file(wrong, keys.new_key())
    c = connect(["--service", str(agent.plan.service(4)), "--key-file", str(wrong), "--dev", dev, "--timeout", "3"])
    assert c.proc.wait(30) == 1
    err = c.stderr()
    assert "handshake" in err and "no answer to any hello" in err
    assert "bad-mac" in agent.log_text()
    # the hello crossed the node, but nothing ever came back through it
    table = agent.conntrack("node")
    flows = [line for line in table.splitlines() if f"dport={agent.plan.port}" in line]
    assert flows and all("UNREPLIED" in line for line in flows), table
    assert dev not in netns.run(agent.plan.ns("pod"), ["ip", "-o", "link"])


def _flows_originated_by(table: str, address: object) -> list[str]:
    """conntrack lines whose original direction starts at ``address``."""
    return [line for line in table.splitlines() if "src=" in line and line.split("src=")[1].split()[0] == str(address)]


def agent_answered_status(lab: Lab) -> None:
    """SIGUSR1 and its status line: the agent's loop has come round since the last time."""
    pid = lab.agent.pid
    assert pid is not None
    asked = lab.log_text().count("status: ")
    os.kill(pid, signal.SIGUSR1)
    wait_until(lambda: lab.log_text().count("status: ") > asked, "the agent's status line", 10)


def test_pod_end_sends_nothing_before_a_hello(agent: Lab) -> None:
    for _ in range(2):  # the agent has listened and gone through its loop (where a sender would send)
        agent_answered_status(agent)
    pod = agent.plan.pod_address(4)
    assert _flows_originated_by(agent.conntrack("node"), pod) == []
    assert (
        "0 flow entries"
        in subprocess.run(
            ["ip", "netns", "exec", agent.plan.ns("node"), "conntrack", "-L"], capture_output=True, text=True
        ).stderr
    )
    links = netns.run(agent.plan.ns("pod"), ["ip", "-o", "-d", "link", "show", "type", "vxlan"])
    assert links.strip() == ""
    # control: a datagram the pod does send from the tunnel port shows up in the very same check
    send = (
        f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', {agent.plan.port}));"
        f" s.sendto(b'x', ('{agent.plan.public_address(4)}', {agent.plan.port}))"
    )
    netns.run(agent.plan.ns("pod"), [sys.executable, "-c", send])
    assert _flows_originated_by(agent.conntrack("node"), pod)


def test_flow_is_opened_from_outside(agent: Lab, key_file: Path, connect: type[Connect], dev: str) -> None:
    connect(["--service", str(agent.plan.service(4)), "--key-file", str(key_file), "--dev", dev]).ready_line()
    table = agent.conntrack("node")
    flows = [line for line in table.splitlines() if f"dport={agent.plan.port}" in line]
    assert len(flows) == 1, table
    first_src = flows[0].split("src=")[1].split()[0]
    assert first_src == str(agent.plan.public_address(4)), "the original direction must be external -> Service"
    assert "UNREPLIED" not in flows[0], "the pod end answered along the same flow"


def test_peer_pin(lab: Lab, key: bytes, key_file: Path, connect: type[Connect], dev: str) -> None:
    lab.start_agent(key, peer=lab.plan.public_address(4))
    ok = connect(["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev])
    ok.ready_line()
    assert ok.stop() == 0
    lab.stop_agent()
    lab.start_agent(key, peer=lab.plan.external_address(4))  # the un-NATed address: never what the pod sees
    pinned_out = connect(
        ["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev + "b", "--timeout", "3"]
    )
    assert pinned_out.proc.wait(30) == 1
    assert "unexpected-peer" in lab.log_text()


def network_state(ns: str) -> dict[str, str]:
    """A namespace's links, addresses, routes and nftables ruleset, as ``ip`` and ``nft`` print them."""
    commands = {
        "links": ["ip", "-o", "link"],
        "addresses": ["ip", "-o", "addr"],
        "routes": ["ip", "route", "show", "table", "all"],
        "ruleset": ["nft", "list", "ruleset"],
    }
    return {name: netns.run(ns, argv) for name, argv in commands.items()}


def test_connect_and_agent_remove_what_they_built(
    lab: Lab, key: bytes, key_file: Path, connect: type[Connect], dev: str
) -> None:
    pod = lab.plan.ns("pod")
    before = network_state(pod)
    lab.start_agent(key)
    c = connect(["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev])
    c.ready_line()
    assert dev in netns.run(pod, ["ip", "-o", "link"])
    assert network_state(pod)["ruleset"] != before["ruleset"], "the agent filters its port while it runs"
    assert c.stop() == 0
    assert dev not in netns.run(None, ["ip", "-o", "link"])
    lab.stop_agent()
    assert network_state(pod) == before
    assert "stopped" in lab.log_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_connect_stops_promptly_during_the_handshake(
    lab: Lab, key_file: Path, connect: type[Connect], signum: int, dev: str
) -> None:
    """No agent: the handshake would wait its full timeout; a signal ends it at once, cleanly."""
    c = connect(["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev, "--timeout", "60"])
    c.wait_log("handshake: hello from")
    c.proc.send_signal(signum)
    assert c.proc.wait(10) == 130  # long before the handshake's own 60 s
    assert dev not in netns.run(None, ["ip", "-o", "link"])


# the external end's settings, as a user's shell or CI job might have them: none may reach the lab's
# agent, which gets its settings as flags only (it used to inherit these, and died on ens3)
EXTERNAL_END_ENVIRONMENT = {
    "SVCTUNNEL_UNDERLAY_DEV": "ens3",
    "SVCTUNNEL_PEER": "192.0.2.99",
    "SVCTUNNEL_PORT": "7000",
    "SVCTUNNEL_BRIDGE": "br-none",
    "SVCTUNNEL_HOST_NETWORK": "true",
}


@pytest.mark.parametrize("environment", [{}, EXTERNAL_END_ENVIRONMENT], ids=["plain", "external-end-settings-set"])
def test_lab_cli_up_status_down(connect: type[Connect], dev: str, environment: dict[str, str]) -> None:
    env = {**os.environ, **environment}
    up = subprocess.run(svctunnel_cmd("lab", "up"), capture_output=True, text=True, timeout=120, env=env)
    assert up.returncode == 0, up.stderr
    run_id = up.stdout.split()[1].rstrip(":")
    try:
        assert all(netns.exists(names.netns_name(run_id, role)) for role in ("home", "wan", "node", "pod"))
        status = subprocess.run(svctunnel_cmd("lab", "status", "--run", run_id), capture_output=True, text=True)
        assert "agent pid -" not in status.stdout and names.netns_name(run_id, "pod") in status.stdout
        settings = (state_root() / run_id / "agent.log").read_text().split("agent started, pid ")[1].splitlines()[0]
        assert "port=5533 peer=None underlay-dev=None" in settings and "host-network=False" in settings, settings
        assert "bridge=None" in settings, settings
        command = next(line for line in up.stdout.splitlines() if line.startswith("connect:")).split()[2:]
        c = connect([*command[1:], "--dev", dev])
        c.ready_line()
        assert ping("10.30.30.1", dev).returncode == 0
        c.stop()
    finally:
        down = subprocess.run(svctunnel_cmd("lab", "down", "--run", run_id), capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not netns.listing(names.netns_prefix(run_id))
    assert not [
        p
        for p in subprocess.run(
            ["pgrep", "-af", "pytest_svctunnel agent"], capture_output=True, text=True
        ).stdout.splitlines()
        if run_id in p
    ]


TAP_SCRIPT = """
import sys
from pytest_svctunnel.transport import HelloTap
with HelloTap(int(sys.argv[1])) as tap:
    print("open", flush=True)
    while (d := tap.receive(timeout=3.0)) is not None:
        print(d.payload[:8].hex(), d.source, d.destination, flush=True)
"""


def test_hello_tap_sees_only_handshake_datagrams(lab: Lab) -> None:
    """A real kernel filter: data on the tunnel port never reaches the agent's socket."""
    tap = subprocess.Popen(
        ["ip", "netns", "exec", lab.plan.ns("pod"), sys.executable, "-c", TAP_SCRIPT, str(lab.plan.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert tap.stdout is not None and tap.stdout.readline().strip() == "open"
    service = lab.plan.service(4)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in (b"\x08\x00\x00\x00" + bytes(60), b"SVTX-not-magic", b"SVTN-looks-like-a-hello"):
            sock.sendto(payload, (str(service.address), service.port))
        sock.sendto(b"SVTN-to-another-port", (str(service.address), service.port + 1))
    out, _ = tap.communicate(timeout=20)
    lines = out.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(b"SVTN-loo".hex())
    assert f"{lab.plan.pod_address(4)}:{lab.plan.port}" in lines[0]


# -- the original project's catch ------------------------------------------------------------


def _original_style_pod(lab: Lab) -> None:
    """The original's pod side: hand-set peer address, fixed port 5533 both ways."""
    netns.run(
        lab.plan.ns("pod"),
        [
            "ip",
            "link",
            "add",
            "vxlan0",
            "type",
            "vxlan",
            "id",
            "333",
            "dev",
            "eth0",
            "remote",
            str(lab.plan.public_address(4)),
            "dstport",
            "5533",
            "srcport",
            "5533",
            "5534",
        ],
    )
    netns.run(lab.plan.ns("pod"), ["ip", "addr", "add", "10.30.30.1/30", "dev", "vxlan0"])
    netns.run(lab.plan.ns("pod"), ["ip", "link", "set", "vxlan0", "up"])


def _original_style_external(lab: Lab, dev: str) -> None:
    netns.run(
        None,
        [
            "ip",
            "link",
            "add",
            dev,
            "type",
            "vxlan",
            "id",
            "333",
            "dev",
            lab.plan.lan_link,
            "remote",
            str(lab.plan.service(4).address),
            "dstport",
            "5533",
            "srcport",
            "5533",
            "5534",
        ],
    )
    netns.run(None, ["ip", "addr", "add", "10.30.30.2/30", "dev", dev])
    netns.run(None, ["ip", "link", "set", dev, "up"])


@pytest.fixture
def port_keeping_lab() -> Iterator[Lab]:
    run = Run.new()
    built = Lab(run, rewrite_ports=False)
    built.up()
    yield built
    built.down()
    run.remove()


def test_original_style_works_when_the_external_side_sends_first(port_keeping_lab: Lab) -> None:
    """Positive control: the lab is faithful, not simply broken for the original."""
    lab = port_keeping_lab
    orig = names.link_name(lab.plan.run_id, "orig")
    _original_style_external(lab, orig)
    ping("10.30.30.1", orig, count=1)  # opens the flow through the Service; nobody answers yet
    _original_style_pod(lab)
    assert ping("10.30.30.1", orig, count=3).returncode == 0


@pytest.mark.parametrize("rewrite_ports", [False, True], ids=["port-keeping-nat", "port-rewriting-nat"])
def test_original_style_fails_when_the_pod_sends_first_but_ours_works(
    rewrite_ports: bool, key: bytes, key_file: Path, connect: type[Connect], dev: str
) -> None:
    run = Run.new()
    lab = Lab(run, rewrite_ports=rewrite_ports)
    lab.up()
    try:
        _original_style_pod(lab)
        ping("10.30.30.2", ns=lab.plan.ns("pod"), count=2)  # the pod speaks first: masqueraded to the node
        node_table = lab.conntrack("node")
        assert f"src={lab.plan.pod_address(4)}" in node_table
        orig = names.link_name(lab.plan.run_id, "orig")
        _original_style_external(lab, orig)
        result = ping("10.30.30.1", orig, count=3)
        assert result.returncode != 0, "the original's tunnel must not carry traffic after the pod spoke first"
        # ours, in the same poisoned lab: the stale conntrack entries stay, and do not matter
        netns.run(None, ["ip", "link", "del", orig])
        netns.run(lab.plan.ns("pod"), ["ip", "link", "del", "vxlan0"])
        lab.start_agent(key)
        c = connect(["--service", str(lab.plan.service(4)), "--key-file", str(key_file), "--dev", dev])
        c.ready_line()
        assert ping("10.30.30.1", dev, count=3).returncode == 0
        assert ping("fd00:3030::1", dev, count=3).returncode == 0
        assert f"src={lab.plan.pod_address(4)}" in lab.conntrack("node"), "the poisoned entry is still there"
        c.stop()
    finally:
        lab.down()
        run.remove()


# -- never touch a link the tunnel did not make ----------------------------------------------


def test_connect_refuses_a_device_name_that_is_not_a_vxlan(agent: Lab, key_file: Path, connect: type[Connect]) -> None:
    lan = agent.plan.lan_link  # a veth of the lab in this namespace
    c = connect(["--service", str(agent.plan.service(4)), "--key-file", str(key_file), "--dev", lan])
    assert c.proc.wait(30) == 2  # a usage error, before anything is built
    assert f"a link named {lan} already exists on this host and is not a tunnel device svctunnel made" in c.stderr()
    assert lan in netns.run(None, ["ip", "-o", "link", "show", lan])
    assert "challenged" not in agent.log_text(), "refused before sending anything"


def _dev_snmp6(dev: str) -> dict[str, int]:
    lines = Path(f"/proc/net/dev_snmp6/{dev}").read_text().split("\n")
    return {k: int(v) for k, v in (line.split() for line in lines if line.strip())}


def test_first_answers_are_never_taken_for_forwarding(agent: Lab, key: bytes, dev: str) -> None:
    """The device's addresses are local before the first packet leaves: else the pod's first
    neighbour advertisement is dropped as an address error and IPv6 waits a second to retry."""
    from pytest_svctunnel.connector import ConnectSettings, ExternalEnd
    from pytest_svctunnel.networks import single_network

    net = single_network(dev, 333, None, None, None, None)
    settings = ConnectSettings(agent.plan.service(4), key, (net,), 20.0)
    for _ in range(8):  # the race, when present, shows in about one session in three
        end = ExternalEnd(settings)
        try:
            end.open()
            counters = _dev_snmp6(dev)
        finally:
            end.close()
        assert counters["Ip6InAddrErrors"] == 0, counters
        assert counters["Icmp6InNeighborAdvertisements"] >= 1
    # each session came from a fresh port: the pod points at the latest one only
    fdb = netns.run(agent.plan.ns("pod"), ["bridge", "fdb", "show", "dev", dev])
    assert len([line for line in fdb.splitlines() if line.startswith("00:00:00:00:00:00")]) == 1, fdb
