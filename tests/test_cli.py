"""The CLI contract: keygen, bad arguments that exit 2 with one line and touch nothing, and the
agent's settings as the one contract (agentsettings) reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import keys, names, netns
from pytest_svctunnel.names import new_run_id
from pytest_svctunnel.runs import Run

from .helpers import svctunnel_cmd, wait_until


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(svctunnel_cmd(*args), capture_output=True, text=True, timeout=60)


def test_keygen_prints_a_usable_key(tmp_path: Path) -> None:
    first, second = run_cli("keygen"), run_cli("keygen")
    assert first.returncode == 0
    text = first.stdout.strip()
    assert len(text) == 64 and int(text, 16) >= 0
    assert text != second.stdout.strip()
    path = tmp_path / "key"
    path.write_text(first.stdout)
    assert keys.read_key_file(path) == bytes.fromhex(text)


@pytest.fixture
def good_key(tmp_path: Path) -> Path:
    path = tmp_path / "good.key"
    keys.write_key_file(path, keys.new_key())
    return path


@pytest.fixture
def short_key(tmp_path: Path) -> Path:
    path = tmp_path / "short.key"
    path.write_text("abcd1234\n")
    return path


RUN = new_run_id()
DEV = names.link_name(RUN, "cli0")  # what the command under test is told to create

CONNECT_BAD = [
    pytest.param(["--ipv4", "10.30.30.300/30"], "10.30.30.300/30", id="ipv4-does-not-parse"),
    pytest.param(["--ipv4", "10.30.30.2"], "with prefix", id="ipv4-without-prefix"),
    pytest.param(["--ipv6", "10.30.30.2/30"], "IPv6", id="ipv6-given-ipv4"),
    pytest.param(["--remote-ipv4", "nonsense"], "nonsense", id="remote-ipv4"),
    pytest.param(["--vni", "0"], "VNI", id="vni-zero"),
    pytest.param(["--vni", "16777216"], "VNI", id="vni-too-big"),
    pytest.param(["--service", "198.18.0.1:0"], "198.18.0.1:0", id="service-port-zero"),
    pytest.param(["--service", "198.18.0.1:65536"], "198.18.0.1:65536", id="service-port-too-big"),
    pytest.param(["--service", "not-an-address"], "not-an-address", id="service-not-address"),
    pytest.param(["--dev", "a-very-long-device-name"], "interface name", id="dev-too-long"),
    pytest.param(["--dev", ".."], "interface name", id="dev-dot-dot"),
    pytest.param(["--dev", "vxlän0"], "printable ASCII", id="dev-not-ascii"),
    pytest.param(["--dev", "vx%d"], "'%'", id="dev-percent"),
    pytest.param(["--underlay-dev", "eth/0"], "interface name", id="underlay-slash"),
    pytest.param(["--timeout", "-1"], "timeout", id="timeout-negative"),
    pytest.param(["--key-file", "/nonexistent/svctunnel.key"], "svctunnel keygen", id="key-missing"),
    pytest.param(["--key-file", "/"], "cannot be read", id="key-unreadable"),
    pytest.param(["--key-file", "SHORT"], "too short", id="key-too-short"),
    pytest.param(["--ipv4", "10.50.0.1/32"], "no address for the other end", id="ipv4-no-room-for-remote"),
]


@pytest.mark.parametrize(("extra", "needle"), CONNECT_BAD)
def test_connect_bad_arguments(extra: list[str], needle: str, good_key: Path, short_key: Path) -> None:
    args = {"--service": "198.18.0.1:5533", "--key-file": str(good_key), "--dev": DEV}
    for flag, value in zip(extra[::2], extra[1::2], strict=False):
        args[flag] = str(short_key) if value == "SHORT" else value
    argv = [item for pair in args.items() for item in pair]
    done = run_cli("connect", *argv)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]
    assert done.stdout == ""
    assert not {args["--dev"], DEV} & set(os.listdir("/sys/class/net"))


AGENT_BAD = [
    pytest.param(["--port", "0"], "port", id="port-zero"),
    pytest.param(["--port", "65536"], "port", id="port-too-big"),
    pytest.param(["--peer", "999.1.1.1"], "999.1.1.1", id="peer-not-address"),
    pytest.param(["--key-file", "/nonexistent/k"], "svctunnel keygen", id="key-missing"),
    pytest.param(["--key-file", "SHORT"], "too short", id="key-too-short"),
    pytest.param([], "--key-file", id="no-key"),
    pytest.param(["--bridge", ".."], "interface name", id="bridge-dot-dot"),
    pytest.param(["--bridge", "brü"], "printable ASCII", id="bridge-not-ascii"),
    pytest.param(["--underlay-dev", "a" * 16], "interface name", id="underlay-too-long"),
    pytest.param(["--max-skew", "0"], "--max-skew", id="max-skew-zero"),
]


@pytest.mark.parametrize(("extra", "needle"), AGENT_BAD)
def test_agent_bad_arguments(extra: list[str], needle: str, short_key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVCTUNNEL_KEY_FILE", raising=False)
    argv = [str(short_key) if a == "SHORT" else a for a in extra]
    done = run_cli("agent", *argv)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("SVCTUNNEL_HOST_NETWORK", "maybe", "SVCTUNNEL_HOST_NETWORK"),
        ("SVCTUNNEL_BRIDGE", "..", "SVCTUNNEL_BRIDGE"),
        ("SVCTUNNEL_PORT", "0", "SVCTUNNEL_PORT"),
    ],
)
def test_agent_names_the_variable_of_a_bad_value(variable: str, value: str, needle: str, good_key: Path) -> None:
    env = {"PATH": os.environ["PATH"], "SVCTUNNEL_KEY_FILE": str(good_key), variable: value}
    done = subprocess.run(svctunnel_cmd("agent"), capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_agent_reads_its_settings_from_the_environment(tmp_path: Path) -> None:
    env_key = tmp_path / "env.key"
    env_key.write_text("00\n")
    done = subprocess.run(
        svctunnel_cmd("agent"),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SVCTUNNEL_KEY_FILE": str(env_key)},
    )
    assert done.returncode == 2
    assert str(env_key) in done.stderr and "too short" in done.stderr


@pytest.mark.parametrize("unknown", ["zzzzzz", "../../etc", new_run_id()])
def test_lab_down_of_an_unknown_run_is_a_usage_error(unknown: str) -> None:
    """Nothing is touched: not the labs there are (a command that fell back to 'all labs' would
    remove this one's record)."""
    other = Run.new()
    other.write("lab.json", {"block": 1, "port": 5533, "rewrite_ports": True})
    try:
        done = run_cli("lab", "down", "--run", unknown)
        assert done.returncode == 2, done
        assert f"no lab with run id {unknown}" in done.stderr and "lab status" in done.stderr
        assert (other.dir / "lab.json").exists()
    finally:
        other.remove()


# -- the agent in a network namespace of its own ------------------------------------------------------------


@pytest.fixture
def agent_netns(run: Run) -> Iterator[str]:
    """An empty network namespace for one agent process, removed afterwards."""
    name = names.netns_name(run.id, "agent")
    netns.create(name)
    netns.run(name, ["ip", "link", "set", "lo", "up"])
    yield name
    netns.remove(name)


@pytest.mark.root
@pytest.mark.parametrize(("value", "host_network"), [("0", False), ("false", False), ("1", True), ("yes", True)])
def test_host_network_variable_is_a_boolean(
    agent_netns: str, good_key: Path, tmp_path: Path, value: str, host_network: bool
) -> None:
    """SVCTUNNEL_HOST_NETWORK=0 is off (it used to be bool("0"), on). In node mode the agent's port
    filter lets handshake datagrams through, so that the node's conntrack sees them; elsewhere not."""
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        environment = {"PATH": os.environ["PATH"], "SVCTUNNEL_KEY_FILE": str(good_key), "SVCTUNNEL_HOST_NETWORK": value}
        argv = ["ip", "netns", "exec", agent_netns, sys.executable, "-m", "pytest_svctunnel", "agent"]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_until(lambda: "listening on UDP port" in log.read_text() or proc.poll() is not None, "the agent listening")
        assert proc.poll() is None, log.read_text()
        assert f"host-network={host_network}" in log.read_text()
        ruleset = netns.run(agent_netns, ["nft", "list", "ruleset"])
        accepting = [line for line in ruleset.splitlines() if line.strip().endswith(" accept") and "policy" not in line]
        assert bool(accepting) is host_network, ruleset
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.root
def test_agent_with_a_missing_underlay_device_says_so_in_one_line(agent_netns: str, good_key: Path) -> None:
    argv = ["ip", "netns", "exec", agent_netns, sys.executable, "-m", "pytest_svctunnel", "agent"]
    env = {"PATH": os.environ["PATH"], "SVCTUNNEL_KEY_FILE": str(good_key)}
    done = subprocess.run([*argv, "--underlay-dev", "ens3"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "does not exist" in line]
    assert len(errors) == 1 and "--underlay-dev" in errors[0], done.stderr
    assert netns.run(agent_netns, ["nft", "list", "ruleset"]).strip() == "", "the agent touched its namespace"
